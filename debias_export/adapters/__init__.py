"""Model families. Importing this package registers every built-in family."""
from .base import ModelAdapter, OutputPositions, adapter_for, load_adapter, register_adapter, registered_families
from . import hf_clip  # noqa: F401  (registers "hf_clip")
from . import dual_encoder  # noqa: F401
from . import open_clip_family, llava  # noqa: F401

__all__ = ["ModelAdapter", "OutputPositions", "adapter_for", "load_adapter", "register_adapter", "registered_families"]
