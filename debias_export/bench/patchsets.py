"""Benchmark variants on one set of base weights: compiled site edits and folded module copies, swapped in and out.

A :class:`PatchSet` holds compiled :class:`~debias_export.runtime.SiteEdit` modules (and, for folded projection
edits, folded copies of the modules they change) and installs / removes them on the model's own modules outside
the timed region, so the eager comparison measures exactly the edit, not two copies of the model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..adapters import ModelAdapter
from ..core.errors import DebiasError
from ..core.modules import parent_and_name, swap_module
from ..edits import apply_edits
from ..edits.install import install_edits
from ..edits.projection import split_folded
from ..runtime import InstalledSiteEdit, SiteEdit


# ----- patch sets -----------------------------------------------------------------------------------
@dataclass
class PatchSet:
    """Compiled wrappers for one variant, detached from the model until :meth:`install`."""

    name: str
    entries: list[tuple[str, SiteEdit, str | None]] = field(default_factory=list)  # (module path, site edit, position module)
    # folded edits: (module path, parent, child name, original module, folded copy), swapped like wrappers
    swaps: list[tuple[str, nn.Module, str, nn.Module, nn.Module]] = field(default_factory=list)
    folds: list[dict[str, Any]] = field(default_factory=list)  # fold records (edits.projection.fold_record)
    _installed: list[InstalledSiteEdit] = field(default_factory=list)

    @classmethod
    def compile(cls, name: str, adapter: ModelAdapter, edits: list) -> "PatchSet":
        """Compile ``edits`` with :func:`apply_edits`, then take the wrappers out again (model restored).

        Projection edits that record a fold mode are folded instead: the folded copies of the modules they
        change (same class, same shapes, so zero extra ops) are kept and the original weights restored.
        """
        to_fold, to_patch = split_folded(list(edits))
        swaps, folds = [], []
        if to_fold:
            installed = install_edits(adapter, to_fold)  # folds only: to_fold holds no patch edits
            try:
                folds = installed.fold_records()
                paths = list(dict.fromkeys(p for _, h in installed.folds for p in h.folded))
                copies = {p: copy.deepcopy(adapter.model.get_submodule(p)) for p in paths}
            finally:
                installed.remove()
            for path, folded in copies.items():
                parent, child = parent_and_name(adapter.model, path)
                swaps.append((path, parent, child, getattr(parent, child), folded))
        entries = []
        if to_patch or not to_fold:  # apply_edits also gives the error for an empty edit list
            handle = apply_edits(adapter, to_patch)
            entries = _entries(adapter, handle._installed)
            handle.remove()
        clash = {p for p, _, _ in entries} & {s[0] for s in swaps}
        if clash:
            raise DebiasError(f"variant {name!r} both folds into and patches {sorted(clash)[0]}; use separate variants")
        return cls(name, entries, swaps=swaps, folds=folds)

    def paths(self) -> list[str]:
        """Every module path this variant changes (patched or folded)."""
        return [p for p, _, _ in self.entries] + [s[0] for s in self.swaps]

    @classmethod
    def discover(cls, name: str, adapter: ModelAdapter) -> "PatchSet":
        """The site edits :func:`~debias_export.export.load_patched` installed (the model stays patched)."""
        installed = list(getattr(adapter, "installed_patches", []) or [])
        if not installed:
            raise DebiasError("the loaded model has no debias patches to benchmark")
        return cls(name, _entries(adapter, installed), _installed=installed)

    def wrappers(self) -> list[SiteEdit]:
        return [w for _, w, _ in self.entries]

    def install(self, model: nn.Module) -> None:
        # parents are held as objects, so a fold inside a block that a wrapper also wraps still lands
        for _, parent, child, _, folded in self.swaps:
            swap_module(parent, child, folded)
        for path, site_edit, position_path in self.entries:
            position = model.get_submodule(position_path) if position_path is not None else None
            self._installed.append(InstalledSiteEdit(model.get_submodule(path), site_edit, position))

    def uninstall(self, model: nn.Module) -> None:
        for item in reversed(self._installed):
            item.remove()
        self._installed.clear()
        for _, parent, child, original, _ in self.swaps:
            swap_module(parent, child, original)

    def to(self, **kw: Any) -> "PatchSet":
        for w in self.wrappers():
            w.to(**kw)  # the patched modules move with the model
        for _, _, _, original, folded in self.swaps:  # whichever of the two is outside the model now
            original.to(**kw)
            folded.to(**kw)
        return self


def _entries(adapter: ModelAdapter, installed: list[InstalledSiteEdit]) -> list[tuple[str, SiteEdit, str | None]]:
    """(module path, site edit, position module path) of installed site edits, for re-installing later."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    return [(names[id(item.module)], item.site_edit,
             names[id(item.position_module)] if item.position_module is not None else None) for item in installed]


class VariantSwitch:
    """Keeps at most one :class:`PatchSet` installed in a model; ``None`` means unmodified."""

    def __init__(self, model: nn.Module, variants: dict[str, PatchSet | None]):
        self.model, self.variants, self.current = model, variants, None

    def activate(self, name: str) -> None:
        if name == self.current:
            return
        if self.current is not None and self.variants[self.current] is not None:
            self.variants[self.current].uninstall(self.model)
        if self.variants[name] is not None:
            self.variants[name].install(self.model)
        self.current = name

    def reset(self) -> None:
        """Leave the model unmodified (the patched state of a loaded patched model is restored by caller)."""
        for name, ps in self.variants.items():
            if ps is None:
                self.activate(name)
                return


class Call:
    """A timed callable with an untimed ``prepare`` step (variant switching, input placement)."""

    def __init__(self, fn: Callable[[], object], prepare: Callable[[], None] | None = None):
        self.fn, self.prepare = fn, prepare

    def __call__(self) -> object:
        return self.fn()
