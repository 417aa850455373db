"""Production loading of an exported patched model, without remote code; the reload check exports run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..adapters import ModelAdapter
from ..core.errors import DebiasError, IntegrityError, ValidationError
from ..edits.base import site_resolver
from ..runtime import install_patches
from ..sae.model import read_safetensors
from .hf_dir import DEBIAS_CONFIG, DEBIAS_PATCHES, READABLE_FORMATS, hf_spec
from .manifest import verify_manifest
from .onnx_specs import example_inputs


def read_debias_config(path: str | Path) -> dict[str, Any]:
    """``debias_config.json`` of an exported directory, checked for the fields loading needs."""
    file = Path(path) / DEBIAS_CONFIG
    if not file.is_file():
        raise DebiasError(f"{path} is not a debias-export model directory (missing {DEBIAS_CONFIG})")
    try:
        cfg = json.loads(file.read_text())
    except ValueError as exc:
        raise IntegrityError(f"corrupt {file}: {exc}") from None
    if cfg.get("format") not in READABLE_FORMATS:
        raise DebiasError(f"{file} has format {cfg.get('format')!r}; this version reads {', '.join(READABLE_FORMATS)}")
    for key in ("family", "base", "patches"):
        if key not in cfg:
            raise IntegrityError(f"{file} lacks {key!r}")
    return cfg


def load_patched(path: str | Path, verify: bool = True) -> ModelAdapter:
    """Load an exported directory (or a bundle's ``hf/``): verify its manifest, build the stock model, install the edits.

    Uses the family's stock class (e.g. ``transformers.CLIPModel``) and
    :func:`debias_export.runtime.install_patches` -- the same runtime the remote code carries -- with
    sites resolved by the family's adapter, so outputs equal those of the in-memory patched model bit
    for bit, on whichever transformers major made the export. Returns the adapter (eval mode);
    the saved configs are on ``adapter.debias_config``.
    """
    path = Path(path)
    if not path.is_dir():
        raise DebiasError(f"{path} is not a directory")
    if not (path / DEBIAS_CONFIG).is_file() and (path / "hf" / DEBIAS_CONFIG).is_file():
        path = path / "hf"  # an export bundle (DIR/hf + DIR/onnx): load its HF model
    if verify:
        verify_manifest(path)
    cfg = read_debias_config(path)
    adapter = hf_spec(cfg["family"]).load_base(path, cfg["base"])
    # a fully folded export is a stock checkpoint: its edits live in the weights, there are no patches
    tensors = read_safetensors(path / DEBIAS_PATCHES) if cfg["patches"] or (path / DEBIAS_PATCHES).exists() else {}
    try:
        installed = install_patches(adapter.model, cfg["patches"], tensors, site_resolver(adapter))
    except (KeyError, RuntimeError, AttributeError, TypeError, ValueError, LookupError, DebiasError) as exc:
        raise IntegrityError(f"{path / DEBIAS_PATCHES} does not fit {path / DEBIAS_CONFIG}: {str(exc).splitlines()[0]}") from None
    ref = next(adapter.model.parameters())
    for item in installed:
        item.site_edit.to(device=ref.device, dtype=ref.dtype)
    adapter.model.eval()
    adapter.debias_config = cfg
    adapter.installed_patches = installed  # what bench takes out and puts back (InstalledSiteEdit.remove)
    return adapter


@torch.no_grad()
def check_reload(adapter: ModelAdapter, path: Path, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, Any]:
    """Reload ``path`` with :func:`load_patched` and require bit-identical tower outputs."""
    loaded = load_patched(path, verify=True)
    report = {}
    for tower in adapter.towers():
        inputs = example_inputs(adapter, tower, batch, seq, seed)
        want, got = adapter.embed(tower, inputs), loaded.embed(tower, inputs)
        if want.shape != got.shape or not torch.equal(want, got):
            diff = (want - got).abs().max().item() if want.shape == got.shape else float("nan")
            raise ValidationError(f"reloaded {tower} tower from {path} differs from the patched model (max |diff| {diff:.3g})")
        report[tower] = {"identical": True, "shape": list(want.shape)}
    return report
