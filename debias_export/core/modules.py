"""The one parent/child module swap (the only place that splits a dotted module path).

Folding an edit into a Linear (projection folds, benchmark copies) replaces a submodule of the user's
model and must put the original back exactly; ``runtime.py`` stays torch-only and does not use this.
"""
from __future__ import annotations

from torch import nn


def parent_and_name(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the submodule at dotted ``path`` under ``root``."""
    parent_name, _, child = path.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def swap_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` under ``root``; returns the module that was there (to swap back later)."""
    parent, child = parent_and_name(root, path)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
