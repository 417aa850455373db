"""Evaluation reports: ``metrics.json`` + ``report.md`` (+ trade-off plots for alpha sweeps).

Inputs are the dicts of :func:`~debias_export.eval.retrieval.evaluate`, ``compare`` or
``sweep_alpha`` (or their LLaVA counterparts in :mod:`.llava_eval`); the kind is recognised from their shape.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..export.manifest import atomic_output_dir
from .retrieval import ATTRIBUTES


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown_evaluation(res: dict, title: str = "Bias evaluation") -> str:
    """Markdown tables for one :func:`evaluate` result."""
    lines = [f"# {title}", "", f"Model: `{res['model'].get('family')}` from `{res['model'].get('source')}`; "
             f"FairFace images: {res['fairface_images']}, PAIRS images: {res['pairs_images']}, k = {res['k']}.", "",
             "## Text-to-image retrieval skew (FairFace)", "",
             "| prompt set | prompts | attribute | MaxSkew@k | NDKL@k | MaxSkew shuffled (sd) | pool |",
             "|---|---|---|---|---|---|---|"]
    for name, per in res["retrieval"].items():
        for attr in ATTRIBUTES:
            e = per[attr]
            floor = f"{e['max_skew_shuffled']:.3f} ({e['max_skew_shuffled_sd']:.3f})" if "max_skew_shuffled" in e else "-"
            lines.append(f"| {name} | {per['prompts']} | {attr} | {e['max_skew']:.3f} | {e['ndkl']:.3f} | {floor} | {e['pool']} |")
    lines += ["", "Concepts whose top-k is most female / most male (fraction female in top k):", ""]
    for name, per in res["retrieval"].items():
        lean = per["top_concepts_gender"]
        lines.append(f"- {name}: female-leaning {lean['most_female']}; male-leaning {lean['most_male']}")
    lines += ["", "## PAIRS counterfactual confidence gaps", "",
              "| section | scenarios | 4-group gap | 4-group KL | gender gap | race gap |", "|---|---|---|---|---|---|"]
    for sec, e in res["pairs"].items():
        lines.append(f"| {sec} | {e['scenarios']} | {e['group_gap']:.4f} | {e['group_kl']:.4f} | {e['gender_gap']:.4f} | {e['race_gap']:.4f} |")
    lines += ["", "## Utility (FairFace, held out)", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in res["utility"].items()]
    return "\n".join(lines) + "\n"


def markdown_compare(cmp: dict) -> str:
    """Before/after table plus fidelity numbers for a :func:`compare` result."""
    b, p = cmp["base"], cmp["patched"]
    lines = ["# Before / after the patch", "", f"k = {b['k']}", "", "| metric | base | patched | change |", "|---|---|---|---|"]
    for name in b["retrieval"]:
        for attr in ATTRIBUTES:
            ci = (cmp.get("bias_change") or {}).get(name, {}).get(attr)
            for m in ("max_skew", "ndkl"):
                x, y = b["retrieval"][name][attr][m], p["retrieval"][name][attr][m]
                extra = (f" ({100 * ci['change']:+.1f}%, 95% CI [{100 * ci['ci_low']:+.1f}, {100 * ci['ci_high']:+.1f}]%)"
                         if ci and m == "max_skew" else "")
                lines.append(f"| {name}/{attr} {m} | {x:.3f} | {y:.3f} | {y - x:+.3f}{extra} |")
    for sec in b["pairs"]:
        for m in ("group_gap", "gender_gap", "race_gap"):
            x, y = b["pairs"][sec][m], p["pairs"][sec][m]
            lines.append(f"| PAIRS {sec} {m} | {x:.4f} | {y:.4f} | {y - x:+.4f} |")
    for m, x in b["utility"].items():
        y = p["utility"][m]
        if isinstance(x, float):
            lines.append(f"| {m} | {x:.3f} | {y:.3f} | {y - x:+.3f} |")
    lines += ["", "## Fidelity (patched vs unmodified)", ""]
    for k, v in cmp["fidelity"].items():
        lines.append(f"- {k}: " + (", ".join(f"{a} {c:.4f}" for a, c in v.items()) if isinstance(v, dict) else f"{v:.4f}"))
    return "\n".join(lines) + "\n"


def sweep_rows(rows: list[dict], attr: str = "gender") -> list[dict]:
    """Flat per-alpha numbers for the trade-off table/plots."""
    out = []
    for r in rows:
        flat = {"alpha": r["alpha"]}
        for name, per in r["retrieval"].items():
            flat[f"max_skew/{name}/{attr}"] = per[attr]["max_skew"]
        flat["caption_recall@10"] = r["utility"]["caption_recall@10"]
        flat["image_cosine"] = r["fidelity"]["image_cosine"]["mean"]
        flat["prompt_cosine"] = r["fidelity"]["prompt_cosine"]["mean"]
        out.append(flat)
    return out


def markdown_sweep(rows: list[dict]) -> str:
    flat = sweep_rows(rows)
    keys = list(flat[0])
    lines = ["# Alpha sweep: bias vs utility", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(f[k]) for k in keys) + " |" for f in flat]
    return "\n".join(lines) + "\n\n![trade-off](tradeoff.png)\n"


def plot_sweep(rows: list[dict], path: str | Path) -> None:
    """MaxSkew vs alpha, utility vs alpha and the MaxSkew/utility trade-off curve."""
    import matplotlib  # heavy; only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = sweep_rows(rows)
    alphas = [f["alpha"] for f in flat]
    skew_keys = [k for k in flat[0] if k.startswith("max_skew/")]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for k in skew_keys:
        ax[0].plot(alphas, [f[k] for f in flat], marker="o", label=k.split("/")[1])
    ax[0].set(xlabel="alpha", ylabel="MaxSkew@k (gender)", title="bias vs alpha")
    ax[0].legend()
    for k in ("caption_recall@10", "image_cosine", "prompt_cosine"):
        ax[1].plot(alphas, [f[k] for f in flat], marker="o", label=k)
    ax[1].set(xlabel="alpha", ylabel="utility / fidelity", title="utility vs alpha")
    ax[1].legend()
    mean_skew = [sum(f[k] for k in skew_keys) / len(skew_keys) for f in flat]
    ax[2].plot([f["caption_recall@10"] for f in flat], mean_skew, marker="o")
    for a, x, y in zip(alphas, [f["caption_recall@10"] for f in flat], mean_skew):
        ax[2].annotate(f"{a:g}", (x, y))
    ax[2].set(xlabel="caption recall@10", ylabel="mean MaxSkew@k (gender)", title="trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_skew_bars(res: dict, path: str | Path) -> None:
    """MaxSkew per prompt set and attribute, with the shuffled-label noise floor when present."""
    import matplotlib  # heavy; only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["retrieval"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(ATTRIBUTES)
    for j, attr in enumerate(ATTRIBUTES):
        xs = [i + j * width for i in range(len(names))]
        ax.bar(xs, [res["retrieval"][n][attr]["max_skew"] for n in names], width, label=attr)
        floors = [res["retrieval"][n][attr].get("max_skew_shuffled") for n in names]
        if all(f is not None for f in floors):
            ax.scatter(xs, floors, color="k", marker="_", s=200, zorder=3)
    ax.set_xticks([i + width for i in range(len(names))], names)
    ax.set(ylabel=f"MaxSkew@{res['k']}", title="retrieval skew (black: shuffled-label floor)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_retrieval(result: Any, folder: Path) -> None:
    """``report.md`` + plots of a retrieval result: an alpha sweep (list), a before/after comparison or one evaluation."""
    if isinstance(result, list):
        (folder / "report.md").write_text(markdown_sweep(result))
        plot_sweep(result, folder / "tradeoff.png")
    elif "patched" in result:
        (folder / "report.md").write_text(markdown_compare(result) + "\n" + markdown_evaluation(result["base"], "Base model"))
        plot_skew_bars(result["base"], folder / "skew_base.png")
        plot_skew_bars(result["patched"], folder / "skew_patched.png")
    else:
        (folder / "report.md").write_text(markdown_evaluation(result))
        plot_skew_bars(result, folder / "skew.png")


def write_report(result: Any, out_dir: str | Path, overwrite: bool = False,
                 render: Callable[[Any, Path], None] = render_retrieval) -> Path:
    """Write ``metrics.json`` and what ``render(result, folder)`` draws (``report.md``, plots) atomically into ``out_dir``.

    ``render``: the renderer of the metric that produced ``result`` (retrieval by default; the llava metric
    passes its own, :func:`~debias_export.eval.llava_eval.render_llava`).
    """
    out = Path(out_dir)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        render(result, tmp)
    return out
