"""``debias-export eval``: bias (MaxSkew/NDKL, PAIRS gaps) and utility of a model, before/after a patch."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..errors import DebiasError
from .common import load_model_spec, model_option, refuse_existing


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DebiasError(f"--alphas must be comma-separated numbers, got {text!r}") from None


@click.command("eval")
@model_option
@click.option("--patched", "patched_dir", type=click.Path(path_type=Path), default=None,
              help="Exported patched model directory to compare against --model.")
@click.option("--edit", "edit_dir", type=click.Path(path_type=Path), default=None,
              help="Edit folder applied to --model for the comparison.")
@click.option("--alphas", default=None, help="With --edit: sweep the edit's alpha over these values, e.g. 0,0.25,0.5,1.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Shared data directory (default: $DEBIAS_EXPORT_DATA or ../shared/data).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Report directory to create.")
@click.option("-k", "--k", "k", default=50, show_default=True, help="Top-k for MaxSkew / NDKL.")
@click.option("--shuffles", default=10, show_default=True, help="Shuffled-label noise-floor repeats (base model).")
@click.option("--prompt-sets", default=None, help="Comma-separated subset of adjectives,occupations,activities,stereotypes.")
@click.option("--max-images", type=int, default=None, help="Use only the first N FairFace images (quick runs).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def eval_cmd(model_spec: str, patched_dir: Path | None, edit_dir: Path | None, alphas: str | None, data_dir: Path | None,
             out_dir: Path, k: int, shuffles: int, prompt_sets: str | None, max_images: int | None, overwrite: bool) -> None:
    """Evaluate retrieval skew, PAIRS confidence gaps and utility; with --patched/--edit, before vs after."""
    import torch

    from ..eval.report import write_report
    from ..eval.retrieval import EvalData, compare, evaluate, sweep_alpha

    if patched_dir is not None and edit_dir is not None:
        raise DebiasError("give either --patched or --edit, not both")
    alpha_list = _floats(alphas)
    if alpha_list is not None and edit_dir is None:
        raise DebiasError("--alphas needs --edit (the edit whose alpha is swept)")
    refuse_existing(out_dir, overwrite)
    sets = [s.strip() for s in prompt_sets.split(",")] if prompt_sets else None
    adapter = load_model_spec(model_spec)
    data = EvalData.load(adapter, data_dir, sets, max_images=max_images)
    with torch.no_grad():
        if patched_dir is not None:
            from ..export.loading import load_patched

            result = compare(adapter, load_patched(patched_dir), k=k, shuffles=shuffles, data=data)
        elif edit_dir is not None:
            from ..edits import load_edit

            edit = load_edit(edit_dir)
            if alpha_list is not None:
                if not hasattr(edit, "alpha"):
                    raise DebiasError(f"edit kind {edit.kind!r} has no alpha to sweep")
                result = sweep_alpha(adapter, lambda a: dataclasses.replace(edit, alpha=a), alpha_list, k=k, data=data)
            else:
                result = compare(adapter, edit, k=k, shuffles=shuffles, data=data)
        else:
            result = evaluate(adapter, k=k, shuffles=shuffles, data=data)
    write_report(result, out_dir, overwrite=overwrite)
    click.echo(f"wrote {out_dir}/report.md and metrics.json")
