"""The one report of a multi-variant recipe run: before/after bias, utility and cost per variant."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..eval.llava_eval import llava_run_table

RECALL_KEY = "caption_recall@10"


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _rel(before: float | None, after: float | None) -> str:
    if before in (None, 0) or after is None:
        return "-"
    return f"{100 * (after - before) / before:+.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}]"


def variant_rows(summaries: list[dict[str, Any]], prompt_set: str) -> list[str]:
    """Markdown rows: MaxSkew(gender)@k before/after on one prompt set, utility and latency beside it."""
    rows = []
    for s in summaries:
        ev = s.get("eval") or {}
        b = ev.get("max_skew_gender_before", {}).get(prompt_set)
        a = ev.get("max_skew_gender_after", {}).get(prompt_set)
        ub = (ev.get("utility_before") or {}).get(RECALL_KEY)
        ua = (ev.get("utility_after") or {}).get(RECALL_KEY)
        bench = (s.get("bench") or {}).get("headline") or []
        ort8 = [h for h in bench if h["runtime"] == "ort" and h["batch"] == 8] or bench[:1]
        lat = _f(ort8[0]["ratio_of_medians"]) if ort8 else "-"
        fid = ev.get("fidelity") or {}
        # the edited tower's embeddings: images for image-tower edits, prompts for text-tower edits
        cos = (fid.get("image_cosine" if s["tower"] == "image" else "prompt_cosine") or {}).get("mean")
        kind = s.get("kind", "sae")
        if kind == "projection":  # method + where it lives; the "neurons" column holds the erased rank
            mode, size = f"{s['method']}, fold {s['fold']}", f"rank {s['rank']}"
        else:
            mode, size = s["mode"], str(len(s["neurons"]))
        rows.append(f"| {s['variant']} | {kind} | {s['site']} | {mode} | {s['alpha']} | {size} | {_f(b)} | {_f(a)} "
                    f"| {_rel(b, a)}{_ci(ev.get('max_skew_gender_change_ci', {}).get(prompt_set))} "
                    f"| {_f(ub)} | {_f(ua)} | {_rel(ub, ua)} "
                    f"| {_f(cos)} | {lat} |")
    return rows


def write_run_report(work: Path, summaries: list[dict[str, Any]], recipe) -> Path:
    """``report.md`` + ``sweep.png`` at the top of the run directory."""
    lines = [f"# {recipe.name}: debiasing report", "",
             f"Model `{recipe.model.spec}`; data `{recipe.data.dir or '../shared/data'}`; seed {recipe.seed}. "
             "MaxSkew@k (gender) is text-to-image retrieval skew on FairFace 540 (lower is fairer; 0 = balanced); "
             f"utility is {RECALL_KEY} of caption-to-image retrieval on the same held-out faces; latency is the "
             "patched/unmodified ratio of medians (onnxruntime CPU, batch 8, when benchmarked). Kinds: `sae` zeroes "
             "SAE neurons with mixing weight a; `projection` erases the linear subspace of the label (LEACE or "
             "mean difference) with strength b, folded into the weights (zero extra ops) or patched as a fused "
             "low-rank module. The MaxSkew change carries a 95% paired bootstrap interval over prompt concepts "
             "(in percent): a change whose interval spans 0 is within noise.", ""]
    sets = sorted({k for s in summaries for k in (s.get("eval") or {}).get("max_skew_gender_before", {})})
    floor = next((s["eval"]["noise_floor"] for s in summaries if "noise_floor" in (s.get("eval") or {})), {})
    for prompt_set in sets:
        lines += [f"## Prompt set: {prompt_set} (shuffled-label noise floor {_f(floor.get(prompt_set))})", "",
                  "| variant | kind | site | mode | a / b | neurons / rank | MaxSkew before | after | change | recall before "
                  "| after | change | emb. cosine | latency x |", "|" + "---|" * 14]
        lines += variant_rows(summaries, prompt_set) + [""]

    lines += llava_run_table(summaries)  # llava variants: VLAGenderBias numbers instead of retrieval skew
    lines += ["Per-variant details (probe report, SAE, edit, exports with manifests, eval and bench reports) are in the "
              "variant folders.", ""]
    out = work / "report.md"
    out.write_text("\n".join(lines))
    _plot_sweeps(summaries, work / "sweep.png")
    return out


def _plot_sweeps(summaries: list[dict[str, Any]], path: Path, prompt_set: str = "occupations") -> None:
    import matplotlib  # heavy; only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for s in summaries:
        sweep = (s.get("eval") or {}).get("sweep") or []
        if not sweep or "max_skew_gender" not in sweep[0]:  # llava sweeps: see llava_run_table
            continue
        alphas = [r["alpha"] for r in sweep]
        ax1.plot(alphas, [r["max_skew_gender"].get(prompt_set) for r in sweep], marker="o", label=s["variant"])
        ax2.plot(alphas, [r["utility"].get(RECALL_KEY) for r in sweep], marker="o", label=s["variant"])
    ax1.set(xlabel="a (SAE mixing weight) / b (projection strength)", ylabel=f"MaxSkew@k gender ({prompt_set})", title="bias vs a")
    ax2.set(xlabel="a / b", ylabel=RECALL_KEY, title="utility vs a")
    if ax1.lines:  # no eval section: an empty plot, without matplotlib's empty-legend warning
        ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
