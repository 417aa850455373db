"""SAE neuron-zeroing edit (DeBiasLens), its compiler and its literal reference hook.

``mode="reconstruct"`` (paper): ``h' = (1-a) h + a (f'(h) @ W_dec + b_dec)``, ``f'`` = latents with
the chosen neurons set to ``v``. Cost: a full SAE encode + decode per edited token.

``v`` is one number for every chosen neuron (0: DeBiasLens' zeroing) or one number per neuron (e.g. each
neuron's group-balanced mean activation: mean ablation). Either way ``v`` only adds the constant
``a * sum_s v_s W_dec[s]``, so it folds into the compiled bias and the graph is the same.

``mode="residual"``: ``h' = h - a * sum_s (f_s(h) - v) W_dec[s]``. Keeps the SAE's reconstruction
error, so only the chosen neurons' contribution changes. For threshold/ReLU SAEs ``f_s`` depends
only on encoder column ``s``, so the compiled module holds ``|S|`` columns: O(d * |S|) per token.
Top-k SAEs need the full encode to know whether ``s`` made the top k.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ...adapters import ModelAdapter, adapter_for
from ...core.choices import SAE_MODES
from ...core.errors import ConfigError, ShapeError, check_finite
from ...core.model_match import check_made_for, fingerprint_record, record_of
from ...core.sites import Site
from ...runtime import FusedSAEEdit
from ...sae.model import SAEConfig, SparseAutoencoder
from ..base import EditConfig, register_edit

MODES = SAE_MODES


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SAEEdit(EditConfig):
    """Zero (or set to ``value``) chosen SAE latents at one site and mix with weight ``alpha``.

    ``value``: one number for all ``neurons``, or a list with one number per neuron (same order)."""

    kind = "sae"

    sae: SparseAutoencoder | None = None
    neurons: list[int] = field(default_factory=list)
    value: float | list[float] = 0.0
    alpha: float = 0.6
    mode: str = "reconstruct"
    prune: bool = True  # apply only at the positions that reach the tower output
    model: str | None = None  # provenance: the model id the edit was made for
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"SAE edit mode {self.mode!r} unknown; expected one of {', '.join(MODES)}")
        if not _is_number(self.alpha):
            raise ConfigError(f"SAE edit alpha must be a number, got {self.alpha!r}")
        a = float(self.alpha)
        if not 0.0 <= a <= 1.0:  # also rejects NaN
            raise ConfigError(f"SAE edit alpha (a) must be in [0, 1], got {self.alpha}")
        per_neuron = isinstance(self.value, (list, tuple))
        values = list(self.value) if per_neuron else [self.value]
        if not all(_is_number(v) for v in values):
            raise ConfigError(f"SAE edit value must be a number or a list of numbers (one per neuron), got {str(self.value)[:60]!r}")
        if not all(math.isfinite(float(v)) for v in values):
            raise ConfigError(f"SAE edit value (v) must be finite, got {str(self.value)[:60]}")
        self.value = [float(v) for v in values] if per_neuron else float(self.value)
        if isinstance(self.neurons, (str, bytes)) or not all(isinstance(n, int) and not isinstance(n, bool)
                                                              for n in self.neurons):
            raise ConfigError(f"SAE edit neurons must be a list of integers, got {self.neurons!r}")
        self.neurons = [int(n) for n in self.neurons]
        if not self.neurons:
            raise ConfigError("SAE edit needs at least one neuron")
        dup = sorted({n for n in self.neurons if self.neurons.count(n) > 1})
        if dup:
            raise ConfigError(f"SAE edit neurons are duplicated: {dup}")
        if per_neuron and len(self.value) != len(self.neurons):
            raise ConfigError(f"SAE edit has {len(self.value)} values for {len(self.neurons)} neurons (one per neuron, same order)")
        if self.sae is not None:
            bad = [n for n in self.neurons if not 0 <= n < self.sae.num_latents]
            if bad:
                raise ConfigError(f"SAE edit neurons {bad} out of range: the SAE has {self.sae.num_latents} latents (0..{self.sae.num_latents - 1})")

    def values(self) -> torch.Tensor:
        """``v`` per chosen neuron, float64 ``[len(neurons)]`` (a single number repeated)."""
        if isinstance(self.value, list):
            return torch.tensor(self.value, dtype=torch.float64)
        return torch.full((len(self.neurons),), float(self.value), dtype=torch.float64)

    def prune_positions(self) -> bool:
        return self.prune

    def validate(self, adapter: ModelAdapter) -> Site:
        site = super().validate(adapter)
        if self.sae is None:
            raise ConfigError("SAE edit has no SAE")
        width = adapter.width(site.tower)
        if self.sae.d_in != width:
            raise ShapeError(f"SAE width {self.sae.d_in} does not match site {site.name} width {width}")
        # same width is not the same place: an SAE trained at another site, tower or model family computes nonsense
        check_made_for("the SAE", record_of(self.sae.cfg.metadata), adapter, site)
        check_made_for("the edit", fingerprint_record(self.provenance), adapter)
        return site

    # ----- serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "neurons": self.neurons, "value": self.value, "alpha": self.alpha,
                "mode": self.mode, "prune": self.prune, "model": self.model, "provenance": self.provenance,
                "sae_config": asdict(self.sae.cfg)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"sae.{k}": v for k, v in self.sae.state_tensors().items()}

    @classmethod
    def from_saved(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SAEEdit":
        cfg = dict(cfg)
        try:
            sae_cfg = SAEConfig(**cfg.pop("sae_config"))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"edit config has a bad or missing sae_config: {exc}") from None
        sae = SparseAutoencoder.from_tensors(sae_cfg, {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        try:
            return cls(sae=sae, **cfg)
        except TypeError as exc:
            raise ConfigError(f"bad SAE edit config: {exc}") from None


@register_edit(SAEEdit)
@torch.no_grad()
def compile_sae_edit(edit: SAEEdit, adapter: ModelAdapter, site: Site) -> FusedSAEEdit:
    """Fold neurons, ``a``, ``v`` and ``b_dec`` into constants (float64, then checked finite)."""
    sae = edit.sae
    a, v = float(edit.alpha), edit.values()
    W_enc, b_enc = sae.W_enc.double(), sae.b_enc.double()
    W_dec, b_dec = sae.W_dec.double(), sae.b_dec.double()
    thr = sae.threshold.double()
    S = torch.tensor(edit.neurons, dtype=torch.long)
    F = sae.num_latents
    topk = sae.cfg.k if sae.cfg.activation == "topk" else 0
    if sae.cfg.activation == "relu":
        thr = torch.zeros_like(thr)
    thr = thr.clamp_min(0.0)  # relu then threshold == one compare against max(thr, 0)
    b_enc_eff = b_enc - b_dec @ W_enc  # (x - b_dec) @ W + b  ==  x @ W + (b - b_dec @ W)
    v_term = v @ W_dec[S]  # sum_s v_s W_dec[s]
    if edit.mode == "reconstruct":
        keep_mask = torch.ones(F, dtype=torch.bool)
        keep_mask[S] = False
        if topk:  # top-k needs every latent for the cut; zero the chosen rows instead of dropping
            cols, W_out = torch.arange(F), W_dec * keep_mask[:, None].double()
        else:
            cols = keep_mask.nonzero().flatten()
            W_out = W_dec[cols]
        mod = FusedSAEEdit(sae.d_in, len(cols), keep=1.0 - a, topk=topk, per_latent_threshold=thr.dim() == 1)
        mod.W_enc.copy_(W_enc[:, cols])
        mod.b_enc.copy_(b_enc_eff[cols])
        mod.threshold.copy_(thr[cols] if thr.dim() == 1 else thr)
        mod.W_dec.copy_(a * W_out)
        mod.bias.copy_(a * (b_dec + v_term))
    else:
        if topk:
            cols, select = torch.arange(F), S
        else:
            cols, select = S, torch.arange(len(S))
        mod = FusedSAEEdit(sae.d_in, len(cols), keep=1.0, topk=topk, n_select=len(S), per_latent_threshold=thr.dim() == 1)
        mod.W_enc.copy_(W_enc[:, cols])
        mod.b_enc.copy_(b_enc_eff[cols])
        mod.threshold.copy_(thr[cols] if thr.dim() == 1 else thr)
        mod.select.copy_(select)
        mod.W_dec.copy_(-a * W_dec[S])
        mod.bias.copy_(a * v_term)
    for name, buf in mod.state_dict().items():
        check_finite(f"compiled SAE edit {name}", buf)
    return mod.float().eval()


def reference_formula(edit: SAEEdit, h: torch.Tensor) -> torch.Tensor:
    """The edit exactly as written in the paper / issue, on every token (tests compare against it)."""
    sae, a, v = edit.sae, float(edit.alpha), edit.values().float()
    f = sae.encode(h.float())
    S = torch.tensor(edit.neurons, dtype=torch.long)
    if edit.mode == "reconstruct":
        f2 = f.clone()
        f2[..., S] = v
        out = (1 - a) * h.float() + a * sae.decode(f2)
    else:
        out = h.float() - a * (f[..., S] - v) @ sae.W_dec[S]
    return out.to(h.dtype)


def reference_hook(model: "nn.Module | ModelAdapter", edit: SAEEdit):
    """Register a plain forward hook applying :func:`reference_formula` at the edit's site."""
    return _output_hook(model, edit, lambda h: reference_formula(edit, h))


def reconstruction_only_hook(model: "nn.Module | ModelAdapter", edit: SAEEdit):
    """The control of a reconstruct edit: ``(1-a) h + a SAE.decode(SAE.encode(h))`` at its site, every token,
    no latent changed. What part of the edit's effect comes from swapping in the SAE's reconstruction (its error
    term dropped) rather than from the chosen neurons. A residual edit has no such part (it would be the identity).
    Returns the hook's handle (``remove()`` undoes it)."""
    if edit.mode != "reconstruct":
        raise ConfigError(f"a reconstruction-only control needs a reconstruct edit, not {edit.mode!r} "
                          "(residual mode keeps the reconstruction error: no latent changed is the identity)")
    sae, a = edit.sae, float(edit.alpha)
    return _output_hook(model, edit, lambda h: ((1 - a) * h.float() + a * sae.decode(sae.encode(h.float()))).to(h.dtype))


def _output_hook(model: "nn.Module | ModelAdapter", edit: SAEEdit, formula):
    adapter = adapter_for(model)
    site = edit.validate(adapter)
    module = adapter.model.get_submodule(adapter.site_module_path(site))

    def hook(mod, args, out):
        with torch.no_grad():
            if isinstance(out, tuple):
                return (formula(out[0]),) + tuple(out[1:])
            return formula(out)

    # prepend: edit before any other hook on the module reads the output (transformers 5 records hidden states with hooks)
    return module.register_forward_hook(hook, prepend=True)
