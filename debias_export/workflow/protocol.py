"""The held-out protocol of a recipe variant: ``select:`` (settings chosen on a selection split) and ``seeds:``.

Two phases, so that no setting can depend on the evaluation data:

1. :func:`select_variant` (every variant first): capture the fit data once per site (selection faces left
   out when they come from the same table), train one SAE per seed, and score every ``select.grid`` cell
   x seed on the selection split only: faces (default: the UTKFace validation split the shipped bias lab
   never trained on) and the ``select`` half of each prompt set's concepts. The cell with the lowest mean
   relative MaxSkew of ``select.column`` whose mean utility loss (worst relative drop of ``select.utility``)
   stays within ``select.max_utility_loss`` wins; when none does, the cell that loses least (flagged).
2. :func:`finish_variant`: the chosen setting, per seed, is evaluated once on the evaluation data
   (FairFace 540, PAIRS; all concepts and the held-out half), exported, validated and benchmarked (first
   seed), and reported with the seed x concept bootstrap interval (:mod:`debias_export.eval.protocol`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..analysis.metrics import embedding_cosine
from ..analysis.probe import neurons_from_report
from ..capture import InputCache
from ..core.errors import DebiasError, NotBuiltError
from ..core.model_match import FINGERPRINT_KEY, model_fingerprint
from ..data.datasets import LabelledImages
from ..edits import SAEEdit
from ..edits.install import edits_installed
from ..edits.projection import fit_from_capture, read_fair_directions
from ..eval.prefix_replay import PrefixTrace
from ..eval.protocol import half_view, seed_change_ci, selection_score
from ..eval.report import write_report
from ..eval.retrieval import SELECT_HALF, EvalData, compare, embed, evaluate, load_prompt_sets, sweep_alpha
from .biaslab import validation_split
from .controls import NO_NEURONS, NOT_APPLICABLE, RANDOM, control_edits
from .recipe import Recipe
from .recipe_select import SELECT_LAB_SPLIT, apply_cell, grid_cells
from .lean import lean_labels
from .steps import Captured, Steps, capture, data_base, data_source, get_sae, log, neuron_values, probe, write_json

HELD_OUT_SUFFIX = "/held-out"  # prompt-set key suffix of the held-out concept half in eval summaries


@dataclasses.dataclass
class Selection:
    """The selection split, embedded once by the unmodified model."""

    rows: list[dict]
    files: frozenset
    csv: Path
    data: EvalData
    base_emb: dict
    base: dict
    description: str
    trace: PrefixTrace  # the unmodified model's blocks on ``data``: edited runs replay the ones an edit leaves alone


@dataclasses.dataclass
class Plan:
    """What phase 1 chose for a variant: the recipe with the chosen cell, the per-seed edits, the table."""

    recipe: Recipe
    cell: dict
    edits: dict[int, Any]
    probes: dict[int, Any]
    site: Any
    cap: Captured  # the chosen cell's capture of the fit data (controls draw their latents from it)
    table: list[dict]
    chosen: dict | None
    steps: Steps
    work: Path


def _selection(r: Recipe, adapter, shared: dict) -> Selection:
    s, base_dir = r.select, data_base(r)
    cache_key = ("selection", id(adapter), s.images, s.image_dir, s.limit, str(base_dir), s.k)
    if cache_key in shared:
        return shared[cache_key]
    if s.images == SELECT_LAB_SPLIT:
        rows = [dict(x) for x in validation_split(base_dir)]
        csv, paths = base_dir / "utkface" / "labels.csv", [x.pop("path") for x in rows]
        what = "the bias lab's UTKFace validation split (faces never trained on)"
    else:
        source = LabelledImages(base_dir / s.images, image_dir=base_dir / s.image_dir if s.image_dir else None)
        rows, csv = [dict(x) for x in source.rows], source.csv_path
        paths = [str(source.path(i)) for i in range(len(rows))]
        what = f"{s.images}"
    if s.limit is not None and s.limit < len(rows):  # an even spread, not the first rows (files sort by label)
        step = len(rows) / s.limit
        pick = [int(i * step) for i in range(s.limit)]
        rows, paths = [rows[i] for i in pick], [paths[i] for i in pick]
    what += f", {len(rows)} faces"
    column = s.column or r.probe.column
    if not rows or column not in rows[0]:
        raise DebiasError(f"select: the selection split has no label column {column!r}")
    data = EvalData.from_images(adapter, rows, paths, load_prompt_sets(base_dir, half=SELECT_HALF))
    base_emb, trace = _traced_embed(adapter, data)
    sel = Selection(rows, frozenset(x.get("file") for x in rows), csv.resolve(), data, base_emb,
                    evaluate(adapter, k=s.k, data=data, embeddings=base_emb), what, trace)
    shared[cache_key] = sel
    return sel


def _fit_table(r: Recipe) -> Path | None:
    base = data_base(r)
    rel = r.data.images or r.data.captions_from
    return (base / rel).resolve() if rel else None


def _build_edit(rc: Recipe, adapter, cap, cache: Path, progress: bool, seed: int, memo: dict) -> tuple[Any, dict | None]:
    """The edit of one grid cell and seed (SAE: probe the seed's SAE; projection: fit once, seed-free)."""
    site = cap.site
    provenance = {"recipe": rc.source, "recipe_name": rc.name, "seed": seed, "model": rc.model.spec, "site": site.name,
                  "probe_column": rc.probe.column}
    e = rc.edit
    if e.kind == "projection":
        k = ("fit", cap.cache_key, repr(dataclasses.astuple(e)), rc.probe.column)  # repr: edit.keep is a list
        if k not in memo:
            fair = read_fair_directions(Path(e.fair_from)) if e.fair_from else None
            memo[k] = fit_from_capture(cap.store, rc.probe.column, method=e.method, fold=e.fold, adapter=adapter, fair=fair,
                                       strength=e.strength, amplify=e.amplify, center=e.center, model=rc.model.spec,
                                       activations=e.fit_on, keep=e.keep, provenance=provenance)
        return memo[k], None
    k = ("sae", cap.cache_key, dataclasses.astuple(rc.sae), seed)
    if k not in memo:
        memo[k] = get_sae(rc, adapter, cap, cache, progress, seed=seed)
    sae = memo[k]
    latents = memo.setdefault("latents", {})
    report = probe(rc, sae, cap, latents)
    neurons = e.neurons or neurons_from_report(report)
    if not neurons:
        return None, report
    provenance.update(sae=dict(sae.cfg.metadata), **{FINGERPRINT_KEY: model_fingerprint(adapter)})
    value = neuron_values(rc, sae, cap, neurons, latents)
    return SAEEdit(site=site.name, sae=sae, neurons=neurons, value=value, alpha=e.alpha, mode=e.mode,
                   model=rc.model.spec, provenance=provenance), report


def _lean_labels(r: Recipe, adapter, cache: Path, sel: Selection, exclude, memo: dict, steps: Steps) -> list[str]:
    """``data.label_by: lean``: each fit text labelled by its retrieval lean over the selection faces (unedited model)."""
    k = ("lean", dataclasses.astuple(r.data), r.probe.column, id(sel))
    if k not in memo:
        texts = [row["text"] for row in data_source(r, cache, exclude).rows]
        column = r.probe.column
        faces = [row.get(column, "") for row in sel.data.fairface]
        labels, info = steps("lean-labels", lambda: lean_labels(adapter, texts, sel.base_emb["fairface"], faces))
        log(f"{r.name}: {info['texts']} fit texts labelled by their {column} lean over {sel.description} "
            f"({info['classes'][0]} above the median lean {info['median_lean']:+.4f})")
        memo[k] = labels
    return memo[k]


def _same_edit_key(edit, seed: int, sel: Selection, column: str, r: Recipe) -> tuple | None:
    """What a selection score of an SAE edit depends on (the SAE object is held by the memo, so its id is stable)."""
    if not isinstance(edit, SAEEdit):
        return None
    return ("select-score", id(sel), column, r.select.k, tuple(r.select.utility), seed, edit.site, id(edit.sae),
            tuple(edit.neurons), str(edit.value), edit.alpha, edit.mode, edit.prune)


def _write_selection(work: Path, sel: Selection | None, column: str | None, r: Recipe, table: list[dict]) -> None:
    write_json(work / "selection.json", {"split": sel.description if sel else None, "column": column,
                                         "utility": r.select.utility if r.select else None,
                                         "max_utility_loss": r.select.max_utility_loss if r.select else None,
                                         "cells": table})


def select_variant(r: Recipe, adapter, work: Path, cache: Path, progress: bool, shared: dict) -> Plan:
    """Phase 1: score every grid cell x seed on the selection split; reads no evaluation data."""
    if r.select is not None and adapter.bias_metric != "retrieval":
        raise DebiasError(f"select: the held-out protocol scores retrieval skew; family {adapter.family} uses "
                          f"{adapter.bias_metric!r} (drop select: for it)")
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(f"{r.name}: ")
    seeds = r.seeds or [r.seed]
    sel = _selection(r, adapter, shared) if r.select is not None else None
    exclude = sel.files if sel is not None and _fit_table(r) == sel.csv else frozenset()
    column = (r.select.column or r.probe.column) if r.select else None
    memo = shared.setdefault("memo", {})
    table, plans = [], {}
    labels = _lean_labels(r, adapter, cache, sel, exclude, memo, steps) if r.data.label_by == "lean" else None
    for cell in grid_cells(r):
        rc = dataclasses.replace(apply_cell(r, cell), seed=seeds[0])
        cap_key = ("cap", rc.site, dataclasses.astuple(rc.data), dataclasses.astuple(rc.capture), tuple(sorted(exclude)),
                   rc.probe.column)
        if cap_key not in memo:
            memo[cap_key] = capture(rc, adapter, cache, steps, progress, seed=seeds[0], exclude=exclude, labels=labels,
                                    inputs_cache=shared.setdefault("inputs", InputCache()))
        cap = memo[cap_key]
        run_seeds = seeds[:1] if rc.edit.kind == "projection" else seeds  # a projection fit has no seed
        edits, probes, scores = {}, {}, []
        for seed in run_seeds:
            edit, report = steps("train-sae+probe" if rc.edit.kind == "sae" else "fit-projection",
                                 lambda: _build_edit(rc, adapter, cap, cache, progress, seed, memo))
            edits[seed], probes[seed] = edit, report
            if edit is None or sel is None:
                continue
            # cells that build the very same edit (e.g. top-n 3 and 10 when a seed has <= 3 neurons) score it once
            same = _same_edit_key(edit, seed, sel, column, r)
            if same is not None and same in memo:
                scores.append(memo[same])
                continue

            def score():
                with edits_installed(adapter, edit), sel.trace.replaying(adapter, cap.site):
                    emb = embed(adapter, sel.data, reuse=sel.base_emb, tower=cap.site.tower)
                after = evaluate(adapter, k=r.select.k, data=sel.data, embeddings=emb)
                key = "fairface" if cap.site.tower == "image" else "text:captions"
                return {**selection_score(sel.base, after, column, r.select.utility),
                        "cosine": embedding_cosine(emb[key], sel.base_emb[key])["mean"]}

            scores.append(steps("select-score", score))
            if same is not None:
                memo[same] = scores[-1]
        row: dict[str, Any] = {"cell": cell, "site": cap.site.name, "seeds": run_seeds,
                               "neurons": {s: list(e.neurons) for s, e in edits.items() if hasattr(e, "neurons")}}
        if any(e is None for e in edits.values()):
            row["skipped"] = "probing found no social neurons for some seed"
        elif scores:
            n = len(scores)
            row.update(skew_change=sum(x["skew_change"] for x in scores) / n,
                       utility_loss=sum(x["utility_loss"] for x in scores) / n,
                       cosine=sum(x["cosine"] for x in scores) / n, per_seed=scores)
            row["feasible"] = row["utility_loss"] <= r.select.max_utility_loss
        table.append(row)
        plans[len(table) - 1] = (rc, edits, probes, cap)
    usable = [i for i, row in enumerate(table) if "skipped" not in row]
    if not usable:  # every cell's table stays on disk: which seed found how many neurons where
        _write_selection(work, sel, column, r, table)
        # the seed mean needs an edit per seed, so a cell where only some seeds have neurons does not count
        most = max((sum(1 for n in row["neurons"].values() if n) for row in table), default=0)
        raise NotBuiltError(f"{r.name}: no select.grid cell has social neurons for column {r.probe.column!r} on every "
                            f"seed (at most {most} of {len(seeds)} seeds in a cell); lower probe.tau, train the SAE "
                            "longer, or give edit.neurons")
    if sel is None:
        best = usable[0]
    else:
        feasible = [i for i in usable if table[i]["feasible"]]
        best = (min(feasible, key=lambda i: table[i]["skew_change"]) if feasible
                else min(usable, key=lambda i: (table[i]["utility_loss"], table[i]["skew_change"])))
        table[best]["chosen"] = True
        log(f"{r.name}: chose {table[best]['cell'] or 'the recipe settings'} on {sel.description}: MaxSkew "
            f"{100 * table[best]['skew_change']:+.1f}%, utility loss {100 * table[best]['utility_loss']:.1f}%"
            + ("" if table[best]["feasible"] else " (no cell met select.max_utility_loss)"))
    rc, edits, probes, cap = plans[best]
    _write_selection(work, sel, column, r, table)
    return Plan(rc, table[best]["cell"], edits, probes, cap.site, cap, table, table[best] if sel else None, steps, work)


def _traced_embed(adapter, data: EvalData) -> tuple[dict, PrefixTrace]:
    """The unmodified model's embeddings of ``data``, and its blocks' outputs for edited runs to replay."""
    trace = PrefixTrace()
    with contextlib.ExitStack() as stack:
        for tower in adapter.towers():
            stack.enter_context(trace.recording(adapter, tower))
        return embed(adapter, data), trace


def _eval_data(rc: Recipe, adapter, shared: dict) -> tuple[EvalData, dict, PrefixTrace]:
    k = ("eval", id(adapter), rc.data.dir, rc.eval.limit)
    if k not in shared:
        data = EvalData.load(adapter, rc.data.dir, max_images=rc.eval.limit)
        shared[k] = (data, *_traced_embed(adapter, data))
    return shared[k]


def _aggregate(cmps: dict[int, dict], data: EvalData, minus: dict[int, dict] | None = None) -> dict[str, Any]:
    """Seed-averaged before/after per prompt set (all concepts and the held-out half) with the seed x concept CI.
    ``minus`` (another edit's comparisons, same seeds): the paired difference instead, ``(sum A - sum C) / sum
    before`` per draw, i.e. how much more ``cmps`` lowers skew than ``minus`` (negative: more), same bootstrap."""
    first = next(iter(cmps.values()))
    before, after, ci, detail = {}, {}, {}, {}
    for name, per in first["base"]["retrieval"].items():
        if "gender" not in per:
            continue
        concepts = [c for _, c in data.prompt_sets[name]]
        b = per["gender"]["max_skew_per_prompt"]
        afters = [c["patched"]["retrieval"][name]["gender"]["max_skew_per_prompt"] for c in cmps.values()]
        if minus is not None:  # A - C + before: its relative change over before is the paired difference
            others = [minus[s]["patched"]["retrieval"][name]["gender"]["max_skew_per_prompt"] for s in cmps]
            afters = [[x - y + z for x, y, z in zip(a, o, b)] for a, o in zip(afters, others)]
        for label, (bb, cc, aa) in ((name, (b, concepts, afters)),
                                    (name + HELD_OUT_SUFFIX, (*half_view(b, concepts), [half_view(a, concepts)[0] for a in afters]))):
            if not bb:
                continue
            res = seed_change_ci(bb, aa, cc)
            before[label] = sum(bb) / len(bb)
            after[label] = sum(sum(a) for a in aa) / (len(aa) * len(bb))
            ci[label], detail[label] = [res["ci_low"], res["ci_high"]], res
    return {"max_skew_gender_before": before, "max_skew_gender_after": after, "max_skew_gender_change_ci": ci,
            "max_skew_gender_seeds": detail}


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = [k for k, v in dicts[0].items() if isinstance(v, float)]
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}


def _seed_means(cmps: dict[int, dict]) -> dict[str, Any]:
    """Utility after the edit and embedding fidelity, averaged over the seeds' comparisons."""
    return {"utility_after": _mean_dicts([c["patched"]["utility"] for c in cmps.values()]),
            "fidelity": {k: {"mean": sum(c["fidelity"][k]["mean"] for c in cmps.values()) / len(cmps)}
                         for k in ("image_cosine", "prompt_cosine")}}


def finish_variant(plan: Plan, adapter, shared: dict, export_bench: Callable[..., dict]) -> dict[str, Any]:
    """Phase 2: export/validate/bench the first seed's edit, evaluate every seed once on the evaluation data."""
    rc, work, steps, site = plan.recipe, plan.work, plan.steps, plan.site
    seeds = list(plan.edits)
    edit0 = plan.edits[seeds[0]]
    edit0.save(work / "edit")
    if plan.probes[seeds[0]] is not None:
        write_json(work / "probe.json", plan.probes[seeds[0]])
    exported = export_bench(rc, adapter, edit0, site, work, steps, dict(edit0.provenance))
    projection = rc.edit.kind == "projection"
    summary: dict[str, Any] = {
        "variant": rc.name, "kind": rc.edit.kind, "site": site.name, "tower": site.tower,
        "mode": rc.edit.method if projection else rc.edit.mode, "alpha": rc.edit.strength if projection else rc.edit.alpha,
        "neurons": [] if projection else list(edit0.neurons), "seeds": seeds, "chosen": plan.cell,
        "selection": plan.chosen, "selection_cells": len(plan.table),
        "fit_data": {k: v for k, v in dataclasses.asdict(rc.data).items() if v is not None and k != "dir"},
        "neurons_per_seed": {s: list(getattr(e, "neurons", [])) for s, e in plan.edits.items()}}
    if projection:
        summary.update(method=rc.edit.method, fold=rc.edit.fold, rank=0 if edit0.in_dirs is None else int(edit0.in_dirs.shape[1]),
                       stock=exported.get("stock"))
    else:
        summary["value_per_seed"] = {s: e.value for s, e in plan.edits.items()}
    if "bench" in exported:
        summary["bench"] = exported["bench"]
    if rc.eval is not None:
        summary["eval"] = steps("eval", lambda: _evaluate(plan, adapter, shared))
    summary["steps"] = steps.record
    write_json(work / "run.json", summary)
    return summary


def _evaluate(plan: Plan, adapter, shared: dict) -> dict[str, Any]:
    rc, work, site = plan.recipe, plan.work, plan.site
    log(f"{rc.name}: evaluating the chosen setting on the evaluation data (first read of it for this variant)")
    data, base_emb, trace = _eval_data(rc, adapter, shared)
    seeds = list(plan.edits)
    with trace.replaying(adapter, site):  # replays only blocks whose weights are the recorded ones (no fold)
        cmps = {s: compare(adapter, e, k=rc.eval.k, shuffles=10 if s == seeds[0] else 0, data=data, base_emb=base_emb,
                           tower=site.tower) for s, e in plan.edits.items()}
    write_report(cmps[seeds[0]], work / "eval" / "compare", overwrite=True)
    edit0 = plan.edits[seeds[0]]
    field = "strength" if rc.edit.kind == "projection" else "alpha"
    with trace.replaying(adapter, site):
        rows = sweep_alpha(adapter, lambda a: dataclasses.replace(edit0, **{field: a}), rc.eval.alphas, k=rc.eval.k,
                           data=data, base_emb=base_emb, tower=site.tower)
    write_report(rows, work / "eval" / "sweep", overwrite=True)
    base = cmps[seeds[0]]["base"]
    out = _aggregate(cmps, data)
    out.update(noise_floor={n: p["gender"].get("max_skew_shuffled") for n, p in base["retrieval"].items() if "gender" in p},
               utility_before=base["utility"], utility_after_per_seed={s: c["patched"]["utility"] for s, c in cmps.items()},
               **_seed_means(cmps),
               pairs_gender_gap_before={sec: v["gender_gap"] for sec, v in base["pairs"].items()},
               pairs_gender_gap_after={sec: sum(c["patched"]["pairs"][sec]["gender_gap"] for c in cmps.values()) / len(cmps)
                                       for sec in base["pairs"]},
               sweep=[{"alpha": r["alpha"], "max_skew_gender": {n: p["gender"]["max_skew"] for n, p in r["retrieval"].items()},
                       "utility": r["utility"], "cosine": r["fidelity"]["image_cosine" if site.tower == "image" else "prompt_cosine"]["mean"]}
                      for r in rows])
    if rc.eval.controls:
        out["controls"] = (_controls(plan, adapter, data, base_emb, trace, shared, cmps) if rc.edit.kind == "sae"
                           else {kind: {"not_applicable": NO_NEURONS} for kind in rc.eval.controls})
    return out


def _controls(plan: Plan, adapter, data: EvalData, base_emb: dict, trace: PrefixTrace, shared: dict,
              edit_cmps: dict[int, dict]) -> dict[str, Any]:
    """``eval.controls`` of an SAE variant (:mod:`.controls`), each evaluated per seed and aggregated like the edit,
    with the edit's paired difference from it (``edit_minus_control``: below 0 = the neurons lower skew more)."""
    rc = plan.recipe
    latents = shared.setdefault("memo", {}).setdefault("latents", {})
    out: dict[str, Any] = {}
    for kind in rc.eval.controls:
        per_seed = control_edits(kind, plan.edits, rc, plan.cap, latents)
        if per_seed is None:
            out[kind] = {"not_applicable": NOT_APPLICABLE[kind]}
            continue
        log(f"{rc.name}: evaluating the {kind} control ({len(per_seed)} seeds)")
        with trace.replaying(adapter, plan.site):
            cmps = {s: compare(adapter, e, k=rc.eval.k, data=data, base_emb=base_emb, tower=plan.site.tower)
                    for s, e in per_seed.items()}
        res = _aggregate(cmps, data)
        paired = _aggregate(edit_cmps, data, minus=cmps)
        res["edit_minus_control"] = {"change": {p: d["change"] for p, d in paired["max_skew_gender_seeds"].items()},
                                     "ci": paired["max_skew_gender_change_ci"]}
        res.update(_seed_means(cmps))
        if kind == RANDOM:
            res.update(neurons_per_seed={s: e.neurons for s, e in per_seed.items()},
                       value_per_seed={s: e.value for s, e in per_seed.items()})
        out[kind] = res
    return out
