"""The one report of a multi-variant recipe run: before/after bias, utility and cost per variant; for runs of
the held-out protocol also the selection-split results and the chosen settings, kept apart from the evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..eval.llava_eval import llava_run_table
from .percent import ci_suffix, pct

RECALL_KEY = "caption_recall@10"
UTILITY_KEYS = ("caption_recall@10", "caption_recall@50", "caption_recall_no_gender@10", "gender_zero_shot_acc",
                "age_zero_shot_acc", "race_zero_shot_acc")


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _rel(before: float | None, after: float | None) -> str:
    if before in (None, 0) or after is None:
        return "-"
    return f"{100 * (after - before) / before:+.1f}%"


def _latency(s: dict[str, Any]) -> str:
    bench = (s.get("bench") or {}).get("headline") or []
    ort8 = [h for h in bench if h["runtime"] == "ort" and h["batch"] == 8] or bench[:1]
    return _f(ort8[0]["ratio_of_medians"]) if ort8 else "-"


def _cos(s: dict[str, Any]) -> float | None:
    fid = (s.get("eval") or {}).get("fidelity") or {}
    # the edited tower's embeddings: images for image-tower edits, prompts for text-tower edits
    return (fid.get("image_cosine" if s["tower"] == "image" else "prompt_cosine") or {}).get("mean")


def _mode_size(s: dict[str, Any]) -> tuple[str, str]:
    if s.get("kind") == "projection":  # method + where it lives; the "neurons" column holds the erased rank
        return f"{s['method']}, fold {s['fold']}", f"rank {s['rank']}"
    return s["mode"], str(len(s["neurons"]))


def _built(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in summaries if "not_built" not in s]


def _not_built_lines(summaries: list[dict[str, Any]]) -> list[str]:
    missing = [s for s in summaries if "not_built" in s]
    if not missing:
        return []
    lines = ["## Not built", "", "These variants' edits do not exist on this model and data, so they have no row below "
             "(the run went on with the others; `<variant>/selection.json` or `<variant>/probe.json` shows what "
             "probing found):", ""]
    return lines + [f"- **{s['variant']}** ({s['kind']}, {s['site']}): {s['not_built']}" for s in missing] + [""]


def variant_rows(summaries: list[dict[str, Any]], prompt_set: str) -> list[str]:
    """Markdown rows: MaxSkew(gender)@k before/after on one prompt set, utility and latency beside it."""
    rows = []
    for s in _built(summaries):
        ev = s.get("eval") or {}
        b = ev.get("max_skew_gender_before", {}).get(prompt_set)
        a = ev.get("max_skew_gender_after", {}).get(prompt_set)
        ub = (ev.get("utility_before") or {}).get(RECALL_KEY)
        ua = (ev.get("utility_after") or {}).get(RECALL_KEY)
        mode, size = _mode_size(s)
        seeds = (ev.get("max_skew_gender_seeds") or {}).get(prompt_set)
        spread = "" if not seeds or seeds["seeds"] < 2 else (
            f" | {', '.join(pct(x) for x in seeds['per_seed'])} (sd {100 * seeds['seed_sd']:.1f})")
        if not spread and any("seeds" in x for x in summaries):
            spread = " | -"
        rows.append(f"| {s['variant']} | {s.get('kind', 'sae')} | {s['site']} | {mode} | {s['alpha']} | {size} | {_f(b)} | {_f(a)} "
                    f"| {_rel(b, a)}{ci_suffix(ev.get('max_skew_gender_change_ci', {}).get(prompt_set))}{spread} "
                    f"| {_f(ub)} | {_f(ua)} | {_rel(ub, ua)} | {_f(_cos(s))} | {_latency(s)} |")
    return rows


def _selection_lines(summaries: list[dict[str, Any]]) -> list[str]:
    rows = [s for s in summaries if s.get("selection")]
    if not rows:
        return _not_built_lines(summaries)
    lines = ["## Selection split (settings chosen here; no evaluation data read)", "",
             "Each variant's grid was scored on the selection split only, averaged over its seeds: the mean relative "
             "MaxSkew change over the prompt sets' *select* half of concepts, and the utility loss (worst relative drop "
             "of the listed utility metrics). The chosen cell is the lowest MaxSkew whose utility loss stays within the "
             "limit (the least-loss cell, flagged, when none does). Every cell: `<variant>/selection.json`.", "",
             "| variant | grid cells | chosen settings | neurons per seed | MaxSkew change (selection) | utility loss | "
             "within limit | emb. cosine |", "|" + "---|" * 8]
    for s in rows:
        c = s["selection"]
        cell = ", ".join(f"{k}={v}" for k, v in (s.get("chosen") or {}).items()) or "(recipe settings)"
        per = (c.get("per_seed") or [{}])[0].get("skew_change_per_set", {})
        neurons = "; ".join(str(len(v)) for v in (s.get("neurons_per_seed") or {}).values()) if s.get("kind") == "sae" else "-"
        lines.append(f"| {s['variant']} | {s['selection_cells']} | {cell} | {neurons} | {pct(c['skew_change'])} "
                     f"({', '.join(f'{k} {pct(v)}' for k, v in per.items())}; seed {s['seeds'][0]}) "
                     f"| {100 * c['utility_loss']:.1f}% | {'yes' if c['feasible'] else '**no**'} | {_f(c['cosine'])} |")
    return lines + [""] + _not_built_lines(summaries)


def _utility_lines(summaries: list[dict[str, Any]]) -> list[str]:
    rows = [s for s in summaries if (s.get("eval") or {}).get("utility_before")]
    if not rows:
        return []
    keys = [k for k in UTILITY_KEYS if k in rows[0]["eval"]["utility_before"]]
    lines = ["## Utility on the evaluation faces (before -> after, seed mean)", "",
             "| variant | " + " | ".join(keys) + " | emb. cosine |", "|" + "---|" * (len(keys) + 2)]
    for s in rows:
        ub, ua = s["eval"]["utility_before"], s["eval"]["utility_after"]
        cells = [f"{_f(ub.get(k))} -> {_f(ua.get(k))} ({_rel(ub.get(k), ua.get(k))})" for k in keys]
        lines.append(f"| {s['variant']} | " + " | ".join(cells) + f" | {_f(_cos(s))} |")
    return lines + [""]


CONTROL_SETS = ("occupations", "occupations/held-out", "adjectives", "adjectives/held-out")
CONTROL_NAMES = {"reconstruction": "control: reconstruction only (no latent changed)",
                 "random": "control: random latents (frequency-matched)"}


def _controls_lines(summaries: list[dict[str, Any]]) -> list[str]:
    rows = [s for s in _built(summaries) if (s.get("eval") or {}).get("controls") and s.get("kind", "sae") == "sae"]
    if not rows:
        return []
    sets = [p for p in CONTROL_SETS if p in rows[0]["eval"].get("max_skew_gender_change_ci", {})]
    keys = [k for k in (RECALL_KEY, "caption_recall_no_gender@10", "age_zero_shot_acc") if k in rows[0]["eval"]["utility_before"]]
    lines = ["## Controls (evaluation data; nothing chosen from them)", "",
             "Each SAE edit beside edits that share its SAE, site, a and value rule but not its neurons, per seed: "
             "the SAE's reconstruction alone (reconstruct mode), and as many random latents firing as often as the "
             "chosen ones. An edit debiases through its neurons when it lowers skew beyond its controls: the last "
             "column is the edit's change minus the control's on occupations, paired by seed and concept in one "
             "bootstrap (below 0: the neurons lower skew more). MaxSkew change with the same seed x concept interval; "
             "utility relative to the unmodified model.", "",
             "| variant | edit / control | " + " | ".join(sets) + " | " + " | ".join(keys) + " | emb. cosine | "
             "edit minus control (occupations) |", "|" + "---|" * (len(sets) + len(keys) + 4)]
    for s in rows:
        ev, ub = s["eval"], s["eval"]["utility_before"]
        for name, res in [("edit (chosen neurons)", ev)] + [(CONTROL_NAMES[k], c) for k, c in ev["controls"].items()]:
            if "not_applicable" in res:
                lines.append(f"| {s['variant']} | {name} | not applicable: {res['not_applicable']} |")
                continue
            b, a, ci = res["max_skew_gender_before"], res["max_skew_gender_after"], res["max_skew_gender_change_ci"]
            cells = [f"{_rel(b.get(p), a.get(p))}{ci_suffix(ci.get(p))}" for p in sets]
            cells += [_rel(ub.get(k), res["utility_after"].get(k)) for k in keys]
            cos = (res.get("fidelity") or {}).get("image_cosine" if s["tower"] == "image" else "prompt_cosine", {}).get("mean")
            diff = res.get("edit_minus_control")
            paired = "-" if not diff or "occupations" not in diff["change"] else \
                f"{pct(diff['change']['occupations'])}{ci_suffix(diff['ci'].get('occupations'))}"
            lines.append(f"| {s['variant']} | {name} | " + " | ".join(cells) + f" | {_f(cos)} | {paired} |")
    return lines + [""]


def write_run_report(work: Path, summaries: list[dict[str, Any]], recipe, data_dir: str | None = None) -> Path:
    """``report.md`` (+ ``sweep.png`` when a variant was evaluated) at the top of the run directory."""
    protocol = any("seeds" in s for s in summaries)
    lines = [f"# {recipe.name}: debiasing report", "",
             f"Model `{recipe.model.spec}`; data `{data_dir or recipe.data.dir}`; "
             + (f"SAE seeds {', '.join(map(str, recipe.seeds or [recipe.seed]))}. " if protocol else f"seed {recipe.seed}. ")
             + "MaxSkew@k (gender) is text-to-image retrieval skew on FairFace 540 (lower is fairer; 0 = balanced); "
             f"utility is {RECALL_KEY} of caption-to-image retrieval on the same faces; latency is the "
             "patched/unmodified ratio of medians (onnxruntime CPU, batch 8, when benchmarked). Kinds: `sae` sets "
             "SAE neurons to v (0, or `mean`: each neuron's group-balanced mean activation) with mixing weight a; "
             "`projection` erases the linear subspace of the label (LEACE or mean difference) with strength b, "
             "folded into the weights (zero extra ops) or patched as a fused low-rank module.", ""]
    if protocol:
        lines += ["**Held-out protocol.** Settings were chosen on the selection split below; the evaluation numbers "
                  "come from one pass over FairFace 540 / PAIRS afterwards. `<set>/held-out` rows use only the half of "
                  "each prompt set's concepts never used for selection. The change is the relative change of the "
                  "seed-averaged MaxSkew; its 95% interval is a two-level bootstrap (seeds and prompt concepts "
                  "resampled together, 2000 draws), and the per-seed changes and their sd are given beside it "
                  "(projection fits have no seed: concepts only).", ""]
        lines += _selection_lines(summaries)
    else:
        lines += _not_built_lines(summaries)
        lines += ["The MaxSkew change carries a 95% paired bootstrap interval over prompt concepts (in percent): a "
                  "change whose interval spans 0 is within noise.", ""]
    sets = sorted({k for s in summaries for k in (s.get("eval") or {}).get("max_skew_gender_before", {})})
    floor = next((s["eval"]["noise_floor"] for s in summaries if "noise_floor" in (s.get("eval") or {})), {})
    if not sets and not llava_run_table(summaries):
        lines += ["No variant has an `eval` section, so there are no before/after numbers here (add `eval:` to the "
                  "recipe); the exports and their validation are in the variant folders.", ""]
    for prompt_set in sets:
        spread_col = " per seed |" if protocol else ""
        lines += [f"## Prompt set: {prompt_set} (shuffled-label noise floor {_f(floor.get(prompt_set.split('/')[0]))})", "",
                  "| variant | kind | site | mode | a / b | neurons / rank | MaxSkew before | after | change |" + spread_col
                  + " recall before | after | change | emb. cosine | latency x |", "|" + "---|" * (15 if protocol else 14)]
        lines += variant_rows(summaries, prompt_set) + [""]
    lines += _utility_lines(summaries)
    lines += _controls_lines(summaries)
    lines += llava_run_table(summaries)  # llava variants: VLAGenderBias numbers instead of retrieval skew
    lines += ["Per-variant details (probe report, SAE, edit, exports with manifests, eval and bench reports) are in the "
              "variant folders.", ""]
    out = work / "report.md"
    out.write_text("\n".join(lines))
    if any((s.get("eval") or {}).get("sweep") for s in summaries):
        _plot_sweeps(summaries, work / "sweep.png")
    return out


def _plot_sweeps(summaries: list[dict[str, Any]], path: Path, prompt_set: str = "occupations") -> None:
    """One panel per variant: MaxSkew (left axis) and utility (right axis) against a / b, on one figure."""
    import matplotlib  # heavy; only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in summaries if (sw := (s.get("eval") or {}).get("sweep")) and "max_skew_gender" in sw[0]]
    if not shown:  # llava sweeps: see llava_run_table
        return
    cols = min(4, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, s in zip(axes.flat, shown):
        sweep = s["eval"]["sweep"]
        alphas = [r["alpha"] for r in sweep]
        ax.plot(alphas, [r["max_skew_gender"].get(prompt_set) for r in sweep], "o-", color="C3", label=f"MaxSkew ({prompt_set})")
        ax.set(xlabel="a (SAE) / b (projection)", title=s["variant"])
        ax.set_ylabel("MaxSkew@k gender", color="C3")
        right = ax.twinx()
        for i, key in enumerate(("caption_recall@10", "caption_recall_no_gender@10", "age_zero_shot_acc", "race_zero_shot_acc")):
            if key in sweep[0]["utility"]:
                right.plot(alphas, [r["utility"][key] for r in sweep], "s--", color=f"C{i}", label=key)
        right.set_ylabel("utility")
        if s is shown[0]:
            handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
            ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
