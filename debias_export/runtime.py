"""Runtime modules of a patched encoder. Standalone: imports only torch.

This one file is used three ways, so the graph that runs is the same everywhere:
in-memory patching (``debias_export.edits``), ``debias_export.load_patched``, and copied verbatim
into exported model directories as the ``trust_remote_code`` modeling code's runtime.

A patched block is an :class:`EditedModule` holding the original module as ``base_layer`` and a
list of fused edit modules applied to its output hidden states, optionally only at the token
positions that reach the tower output (output-position pruning).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


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

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = h @ self.W_enc + self.b_enc
        if self.topk:
            # k-th largest value per row as the cut: a compare, not a scatter, so it exports cleanly
            kth = torch.topk(z, self.topk, dim=-1).values[..., -1:]
            f = z * ((z >= kth) & (z > 0)).to(z.dtype)
        else:
            # threshold already clamped at >= 0 (includes ReLU); where() saves a pass over [B, T, F] vs z * mask
            f = torch.where(z > self.threshold, z, torch.zeros((), dtype=z.dtype, device=z.device))
        if self.n_select:
            f = f.index_select(-1, self.select)
        out = f @ self.W_dec + self.bias
        return out + h if self.keep == 1.0 else out + self.keep * h


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


class EditedModule(nn.Module):
    """Wraps ``base_layer`` and applies ``edits`` to its output hidden states (tensor or tuple[0]).

    ``positions``: ``None`` (every token), ``{"static": i}`` (one fixed position, e.g. CLS) or
    ``{"rule": name, "input": "input_ids", "eos_token_id": n}`` (per-row positions computed from the
    tower's inputs by a pre-hook that :func:`attach_position_hook` installs on the tower module).
    """

    def __init__(self, base_layer: nn.Module, edits: list[nn.Module], positions: dict | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.edits = nn.ModuleList(edits)
        self.positions = positions
        self._dynamic_pos: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        # peft-style: attributes the wrapped module's callers expect (e.g. open_clip's
        # ``resblocks[0].get_weight_dtype()``) fall through to ``base_layer``.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

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
            raise RuntimeError("EditedModule: dynamic output positions were not set by the tower pre-hook")
        index = pos.to(h.device).long().view(-1, 1, 1).expand(-1, 1, h.shape[-1])
        picked = h.gather(1, index)
        return h.scatter(1, index, self.apply_edits(picked))

    def forward(self, *args: Any, **kwargs: Any):
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.edit_hidden(out[0]),) + tuple(out[1:])
        return self.edit_hidden(out)


def attach_position_hook(tower_module: nn.Module, wrapper: EditedModule):
    """Pre-hook on the tower module that computes dynamic output positions from its inputs."""
    rule = POSITION_RULES[wrapper.positions["rule"]]
    name = wrapper.positions.get("input", "input_ids")
    eos = int(wrapper.positions.get("eos_token_id", 0))

    def hook(module, args, kwargs):
        ids = kwargs.get(name)
        if ids is None and args:
            ids = args[0]
        wrapper._dynamic_pos = rule(ids, eos)

    return tower_module.register_forward_pre_hook(hook, with_kwargs=True)


def install_patches(model: nn.Module, patches: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> list[EditedModule]:
    """Rebuild saved patches on a freshly loaded base model (used by load_patched and remote code).

    ``patches``: ``[{"module": path, "positions": ..., "hook_module": path|None, "edits": [spec...]}]``;
    tensors are named ``debias_patches.<i>.<j>.<buffer>``.
    """
    wrappers = []
    for i, patch in enumerate(patches):
        edits = []
        for j, spec in enumerate(patch["edits"]):
            edit = build_edit(spec)
            prefix = f"debias_patches.{i}.{j}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            edit.load_state_dict(state, strict=True)
            edits.append(edit)
        parent_name, _, child = patch["module"].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = EditedModule(getattr(parent, child), edits, patch.get("positions"))
        setattr(parent, child, wrapper)
        if patch.get("hook_module") is not None:
            attach_position_hook(model.get_submodule(patch["hook_module"]), wrapper)
        wrappers.append(wrapper)
    return wrappers
