"""SAE neuron-zeroing edits (DeBiasLens): config and compile (float64 fold)."""
from .edit import (MODES, SAEEdit,
                   compile_sae_edit, reference_formula, reference_hook)
