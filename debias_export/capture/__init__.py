"""Capture residual-stream activations at a site into an on-disk activation store."""
from .store import (MANIFEST,
                    FORMAT, VERSION, TOKEN_MODES, DTYPES, PER_TOKEN, PER_INPUT, CaptureResult, model_fingerprint,
                    capture_activations, ActivationStore)
