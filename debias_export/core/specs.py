"""Model specs offline first: which strings name a hub download, and a fast, helpful refusal when hub access is off.

A model spec that is not a built-in name (``tiny-clip``, ``biaslab``, ``arch:...``) is a local directory or a
hub id. Hub access is **off** unless the user turns it on (``DEBIAS_EXPORT_ALLOW_HUB=1``, or the CLI's
``debias-export --allow-hub``): a typo such as ``tiny-clipp`` must not cost half a minute of hub retries on an
offline machine, and nothing may download behind the user's back. With hub access off, a hub id already in the
local Hugging Face cache still loads (``local_files_only=True``, no network).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable

from .choices import HUB_ENV
from .errors import DebiasError

_TRUE = ("1", "true", "yes", "on")
# files whose presence in the local hub cache means "this repo was downloaded before" (HF / open_clip layouts)
_CACHE_MARKERS = ("config.json", "open_clip_config.json")
# built-in spec forms (never a hub id or a directory): tiny random models, real configs, the bias lab
BUILTIN_PREFIXES = ("tiny-", "arch:", "biaslab:")
BUILTIN_NAMES = ("biaslab",)
OPEN_CLIP_PREFIXES = ("open_clip:", "hf-hub:", "local-dir:")  # open_clip's own spec forms (adapters.open_clip_family)


class UnknownModelSpec(DebiasError):
    """A model spec that is neither built in, nor a local path, nor reachable (hub access off, not cached)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def hub_allowed() -> bool:
    """Whether model specs may be downloaded from the hub: ``DEBIAS_EXPORT_ALLOW_HUB=1`` and not ``HF_HUB_OFFLINE=1``."""
    return _env_true(HUB_ENV) and not _env_true("HF_HUB_OFFLINE")


def hub_kwargs() -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: ``local_files_only=True`` while hub access is off (cache only, no network)."""
    return {} if hub_allowed() else {"local_files_only": True}


def in_hub_cache(repo_id: str) -> bool:
    """Whether ``repo_id`` was downloaded before (its config sits in the local hub cache); never touches the network."""
    from huggingface_hub import try_to_load_from_cache  # core/ stays light: the CLI checks specs at parse time

    for name in _CACHE_MARKERS:
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except Exception:  # noqa: BLE001 - not a valid repo id (HFValidationError): not in the cache either
            return False
    return False


def open_clip_names() -> set[str]:
    """open_clip's architecture names, read from its package's config folder without importing it (seconds)."""
    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        return set()
    return {p.stem for loc in found.submodule_search_locations for p in Path(loc, "model_configs").glob("*.json")}


def is_builtin_spec(spec: str) -> bool:
    """``tiny-*[:seed]``, ``arch:*``, ``biaslab[:DIR]``: specs no hub or directory lookup should see."""
    return spec.startswith(BUILTIN_PREFIXES) or spec in BUILTIN_NAMES


def suggest(spec: str, candidates: Iterable[str]) -> str | None:
    """The closest known spec to a mistyped one (``tiny-clipp`` -> ``tiny-clip``), or None."""
    if "/" in spec or os.sep in spec:  # a hub id or a path: a built-in name is not what was meant
        return None
    name = spec.partition(":")[0] if spec.startswith("tiny-") else spec
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_spec_message(spec: str, candidates: Iterable[str]) -> str:
    """``unknown model spec 'x' (did you mean 'y'? local directory not found; hub access is off ...)``: one line."""
    guess = suggest(spec, candidates)
    hint = f"did you mean {guess!r}? " if guess else ""
    if hub_allowed():
        return f"unknown model spec {spec!r} ({hint}local directory not found and the hub has no such model)"
    why = "HF_HUB_OFFLINE=1" if _env_true("HF_HUB_OFFLINE") and _env_true(HUB_ENV) else f"{HUB_ENV}=1 turns it on"
    return f"unknown model spec {spec!r} ({hint}local directory not found; hub access is off: {why})"


def check_source(spec: str, candidates: Iterable[str] = ()) -> None:
    """Refuse at once a spec that names no local path and no cached hub model while hub access is off.

    Called before any ``from_pretrained`` so that nothing reaches for the network; ``candidates`` are the
    known spec names a typo is matched against."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelSpec(f"model spec must be a non-empty string, got {spec!r}")
    if os.path.exists(spec) or hub_allowed() or in_hub_cache(spec):
        return
    raise UnknownModelSpec(unknown_spec_message(spec, candidates))
