"""Projection edits (RES-FAIR / LEACE), one module per step: config -> compile (patched) | fold (weights) | fit."""
from ...core.choices import EXPORT_FOLDS, FOLD_MODES
from .compile import compile_projection_edit, reference_map
from .config import ProjectionEdit
from .fit import capture_fit_activations, fit_from_capture, read_fair_directions
from .fold import FoldHandle, fold_all, fold_projection, fold_record, split_folded

__all__ = ["EXPORT_FOLDS", "FOLD_MODES", "ProjectionEdit", "compile_projection_edit", "reference_map", "FoldHandle",
           "fold_projection", "fold_all", "fold_record", "split_folded", "capture_fit_activations", "fit_from_capture",
           "read_fair_directions"]
