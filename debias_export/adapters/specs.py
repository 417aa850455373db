"""Turn a model spec string (CLI / recipe) into an adapter."""
from __future__ import annotations

from typing import Any

from .base import ModelAdapter, load_adapter


def load_model_spec(spec: str, family: str | None = None, **kwargs: Any) -> ModelAdapter:
    """Hub id or local dir; ``tiny-clip[:seed]`` (tiny random CLIP, offline); ``arch:<name>`` (real
    architecture config from :mod:`debias_export.real_configs` with random weights, for latency/export work)."""
    if spec.startswith("tiny-clip"):
        from ..testing import tiny_clip

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        adapter = tiny_clip(seed=seed)
    elif spec.startswith("arch:"):
        from ..real_configs import random_clip

        adapter = random_clip(spec[5:])
    else:
        return load_adapter(spec, family=family, **kwargs)
    adapter.source = spec
    return adapter
