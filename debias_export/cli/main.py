"""``debias-export`` command line. Each command lives in its own module under ``cli/``, imported on use.

Errors: a :class:`~debias_export.core.errors.DebiasError` (or click usage error) prints one line and exits
2; anything else is a bug and also prints one line unless ``--debug`` asks for the traceback.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Any, Callable

import click

from ..core.choices import HUB_ENV
from ..core.errors import DebiasError
from ..core.fileio import disk_full
from .common import check_model_spec

# command name -> (module under cli/, attribute). Commands are imported when invoked (or listed by --help), and
# a command module imports only click and core/ at its top, so `debias-export [COMMAND] --help` loads no torch.
COMMANDS = {
    "capture": ("capture", "capture"),
    "train-sae": ("train_sae", "train_sae"),
    "probe": ("probe", "probe"),
    "patch": ("patch", "patch"),
    "export": ("export", "export"),
    "validate": ("validate", "validate"),
    "verify": ("verify", "verify"),
    "run": ("run", "run"),
    "bench": ("bench", "bench"),
    "eval": ("eval", "eval_cmd"),
    "locate": ("locate", "locate"),
    "bias-lab": ("bias_lab", "bias_lab"),
    "project": ("project", "project"),
    "reproduce": ("reproduce", "reproduce"),
    "compare": ("compare", "compare"),
}


class LazyGroup(click.Group):
    """A click group whose commands are imported by module name on first use (click's documented lazy-loading pattern)."""

    def __init__(self, *args: Any, lazy_commands: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, attr = self.lazy_commands[cmd_name]
            command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
            if command.name != cmd_name:
                raise RuntimeError(f"cli.{module}.{attr} is named {command.name!r}, listed as {cmd_name!r}")
            if any(p.name == "model_spec" for p in command.params):
                command.parse_args = _checking_model_spec(command.parse_args)
            self.add_command(command)
        return self.commands.get(cmd_name)


def _checking_model_spec(parse_args: Callable[[click.Context, list[str]], list[str]]) -> Callable[[click.Context, list[str]], list[str]]:
    """A command's ``parse_args`` followed by the cheap ``--model`` check (``common.check_model_spec``): after every
    option parsed (their own errors come first), before the command body imports torch."""
    def parse_and_check(ctx: click.Context, args: list[str]) -> list[str]:
        rest = parse_args(ctx, args)
        check_model_spec(ctx.params.get("model_spec"))
        return rest

    return parse_and_check


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--allow-hub", is_flag=True,
              help=f"Let --model hub ids download from the Hugging Face hub (default: off; or set {HUB_ENV}=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, allow_hub: bool) -> None:
    """Compile debiasing edits into VLM encoders; export, validate and benchmark them."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if debug:
        os.environ["DEBIAS_EXPORT_DEBUG"] = "1"
    if allow_hub:  # read by adapters.specs wherever a model spec is resolved
        os.environ[HUB_ENV] = "1"


class _StderrHandler(logging.Handler):
    """Library warnings (``warning: ...`` lines from the ``debias_export`` loggers) on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _show_library_warnings() -> None:
    logger = logging.getLogger("debias_export")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """Python warnings (ours and the libraries') as ``warning: ...`` lines: the first line of the message, no source line."""
    text = str(message).strip().splitlines()
    click.echo(f"warning: {text[0] if text else category.__name__}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to one line + exit code 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    _show_library_warnings()
    with warnings.catch_warnings():  # restores the caller's warning display on the way out (in-process callers)
        if not debug:  # --debug keeps Python's own format (file and line of each warning)
            warnings.showwarning = _one_line_warning
        return _run(argv, debug)


def _run(argv: list[str] | None, debug: bool) -> int:
    try:
        cli.main(args=argv, prog_name="debias-export", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except DebiasError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except OSError as exc:  # disk full, permissions...: the user's environment, not a bug
        if debug:
            raise
        if disk_full(exc):  # outside an atomic output dir (those say "nothing was changed" themselves)
            click.echo(f"error: no space left on device while writing {exc.filename or 'the output'}", err=True)
            return 2
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: still one line unless --debug
        if debug:
            raise
        if disk_full(exc):  # safetensors reports ENOSPC as its own SafetensorError
            click.echo("error: no space left on device while writing a safetensors file", err=True)
            return 2
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: internal error {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
