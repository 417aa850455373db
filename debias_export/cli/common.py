"""Options and helpers shared by CLI commands."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from ..core.choices import BUILTIN_MODEL_SPECS, HUB_ENV
from ..core.errors import DebiasError
from ..core.fileio import refuse_existing
from ..core.specs import OPEN_CLIP_PREFIXES, check_source, open_clip_names  # noqa: F401  (re-exported for commands)


def load_model_spec(spec: str, family: str | None = None, **kwargs: Any) -> Any:
    """:func:`debias_export.workflow.model_specs.load_model_spec`, imported when a command runs."""
    from ..workflow.model_specs import load_model_spec as load  # torch + transformers: not at --help time

    return load(spec, family=family, **kwargs)


def check_model_spec(spec: str | None) -> None:
    """Parse-time check of ``--model`` (no torch yet; ``cli.main`` runs it once every option parsed cleanly): a spec
    that names nothing -- no built-in model, no local path, no cached hub model while hub access is off -- fails at
    once with the closest known spec, before any data or model is loaded. The rest is resolved by ``workflow.model_specs``."""
    if spec is None or spec.partition(":")[0] in BUILTIN_MODEL_SPECS or spec.startswith(("arch:", *OPEN_CLIP_PREFIXES)):
        return
    if spec.split("@")[0] not in open_clip_names():
        check_source(spec, BUILTIN_MODEL_SPECS)


model_option = click.option(
    "--model", "model_spec", required=True,
    help=f"Model spec: {', '.join(BUILTIN_MODEL_SPECS[:5])} (tiny random models take ':SEED'), 'arch:NAME' (real config, "
         f"random weights), an exported or local model directory, or a hub id (downloads need --allow-hub or {HUB_ENV}=1).")
family_option = click.option("--family", default=None, help="Model family (default: detected from the config).")


class FloatOrWord(click.ParamType):
    """A finite float or one of a few words (``--value mean``)."""

    name = "number-or-word"

    def __init__(self, *words: str) -> None:
        self.words = words

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, str) and value in self.words:
            return value
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            self.fail(f"must be a finite number or {' / '.join(self.words)}, got {value}", param, ctx)
        return x


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


# ----- what every command prints: one-line warnings, progress, and a closing summary -----------------------------
def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (the CLI's style; never a raw Python ``UserWarning``)."""
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


def progress(iterable: Any = None, *, desc: str, total: int | None = None, unit: str = "it", disable: bool = False) -> Any:
    """A tqdm bar on stderr for anything over a few seconds (``disable``: the command's ``--no-progress``)."""
    from tqdm.auto import tqdm  # only commands that run long import it

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True)


def summary(headline: str, files: dict[str, Any] | None = None, next_step: str | None = None) -> None:
    """The closing lines of a command on stdout: the headline result, where its files are, the natural next command."""
    click.echo(headline)
    for what, where in (files or {}).items():
        click.echo(f"  {what}: {where}")
    if next_step:
        click.echo(f"next: {next_step}")


def warn_unread_site(adapter: Any, site: Any) -> None:
    """One warning line when the model never reads ``site`` (for capture / train-sae: data there is not what the
    model uses, e.g. LLaVA's image.-1); silent otherwise."""
    message = adapter.unread_site_message(site)
    if message is not None:
        warn(message)


def check_site_read(adapter: Any, site: Any, allowed: bool, flag: str = "--allow-unread-site") -> None:
    """Refuse (or, with ``allowed``, warn about) a site the model never reads: LLaVA's ``image.-1`` lies after
    ``vision_feature_layer`` -2, so an edit there is silently a no-op and a capture there is not what the model uses."""
    message = adapter.unread_site_message(site)
    if message is None:
        return
    if not allowed:
        raise DebiasError(f"{message}; pass {flag} to go on anyway")
    warn(message)
