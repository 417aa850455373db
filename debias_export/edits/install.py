"""Put saved edits into a model the way ``export`` ships them: projection edits that record a fold mode
are folded into the weights, every other edit is patched with :func:`~debias_export.edits.apply_edits`.

One place for that rule, so ``export``, ``eval`` (retrieval and LLaVA metrics) and recipes cannot
disagree about what an edit folder means.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .base import EditConfig, apply_edits
from .projection import FoldHandle, ProjectionEdit, fold_all, fold_record, split_folded


class InstalledEdits:
    """Folds (in the weights) plus at most one runtime patch; ``remove()`` undoes both, last installed first."""

    def __init__(self, folds: list[tuple[ProjectionEdit, FoldHandle]], patch: Any = None) -> None:
        self.folds = folds
        self.patch = patch

    def fold_records(self) -> list[dict[str, Any]]:
        """JSON records of the folds (for export configs and manifests)."""
        return [fold_record(edit, handle) for edit, handle in self.folds]

    def remove(self) -> None:
        if self.patch is not None:
            self.patch.remove()
            self.patch = None
        for _, handle in reversed(self.folds):
            handle.remove()
        self.folds = []


def install_edits(model: Any, edits: "EditConfig | list[EditConfig]") -> InstalledEdits:
    """Fold the edits that record a fold mode, then patch the rest (all or nothing)."""
    edits = [edits] if isinstance(edits, EditConfig) else list(edits)
    to_fold, to_patch = split_folded(edits)
    installed = InstalledEdits(list(zip(to_fold, fold_all(model, to_fold))))
    if to_patch or not to_fold:  # apply_edits also gives the error for an empty edit list
        try:
            installed.patch = apply_edits(model, to_patch)
        except Exception:
            installed.remove()
            raise
    return installed


@contextmanager
def edits_installed(model: Any, edits_or_installer: "EditConfig | list[EditConfig] | Callable[[Any], Any]") -> Iterator[Any]:
    """``install_edits`` (or a custom installer ``fn(model) -> handle with remove()``) for a ``with`` block."""
    handle = edits_or_installer(model) if callable(edits_or_installer) else install_edits(model, edits_or_installer)
    try:
        yield handle
    finally:
        handle.remove()
