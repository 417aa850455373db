"""Fold a :class:`ProjectionEdit` exactly into the weights of the Linears that write the activation.

See :mod:`.config` for the map and the fold modes (``site``, ``output``, ``every_writer``).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...adapters import ModelAdapter, adapter_for
from ...adapters.anatomy import check_output_fold, tower_parts
from ...core.choices import FOLD_MODES
from ...core.errors import ConfigError, DebiasError, ShapeError, check_finite
from ...core.model_match import check_made_for, fingerprint_record
from ...core.modules import swap_module
from ...core.sites import Site
from ...runtime import EDIT_ATTR
from ..base import EditConfig
from .config import ProjectionEdit


class FoldHandle:
    """Undo information of :func:`fold_projection`: original parameters (and replaced modules)."""

    def __init__(self, adapter: ModelAdapter, mode: str):
        self.adapter = adapter
        self.mode = mode
        self.folded: list[str] = []  # module paths whose weights now include the map
        self.skipped: list[str] = []  # stream writers that cannot absorb it (documented per mode)
        self._saved: list[tuple[nn.Module, str, torch.Tensor | None]] = []
        self._replaced: list[tuple[str, nn.Module]] = []  # (module path, original module)

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
            for path, original in reversed(self._replaced):
                swap_module(self.adapter.model, path, original)
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
        handle._replaced.append((path, swap_module(handle.adapter.model, path, new)))
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
