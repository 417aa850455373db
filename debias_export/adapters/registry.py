"""The family registry: family name -> adapter class, filled by each family module's ``@register_adapter``.

This module imports no family code: a family's module is imported by name (``FAMILY_MODULES``) the first
time the family is needed (peft-style), so ``import debias_export.adapters`` stays cheap and a family
never has to be listed anywhere else.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from torch import nn
from transformers import AutoConfig

from ..core.errors import DebiasError
from ..core.specs import BUILTIN_NAMES, UnknownModelSpec, check_source, hub_kwargs, open_clip_names, unknown_spec_message
from .base import ModelAdapter, refuse_patched_export

# family name -> module that defines it (imported by name on first use, in this order). Adding a family: its
# module (decorated with @register_adapter) plus one line here.
FAMILY_MODULES = {
    "hf_clip": f"{__package__}.hf_clip",
    "hf_dual_encoder": f"{__package__}.dual_encoder",
    "open_clip": f"{__package__}.open_clip_family",
    "llava": f"{__package__}.llava",
}
_REGISTRY: dict[str, type[ModelAdapter]] = {}


def _import_family(family: str) -> None:
    module = FAMILY_MODULES.get(family)
    if module is not None and family not in _REGISTRY:
        importlib.import_module(module)  # its @register_adapter fills _REGISTRY


def _import_all() -> None:
    for family in FAMILY_MODULES:
        _import_family(family)


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make a family available to :func:`adapter_for` / :func:`load_adapter`."""
    _REGISTRY[cls.family] = cls
    return cls


def registered_families() -> dict[str, type[ModelAdapter]]:
    """Every family (the built-in ones are imported on this first call)."""
    _import_all()
    return dict(_REGISTRY)


def adapter_for(model: nn.Module, source: str | None = None) -> ModelAdapter:
    """Wrap an already-loaded model in the adapter of its family."""
    if isinstance(model, ModelAdapter):
        return model
    _import_all()
    for cls in _REGISTRY.values():
        if cls.matches(model):
            return cls(model, source=source)
    raise DebiasError(f"no model family handles {type(model).__name__}; supported: {', '.join(sorted(_REGISTRY))}")


def tiny_spec_names() -> list[str]:
    """The tiny random models' spec names (``tiny-clip``, ...), one per family that has one."""
    return sorted(cls.tiny_name for cls in registered_families().values() if cls.tiny_name)


def load_adapter(spec: "str | os.PathLike[str]", family: str | None = None, **kwargs: Any) -> ModelAdapter:
    """Load a model by hub id, local directory or tiny spec (``tiny-clip[:seed]``), picking the family from its
    config when not given. Every other spec (``biaslab``, ``arch:...``, exports): :func:`debias_export.load_adapter`."""
    spec = os.fspath(spec)
    _import_all()
    tiny = {cls.tiny_name: cls for cls in _REGISTRY.values() if cls.tiny_name}
    owner = tiny.get(spec.partition(":")[0])
    if owner is not None and family in (None, owner.family):
        return owner.load(spec)  # the family's loader builds its own tiny spec
    refuse_patched_export(spec)
    if family is None:
        family = detect_family(spec)
    _import_family(family)
    if family not in _REGISTRY:
        raise DebiasError(f"unknown model family {family!r}; supported: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[family].load(spec, **kwargs)


def detect_family(spec: str) -> str:
    """Family of a hub id / local dir, read from its config (``model_type``). Nothing is downloaded unless hub
    access is on (:mod:`.specs`): an unknown spec fails at once with a suggestion."""
    if (spec.startswith(("hf-hub:", "open_clip:", "local-dir:")) or os.path.isfile(spec)
            or os.path.isfile(os.path.join(spec, "open_clip_config.json"))):
        return "open_clip"
    if not os.path.isdir(spec) and "/" not in spec and spec.split("@")[0] in open_clip_names():
        return "open_clip"
    candidates = [*tiny_spec_names(), *BUILTIN_NAMES]
    check_source(spec, candidates)
    try:
        cfg = AutoConfig.from_pretrained(spec, **hub_kwargs())
    except Exception as exc:  # noqa: BLE001 - turned into a one-line error
        if not os.path.exists(spec):
            raise UnknownModelSpec(f"{unknown_spec_message(spec, candidates)}: {str(exc).splitlines()[0]}") from None
        raise DebiasError(f"cannot read a model config from {spec!r}: {str(exc).splitlines()[0]}") from None
    for cls in _REGISTRY.values():
        if spec_family := getattr(cls, "handles_config", None):
            if spec_family(cfg):
                return cls.family
    raise DebiasError(f"model type {getattr(cfg, 'model_type', '?')!r} at {spec!r} is not supported; families: {', '.join(sorted(_REGISTRY))}")
