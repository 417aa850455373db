"""Error types. Every user-facing failure is a :class:`DebiasError` with a one-line message.

The CLI turns these into ``error: <message>`` on stderr and exit code 2 (no traceback unless
``--debug``). Library code raises them with messages that name what did not match, peft-style.
"""
from __future__ import annotations


class DebiasError(Exception):
    """A problem with the user's input, files or settings (not a bug in debias-export)."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep messages on one line: they are printed as-is by the CLI.
        super().__init__(" ".join(str(message).split()))


class ConfigError(DebiasError):
    """Bad recipe / edit / SAE configuration values or keys."""


class ShapeError(DebiasError):
    """A tensor does not have the width or shape the model site needs."""


class IntegrityError(DebiasError):
    """A file is corrupt, truncated, tampered with or does not match its manifest."""


class ValidationError(DebiasError):
    """An exported artifact does not reproduce the PyTorch model within tolerance."""


class NotBuiltError(DebiasError):
    """A variant's edit does not exist on this model and data (probing found no social neuron).

    A finding about the model, not a crash: a multi-variant run records the variant as "not built" with this
    message and goes on with the others; a run with nothing built still stops with it (exit 2)."""


class CheckFailed(DebiasError):
    """A check ran on good input and found a difference (``reproduce``: artifacts differ; ``compare``: conclusions
    differ): exit 1, a finding, not 2 (bad input)."""

    exit_code = 1


def check_finite(name: str, tensor) -> None:
    """Raise when a tensor holds NaN or Inf (merged/folded weights must stay finite)."""
    import torch  # core/ stays torch-free: the CLI imports it at --help

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise DebiasError(f"{name} contains NaN or Inf values")
