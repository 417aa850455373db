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

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ...adapters import ModelAdapter
from ...analysis.leace import ErasureSubspace, fair_directions, fit_eraser
from ...core.choices import EXPORT_FOLDS
from ...core.errors import ConfigError, ShapeError, check_finite
from ...core.model_match import check_made_for, fingerprint_record
from ...core.sites import Site
from ..base import EditConfig


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
            fair: torch.Tensor | None = None, keep: Sequence[Sequence] = (), **kwargs: Any) -> "ProjectionEdit":
        """Fit the bias subspace on labelled activations ``[n, d]`` read at ``site``; ``keep``: other labelings of the
        same inputs whose linear information the erasure must leave intact (LEACE only, see ``fit_leace``)."""
        return cls.from_subspace(site, fit_eraser(activations, labels, method=method, keep=keep), fair=fair, **kwargs)

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
