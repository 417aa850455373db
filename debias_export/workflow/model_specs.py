"""Turn a model spec string (CLI / recipe) into an adapter."""
from __future__ import annotations

import os
from typing import Any, Callable

from ..adapters import ModelAdapter, load_adapter, registered_families
from ..adapters.real_configs import random_clip
from ..core.errors import DebiasError
from ..export import load_patched
from .biaslab import lab_adapter


def tiny_builders() -> dict[str, Callable[[int], ModelAdapter]]:
    """Tiny random models by spec name (``tiny-clip``, ...: offline smoke runs and tests), one per family that has one."""
    return {cls.tiny_name: cls.tiny for cls in registered_families().values() if cls.tiny_name}


def load_model_spec(spec: str, family: str | None = None, **kwargs: Any) -> ModelAdapter:
    """Hub id or local dir; ``tiny-clip|tiny-open-clip|tiny-llava|tiny-dual-encoder[:seed]`` (tiny random models, offline); ``biaslab`` (the bias lab dual encoder, shipped weights); ``arch:<name>`` (real
    architecture config from :mod:`debias_export.adapters.real_configs` with random weights, for latency/export work)."""
    name, _, seed_text = spec.partition(":")
    builders = tiny_builders() if name.startswith("tiny-") else {}
    if name in builders:
        try:
            seed = int(seed_text) if seed_text else 0
        except ValueError:
            raise DebiasError(f"bad model spec {spec!r}: seed {seed_text!r} is not an integer") from None
        adapter = builders[name](seed)
    elif spec == "biaslab":
        # The offline real-bias reference model: shipped weights + the packaged MiniLM, built instantly.
        adapter = lab_adapter()
    elif spec.startswith("arch:"):
        adapter = random_clip(spec[5:])
    elif os.path.isfile(os.path.join(spec, "debias_config.json")) or os.path.isfile(os.path.join(spec, "hf", "debias_config.json")):
        # A patched export: load it patched (a stock loader would silently drop the edit).
        return load_patched(spec)
    else:
        return load_adapter(spec, family=family, **kwargs)
    adapter.source = spec
    return adapter
