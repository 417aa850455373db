"""Options and helpers shared by CLI commands."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..adapters import ModelAdapter, load_adapter
from ..errors import DebiasError

model_option = click.option("--model", "model_spec", required=True,
                            help="Hub id or local directory of the model (or 'tiny-clip' for a tiny random CLIP).")
family_option = click.option("--family", default=None, help="Model family (default: detected from the config).")


def load_model_spec(spec: str, family: str | None = None, **kwargs: Any) -> ModelAdapter:
    """Load a model named on the command line. ``tiny-clip[:seed]`` builds a tiny random CLIP offline."""
    if spec.startswith("tiny-clip"):
        from ..testing import tiny_clip

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        adapter = tiny_clip(seed=seed)
        adapter.source = spec
        return adapter
    return load_adapter(spec, family=family, **kwargs)


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Output directories are never clobbered silently."""
    if path.exists() and not overwrite:
        raise DebiasError(f"output {path} already exists (pass --overwrite to replace it)")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
