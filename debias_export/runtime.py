"""Runtime modules of a patched encoder. Standalone: imports only torch.

This one file is used three ways, so the graph that runs is the same everywhere:
in-memory patching (``debias_export.edits``), ``debias_export.load_patched``, and copied verbatim
into exported model directories as the ``trust_remote_code`` modeling code's runtime.

A patched site keeps its original module in place (its class, name and weights are untouched). The
site's fused edits live in a :class:`SiteEdit` registered on that module as the child ``debias_edit``
and run as the module's first forward hook (``prepend=True``), so every consumer of the module's
output sees the edited value: the next block, ``output_hidden_states`` (transformers 5 collects it
with its own forward hooks on the layer classes; ours runs before them), user hooks and LLaVA's
``vision_feature_layer``. Wrapping the module instead would hide the edit from any hook on the
original module (transformers 5's hidden-state recorder among them).

Saved patches name a site (``tower.layer.kind``), never a module path: :func:`install_patches`
resolves sites with a caller-given resolver (the adapter, in ``load_patched``) or, for remote code,
with :data:`HF_LAYOUTS`, which lists where each Hugging Face family keeps its blocks under every
supported transformers major.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

EDIT_ATTR = "debias_edit"  # child name of the SiteEdit on a patched module


class FusedSAEEdit(nn.Module):
    """Precomputed SAE neuron-zeroing edit: encode GEMM, threshold, decode GEMM, add.

    ``reconstruct``: ``h' = keep * h + f(h) @ W_dec_eff + bias`` with the chosen neurons' decoder
    rows removed, ``a``/``v`` folded into ``W_dec_eff``/``bias`` and ``b_dec`` folded into ``b_enc``.
    ``residual``: the same graph over only the chosen neurons' encoder columns (threshold/ReLU SAEs),
    giving ``h - a * sum_s (f_s - v) W_dec[s]``. Top-k SAEs keep a full encode to find the k-th value.
    """

    def __init__(self, d_in: int, n_latents: int, keep: float, topk: int = 0, n_select: int = 0,
                 per_latent_threshold: bool = False):
        super().__init__()
        self.keep = float(keep)
        self.topk = int(topk)
        self.n_select = int(n_select)
        self.register_buffer("W_enc", torch.zeros(d_in, n_latents))
        self.register_buffer("b_enc", torch.zeros(n_latents))
        self.register_buffer("threshold", torch.zeros(n_latents if per_latent_threshold else ()))
        n_out = n_select if n_select else n_latents
        self.register_buffer("W_dec", torch.zeros(n_out, d_in))
        self.register_buffer("bias", torch.zeros(d_in))
        if n_select:
            self.register_buffer("select", torch.zeros(n_select, dtype=torch.long))

    def spec(self) -> dict[str, Any]:
        return {"type": "sae", "d_in": self.W_enc.shape[0], "n_latents": self.W_enc.shape[1], "keep": self.keep,
                "topk": self.topk, "n_select": self.n_select, "per_latent_threshold": self.threshold.dim() == 1}

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``z`` of the kept latents."""
        return h @ self.W_enc + self.b_enc

    def active(self, z: torch.Tensor) -> torch.Tensor:
        """Boolean mask of active latents: ``z > threshold``, or top-k's ``(z >= k-th value) & (z > 0)``."""
        if self.topk:
            # k-th largest value per row as the cut: a compare, not a scatter, so it exports cleanly
            kth = torch.topk(z, self.topk, dim=-1).values[..., -1:]
            return (z >= kth) & (z > 0)
        return z > self.threshold  # threshold already clamped at >= 0 (includes ReLU)

    def combine(self, h: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The edited output from the input, its pre-activations and a latent mask (validation can pass its own)."""
        if self.topk:
            f = z * mask.to(z.dtype)
        else:
            # where() saves a pass over [B, T, F] vs z * mask
            f = torch.where(mask, z, torch.zeros((), dtype=z.dtype, device=z.device))
        if self.n_select:
            f = f.index_select(-1, self.select)
        out = f @ self.W_dec + self.bias
        return out + h if self.keep == 1.0 else out + self.keep * h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.encode(h)
        return self.combine(h, z, self.active(z))


class LowRankEdit(nn.Module):
    """Affine low-rank map ``h' = h - (h - mu) @ P + h @ G`` stored as ``h + (h @ U) @ V + c``."""

    def __init__(self, d_in: int, rank: int):
        super().__init__()
        self.register_buffer("U", torch.zeros(d_in, rank))
        self.register_buffer("V", torch.zeros(rank, d_in))
        self.register_buffer("c", torch.zeros(d_in))

    def spec(self) -> dict[str, Any]:
        return {"type": "lowrank", "d_in": self.U.shape[0], "rank": self.U.shape[1]}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + (h @ self.U) @ self.V + self.c


EDIT_TYPES: dict[str, type[nn.Module]] = {"sae": FusedSAEEdit, "lowrank": LowRankEdit}


def build_edit(spec: dict[str, Any]) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("type")
    return EDIT_TYPES[kind](**spec)


# ----- output positions ---------------------------------------------------------------------------
def eos_first(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """HF CLIP text pooling: first EOS, or argmax of ids for legacy ``eos_token_id == 2`` configs."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def ids_argmax(input_ids: torch.Tensor, eos_token_id: int = 0) -> torch.Tensor:
    """open_clip / OpenAI CLIP text pooling: the highest token id (EOT)."""
    return input_ids.to(torch.int).argmax(dim=-1)


POSITION_RULES = {"eos_first": eos_first, "ids_argmax": ids_argmax}


def add_at_positions(h: torch.Tensor, pos: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``h`` with ``edit`` applied to row ``pos[b]`` of each batch item ``b`` (``h``: [B, T, d], ``pos``: [B]).

    Written as ``h + onehot(pos) * (edit(h[pos]) - h[pos])`` rather than a scatter of the edited rows, so
    the last op before the tower's final LayerNorm stays an ``Add``: onnxruntime's transformer optimizer
    fuses Add + LayerNormalization into SkipLayerNormalization, which a ScatterElements in between prevents.
    Equal to the scatter within float rounding on the edited rows (``p + (e - p)``), exactly elsewhere.
    """
    index = pos.view(-1, 1, 1).expand(-1, 1, h.shape[-1])
    picked = h.gather(1, index)
    delta = edit(picked) - picked  # [B, 1, d]
    onehot = (torch.arange(h.shape[1], device=h.device).view(1, -1) == pos.view(-1, 1)).to(h.dtype)  # [B, T]
    return h + onehot.unsqueeze(-1) * delta


class SiteEdit(nn.Module):
    """The fused edits of one site, applied to its module's output (a tensor, or a tuple's first item).

    ``positions``: ``None`` (every token), ``{"static": i}`` (one fixed position, e.g. CLS) or
    ``{"rule": name, "input": "input_ids", "eos_token_id": n}`` (per-row positions computed from the
    tower's inputs by the pre-hook :func:`attach_position_hook` installs on the tower's input module).
    """

    def __init__(self, edits: list[nn.Module], positions: dict | None = None):
        super().__init__()
        self.edits = nn.ModuleList(edits)
        self.positions = positions
        self._dynamic_pos: torch.Tensor | None = None

    def apply_edits(self, h: torch.Tensor) -> torch.Tensor:
        for edit in self.edits:
            h = edit(h)
        return h

    def edit_hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.positions is None or h.dim() != 3:
            return self.apply_edits(h)
        if "static" in self.positions:
            i = int(self.positions["static"])
            return torch.cat([h[:, :i], self.apply_edits(h[:, i:i + 1]), h[:, i + 1:]], dim=1)
        pos = self._dynamic_pos
        if pos is None:
            raise RuntimeError("SiteEdit: dynamic output positions were not set by the tower pre-hook")
        return add_at_positions(h, pos.to(h.device).long(), self.apply_edits)

    def forward(self, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self.edit_hidden(output[0]),) + tuple(output[1:])
        return self.edit_hidden(output)


def _run_site_edit(module: nn.Module, args: Any, output: Any) -> Any:
    return getattr(module, EDIT_ATTR)(output)


class InstalledSiteEdit:
    """A :class:`SiteEdit` installed on a module; :meth:`remove` restores the module exactly."""

    def __init__(self, module: nn.Module, site_edit: SiteEdit, position_module: nn.Module | None = None):
        if EDIT_ATTR in module._modules:
            raise ValueError(f"{type(module).__name__} already carries a debias edit")
        self.module, self.site_edit, self.position_module = module, site_edit, position_module
        module.add_module(EDIT_ATTR, site_edit)
        # prepend: run before any hook already on the module (e.g. a hidden-state recorder)
        self._hooks = [module.register_forward_hook(_run_site_edit, prepend=True)]
        if position_module is not None:
            self._hooks.append(attach_position_hook(position_module, site_edit))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.module._modules.get(EDIT_ATTR) is self.site_edit:
            del self.module._modules[EDIT_ATTR]


def attach_position_hook(position_module: nn.Module, site_edit: SiteEdit):
    """Pre-hook on the tower's input module that computes dynamic output positions from its inputs."""
    rule = POSITION_RULES[site_edit.positions["rule"]]
    name = site_edit.positions.get("input", "input_ids")
    eos = int(site_edit.positions.get("eos_token_id", 0))

    def hook(module, args, kwargs):
        ids = kwargs.get(name)
        if ids is None and args:
            ids = args[0]
        site_edit._dynamic_pos = rule(ids, eos)

    return position_module.register_forward_pre_hook(hook, with_kwargs=True)


def site_edits(model: nn.Module) -> list[tuple[str, SiteEdit]]:
    """``(path of the patched module, SiteEdit)`` for every installed edit, in module order."""
    return [(name.rpartition(".")[0], m) for name, m in model.named_modules() if isinstance(m, SiteEdit)]


# ----- where sites live (remote code: no adapter available) -----------------------------------------
# family -> tower -> candidate paths of the block list (first that exists wins: transformers 4.x keeps a
# CLIPVisionTransformer inside CLIPVisionModel, 5.x flattens it), sub-module per site kind, and the
# module whose inputs hold the token ids for dynamic positions.
_CLIP_SUBS = {"attn_out": "self_attn.out_proj", "mlp_out": "mlp.fc2"}
_BERT_SUBS = {"attn_out": "attention.output.dense", "mlp_out": "output.dense"}
HF_LAYOUTS: dict[str, dict[str, dict[str, Any]]] = {
    "hf_clip": {
        "image": {"blocks": ("vision_model.encoder.layers", "vision_model.vision_model.encoder.layers"),
                  "subs": _CLIP_SUBS, "inputs": ("vision_model",)},
        "text": {"blocks": ("text_model.encoder.layers",), "subs": _CLIP_SUBS, "inputs": ("text_model",)},
    },
    "hf_dual_encoder": {
        "image": {"blocks": ("vision_model.vision_model.encoder.layers", "vision_model.encoder.layers"),
                  "subs": _CLIP_SUBS, "inputs": ("vision_model",)},
        "text": {"blocks": ("text_model.encoder.layer",), "subs": _BERT_SUBS, "inputs": ("text_model",)},
    },
    "llava": {
        "image": {"blocks": ("model.vision_tower.vision_model.encoder.layers", "model.vision_tower.encoder.layers",
                             "vision_tower.vision_model.encoder.layers", "vision_tower.encoder.layers"),
                  "subs": _CLIP_SUBS, "inputs": ("model.vision_tower", "vision_tower")},
    },
}


def _first_path(model: nn.Module, candidates: tuple[str, ...], what: str) -> str:
    for path in candidates:
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise LookupError(f"{type(model).__name__} has no {what} (looked for {', '.join(candidates)})")


def hf_blocks_path(model: nn.Module, family: str, tower: str) -> str:
    """Path of the block list of ``tower`` in a Hugging Face model of ``family``, on any transformers major."""
    layout = HF_LAYOUTS[family][tower]
    return _first_path(model, layout["blocks"], f"{tower} block list")


def hf_resolver(model: nn.Module, family: str) -> Callable[[str], tuple[nn.Module, nn.Module | None]]:
    """Site name -> (module to patch, module for the position pre-hook) from :data:`HF_LAYOUTS`."""

    def resolve(site: str) -> tuple[nn.Module, nn.Module | None]:
        tower, layer, kind = site.split(".")
        layout = HF_LAYOUTS[family][tower]
        path = f"{hf_blocks_path(model, family, tower)}.{int(layer)}"
        if kind != "resid_post":
            path += "." + layout["subs"][kind]
        inputs = model.get_submodule(_first_path(model, layout["inputs"], f"{tower} input module"))
        return model.get_submodule(path), inputs

    return resolve


def install_patches(model: nn.Module, patches: list[dict[str, Any]], tensors: dict[str, torch.Tensor],
                    resolve: Callable[[str], tuple[nn.Module, nn.Module | None]]) -> list[InstalledSiteEdit]:
    """Rebuild saved patches on a freshly loaded base model (used by load_patched and remote code).

    ``patches``: ``[{"site": "image.11.resid_post", "positions": ..., "edits": [spec...]}]``; tensors are
    named ``debias_patches.<i>.<j>.<buffer>``; ``resolve(site) -> (module, position input module)``.
    """
    installed = []
    try:
        for i, patch in enumerate(patches):
            edits = []
            for j, spec in enumerate(patch["edits"]):
                edit = build_edit(spec)
                prefix = f"debias_patches.{i}.{j}."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                edit.load_state_dict(state, strict=True)
                edits.append(edit)
            module, inputs = resolve(patch["site"])
            positions = patch.get("positions")
            dynamic = positions is not None and "rule" in positions
            installed.append(InstalledSiteEdit(module, SiteEdit(edits, positions), inputs if dynamic else None))
    except Exception:
        for item in reversed(installed):
            item.remove()
        raise
    return installed
