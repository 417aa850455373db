"""Compile a :class:`ProjectionEdit` to the runtime ``LowRankEdit`` (patched route) and its reference formula."""
from __future__ import annotations

import torch

from ...adapters import ModelAdapter
from ...core.errors import check_finite
from ...core.sites import Site
from ...runtime import LowRankEdit
from ..base import register_edit
from .config import ProjectionEdit


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
