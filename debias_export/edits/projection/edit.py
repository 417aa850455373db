"""Residual-projection edit (RES-FAIR style): erase a bias subspace, optionally amplify fair directions.

The map on an activation ``o`` (column form) is

    o' = o - b * A (o - mu) + g * F F^T o,      A = out_dirs @ in_dirs^T

with ``A`` the LEACE oblique projection (or the orthogonal projection onto the group-mean
differences), ``b`` the strength (1 = exact erasure), ``F`` orthonormal fair directions orthogonal
to the range of ``A`` and ``g`` their amplification. It is affine, so it can run two ways:

- patched (:func:`~debias_export.edits.apply_edits`) at any site as the runtime ``LowRankEdit``
  ``h + (h @ U) @ V + c`` of rank ``r + m`` (O(d * (r + m)) per token), combinable with SAE edits;
- folded (:func:`fold_projection`) into the weights of the Linear that writes the activation, which
  leaves a stock architecture (plain ``from_pretrained`` loads it, ONNX has the same operators).
  ``y = W x + bias`` becomes ``y' = (M W) x + (M bias + c)`` with ``M = I - bA + gFF^T``, ``c = bA mu``.

Fold modes (``mode=``):

- ``"site"``: the edit's ``attn_out``/``mlp_out`` site (HF CLIP ``self_attn.out_proj`` / ``mlp.fc2``).
- ``"output"``: the tower's final projection (``visual_projection`` / ``text_projection``); the edit
  then lives in the embedding space (its width is the projection dim) and only the site's tower
  is used. These Linears have no bias: a nonzero mean term ``c`` is refused unless the edit is built
  with ``center=False`` (``c = 0``; the zero cross-covariance guarantee is unchanged because
  covariance ignores constant shifts, embeddings just move by ``-bA mu``) or ``add_bias=True``
  (adds a bias -> no longer a stock checkpoint).
- ``"every_writer"``: ``M`` goes into every module that writes the tower's residual stream (all
  attention and MLP outputs, plus the token and position embeddings of text towers) and ``c`` into
  block 0's attention bias only, so each token gets it once. The stream is a sum of writes, so
  with ``b = 1`` its ``A``-component is pinned to ``A mu`` at every layer. CLIP's vision stream
  starts at ``pre_layrnorm(embeddings)``: a LayerNorm output cannot absorb ``M`` (``M diag(gamma)``
  is not diagonal), so for image towers the initial stream is left as is and only the blocks'
  writes are erased; the handle lists it under ``skipped``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...adapters import ModelAdapter, adapter_for
from ...data.datasets import labelled_indices
from ...core.errors import ConfigError, DebiasError, ShapeError, check_finite
from ...core.model_match import FINGERPRINT_KEY, check_made_for, fingerprint_record
from ...analysis.leace import ErasureSubspace, fair_directions, fit_eraser
from ...runtime import EDIT_ATTR, LowRankEdit
from ...core.sites import Site
from ..base import EditConfig, register_edit

FOLD_MODES = ("site", "output", "every_writer")
EXPORT_FOLDS = ("none", *FOLD_MODES)  # what an edit records for export: "none" = patch (fused LowRankEdit)


@dataclass
class ProjectionEdit(EditConfig):
    """Erase ``A = out_dirs @ in_dirs^T`` towards ``mu`` with strength ``b``; amplify ``F`` by ``g``."""

    kind = "projection"

    in_dirs: torch.Tensor | None = None  # [d, r]
    out_dirs: torch.Tensor | None = None  # [d, r]
    mu: torch.Tensor | None = None  # [d]
    fair: torch.Tensor | None = None  # [d, m], orthonormal, orthogonal to range(A)
    strength: float = 1.0  # b
    amplify: float = 0.0  # g
    center: bool = True  # False drops the mean term: a linear map (foldable into bias-free Linears)
    prune: bool = True  # at the consumed block, patch only the positions that reach the output
    method: str = "leace"
    fold: str = "none"  # how `debias-export export` applies it: patched ("none") or folded with this fold_projection mode
    model: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("strength", "amplify"):
            v = float(getattr(self, name))
            if not torch.isfinite(torch.tensor(v)):
                raise ConfigError(f"projection edit {name} must be finite, got {v}")
            setattr(self, name, v)
        if self.fold not in EXPORT_FOLDS:
            raise ConfigError(f"unknown fold mode {self.fold!r}; expected one of {', '.join(EXPORT_FOLDS)}")
        if self.in_dirs is None and self.fair is None:
            raise ConfigError("projection edit needs a bias subspace (in_dirs/out_dirs) or fair directions")
        for name in ("in_dirs", "out_dirs", "mu", "fair"):
            t = getattr(self, name)
            if t is not None:
                check_finite(f"projection edit {name}", t)
        d = None
        if self.in_dirs is not None:
            if self.out_dirs is None or self.mu is None:
                raise ConfigError("projection edit: in_dirs needs out_dirs and mu")
            if self.in_dirs.dim() != 2 or self.in_dirs.shape != self.out_dirs.shape:
                raise ShapeError(f"projection edit in_dirs {tuple(self.in_dirs.shape)} and out_dirs {tuple(self.out_dirs.shape)} must both be [d, r]")
            d = self.in_dirs.shape[0]
            if tuple(self.mu.shape) != (d,):
                raise ShapeError(f"projection edit mu has shape {tuple(self.mu.shape)}, expected ({d},)")
            # A = out_dirs @ in_dirs.T must be a projection (A @ A = A), i.e. in_dirs.T @ out_dirs = I;
            # anything else (e.g. directions scaled by 1e30) is not an erasure and would blow up at run time.
            gram = self.in_dirs.double().T @ self.out_dirs.double()
            eye = torch.eye(gram.shape[0], dtype=torch.float64)
            if not bool(torch.isfinite(gram).all()) or (gram - eye).abs().max() > 1e-3:
                raise ConfigError("projection edit in_dirs/out_dirs do not form a projection (in_dirs.T @ out_dirs != I)")
        if self.fair is not None:
            if self.fair.dim() != 2 or (d is not None and self.fair.shape[0] != d):
                raise ShapeError(f"projection edit fair directions have shape {tuple(self.fair.shape)}, expected [{d or 'd'}, m]")
            F = self.fair.double()
            if (F.T @ F - torch.eye(F.shape[1], dtype=torch.float64)).abs().max() > 1e-4:
                raise ConfigError("projection edit fair directions are not orthonormal (use leace.fair_directions)")
            if self.in_dirs is not None and (F.T @ self.out_dirs.double()).abs().max() > 1e-4 * self.out_dirs.double().abs().max():
                raise ConfigError("projection edit fair directions overlap the bias subspace (use leace.fair_directions)")

    # ----- construction --------------------------------------------------------------------------
    @classmethod
    def from_subspace(cls, site: str, subspace: ErasureSubspace, fair: torch.Tensor | None = None,
                      **kwargs: Any) -> "ProjectionEdit":
        """Edit erasing ``subspace``; raw ``fair`` directions are orthonormalised against it."""
        F = fair_directions(fair, subspace) if fair is not None else None
        if F is not None and F.shape[1] == 0:
            F = None
        return cls(site=site, in_dirs=subspace.in_dirs, out_dirs=subspace.out_dirs, mu=subspace.mu, fair=F,
                   method=subspace.method, **kwargs)

    @classmethod
    def fit(cls, site: str, activations: torch.Tensor, labels, method: str = "leace",
            fair: torch.Tensor | None = None, **kwargs: Any) -> "ProjectionEdit":
        """Fit the bias subspace on labelled activations ``[n, d]`` read at ``site``."""
        return cls.from_subspace(site, fit_eraser(activations, labels, method=method), fair=fair, **kwargs)

    # ----- the map -------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return int((self.in_dirs if self.in_dirs is not None else self.fair).shape[0])

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.width
        z = torch.zeros(d, 0, dtype=torch.float64)
        I = self.in_dirs.double() if self.in_dirs is not None else z
        O = self.out_dirs.double() if self.out_dirs is not None else z
        F = self.fair.double() if self.fair is not None else z
        mu = self.mu.double() if (self.mu is not None and self.center) else torch.zeros(d, dtype=torch.float64)
        return I, O, F, mu

    def matrix(self) -> torch.Tensor:
        """``M = I - bA + gFF^T`` (float64, column form)."""
        I, O, F, _ = self._parts()
        return torch.eye(self.width, dtype=torch.float64) - self.strength * O @ I.T + self.amplify * F @ F.T

    def constant(self) -> torch.Tensor:
        """``c = b A mu`` (zero when ``center=False``)."""
        I, O, _, mu = self._parts()
        return self.strength * O @ (I.T @ mu)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U [d, r+m]``, ``V [r+m, d]``, ``c [d]`` with ``o' = o + (o @ U) @ V + c`` (float64)."""
        I, O, F, _ = self._parts()
        U = torch.cat([I, F], dim=1)
        V = torch.cat([-self.strength * O.T, self.amplify * F.T], dim=0)
        return U, V, self.constant()

    def prune_positions(self) -> bool:
        return self.prune

    def validate(self, adapter: ModelAdapter) -> Site:
        site = super().validate(adapter)
        width = adapter.width(site.tower)
        if self.width != width:
            raise ShapeError(f"projection edit width {self.width} does not match site {site.name} width {width}")
        check_made_for("the projection edit", fingerprint_record(self.provenance), adapter)
        return site

    # ----- serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "strength": self.strength, "amplify": self.amplify, "center": self.center,
                "prune": self.prune, "method": self.method, "fold": self.fold, "model": self.model, "provenance": self.provenance,
                "width": self.width, "rank": 0 if self.in_dirs is None else int(self.in_dirs.shape[1]),
                "fair_rank": 0 if self.fair is None else int(self.fair.shape[1])}

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("in_dirs", "out_dirs", "mu", "fair")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @classmethod
    def from_saved(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "ProjectionEdit":
        cfg = {k: v for k, v in cfg.items() if k not in ("width", "rank", "fair_rank")}
        unknown = set(tensors) - {"in_dirs", "out_dirs", "mu", "fair"}
        if unknown:
            raise ConfigError(f"projection edit weights have unexpected tensors: {sorted(unknown)}")
        try:
            return cls(**cfg, **tensors)
        except TypeError as exc:
            raise ConfigError(f"bad projection edit config: {exc}") from None


@register_edit(ProjectionEdit)
@torch.no_grad()
def compile_projection_edit(edit: ProjectionEdit, adapter: ModelAdapter, site: Site) -> LowRankEdit:
    """Low-rank runtime module; factors computed in float64, checked finite, then cast."""
    U, V, c = edit.lowrank_factors()
    mod = LowRankEdit(U.shape[0], U.shape[1])
    mod.U.copy_(U)
    mod.V.copy_(V)
    mod.c.copy_(c)
    for name, buf in mod.state_dict().items():
        check_finite(f"compiled projection edit {name}", buf)
    return mod.float().eval()


def reference_map(edit: ProjectionEdit, o: torch.Tensor, linear_only: bool = False) -> torch.Tensor:
    """The map exactly as written, ``o - b A (o - mu) + g F F^T o`` with dense ``A`` (tests use it)."""
    I, O, F, mu = edit._parts()
    A = O @ I.T
    od = o.double()
    out = od - edit.strength * (od - (0 if linear_only else mu)) @ A.T + edit.amplify * od @ F @ F.T
    return out.to(o.dtype)


# ----- folding ----------------------------------------------------------------------------------
class FoldHandle:
    """Undo information of :func:`fold_projection`: original parameters (and replaced modules)."""

    def __init__(self, adapter: ModelAdapter, mode: str):
        self.adapter = adapter
        self.mode = mode
        self.folded: list[str] = []  # module paths whose weights now include the map
        self.skipped: list[str] = []  # stream writers that cannot absorb it (documented per mode)
        self._saved: list[tuple[nn.Module, str, torch.Tensor | None]] = []
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []

    def describe(self) -> dict[str, Any]:
        """JSON record of what was folded where (for manifests)."""
        return {"mode": self.mode, "folded": list(self.folded), "skipped": list(self.skipped),
                "stock": not self._replaced}

    def _save(self, module: nn.Module, name: str) -> None:
        p = getattr(module, name)
        self._saved.append((module, name, None if p is None else p.detach().clone()))

    def remove(self) -> nn.Module:
        """Restore the original weights exactly."""
        with torch.no_grad():
            for module, name, value in reversed(self._saved):
                if value is not None:
                    getattr(module, name).copy_(value)
            for parent, child, original in reversed(self._replaced):
                setattr(parent, child, original)
        self._saved.clear()
        self._replaced.clear()
        self.folded.clear()
        return self.adapter.model


def _module(adapter: ModelAdapter, path: str) -> nn.Module:
    mod = adapter.model.get_submodule(path)
    if EDIT_ATTR in mod._modules:
        raise DebiasError(f"module {path} is patched by apply_edits; fold before patching or remove the patch first")
    return mod


def _fold_linear(handle: FoldHandle, path: str, M: torch.Tensor, c: torch.Tensor | None, add_bias: bool = False) -> None:
    """``W <- M W``, ``bias <- M bias + c`` in float64 (``c`` None: the linear part only)."""
    lin = _module(handle.adapter, path)
    if not isinstance(lin, nn.Linear):
        raise DebiasError(f"cannot fold into {path}: it is a {type(lin).__name__}, not a Linear")
    if lin.out_features != M.shape[0]:
        raise ShapeError(f"projection edit width {M.shape[0]} does not match {path} output width {lin.out_features}")
    has_c = c is not None and bool(c.abs().max() > 0)
    if lin.bias is None and has_c:
        if not add_bias:
            raise ConfigError(f"{path} has no bias but the edit has a mean term b*A*mu; build the edit with "
                              f"center=False (linear, same zero cross-covariance) or fold with add_bias=True (not stock)")
        new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            new.bias.zero_()
        parent_name, _, child = path.rpartition(".")
        parent = handle.adapter.model.get_submodule(parent_name) if parent_name else handle.adapter.model
        handle._replaced.append((parent, child, lin))
        setattr(parent, child, new)
        lin = new
    W = M @ lin.weight.double()
    check_finite(f"folded weight of {path}", W)
    handle._save(lin, "weight")
    lin.weight.copy_(W.to(lin.weight.dtype))
    if lin.bias is not None:
        b = M @ lin.bias.double() + (c if has_c else 0)
        check_finite(f"folded bias of {path}", b)
        handle._save(lin, "bias")
        lin.bias.copy_(b.to(lin.bias.dtype))
    handle.folded.append(path)


def _fold_embedding(handle: FoldHandle, path: str, M: torch.Tensor) -> None:
    """Embedding rows are row vectors: ``E <- E M^T``."""
    emb = _module(handle.adapter, path)
    E = emb.weight.double() @ M.T
    check_finite(f"folded embedding {path}", E)
    handle._save(emb, "weight")
    emb.weight.copy_(E.to(emb.weight.dtype))
    handle.folded.append(path)


def _check_no_layer_scale(adapter: ModelAdapter, tower: str, parts) -> None:
    """A layer scale after the write Linear (open_clip ``ls_1``/``ls_2``) would need ``M`` folded past it."""
    for hook, lin in ((parts.attn_write, parts.attn_out), (parts.mlp_write, parts.mlp_out)):
        if hook is None or hook == lin:
            continue
        for block in adapter.blocks(tower):
            if not isinstance(block.get_submodule(hook), nn.Identity):
                raise ConfigError(f"blocks of the {tower} tower scale their writes ({hook}) after {lin}; folding into "
                                  f"{lin} would be inexact - patch the edit with apply_edits instead")


@torch.no_grad()
def fold_projection(model: "nn.Module | ModelAdapter", edit: ProjectionEdit, mode: str = "site",
                    add_bias: bool = False) -> FoldHandle:
    """Fold ``edit`` into the weights of ``model`` in place (see the module docstring for ``mode``).

    Returns a :class:`FoldHandle`; ``handle.remove()`` restores the original weights exactly.
    """
    from ...adapters.anatomy import check_output_fold, tower_parts

    adapter = adapter_for(model)
    if mode not in FOLD_MODES:
        raise ConfigError(f"unknown fold mode {mode!r}; expected one of {', '.join(FOLD_MODES)}")
    check_made_for("the projection edit", fingerprint_record(edit.provenance), adapter)
    site = Site.parse(edit.site)
    adapter.check_tower(site.tower)
    handle = FoldHandle(adapter, mode)
    M, c = edit.matrix(), edit.constant()
    try:
        if mode == "site":
            site = edit.validate(adapter)
            if site.kind == "resid_post":
                raise ConfigError(f"site {site.name} is a block output, not a Linear's output; fold at attn_out/mlp_out, "
                                  f"use mode='every_writer', or patch it with apply_edits")
            if not adapter.site_is_consumed(site):
                warnings.warn(f"site {site.name} lies after the consumed layer; folding it does not change the output")
            # the Linear inside the write (open_clip's attn site is the MHA; its out_proj is the Linear)
            parts = tower_parts(adapter, site.tower)
            _check_no_layer_scale(adapter, site.tower, parts)
            sub = parts.attn_out if site.kind == "attn_out" else parts.mlp_out
            _fold_linear(handle, f"{adapter.block_path(site)}.{sub}", M, c)
        elif mode == "output":
            parts = tower_parts(adapter, site.tower)
            _fold_linear(handle, check_output_fold(parts, site.tower), M, c, add_bias=add_bias)
        else:
            parts = tower_parts(adapter, site.tower)
            if not parts.sum_of_writes:
                raise ConfigError(f"the {site.tower} tower of family {adapter.family!r} is post-LN (LayerNorm after each "
                                  "residual add): its stream is not a sum of writes, so every-writer folding cannot erase it")
            _check_no_layer_scale(adapter, site.tower, parts)
            width = adapter.width(site.tower)
            if edit.width != width:
                raise ShapeError(f"projection edit width {edit.width} does not match tower {site.tower!r} width {width}")
            for path in parts.embedding_writers:
                _fold_embedding(handle, path, M)
            if parts.stream_start is not None:
                handle.skipped.append(parts.stream_start)
            blocks = adapter.blocks_path(site.tower)
            for layer in range(adapter.num_layers(site.tower)):
                for j, sub in enumerate((parts.attn_out, parts.mlp_out)):
                    # c once per token: block 0's attention write carries it, every other writer gets M only
                    _fold_linear(handle, f"{blocks}.{layer}.{sub}", M, c if (layer == 0 and j == 0) else None)
    except Exception:
        handle.remove()
        raise
    return handle


# ----- fitting from a capture and applying saved edits ------------------------------------------
def capture_fit_activations(store) -> tuple[torch.Tensor, str]:
    """Per-input activations of a capture: the pooled output token when the family has one, else the token mean."""
    has_output = bool(store.shards) and "output_token_index" in store.load_shard(0)
    return (store.output_activations(), "output") if has_output else (store.mean_activations(), "mean")


def fit_from_capture(store, column: str, method: str = "leace", fold: str = "none",
                     adapter: ModelAdapter | None = None, fair: torch.Tensor | None = None,
                     **kwargs: Any) -> ProjectionEdit:
    """Fit a :class:`ProjectionEdit` on an :class:`~debias_export.capture.store.ActivationStore` labelled by ``column``.

    ``fold="output"`` fits in the embedding space instead: the capture must be the output token at the
    tower's consumed block, mapped through the tower's final norm and projection (needs ``adapter``).
    """
    from ...adapters.anatomy import check_output_fold, tower_parts

    if fold not in EXPORT_FOLDS:
        raise ConfigError(f"unknown fold mode {fold!r}; expected one of {', '.join(EXPORT_FOLDS)}")
    site = Site.parse(store.site)
    if fold == "site" and site.kind == "resid_post":
        raise ConfigError(f"fold=site needs an attn_out/mlp_out capture (a Linear's output); {store.path} is at {store.site}")
    labels = store.labels(column)
    acts, which = capture_fit_activations(store)
    # rows without a label are skipped, as probing does (a blank is not a third group) and counted
    keep, n_rows = labelled_indices(labels), len(labels)
    if len(keep) < n_rows:
        acts, labels = acts[keep], [labels[i] for i in keep]
    if fold == "output":
        if adapter is None:
            raise ConfigError("fold=output fits in the embedding space and needs the model (--model)")
        site = adapter.resolve_site(site)
        consumed = adapter.consumed_layer(site.tower)
        if which != "output" or site.kind != "resid_post" or site.layer != consumed:
            raise ConfigError(f"fold=output needs a capture of the output token at {site.tower}.{consumed}.resid_post "
                              f"(what the projection reads); {store.path} is at {store.site} ({which} activations)")
        parts = tower_parts(adapter, site.tower)
        proj = check_output_fold(parts, site.tower)
        if kwargs.get("center", True) and getattr(adapter.model.get_submodule(proj), "bias", None) is None:
            # checked before fitting: a centered edit has a mean term b*A*mu that a bias-free Linear cannot hold
            raise ConfigError(f"fold=output: {proj} has no bias, so a centered edit's mean term cannot fold into it; "
                              f"fit it with center off (--no-center / edit.center: false)")
        if parts.final_norm is None:
            raise ConfigError(f"the {site.tower} tower has no plain final norm before its projection; fold=output cannot be fitted")
        m, ref = adapter.model, next(adapter.model.parameters())
        with torch.no_grad():  # the tower's own tail: final norm, then the projection the fold targets
            acts = m.get_submodule(proj)(m.get_submodule(parts.final_norm)(acts.to(ref.device, ref.dtype))).float().cpu()
        which = "embedding"
    edit = ProjectionEdit.fit(site.name, acts, labels, method=method, fair=fair, fold=fold, **kwargs)
    edit.provenance = {"capture": str(store.path), "column": column, "activations": which,
                       "inputs": int(acts.shape[0]), "unlabelled_skipped": n_rows - len(keep),
                       FINGERPRINT_KEY: store.model_record.get(FINGERPRINT_KEY), **edit.provenance}
    return edit


def split_folded(edits: list[EditConfig]) -> tuple[list[ProjectionEdit], list[EditConfig]]:
    """(edits that record a fold mode, edits to patch with apply_edits)."""
    folds = [isinstance(e, ProjectionEdit) and e.fold != "none" for e in edits]
    return [e for e, f in zip(edits, folds) if f], [e for e, f in zip(edits, folds) if not f]


def fold_all(model: "nn.Module | ModelAdapter", edits: list[ProjectionEdit]) -> list[FoldHandle]:
    """Fold each edit with its recorded mode, in order; on failure the earlier folds are undone."""
    handles: list[FoldHandle] = []
    try:
        for edit in edits:
            handles.append(fold_projection(model, edit, mode=edit.fold))
    except Exception:
        for h in reversed(handles):
            h.remove()
        raise
    return handles


def fold_record(edit: ProjectionEdit, handle: FoldHandle) -> dict[str, Any]:
    """JSON record of one fold for export configs/manifests."""
    return {"edit": {"kind": edit.kind, **edit.to_json()}, **handle.describe()}
