"""Turn a model spec string (CLI / recipe) into an adapter."""
from __future__ import annotations

import os
from typing import Any

from ..adapters import ModelAdapter, load_adapter
from ..adapters.dual_encoder import tiny_dual_encoder
from ..adapters.llava import tiny_llava
from ..adapters.open_clip_family import tiny_open_clip
from ..adapters.real_configs import random_clip
from ..core.errors import DebiasError
from ..export import load_patched
from .biaslab import lab_adapter
from .testing import tiny_clip


def _tiny_clip(seed: int) -> ModelAdapter:
    return tiny_clip(seed=seed)


def _tiny_open_clip(seed: int) -> ModelAdapter:
    return tiny_open_clip(seed=seed)


def _tiny_llava(seed: int) -> ModelAdapter:
    return tiny_llava(seed=seed)


def _tiny_dual_encoder(seed: int) -> ModelAdapter:
    return tiny_dual_encoder(seed=seed)


# Tiny random models by name (offline smoke runs and tests); ``name[:seed]`` on the command line.
TINY_BUILDERS = {"tiny-clip": _tiny_clip, "tiny-open-clip": _tiny_open_clip, "tiny-llava": _tiny_llava,
                 "tiny-dual-encoder": _tiny_dual_encoder}


def load_model_spec(spec: str, family: str | None = None, **kwargs: Any) -> ModelAdapter:
    """Hub id or local dir; ``tiny-clip|tiny-open-clip|tiny-llava|tiny-dual-encoder[:seed]`` (tiny random models, offline); ``biaslab`` (the bias lab dual encoder, shipped weights); ``arch:<name>`` (real
    architecture config from :mod:`debias_export.adapters.real_configs` with random weights, for latency/export work)."""
    name, _, seed_text = spec.partition(":")
    if name in TINY_BUILDERS:
        try:
            seed = int(seed_text) if seed_text else 0
        except ValueError:
            raise DebiasError(f"bad model spec {spec!r}: seed {seed_text!r} is not an integer") from None
        adapter = TINY_BUILDERS[name](seed)
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
