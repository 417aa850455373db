"""Shared helpers of the SAE fixture generator: random parameters, inputs, and writing one case.

A case is a folder ``tests/fixtures/sae/<case>/`` holding

- the SAE files exactly as the library wrote them (under ``files/``),
- ``expected.safetensors``: the fixed input batch ``x`` and the library's own ``latents`` (its encode) and
  ``recon`` (its forward), computed in float32 by the library itself,
- ``case.json``: library, version, what was built, where ``load_any`` should be pointed, and what it must do
  (``"exact"`` or a refusal whose message must contain a given text).

Nothing here imports debias_export: the fixtures are made by the libraries alone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

N_INPUTS = 32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs(d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """The fixed batch every case is run on (offset so a decoder bias matters)."""
    return (torch.randn(N_INPUTS, d, generator=gen(seed)) * scale + 0.3).float()


def randomize(module: torch.nn.Module, seed: int, rules: dict[str, Callable[[tuple[int, ...], torch.Generator], torch.Tensor]],
              default_scale: float = 0.3) -> None:
    """Overwrite every float parameter/buffer of ``module`` with seeded random values, in place.

    ``rules`` maps a state-dict name to a maker ``(shape, generator) -> tensor``; other float tensors get
    ``randn * default_scale / sqrt(fan)`` for matrices and ``randn * 0.1`` for vectors. The library's own
    classes keep their structure; only the numbers change, so the checks are not vacuous (non-unit decoder
    rows, non-zero biases, thresholds that cut).
    """
    g = gen(seed)
    sd = module.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if not t.is_floating_point():
                continue
            if name in rules:
                new = rules[name](tuple(t.shape), g)
            elif t.ndim == 2:
                new = torch.randn(t.shape, generator=g) * default_scale * 3 / (min(t.shape) ** 0.5)
            elif t.ndim == 1:
                new = torch.randn(t.shape, generator=g) * 0.1
            else:
                new = torch.randn(t.shape, generator=g) * 0.1
            t.copy_(new.to(t.dtype).reshape(t.shape))


def thresholds(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Per-latent thresholds that cut some latents (and a few negative ones: libraries treat those specially)."""
    return torch.rand(shape, generator=g) * 0.4 - 0.05


def write_case(root: Path, name: str, *, library: str, version: str, built: str, x: torch.Tensor,
               latents: torch.Tensor | None, recon: torch.Tensor | None, expect: Any, load: dict[str, Any] | None = None,
               files_from: Path | None = None, extra: dict[str, torch.Tensor] | None = None,
               notes: str = "", topk: bool = False) -> Path:
    """Write one case folder; ``files_from`` (the library's save folder) is copied to ``files/`` untouched."""
    case = root / name
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    if files_from is not None:
        shutil.copytree(files_from, case / "files")
    tensors = {"x": x.detach().float().contiguous()}
    if latents is not None:
        tensors["latents"] = latents.detach().float().contiguous()
    if recon is not None:
        tensors["recon"] = recon.detach().float().contiguous()
    for k, v in (extra or {}).items():
        tensors[k] = v.detach().float().contiguous()
    save_file(tensors, str(case / "expected.safetensors"))
    meta = {"library": library, "version": version, "built": built, "expect": expect,
            "load": {"path": "files", **(load or {})}, "topk": topk, "notes": notes}
    (case / "case.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"  {name}: {'exact' if expect == 'exact' else 'refuse'} ({built})")
    return case
