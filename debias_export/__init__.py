"""debias-export: compile interpretability-based debiasing edits into encoders and export them.

``load_adapter(spec)`` takes every model spec the CLI takes (``tiny-clip``, ``biaslab``, ``arch:...``, exports,
directories, hub ids; hub downloads only with ``DEBIAS_EXPORT_ALLOW_HUB=1``). The public names below are loaded on
first access (module ``__getattr__``), so ``import debias_export``
-- and the CLI's ``--help`` -- do not pay for torch and transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import __version__

# public name -> module that defines it
_PUBLIC = {
    "adapter_for": ".adapters",
    "load_adapter": ".workflow.model_specs",
    "registered_families": ".adapters",
    "ProjectionEdit": ".edits",
    "SAEEdit": ".edits",
    "apply_edits": ".edits",
    "load_edit": ".edits",
    "fold_projection": ".edits.projection",
    "DebiasError": ".core.errors",
    "load_patched": ".export",
    "SAEConfig": ".sae",
    "SparseAutoencoder": ".sae",
    "Site": ".core.sites",
}

__all__ = [*_PUBLIC, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .adapters import adapter_for, registered_families
    from .core.errors import DebiasError
    from .core.sites import Site
    from .edits import ProjectionEdit, SAEEdit, apply_edits, load_edit
    from .edits.projection import fold_projection
    from .export import load_patched
    from .sae import SAEConfig, SparseAutoencoder
    from .workflow.model_specs import load_adapter


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:  # a subpackage, e.g. ``dx.sae.load_any``: import it like the eager package did
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
