"""Turn a model spec string (CLI / recipe / ``debias_export.load_adapter``) into an adapter: the one resolution path.

Offline first: built-in specs build locally, directories load from disk, and a hub id is downloaded only when
hub access is on (``DEBIAS_EXPORT_ALLOW_HUB=1`` or ``debias-export --allow-hub``; see ``adapters.specs``). An
unknown spec fails at once with the closest known spec.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from ..adapters import ModelAdapter, registered_families
from ..adapters import load_adapter as load_family_adapter
from ..adapters.real_configs import CONFIGS, random_clip
from ..adapters.registry import tiny_spec_names
from ..core.specs import OPEN_CLIP_PREFIXES, check_source, open_clip_names
from ..export import load_patched
from .biaslab import lab_adapter


def tiny_builders() -> dict[str, Callable[[int], ModelAdapter]]:
    """Tiny random models by spec name (``tiny-clip``, ...: offline smoke runs and tests), one per family that has one."""
    return {cls.tiny_name: cls.tiny for cls in registered_families().values() if cls.tiny_name}


def known_specs() -> list[str]:
    """Every built-in spec name (what a typo is matched against)."""
    arch = [f"arch:{name}" for name in CONFIGS if not name.startswith("llava")]
    return [*tiny_spec_names(), "biaslab", *arch]


def is_export_dir(spec: str) -> bool:
    """A patched export (its root or its ``hf/``): must load patched, a stock loader would silently drop the edit."""
    return os.path.isfile(os.path.join(spec, "debias_config.json")) or os.path.isfile(os.path.join(spec, "hf", "debias_config.json"))


def load_model_spec(spec: "str | os.PathLike[str]", family: str | None = None, **kwargs: Any) -> ModelAdapter:
    """Every model spec the CLI accepts, as an adapter:

    - ``tiny-clip|tiny-open-clip|tiny-llava|tiny-dual-encoder[:seed]``: tiny random models (offline);
    - ``biaslab``: the bias lab dual encoder (shipped weights); ``biaslab:DIR``: another trained lab's folder
      (``weights.safetensors`` + ``recipe.json``, e.g. ``bias-lab --retrain --seed 1 --out DIR``);
    - ``arch:<name>``: a real architecture config from :mod:`debias_export.adapters.real_configs`, random weights;
    - a patched export directory (loaded patched, :func:`debias_export.load_patched`);
    - a local model directory, ``open_clip:NAME[@pretrained]``, or a hub id (downloaded only with hub access on).
    """
    spec = os.fspath(spec)
    if spec == "biaslab":
        # The offline real-bias reference model: shipped weights + the packaged MiniLM, built instantly.
        adapter = lab_adapter()
    elif spec.startswith("biaslab:"):
        # a second, independently trained lab (results must hold on more than one lab: issue #15)
        adapter = lab_adapter(spec[len("biaslab:"):])
    elif spec.startswith("arch:"):
        adapter = random_clip(spec[5:])
    elif is_export_dir(spec):
        return load_patched(spec)
    else:
        if (spec.partition(":")[0] not in tiny_spec_names() and not spec.startswith(OPEN_CLIP_PREFIXES)
                and spec.split("@")[0] not in open_clip_names()):
            check_source(spec, known_specs())  # before any hub lookup: a typo fails here, with a suggestion
        return load_family_adapter(spec, family=family, **kwargs)
    adapter.source = spec
    return adapter


# the public name (``debias_export.load_adapter``): every spec, one resolution path
load_adapter = load_model_spec
