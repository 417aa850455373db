"""Capture a site's activations over labelled inputs into a directory of shards (``format``), written by
``run`` (resumable, cached by settings) and read back by ``store``; ``shards`` feeds SAE training."""
from ..core.choices import TOKEN_MODES
from .format import DTYPES, FORMAT, MANIFEST, PER_INPUT, PER_TOKEN, VERSION, CaptureResult, model_fingerprint
from .run import InputCache, capture_activations
from .shards import ActivationShards, open_activations
from .store import ActivationStore

__all__ = ["TOKEN_MODES", "DTYPES", "FORMAT", "MANIFEST", "PER_INPUT", "PER_TOKEN", "VERSION", "CaptureResult",
           "model_fingerprint", "InputCache", "capture_activations", "ActivationShards", "open_activations", "ActivationStore"]
