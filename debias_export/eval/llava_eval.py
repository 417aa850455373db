"""VLAGenderBias evaluation of llava-family models for ``debias-export eval`` and recipes.

Wraps :mod:`debias_export.eval.llava_bias` (the metric) with what the CLI and the pipeline need:
labelled faces + yes/no questions from the shared data (loaded once), before/after an edit or a
patched export, an alpha sweep, the ``metrics.json`` / ``report.md`` content and the compact numbers
a recipe's ``run.json`` carries. Result dicts carry ``"metric": "vla_gender_bias"``; :func:`write_llava_report`
writes them with this module's renderer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..adapters import ModelAdapter
from ..core.errors import ConfigError, DebiasError
from ..data.datasets import load_rgb, resolve_data_dir
from ..edits.install import edits_installed
from .llava_bias import Question, gender_bias_report, load_labelled_faces, questions_from_prompts, yes_probabilities
from .report import write_report

METRIC = "vla_gender_bias"
PROMPT_SET_CATEGORIES = {"adjectives": "trait", "occupations": "occupation", "activities": "activity"}
SUMMARY_KEYS = ("disproportion_rate", "mean_abs_dev", "mean_abs_gap", "n_significant", "n_significant_female_higher")


@dataclass
class LlavaEvalData:
    """Faces (opened once, reused across before/after/sweep) and the questions asked about each."""

    dataset: str
    paths: list[Path]
    genders: list[str]
    questions: list[Question]
    images: list[Any]

    @classmethod
    def load(cls, data_dir: str | Path | None = None, dataset: str = "fairface540", limit: int | None = None,
             prompt_sets: Sequence[str] | None = None, seed: int = 0) -> "LlavaEvalData":
        """``limit``: a gender-balanced random sample of that many faces (``limit // 2`` per gender, seeded)."""
        root = resolve_data_dir(data_dir)
        if limit is not None and limit < 2:
            raise DebiasError(f"--limit must be >= 2 for the gender bias metric (one face per gender), got {limit}")
        paths, genders = load_labelled_faces(root, dataset, per_gender=None if limit is None else limit // 2, seed=seed)
        questions = questions_from_prompts(root)
        if prompt_sets is not None:
            unknown = sorted(set(prompt_sets) - set(PROMPT_SET_CATEGORIES))
            if unknown:
                raise DebiasError(f"prompt set(s) {unknown} do not apply to the LLaVA metric; "
                                  f"available: {', '.join(PROMPT_SET_CATEGORIES)}")
            keep = {PROMPT_SET_CATEGORIES[s] for s in prompt_sets}
            questions = [q for q in questions if q.category in keep]
        for p in paths:
            if not p.is_file():
                raise DebiasError(f"image file not found: {p} (listed in {root / dataset / 'labels.csv'})")
        images = [load_rgb(p) for p in paths]
        return cls(dataset, paths, genders, questions, images)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "faces": len(self.paths), "n_female": self.genders.count("female"),
                "n_male": self.genders.count("male"), "questions": len(self.questions)}


def processor_of(adapter: Any) -> Any:
    """The adapter's ``LlavaProcessor`` (tokenizer + image processor), or a one-line error."""
    proc = getattr(adapter, "processor", None)
    if proc is None or getattr(proc, "tokenizer", None) is None or getattr(proc, "image_processor", None) is None:
        raise ConfigError(f"LLaVA model {getattr(adapter, 'source', '?')!r} has no processor (tokenizer + image processor); "
                          "the gender bias metric needs one: load a checkpoint with processor files")
    return proc


def yes_matrix(adapter: Any, data: LlavaEvalData, processor: Any = None, batch_size: int = 8) -> torch.Tensor:
    """``P(yes)`` ``[faces, questions]`` of the adapter as it is now (patched or not)."""
    proc = processor if processor is not None else processor_of(adapter)
    return yes_probabilities(adapter, proc, data.images, data.questions, batch_size=batch_size)


def _report(p_yes: torch.Tensor, adapter: Any, data: LlavaEvalData, correction: str) -> dict[str, Any]:
    rep = gender_bias_report(p_yes, data.genders, data.questions, correction=correction)
    return {**rep, "model": adapter.describe(), "data": data.describe()}


def _fidelity(base: torch.Tensor, patched: torch.Tensor) -> dict[str, float]:
    """How far the edit moves the answers: |delta P(yes)| and agreement of the yes/no decision."""
    delta = (patched - base).abs()
    return {"mean_abs_delta_p_yes": float(delta.mean()), "max_abs_delta_p_yes": float(delta.max()),
            "answer_agreement": float(((patched > 0.5) == (base > 0.5)).float().mean())}


def evaluate_llava(adapter: Any, data: LlavaEvalData, correction: str = "bh", batch_size: int = 8) -> dict[str, Any]:
    """Gender disproportion rate, mean |P(yes) - 0.5| and per-question statistics of one model."""
    return _report(yes_matrix(adapter, data, batch_size=batch_size), adapter, data, correction)


def compare_llava(adapter: Any, patched: Any, data: LlavaEvalData, correction: str = "bh",
                  batch_size: int = 8, base: torch.Tensor | None = None) -> dict[str, Any]:
    """Before/after: ``patched`` is a patched adapter (an export) or edit(s) applied to ``adapter`` for the call.
    ``base``: the unmodified model's P(yes) matrix when already computed."""
    proc = processor_of(adapter)
    base = yes_matrix(adapter, data, proc, batch_size) if base is None else base
    if isinstance(patched, ModelAdapter):
        # an export saved without processor files still shares the base model's tokenizer
        after = yes_matrix(patched, data, getattr(patched, "processor", None) or proc, batch_size)
    else:
        with edits_installed(adapter, patched):  # folds projection edits that record a fold mode, patches the rest
            after = yes_matrix(adapter, data, proc, batch_size)
    return {"metric": METRIC, "base": _report(base, adapter, data, correction),
            "patched": _report(after, adapter, data, correction), "fidelity": _fidelity(base, after)}


def sweep_llava(adapter: Any, make_edit: Callable[[float], Any], alphas: Sequence[float], data: LlavaEvalData,
                correction: str = "bh", batch_size: int = 8, base: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Summary numbers of ``make_edit(alpha)`` applied at each alpha (the bias/fidelity trade-off)."""
    proc = processor_of(adapter)
    base = yes_matrix(adapter, data, proc, batch_size) if base is None else base
    rows = []
    for alpha in alphas:
        with edits_installed(adapter, make_edit(float(alpha))):
            p = yes_matrix(adapter, data, proc, batch_size)
        rep = gender_bias_report(p, data.genders, data.questions, correction=correction)
        rows.append({"metric": METRIC, "alpha": float(alpha), **{k: rep[k] for k in SUMMARY_KEYS},
                     "fidelity": _fidelity(base, p)})
    return rows


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one report (for run.json)."""
    return {k: rep[k] for k in SUMMARY_KEYS}


def recipe_eval(recipe: Any, adapter: Any, make_edit: Callable[[float], Any], out: Path) -> dict[str, Any]:
    """The recipe ``eval`` step for llava models: before/after at the recipe's alpha + the alpha sweep.

    Faces: FairFace 540 under ``data.dir``, a gender-balanced sample of ``eval.limit`` faces (else
    ``data.limit``; all 540 when neither is set); questions: every shared prompt concept.
    """
    limit = recipe.eval.limit if recipe.eval.limit is not None else recipe.data.limit
    data = LlavaEvalData.load(recipe.data.dir, limit=limit, seed=recipe.seed)
    with torch.no_grad():
        base = yes_matrix(adapter, data)
        cmp = compare_llava(adapter, make_edit(recipe.edit.alpha), data, base=base)
        write_llava_report(cmp, out / "compare", overwrite=True)
        rows = sweep_llava(adapter, make_edit, recipe.eval.alphas, data, base=base)
    if rows:
        write_llava_report(rows, out / "sweep", overwrite=True)
    return {"metric": METRIC, "test": cmp["base"]["test"], "correction": cmp["base"]["correction"],
            "data": data.describe(), "vla_gender_bias_before": summary(cmp["base"]),
            "vla_gender_bias_after": summary(cmp["patched"]), "fidelity": cmp["fidelity"],
            "sweep": [{k: r[k] for k in ("alpha", *SUMMARY_KEYS, "fidelity")} for r in rows]}


# ----- reports -----------------------------------------------------------------------------------
def _f(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _markdown_one(rep: dict[str, Any], title: str) -> list[str]:
    d = rep["data"]
    lines = [f"# {title}", "", f"Model: `{rep['model'].get('family')}` from `{rep['model'].get('source')}`; "
             f"{d['dataset']}: {rep['n_female']} female + {rep['n_male']} male faces; {rep['n_questions']} yes/no questions.",
             "", f"Test per question: {rep['test']}, {rep['correction'].upper()}-corrected across questions at "
             f"alpha = {rep['alpha']}.", "",
             f"- gender disproportion rate: **{rep['disproportion_rate']:.3f}** ({rep['n_significant']} of "
             f"{rep['n_questions']} questions; {rep['n_significant_female_higher']} with higher P(yes) for women)",
             f"- mean |P(yes) - 0.5|: {rep['mean_abs_dev']:.4f}", f"- mean |gap| (female - male): {rep['mean_abs_gap']:.4f}",
             "", "Questions with the largest gender gaps:", "", "| question | category | P(yes) female | P(yes) male | gap | p adj. | sig. |",
             "|---|---|---|---|---|---|---|"]
    for q in sorted(rep["questions"], key=lambda q: -abs(q["gap"]))[:15]:
        lines.append(f"| {q['text']} | {q['category']} | {q['mean_female']:.3f} | {q['mean_male']:.3f} | {q['gap']:+.4f} "
                     f"| {q['p_adjusted']:.3g} | {'yes' if q['significant'] else ''} |")
    return lines + [""]


def markdown_llava(result: Any) -> str:
    """``report.md`` for an evaluate / compare / sweep result of this module."""
    if isinstance(result, list):
        keys = ["alpha", *SUMMARY_KEYS[:3], "mean_abs_delta_p_yes", "answer_agreement"]
        lines = ["# Alpha sweep: LLaVA gender bias vs fidelity", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in result:
            flat = {**r, **r["fidelity"]}
            lines.append("| " + " | ".join(_f(flat[k]) for k in keys) + " |")
        return "\n".join(lines) + "\n"
    if "patched" in result:
        b, p = result["base"], result["patched"]
        lines = ["# Before / after the patch (LLaVA gender bias)", "", "| metric | base | patched | change |", "|---|---|---|---|"]
        for k in SUMMARY_KEYS:
            lines.append(f"| {k} | {_f(b[k])} | {_f(p[k])} | {_f(p[k] - b[k])} |")
        lines += ["", "## Fidelity (patched vs unmodified)", ""] + [f"- {k}: {v:.4f}" for k, v in result["fidelity"].items()]
        return "\n".join(lines + [""] + _markdown_one(b, "Base model") + _markdown_one(p, "Patched model"))
    return "\n".join(_markdown_one(result, "LLaVA gender bias (VLAGenderBias-style)"))


def plot_llava_sweep(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Disproportion rate and mean |P(yes) - 0.5| vs alpha, with the answer shift beside them."""
    import matplotlib  # heavy; only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(alphas, [r["disproportion_rate"] for r in rows], marker="o", label="disproportion rate")
    ax[0].plot(alphas, [r["mean_abs_gap"] for r in rows], marker="o", label="mean |gap|")
    ax[0].set(xlabel="alpha", title="gender bias vs alpha")
    ax[0].legend()
    ax[1].plot(alphas, [r["mean_abs_dev"] for r in rows], marker="o", label="mean |P(yes) - 0.5|")
    ax[1].plot(alphas, [r["fidelity"]["mean_abs_delta_p_yes"] for r in rows], marker="o", label="mean |delta P(yes)|")
    ax[1].set(xlabel="alpha", title="decisiveness / answer shift vs alpha")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def llava_run_table(summaries: list[dict[str, Any]]) -> list[str]:
    """Markdown section of a multi-variant run report for variants evaluated with this metric (else nothing)."""
    rows = [s for s in summaries if (s.get("eval") or {}).get("metric") == METRIC]
    if not rows:
        return []
    d = rows[0]["eval"]["data"]
    lines = [f"## LLaVA gender bias ({d['dataset']}: {d['n_female']} female + {d['n_male']} male faces, "
             f"{d['questions']} yes/no questions; {rows[0]['eval']['test']}, {rows[0]['eval']['correction'].upper()})", "",
             "| variant | site | a | disproportion rate before | after | mean abs(P(yes)-0.5) before | after "
             "| mean abs gap before | after | mean abs dP(yes) |", "|" + "---|" * 10]
    for s in rows:
        b, a, fid = s["eval"]["vla_gender_bias_before"], s["eval"]["vla_gender_bias_after"], s["eval"]["fidelity"]
        lines.append(f"| {s['variant']} | {s['site']} | {s['alpha']} | {b['disproportion_rate']:.3f} | {a['disproportion_rate']:.3f} "
                     f"| {b['mean_abs_dev']:.4f} | {a['mean_abs_dev']:.4f} | {b['mean_abs_gap']:.4f} | {a['mean_abs_gap']:.4f} "
                     f"| {fid['mean_abs_delta_p_yes']:.4f} |")
    return lines + [""]


def render_llava(result: Any, folder: Path) -> None:
    """``report.md`` (+ the trade-off plot of a sweep) of a VLAGenderBias result."""
    (folder / "report.md").write_text(markdown_llava(result))
    if isinstance(result, list):
        plot_llava_sweep(result, folder / "tradeoff.png")


def write_llava_report(result: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
    """``metrics.json`` + ``report.md`` (+ plot) of a VLAGenderBias result, atomically."""
    return write_report(result, out_dir, overwrite=overwrite, render=render_llava)
