"""SAE neuron-zeroing edits (DeBiasLens): the config and its compile to the fused runtime module (float64 fold)."""
from .edit import MODES, SAEEdit, compile_sae_edit, reconstruction_only_hook, reference_formula, reference_hook

__all__ = ["MODES", "SAEEdit", "compile_sae_edit", "reconstruction_only_hook", "reference_formula",
           "reference_hook"]
