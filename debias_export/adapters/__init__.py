"""Model families: the adapter interface (``base``), the lazy family registry (``registry``), one module per family,
and the tower anatomy (``anatomy``) the analysis and fold code read."""
from .base import ModelAdapter, OutputPositions
from .registry import adapter_for, detect_family, load_adapter, register_adapter, registered_families

__all__ = ["ModelAdapter", "OutputPositions", "adapter_for", "detect_family", "load_adapter", "register_adapter",
           "registered_families"]
