"""Options and helpers shared by CLI commands."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from ..core.fileio import refuse_existing  # noqa: F401  (re-exported for commands)


def load_model_spec(spec: str, family: str | None = None, **kwargs: Any) -> Any:
    """:func:`debias_export.workflow.model_specs.load_model_spec`, imported when a command runs."""
    from ..workflow.model_specs import load_model_spec as load  # torch + transformers: not at --help time

    return load(spec, family=family, **kwargs)


model_option = click.option("--model", "model_spec", required=True,
                            help="Hub id or local directory; 'tiny-clip' (tiny random CLIP) or 'arch:clip-vit-base-patch16' (real config, random weights).")
family_option = click.option("--family", default=None, help="Model family (default: detected from the config).")


class FiniteFloat(click.ParamType):
    """A finite float, optionally within bounds: NaN / Inf / out-of-range values fail at parse time, before any
    model or data is loaded (``click.FloatRange`` lets NaN through: every comparison with it is False)."""

    name = "number"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False,
                 max_open: bool = False) -> None:
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return (f"a finite number in {'(' if self.min_open else '['}{self.min:g}, {self.max:g}"
                    f"{')' if self.max_open else ']'}")
        if self.min is not None:
            return f"a finite number {'>' if self.min_open else '>='} {self.min:g}"
        if self.max is not None:
            return f"a finite number {'<' if self.max_open else '<='} {self.max:g}"
        return "a finite number"

    def check(self, x: float) -> bool:
        return math.isfinite(x) and not (
            self.min is not None and (x < self.min or (self.min_open and x == self.min))) and not (
            self.max is not None and (x > self.max or (self.max_open and x == self.max)))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float) and self.check(value):
            return value
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not self.check(x):
            self.fail(f"must be {self.describe()}, got {value}", param, ctx)
        return x


class FloatList(click.ParamType):
    """Comma-separated finite floats (each checked like :class:`FiniteFloat`), e.g. ``--alphas 0,0.5,1``."""

    name = "numbers"

    def __init__(self, item: FiniteFloat | None = None) -> None:
        self.item = item or FiniteFloat()

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            xs = [float(x) for x in str(value).split(",") if x.strip()]
        except ValueError:
            self.fail(f"must be comma-separated numbers, got {value!r}", param, ctx)
        if not xs:
            self.fail(f"must be comma-separated numbers, got {value!r}", param, ctx)
        bad = [x for x in xs if not self.item.check(x)]
        if bad:
            self.fail(f"each value must be {self.item.describe()}, got {', '.join(f'{x:g}' for x in bad)}", param, ctx)
        return xs


allow_mismatch_option = click.option(
    "--allow-mismatch", is_flag=True,
    help="Use an SAE / edit recorded for another model family, architecture or site anyway (prints a warning).")

POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)
SEED = click.IntRange(min=0, max=2**63 - 1)  # what torch.manual_seed accepts


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
