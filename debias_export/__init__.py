"""debias-export: compile interpretability-based debiasing edits into encoders and export them."""
from .adapters import adapter_for, load_adapter, registered_families
from .edits import ProjectionEdit, SAEEdit, apply_edits, load_edit
from .edits.projection.edit import fold_projection
from .core.errors import DebiasError
from .export import load_patched
from .sae import SAEConfig, SparseAutoencoder
from .core.sites import Site

__version__ = "0.1.0"

__all__ = ["adapter_for", "load_adapter", "load_patched", "registered_families", "SAEEdit", "ProjectionEdit", "fold_projection", "apply_edits", "load_edit", "DebiasError",
           "SAEConfig", "SparseAutoencoder", "Site", "__version__"]
