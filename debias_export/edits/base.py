"""Edit configs, the edit registry and the one verb that applies edits: :func:`apply_edits`.

An edit is a config dataclass (saved as ``edit_config.json`` + ``edit.safetensors``) and a
handler that compiles it, for one adapter and site, into a fused runtime module. Applying an edit
installs a :class:`~debias_export.runtime.SiteEdit` on the site's own module (a child run as its first
forward hook; the original module stays where it is), so :meth:`PatchHandle.remove` restores the model
exactly and every consumer of the module's output sees the edit.
"""
from __future__ import annotations

import json
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import ModelAdapter, OutputPositions, adapter_for
from ..core.errors import DebiasError
from ..core.sites import Site
from ..runtime import InstalledSiteEdit, SiteEdit
from ..sae.model import read_safetensors

EDIT_CONFIG = "edit_config.json"
EDIT_WEIGHTS = "edit.safetensors"


@dataclass
class EditConfig:
    """Base of all edit configs. Subclasses set ``kind`` and implement tensor (de)serialisation."""

    kind: ClassVar[str] = ""

    site: str = ""

    def validate(self, adapter: ModelAdapter) -> Site:
        """Check the edit fits ``adapter`` and return the resolved site (clear error otherwise)."""
        return adapter.resolve_site(self.site)

    def prune_positions(self) -> bool:
        return True

    # Serialisation hooks for subclasses.
    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "EditConfig":
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the edit like a PEFT adapter: ``edit_config.json`` + ``edit.safetensors``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.tensors().items()},
                  str(path / EDIT_WEIGHTS),
                  # one key only: safetensors writes metadata in hash-map order, so several keys would
                  # make the file bytes differ from run to run
                  metadata={"format": f"debias-export-edit/{self.kind}"})
        (path / EDIT_CONFIG).write_text(json.dumps({"kind": self.kind, **self.to_json()}, indent=2, sort_keys=True) + "\n")
        return path


_HANDLERS: dict[type, Callable[[EditConfig, ModelAdapter, Site], nn.Module]] = {}
_KINDS: dict[str, type[EditConfig]] = {}


def register_edit(config_cls: type[EditConfig]):
    """Decorator registering ``compile(config, adapter, site) -> fused module`` for a config class."""

    def deco(fn):
        _HANDLERS[config_cls] = fn
        _KINDS[config_cls.kind] = config_cls
        return fn

    return deco


def registered_edit_kinds() -> dict[str, type[EditConfig]]:
    return dict(_KINDS)


def load_edit(path: str | Path) -> EditConfig:
    """Load an edit folder written by :meth:`EditConfig.save`."""
    path = Path(path)
    cfg_file = path / EDIT_CONFIG
    if not cfg_file.is_file():
        raise DebiasError(f"{path} is not an edit folder (missing {EDIT_CONFIG})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise DebiasError(f"bad edit config {cfg_file}: {exc}") from None
    if not isinstance(cfg, dict):
        raise DebiasError(f"bad edit config {cfg_file}: top level must be a JSON object, got {type(cfg).__name__}")
    kind = cfg.pop("kind", None)
    if not isinstance(kind, str) or kind not in _KINDS:
        raise DebiasError(f"unknown edit kind {kind!r} in {cfg_file}; known: {', '.join(sorted(_KINDS))}")
    try:
        return _KINDS[kind].from_saved(cfg, read_safetensors(path / EDIT_WEIGHTS))
    except (TypeError, ValueError, KeyError) as exc:  # wrong value types in the JSON
        raise DebiasError(f"bad edit config {cfg_file}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def compile_edit(edit: EditConfig, adapter: ModelAdapter) -> tuple[Site, nn.Module]:
    """Resolve the edit's site on ``adapter`` and compile it to its fused runtime module."""
    handler = _HANDLERS.get(type(edit))
    if handler is None:
        raise DebiasError(f"no handler registered for edit type {type(edit).__name__}")
    site = edit.validate(adapter)
    module = handler(edit, adapter, site)
    ref = next(adapter.model.parameters())
    return site, module.to(device=ref.device, dtype=ref.dtype)


class PatchHandle:
    """What :func:`apply_edits` returns: the site edits it installed, their records, and ``remove()``.

    ``records`` (one per patched site, saved with exports) name the site, never a module path, so an
    export loads on any transformers version whose adapter resolves the site.
    """

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.records: list[dict[str, Any]] = []
        self.edits: list[EditConfig] = []
        self._installed: list[InstalledSiteEdit] = []
        self._suspended = False

    def remove(self) -> nn.Module:
        """Take every edit out again (the model is exactly the unpatched one) and drop position hooks."""
        for item in reversed(self._installed):
            item.remove()
        self._installed.clear()
        self.records.clear()
        _PATCHES.pop(self.adapter.model, None)
        return self.adapter.model

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Temporarily take the edits out (e.g. to save the base weights); they are put back after."""
        if self._suspended or not self._installed:
            yield
            return
        self._suspended = True
        for item in reversed(self._installed):
            item.remove()
        try:
            yield
        finally:
            self._installed = [InstalledSiteEdit(item.module, item.site_edit, item.position_module)
                               for item in self._installed]
            self._suspended = False

    @property
    def site_edits(self) -> list[SiteEdit]:
        return [item.site_edit for item in self._installed]

    @property
    def modules(self) -> list[nn.Module]:
        """The patched modules, in record order."""
        return [item.module for item in self._installed]


# The live patch of each model, keyed weakly by the model (not a private attribute on the user's module):
# set by apply_edits, cleared by PatchHandle.remove, read only through current_patch.
_PATCHES: "weakref.WeakKeyDictionary[nn.Module, PatchHandle]" = weakref.WeakKeyDictionary()


def current_patch(model: "nn.Module | ModelAdapter") -> PatchHandle | None:
    """The :class:`PatchHandle` that :func:`apply_edits` installed on ``model`` and that is not removed yet, or None."""
    return _PATCHES.get(model.model if isinstance(model, ModelAdapter) else model)


def apply_edits(model: "nn.Module | ModelAdapter", edits: "EditConfig | list[EditConfig]") -> PatchHandle:
    """Compile ``edits`` into ``model`` in place (the one verb). Several edits on one site chain in order."""
    adapter = adapter_for(model)
    if current_patch(adapter.model):
        raise DebiasError("model is already patched; call remove() on the existing patch first")
    edits = [edits] if isinstance(edits, EditConfig) else list(edits)
    if not edits:
        raise DebiasError("no edits to apply")
    handle = PatchHandle(adapter)
    by_site: dict[str, dict[str, Any]] = {}
    for edit in edits:
        site, fused = compile_edit(edit, adapter)
        if not adapter.site_is_consumed(site):
            warnings.warn(f"site {site.name} lies after the layer the model consumes "
                          f"({adapter.consumed_layer(site.tower)}); this edit does not change the model's output")
        positions = adapter.site_positions(site) if edit.prune_positions() else None
        entry = by_site.setdefault(site.name, {"site": site, "positions": positions, "fused": [], "edits": []})
        if entry["positions"] is not None and positions is None:
            entry["positions"] = None  # any all-token edit on the site disables pruning for it
        entry["fused"].append(fused)
        entry["edits"].append(edit)
    try:
        for name, entry in by_site.items():
            module, pos_json, position_module = resolve_patch_site(adapter, entry["site"], entry["positions"])
            handle._installed.append(InstalledSiteEdit(module, SiteEdit(entry["fused"], pos_json), position_module))
            handle.records.append({"site": name, "positions": pos_json, "edits": [m.spec() for m in entry["fused"]]})
            handle.edits.extend(entry["edits"])
    except Exception:
        handle.remove()
        raise
    _PATCHES[adapter.model] = handle
    return handle


def resolve_patch_site(adapter: ModelAdapter, site: Site, positions: OutputPositions | None
                       ) -> tuple[nn.Module, dict | None, nn.Module | None]:
    """Module to patch for ``site``, the positions as saved JSON, and the module its position pre-hook goes on."""
    module = adapter.model.get_submodule(adapter.site_module_path(site))
    if positions is None:
        return module, None, None
    if positions.is_static:
        return module, {"static": positions.static_index}, None
    return module, dict(positions.rule), adapter.model.get_submodule(positions.hook_path)


def site_resolver(adapter: ModelAdapter):
    """``site name -> (module, position input module)`` for :func:`runtime.install_patches`, via the adapter."""

    def resolve(name: str) -> tuple[nn.Module, nn.Module | None]:
        site = adapter.resolve_site(name)
        module, _, hook = resolve_patch_site(adapter, site, adapter.site_positions(site))
        return module, hook

    return resolve


def patch_tensors(handle: PatchHandle) -> dict[str, torch.Tensor]:
    """Fused buffers of every installed edit, named as :func:`runtime.install_patches` expects."""
    out = {}
    for i, site_edit in enumerate(handle.site_edits):
        for j, edit in enumerate(site_edit.edits):
            for name, buf in edit.state_dict().items():
                out[f"debias_patches.{i}.{j}.{name}"] = buf.detach().contiguous()
    return out
