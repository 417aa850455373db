"""Options and helpers shared by CLI commands."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..adapters.specs import load_model_spec  # noqa: F401  (re-exported for commands)
from ..errors import DebiasError

model_option = click.option("--model", "model_spec", required=True,
                            help="Hub id or local directory; 'tiny-clip' (tiny random CLIP) or 'arch:clip-vit-base-patch16' (real config, random weights).")
family_option = click.option("--family", default=None, help="Model family (default: detected from the config).")


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Output directories are never clobbered silently."""
    if path.exists() and not overwrite:
        raise DebiasError(f"output {path} already exists (pass --overwrite to replace it)")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
