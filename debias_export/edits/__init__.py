"""Edit kinds, one package each (``sae/``, ``projection/``); importing this package registers both."""
from .base import (EditConfig, PatchHandle, apply_edits, compile_edit, current_patch, load_edit, patch_tensors, register_edit,
                   registered_edit_kinds)
from .sae import SAEEdit, reference_formula, reference_hook
from .projection import ProjectionEdit

__all__ = ["EditConfig", "PatchHandle", "apply_edits", "current_patch", "compile_edit", "load_edit", "patch_tensors", "register_edit",
           "registered_edit_kinds", "SAEEdit", "ProjectionEdit", "reference_formula", "reference_hook"]
