"""Projection edits (RES-FAIR / LEACE): config, compile, fold into weights, fit from a capture."""
from .edit import (
                   FOLD_MODES, EXPORT_FOLDS, ProjectionEdit, compile_projection_edit, reference_map, FoldHandle,
                   fold_projection, capture_fit_activations, fit_from_capture, split_folded, fold_all, fold_record)
