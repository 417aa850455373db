"""Where each family's export specs live, and their loading on first use (no family code imported here).

A family plugs into the export machinery with one module, ``debias_export.export.families.<family>``,
which imports the machinery and registers an :class:`~.hf_dir.HFDirSpec` and an ONNX spec
(:func:`~.onnx_specs.register_onnx_spec`). The machinery imports that module by name the first time it
needs the family's specs -- as optimum's exporters look up OnnxConfigs -- so specs point down at the
machinery and nothing points back up, and adding a family touches no list here.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

FAMILIES_PACKAGE = __name__.rpartition(".")[0] + ".families"
_loaded: set[str] = set()


def load_family_specs(family: str) -> None:
    """Import ``families/<family>.py`` once (it registers the family's specs); a family without one is not exportable."""
    if family in _loaded or not family.isidentifier():
        return
    name = f"{FAMILIES_PACKAGE}.{family}"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
    _loaded.add(family)


def exportable_families() -> list[str]:
    """Families with an export spec module (for error messages)."""
    folder = Path(__file__).resolve().parent / "families"
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]))
