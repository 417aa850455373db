"""Edit kinds. Importing this package registers every built-in kind."""
from .base import (EditConfig, PatchHandle, apply_edits, compile_edit, load_edit, patch_tensors, register_edit,
                   registered_edit_kinds)
from .sae.edit import SAEEdit, reference_formula, reference_hook
from .projection.edit import ProjectionEdit  # noqa: F401

__all__ = ["EditConfig", "PatchHandle", "apply_edits", "compile_edit", "load_edit", "patch_tensors", "register_edit",
           "registered_edit_kinds", "SAEEdit", "ProjectionEdit", "reference_formula", "reference_hook"]
