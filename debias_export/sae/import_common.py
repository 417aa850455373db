"""Checked readers shared by the SAE importers (one module per library beside this one).

Every helper raises :class:`DebiasError` (one line, naming the file) instead of a raw exception. Weight
orientation is never guessed from shapes: each importer states the layout's own orientation (e.g. an
``nn.Linear`` weight is ``[out, in]``) and :func:`matrix` checks the shape against it, so a square SAE
(``d == F``) cannot silently come out transposed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError, DebiasError, IntegrityError, ShapeError
from .model import SAEConfig, SparseAutoencoder

log = logging.getLogger("debias_export.sae")

HALF_DTYPES = (torch.float16, torch.bfloat16)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line error naming the file."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DebiasError(f"file not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DebiasError(f"bad JSON in {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise DebiasError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def load_pt(file: Path) -> dict[str, Any]:
    """A ``torch.save``d state dict, read with ``weights_only=True`` (never unpickles arbitrary objects)."""
    if not file.is_file():
        raise DebiasError(f"file not found: {file}")
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad/unsafe files
        raise IntegrityError(f"cannot read {file} as a weights-only state dict: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise DebiasError(f"{file} does not hold a state dict (got {type(obj).__name__})")
    return obj


def safetensors_keys(file: Path) -> set[str]:
    """Tensor names in a safetensors file, reading only its header."""
    from safetensors import safe_open  # the header reader; safetensors is a core dependency

    try:
        with safe_open(str(file), framework="pt") as f:
            return set(f.keys())
    except Exception as exc:  # noqa: BLE001 - corrupt headers raise several types
        raise IntegrityError(f"corrupt or truncated safetensors file {file}: {str(exc).splitlines()[0][:200]}") from None


class Tensors:
    """The tensors of one weights file; :meth:`get` checks presence and dtype and notes half precision."""

    def __init__(self, raw: dict[str, Any], file: Path):
        self.raw, self.file = raw, file
        self.half: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str, ndim: int | None = None) -> torch.Tensor:
        """The tensor as float32; with ``ndim`` (1 or 2) a ShapeError when it is not a vector / matrix."""
        t = self.raw.get(name)
        if t is None:
            have = ", ".join(sorted(map(str, self.raw))) or "none"
            raise DebiasError(f"{self.file} has no tensor {name!r} (has: {have})")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise DebiasError(f"{self.file}: {name!r} is not a float tensor")
        if ndim is not None and t.ndim != ndim:
            raise ShapeError(f"{self.file}: {name} has shape {tuple(t.shape)}, expected a {'vector' if ndim == 1 else 'matrix'}")
        if t.dtype in HALF_DTYPES:
            self.half.add(str(t.dtype).replace("torch.", ""))
        return t.detach().float()

    def warn_if_half(self) -> None:
        """One line when the file was in 16-bit floats: we compute in float32, the library would not."""
        if self.half:
            log.warning("warning: SAE %s is stored in %s; imported as float32 (the library's own half-precision "
                        "forward rounds differently, so its top-k choices can differ)", self.file,
                        "/".join(sorted(self.half)))


def pos_int(value: Any, what: str, file: Path) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{file}: {what} must be a positive integer, got {value!r}")
    return value


def vector(t: torch.Tensor, n: int, name: str, file: Path) -> torch.Tensor:
    if t.ndim != 1 or t.shape[0] != n:
        raise ShapeError(f"{file}: {name} has shape {tuple(t.shape)}, expected ({n},)")
    return t


def matrix(t: torch.Tensor, shape: tuple[int, int], name: str, file: Path) -> torch.Tensor:
    """``t`` with exactly ``shape`` (the layout's documented orientation), else a ShapeError."""
    if tuple(t.shape) != shape:
        raise ShapeError(f"{file}: {name} has shape {tuple(t.shape)}, expected {shape} in this layout")
    return t


def finish(tensors: dict[str, torch.Tensor], activation: str, k: int | None, file: Path, d_in: int | None,
           source: dict[str, Any], thr: torch.Tensor | None = None) -> SparseAutoencoder:
    """Check the site width and threshold, then build the SAE (which checks shapes and finiteness)."""
    d, F = tensors["b_dec"].shape[0], tensors["b_enc"].shape[0]
    if d_in is not None and d != d_in:
        raise ShapeError(f"SAE {file} has width {d} but the site width is {d_in}")
    if thr is not None:
        if tuple(thr.shape) not in ((), (1,), (F,)):
            raise ShapeError(f"{file}: threshold has shape {tuple(thr.shape)}, expected a scalar or ({F},)")
        tensors["threshold"] = thr.reshape(()) if thr.numel() == 1 else thr.reshape(F)
    if activation == "topk" and (k is None or k > F):
        raise ConfigError(f"{file}: top-k SAE needs 0 < k <= {F}, got k={k}")
    cfg = SAEConfig(d_in=d, num_latents=F, activation=activation, k=k, metadata={"imported_from": source})
    return SparseAutoencoder.from_tensors(cfg, tensors)


def unsupported(what: str, name: Any, supported: str, file: Path, hint: str = "") -> ConfigError:
    """The one refusal message for an architecture we cannot import exactly."""
    return ConfigError(f"{file}: {what} {name!r} is not supported (supported: {supported}){hint}")


def gated_as_threshold(W_enc: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor):
    """Rewrite a gated encoder exactly as one pre-activation with a per-latent threshold.

    Gated inference (Rajamanoharan et al. 2024; SAELens, dictionary_learning):
    ``f = [u @ W + b_gate > 0] * relu(u @ (W * exp(r_mag)) + b_mag)``. With ``s = exp(r_mag) > 0`` and
    ``m = u @ (W * s) + b_mag`` the gate is ``m > b_mag - s * b_gate =: t``, so
    ``f = relu(m) * [m > t]`` = our threshold encoding ``relu(m) * [relu(m) > max(t, 0)]`` (for ``t < 0`` every
    positive ``m`` passes both). Returns ``(W_enc', b_enc', threshold)``.
    """
    s = torch.exp(r_mag.double())
    W = (W_enc.double() * s).float()
    thr = torch.relu(b_mag.double() - s * b_gate.double()).float()
    return W, b_mag, thr
