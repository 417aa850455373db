"""The exported Hugging Face directory's format: file names, format versions, the per-family save/load spec,
and the live patch being exported. Shared by the writer (:mod:`.safetensors_export`) and the loader (:mod:`.loading`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..core.errors import DebiasError
from ..edits import PatchHandle, current_patch
from .registry import exportable_families, load_family_specs

DEBIAS_CONFIG = "debias_config.json"
DEBIAS_PATCHES = "debias_patches.safetensors"
MODELING_FILE = "modeling_debias.py"
RUNTIME_FILE = "debias_runtime.py"
FORMAT = "debias-export-hf/2"  # /2: patches name sites, not module paths
READABLE_FORMATS = ("debias-export-hf/1", FORMAT)  # /1 records also carry the absolute site name


@dataclass(frozen=True)
class HFDirSpec:
    """How one family's base model is saved and reloaded as a Hugging Face directory."""

    family: str
    save_base: Callable[[ModelAdapter, Path], None]  # write the UNPATCHED model (weights, config, processor)
    load_base: Callable[[Path, dict[str, Any]], ModelAdapter]  # stock load (no remote code) from base info
    base_info: Callable[[ModelAdapter], dict[str, Any]]  # {"module", "class", ...} recorded in debias_config
    auto_class: str | None = "AutoModel"  # key of config.json auto_map; None: no remote code for this family


_HF_SPECS: dict[str, HFDirSpec] = {}


def register_hf_spec(spec: HFDirSpec) -> HFDirSpec:
    """Called by ``families/<family>.py`` at import."""
    _HF_SPECS[spec.family] = spec
    return spec


def hf_spec(family: str) -> HFDirSpec:
    """The family's spec; its ``families/<family>.py`` module is imported on first use."""
    load_family_specs(family)
    if family not in _HF_SPECS:
        raise DebiasError(f"safetensors export does not support model family {family!r}; supported: {', '.join(exportable_families())}")
    return _HF_SPECS[family]


def patch_handle(obj: "PatchHandle | ModelAdapter | nn.Module") -> PatchHandle:
    """The live patch of a patched model; a clear error for a model that was never patched."""
    if isinstance(obj, PatchHandle):
        handle = obj
    else:
        handle = current_patch(adapter_for(obj))
    if handle is None or not handle.records:
        raise DebiasError("model has no debias patch to export; apply_edits(...) first "
                          "(a plain model is exported with save_pretrained, or export_onnx(..., allow_unpatched=True))")
    return handle


@contextlib.contextmanager
def unpatched(handle: PatchHandle | None) -> Iterator[None]:
    """Temporarily take the patch's edits out (the patch stays valid and is put back after)."""
    if handle is None:
        yield
        return
    with handle.suspended():
        yield
