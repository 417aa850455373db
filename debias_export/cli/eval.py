"""``debias-export eval``: bias and utility of a model, before/after a patch.

CLIP-style families (two towers): MaxSkew/NDKL retrieval skew, PAIRS gaps and utility. The llava
family: the VLAGenderBias-style yes/no metric (gender disproportion rate, mean |P(yes) - 0.5|) on
labelled faces. Options that only one kind of metric reads are refused for the other.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from ..core.choices import PVALUE_CORRECTIONS
from ..core.errors import DebiasError
from ..core.model_match import allow_mismatch as mismatch_allowed
from .common import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    FiniteFloat,
    FloatList,
    allow_mismatch_option,
    load_model_spec,
    model_option,
    progress,
    refuse_existing,
    summary,
)

# options read by only one kind of metric: given explicitly for the other, they are an error, not ignored
RETRIEVAL_ONLY = ("k", "shuffles")
LLAVA_ONLY = ("faces", "correction", "batch_size")


def _refuse_options(ctx: click.Context, names: tuple[str, ...], family: str) -> None:
    from click.core import ParameterSource

    given = [n for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise DebiasError(f"{flags} do(es) not apply to the {family} family's bias metric")


@click.command("eval")
@model_option
@click.option("--patched", "patched_dir", type=click.Path(path_type=Path), default=None,
              help="Exported patched model directory to compare against --model.")
@click.option("--edit", "edit_dir", type=click.Path(path_type=Path), default=None,
              help="Edit folder applied to --model for the comparison.")
@click.option("--alphas", default=None, type=FloatList(FiniteFloat(0.0, 1.0)), help="With --edit: sweep the edit's alpha over these values, e.g. 0,0.25,0.5,1.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Shared data directory (default: $DEBIAS_EXPORT_DATA or ../shared/data).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Report directory to create.")
@click.option("-k", "--k", "k", default=50, show_default=True, type=POSITIVE_INT, help="Top-k for MaxSkew / NDKL (CLIP-style families).")
@click.option("--shuffles", default=10, show_default=True, type=NON_NEGATIVE_INT,
              help="Shuffled-label noise-floor repeats (CLIP-style families).")
@click.option("--prompt-sets", default=None,
              help="Comma-separated subset of adjectives,occupations,activities,stereotypes (llava: the first three).")
@click.option("--limit", "--max-images", "limit", type=click.IntRange(min=2), default=None,
              help="Quick runs: the first N FairFace images (CLIP-style); a gender-balanced sample of N faces (llava).")
@click.option("--faces", default="fairface540", show_default=True,
              help="llava: labelled face set under the data dir (a folder with labels.csv: file,gender).")
@click.option("--correction", type=click.Choice(PVALUE_CORRECTIONS), default="bh", show_default=True,
              help="llava: multiple-testing correction of the per-question Mann-Whitney U p-values.")
@click.option("--batch-size", default=8, show_default=True, type=POSITIVE_INT, help="llava: prompts per forward pass.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar and stage lines.")
@allow_mismatch_option
@click.pass_context
def eval_cmd(ctx: click.Context, model_spec: str, patched_dir: Path | None, edit_dir: Path | None, alphas: list[float] | None,
             data_dir: Path | None, out_dir: Path, k: int, shuffles: int, prompt_sets: str | None, limit: int | None,
             faces: str, correction: str, batch_size: int, overwrite: bool, no_progress: bool, allow_mismatch: bool) -> None:
    """Evaluate a model's bias (and utility); with --patched/--edit, before vs after; with --alphas, a sweep."""
    import torch

    from ..eval.llava_eval import write_llava_report
    from ..eval.report import write_report

    if patched_dir is not None and edit_dir is not None:
        raise DebiasError("give either --patched or --edit, not both")
    alpha_list = alphas
    if alpha_list is not None and edit_dir is None:
        raise DebiasError("--alphas needs --edit (the edit whose alpha is swept)")
    refuse_existing(out_dir, overwrite)
    sets = [s.strip() for s in prompt_sets.split(",")] if prompt_sets else None
    adapter = load_model_spec(model_spec)
    vla = adapter.bias_metric == "vla_gender_bias"  # the family's metric: yes/no questions instead of retrieval
    if not vla and limit is not None and k > limit:  # before minutes of embedding
        raise DebiasError(f"--k {k} is larger than the image pool of --limit {limit} images")
    edit = None
    if edit_dir is not None:
        from ..edits import load_edit

        edit = load_edit(edit_dir)
        if alpha_list is not None and not hasattr(edit, "alpha"):
            raise DebiasError(f"edit kind {edit.kind!r} has no alpha to sweep")
    stage = (lambda msg: None) if no_progress else (lambda msg: click.echo(f"eval: {msg}", err=True))
    if edit is not None and alpha_list is not None:  # one tick per alpha of the sweep
        bar = progress(total=len(alpha_list), desc="eval: alpha sweep", unit="alpha", disable=no_progress)
        edit_at = edit

        def make_edit(a: float):
            bar.update(1)
            return dataclasses.replace(edit_at, alpha=a)
    else:
        bar, make_edit = None, None
    with torch.no_grad(), mismatch_allowed(allow_mismatch):  # one block: a mismatch is said once, not per alpha
        if edit is not None:
            edit.validate(adapter)  # site, width and recorded model: now, not after minutes of embedding
        if vla:
            _refuse_options(ctx, RETRIEVAL_ONLY, adapter.family)
            result = _llava(adapter, patched_dir, edit, alpha_list, data_dir, sets, limit, faces, correction, batch_size,
                            make_edit, stage)
        else:
            _refuse_options(ctx, LLAVA_ONLY, adapter.family)
            result = _retrieval(adapter, patched_dir, edit, alpha_list, data_dir, sets, limit, k, shuffles, make_edit, stage)
    if bar is not None:
        bar.close()
    (write_llava_report if vla else write_report)(result, out_dir, overwrite=overwrite)
    summary(headline(result, k), files={"report": out_dir / "report.md", "metrics": out_dir / "metrics.json"},
            next_step=_next_step(model_spec, patched_dir, edit_dir, alpha_list))


def _next_step(model_spec: str, patched_dir: Path | None, edit_dir: Path | None, alphas: list[float] | None) -> str:
    if edit_dir is not None and alphas is None:
        return f"debias-export eval --model {model_spec} --edit {edit_dir} --alphas 0,0.25,0.5,0.75,1 --out SWEEP_DIR (the trade-off curve)"
    if edit_dir is not None:
        return f"debias-export export --model {model_spec} --edit {edit_dir} --out EXPORT_DIR (edit the alpha in edit_config.json first)"
    if patched_dir is not None:
        return f"debias-export bench --export {patched_dir} --out BENCH_DIR (its cost)"
    return "debias-export locate --model ... (where the bias lives), then capture / project or train-sae / probe / patch"


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "?"


def headline(result: Any, k: int) -> str:
    """One line of the numbers that matter: gender MaxSkew@k per prompt set (before -> after, with the change's
    interval), or the VLAGenderBias disproportion rate; what the report leads with."""
    try:
        if isinstance(result, list):  # a sweep: one row per alpha
            if result and "metric" not in result[0]:
                sets = list(result[0]["retrieval"])[:1]
                pts = ", ".join(f"a={r['alpha']:g}: {_fmt(r['retrieval'][s]['gender']['max_skew'])}" for r in result for s in sets)
                return f"gender MaxSkew@{k} ({sets[0]}) along the sweep: {pts}"
            return f"swept {len(result)} alphas"
        if result.get("metric"):  # llava
            base, after = result.get("base", result), result.get("patched")
            rate = f"gender disproportion rate {_fmt(base.get('disproportion_rate'))}"
            return rate + (f" -> {_fmt(after.get('disproportion_rate'))}" if isinstance(after, dict) else "")
        if "bias_change" in result:
            parts = []
            for s, change in result["bias_change"].items():
                g = change.get("gender")
                if g is None:
                    continue
                before = result["base"]["retrieval"][s]["gender"]["max_skew"]
                after = result["patched"]["retrieval"][s]["gender"]["max_skew"]
                parts.append(f"{s} {_fmt(before)} -> {_fmt(after)} ({g['change']:+.1%} [{g['ci_low']:+.0%}, {g['ci_high']:+.0%}])")
            cos = result.get("fidelity", {}).get("image_cosine", {}).get("mean")
            return f"gender MaxSkew@{k}: " + "; ".join(parts) + (f"; image embedding cosine {_fmt(cos)}" if cos is not None else "")
        parts = [f"{s} {_fmt(v['gender']['max_skew'])}" for s, v in result["retrieval"].items() if "gender" in v]
        acc = result.get("utility", {}).get("gender_zero_shot_acc")
        return f"gender MaxSkew@{k}: " + "; ".join(parts) + (f"; gender zero-shot accuracy {_fmt(acc)}" if acc is not None else "")
    except (KeyError, TypeError, IndexError, AttributeError):  # a result shape this summary does not know: the report has it
        return "evaluation finished"


def _retrieval(adapter, patched_dir, edit, alpha_list, data_dir, sets, limit, k, shuffles, make_edit, stage):
    """MaxSkew/NDKL, PAIRS and utility (families with an image and a text tower)."""
    from ..eval.retrieval import EvalData, compare, evaluate, sweep_alpha

    if "text" not in adapter.towers():
        raise DebiasError(f"the retrieval metrics need an image and a text tower; {adapter.family} has {list(adapter.towers())}")
    stage(f"loading FairFace{f' (first {limit})' if limit else ''}, PAIRS and the prompt sets")
    data = EvalData.load(adapter, data_dir, sets, max_images=limit)
    if patched_dir is not None:
        from ..export.loading import load_patched

        stage(f"embedding with the unmodified and the exported model ({shuffles} shuffled-label repeats)")
        return compare(adapter, load_patched(patched_dir), k=k, shuffles=shuffles, data=data)
    if edit is not None and alpha_list is not None:
        return sweep_alpha(adapter, make_edit, alpha_list, k=k, data=data)
    if edit is not None:
        stage(f"embedding without and with the edit ({shuffles} shuffled-label repeats)")
        return compare(adapter, edit, k=k, shuffles=shuffles, data=data)
    stage(f"embedding ({shuffles} shuffled-label repeats)")
    return evaluate(adapter, k=k, shuffles=shuffles, data=data)


def _llava(adapter, patched_dir, edit, alpha_list, data_dir, sets, limit, faces, correction, batch_size, make_edit, stage):
    """VLAGenderBias-style yes/no gender bias of a LLaVA model."""
    from ..eval.llava_eval import LlavaEvalData, compare_llava, evaluate_llava, processor_of, sweep_llava

    processor_of(adapter)  # fail before loading hundreds of images
    stage(f"loading {faces}{f' (a balanced {limit})' if limit else ''}")
    data = LlavaEvalData.load(data_dir, dataset=faces, limit=limit, prompt_sets=sets)
    stage("asking the yes/no questions")
    kw = {"correction": correction, "batch_size": batch_size}
    if patched_dir is not None:
        from ..export.loading import load_patched

        return compare_llava(adapter, load_patched(patched_dir), data, **kw)
    if edit is not None and alpha_list is not None:
        return sweep_llava(adapter, make_edit, alpha_list, data, **kw)
    if edit is not None:
        return compare_llava(adapter, edit, data, **kw)
    return evaluate_llava(adapter, data, **kw)
