"""Sparse autoencoder used for DeBiasLens-style neuron zeroing.

Parameters follow sae-for-vlm / dictionary_learning: ``W_enc [d, F]``, ``b_enc [F]``,
``W_dec [F, d]``, ``b_dec [d]`` and a ``threshold`` (scalar for BatchTopK SAEs, per-latent for
JumpReLU imports). Inference encoding depends on ``activation``:

- ``threshold``: ``pre = relu((x - b_dec) @ W_enc + b_enc)``, ``f = pre * (pre > threshold)``
- ``relu``:      ``f = relu((x - b_dec) @ W_enc + b_enc)`` (SAELens "standard")
- ``topk``:      ``f`` keeps the ``k`` largest entries of ``relu(pre)`` per row (sparsify / SAELens topk)

Decoding is ``f @ W_dec + b_dec``. On disk: ``cfg.json`` + ``sae.safetensors`` (sparsify layout).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import DebiasError, IntegrityError, ShapeError, check_finite
from ..core.fileio import apply_default_modes

ACTIVATIONS = ("threshold", "relu", "topk")
SAE_WEIGHTS = "sae.safetensors"
SAE_CONFIG = "cfg.json"


@dataclass
class SAEConfig:
    """Shape and encoding rule of an SAE, plus where it was trained (model, tower, site)."""

    d_in: int
    num_latents: int
    activation: str = "threshold"
    k: int | None = 20
    group_fractions: list[float] | None = None  # Matryoshka groups (training only)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise DebiasError(f"SAE activation {self.activation!r} unknown; expected one of {', '.join(ACTIVATIONS)}")
        if self.d_in <= 0 or self.num_latents <= 0:
            raise DebiasError(f"SAE sizes must be positive (d_in={self.d_in}, num_latents={self.num_latents})")
        if self.activation == "topk" and not (self.k and 0 < self.k <= self.num_latents):
            raise DebiasError(f"top-k SAE needs 0 < k <= num_latents (k={self.k}, num_latents={self.num_latents})")


class SparseAutoencoder(nn.Module):
    """A (Matryoshka BatchTopK-trained) sparse autoencoder over one residual-stream site."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, F = cfg.d_in, cfg.num_latents
        self.W_enc = nn.Parameter(torch.empty(d, F))
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(torch.empty(F, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("threshold", torch.tensor(0.0))
        nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            self.W_enc.copy_(self.W_dec.t())

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``relu((x - b_dec) @ W_enc + b_enc)``."""
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-time latents ``f`` (dense ``[..., F]``)."""
        pre = self.pre_acts(x)
        if self.cfg.activation == "threshold":
            return pre * (pre > self.threshold)
        if self.cfg.activation == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        return pre

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ----- persistence -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "W_enc": self.W_enc.detach().contiguous(),
            "b_enc": self.b_enc.detach().contiguous(),
            "W_dec": self.W_dec.detach().contiguous(),
            "b_dec": self.b_dec.detach().contiguous(),
            "threshold": self.threshold.detach().contiguous(),
        }

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae.safetensors`` into ``path`` (created)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.float().cpu() for k, v in self.state_tensors().items()}
        save_file(tensors, str(path / SAE_WEIGHTS), metadata={"format": "debias-export-sae"})
        apply_default_modes(path / SAE_WEIGHTS)  # safetensors writes 0600; the umask decides, as for the JSON
        (path / SAE_CONFIG).write_text(json.dumps(asdict(self.cfg), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> "SparseAutoencoder":
        """Build from named tensors, checking every shape and that values are finite."""
        d, F = cfg.d_in, cfg.num_latents
        want = {"W_enc": (d, F), "b_enc": (F,), "W_dec": (F, d), "b_dec": (d,)}
        for name, shape in want.items():
            if name not in tensors:
                raise DebiasError(f"SAE tensors lack {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise ShapeError(f"SAE tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        thr = tensors.get("threshold", torch.tensor(0.0))
        if thr.numel() not in (1, F):
            raise ShapeError(f"SAE threshold has {thr.numel()} values, expected 1 or {F}")
        sae = cls(cfg)
        with torch.no_grad():
            for name in want:
                getattr(sae, name).copy_(tensors[name].float())
            sae.threshold = thr.float().reshape(()) if thr.numel() == 1 else thr.float().reshape(F).clone()
        for name, t in sae.state_tensors().items():
            check_finite(f"SAE tensor {name}", t)
        return sae.eval()

    @classmethod
    def load(cls, path: str | Path) -> "SparseAutoencoder":
        """Load a folder written by :meth:`save` (other layouts: :func:`debias_export.sae.load_any`)."""
        path = Path(path)
        cfg_file, w_file = path / SAE_CONFIG, path / SAE_WEIGHTS
        if not cfg_file.is_file() or not w_file.is_file():
            raise DebiasError(f"{path} is not a debias-export SAE folder (needs {SAE_CONFIG} and {SAE_WEIGHTS})")
        try:
            raw = json.loads(cfg_file.read_text())
            cfg = SAEConfig(**raw)
        except (ValueError, TypeError) as exc:
            raise DebiasError(f"bad SAE config {cfg_file}: {exc}") from None
        return cls.from_tensors(cfg, read_safetensors(w_file))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning corruption/truncation into a one-line error naming the file."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise DebiasError(f"file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise IntegrityError(f"corrupt or truncated safetensors file {path}: {str(exc).splitlines()[0]}") from None
