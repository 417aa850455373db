"""``debias-export run RECIPE``: capture -> train-sae -> probe -> patch -> export -> validate (-> bench -> eval).

Everything is written under ``<output.dir>.partial/`` and renamed to ``output.dir`` only when every step
succeeded, so a failed run never leaves a half-written artifact where a finished one is expected. The
partial directory is kept on failure: capture shards and SAE checkpoints in it live under ``cache/``,
keyed by a hash of their settings, so rerunning the same recipe resumes instead of starting over (and
variants that share a capture or an SAE compute it once).
"""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..analysis.probe import neurons_from_report
from ..bench import PatchSet, headline, run_benchmark
from ..bench.report import write_report
from ..core.errors import DebiasError, NotBuiltError
from ..core.fileio import apply_default_modes
from ..core.model_match import FINGERPRINT_KEY, model_fingerprint
from ..edits import SAEEdit, apply_edits
from ..edits.install import install_edits
from ..edits.projection import ProjectionEdit, fit_from_capture, read_fair_directions
from ..eval.recipe_eval import recipe_eval
from ..export import export_bundle
from .model_specs import load_model_spec
from .protocol import finish_variant, select_variant
from .recipe import Recipe, expand_variants
from .report import write_run_report
from .steps import Steps, capture, data_base, get_sae, log, neuron_values, probe, write_json


def run_recipe(recipe: Recipe, overwrite: bool | None = None, progress: bool = True) -> Path:
    """Run every variant of ``recipe``; returns the finished output directory."""
    out = Path(recipe.output.dir)
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    if out.exists() and not overwrite:
        raise DebiasError(f"output {out} already exists (set output.overwrite or pass --overwrite)")
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    runs = expand_variants(recipe)
    adapters: dict[tuple, Any] = {}
    shared: dict[str, Any] = {}  # selection split, evaluation data, captures and SAEs shared by the variants
    plans: dict[int, Any] = {}
    not_built: dict[int, dict[str, Any]] = {}
    for i, r in enumerate(runs):  # phase 1: held-out selection of every protocol variant, before any evaluation
        spec = (r.model.spec, r.model.family)
        if spec not in adapters:
            adapters[spec] = load_model_spec(*spec)
        if _protocol(r):
            try:
                plans[i] = select_variant(r, adapters[spec], work / r.name if recipe.variants else work,
                                          work / "cache", progress, shared)
            except NotBuiltError as exc:
                not_built[i] = _not_built(recipe, r, exc)
    summaries = []
    for i, r in enumerate(runs):
        adapter = adapters[(r.model.spec, r.model.family)]
        if i in not_built:
            summaries.append(not_built[i])
        elif i in plans:
            summaries.append(finish_variant(plans[i], adapter, shared, _export_bench))
        else:
            try:
                summaries.append(_run_one(r, adapter, work / r.name if recipe.variants else work, work / "cache", progress))
            except NotBuiltError as exc:
                summaries.append(_not_built(recipe, r, exc))
    missing = [s for s in summaries if "not_built" in s]
    if len(missing) == len(summaries):
        raise NotBuiltError(f"no variant could be built: {missing[0]['variant']}: {missing[0]['not_built']}")
    for s in missing:  # one line each on stderr; the report and summary.json carry the same reason
        warnings.warn(f"variant {s['variant']} not built: {s['not_built']}", stacklevel=1)
    if recipe.variants or _protocol(recipe):
        write_json(work / "summary.json", summaries)
        write_run_report(work, summaries, recipe, str(data_base(recipe).resolve()))
    _finish(work, out)
    log(f"done: {out}")
    return out


def _not_built(recipe: Recipe, r: Recipe, exc: NotBuiltError) -> dict[str, Any]:
    """The summary of a variant whose edit does not exist here: a multi-variant run reports it and goes on
    (the other variants' hours are not thrown away); a single-variant run has nothing to report and stops."""
    if not recipe.variants:
        raise exc
    reason = str(exc).removeprefix(f"{r.name}: ")  # the variant is named beside it wherever it is shown
    return {"variant": r.name, "kind": r.edit.kind, "site": r.site, "not_built": reason}


def _protocol(r: Recipe) -> bool:
    return r.select is not None or r.seeds is not None


def _run_one(recipe: Recipe, adapter, work: Path, cache: Path, progress: bool) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(f"{recipe.name}: ")
    torch.manual_seed(recipe.seed)
    cap = capture(recipe, adapter, cache, steps, progress)
    site = cap.site
    if recipe.edit.kind == "projection":
        return _run_projection(recipe, adapter, site, cap.store, work, steps)
    sae = steps("train-sae", lambda: get_sae(recipe, adapter, cap, cache, progress))
    sae.save(work / "sae")

    latents: dict = {}  # the probe's SAE latents, reused for edit.value: mean

    def run_probe():
        report = probe(recipe, sae, cap, latents)
        report["sources"]["sae"] = str(work / "sae")
        write_json(work / "probe.json", report)
        if report["num_unlabelled"]:
            log(f"{recipe.name}: skipped {report['num_unlabelled']} input(s) with a blank {recipe.probe.column!r} label")
        return report

    report = steps("probe", run_probe)
    neurons = recipe.edit.neurons or neurons_from_report(report)
    if not neurons:
        raise NotBuiltError(f"{recipe.name}: probing found no social neurons for column {recipe.probe.column!r} at tau={recipe.probe.tau}; "
                          "lower probe.tau, train the SAE longer, or give edit.neurons")
    provenance = {"recipe": recipe.source, "recipe_name": recipe.name, "seed": recipe.seed, "model": recipe.model.spec,
                  "site": site.name, "sae": dict(sae.cfg.metadata), "probe_column": recipe.probe.column,
                  FINGERPRINT_KEY: model_fingerprint(adapter)}

    value = neuron_values(recipe, sae, cap, neurons, latents)

    def make_edit(alpha: float) -> SAEEdit:
        return SAEEdit(site=site.name, sae=sae, neurons=neurons, value=value, alpha=alpha,
                       mode=recipe.edit.mode, model=recipe.model.spec, provenance=provenance)

    edit = make_edit(recipe.edit.alpha)
    edit.save(work / "edit")
    _export_bench(recipe, adapter, edit, site, work, steps, provenance, bench=False)
    summary: dict[str, Any] = {"variant": recipe.name, "kind": "sae", "site": site.name, "tower": site.tower, "mode": recipe.edit.mode,
                               "alpha": recipe.edit.alpha, "neurons": neurons, "value": value,
                               "sae_fvu": (sae.cfg.metadata.get("training") or {}).get("final_fvu"), "probe": {
                                   g: [n["index"] for n in v["neurons"]] for g, v in report["groups"].items()}}
    return _eval_bench_record(recipe, adapter, make_edit, edit, site, work, steps, summary)


def _export_bench(recipe: Recipe, adapter, edit, site, work: Path, steps: Steps, provenance: dict,
                  bench: bool = True) -> dict[str, Any]:
    """Install ``edit`` (folded or patched), export + validate it, remove it; then bench it when asked."""
    handle = steps("fold" if getattr(edit, "fold", "none") != "none" else "patch", lambda: install_edits(adapter, edit))
    try:
        folds = handle.fold_records() if hasattr(handle, "fold_records") else None
        kwargs = {"folds": folds} if folds else {}
        export_report = steps("export+validate", lambda: export_bundle(
            adapter, work / "export", onnx=recipe.export.onnx, opset=recipe.export.opset, atol=recipe.export.atol,
            rtol=recipe.export.rtol, exporter=recipe.export.exporter, overwrite=True, provenance=provenance,
            towers=[site.tower], precisions=recipe.export.precisions, **kwargs))
        write_json(work / "validate.json", export_report)
    finally:
        handle.remove()  # the adapter is shared with later variants and the eval/bench steps
    out: dict[str, Any] = {"stock": export_report.get("stock")}
    if bench and recipe.bench is not None:
        out["bench"] = steps("bench", lambda: _bench(recipe, adapter, edit, site, work / "bench"))
    return out


def _eval_bench_record(recipe: Recipe, adapter, make_edit, edit, site, work: Path, steps: Steps,
                       summary: dict[str, Any]) -> dict[str, Any]:
    """The variant's eval and bench steps (when the recipe has them), then ``run.json``."""
    if recipe.eval is not None:
        summary["eval"] = steps("eval", lambda: recipe_eval(recipe, adapter, make_edit, work / "eval"))
    if recipe.bench is not None:
        summary["bench"] = steps("bench", lambda: _bench(recipe, adapter, edit, site, work / "bench"))
    summary["steps"] = steps.record
    write_json(work / "run.json", summary)
    return summary


def _run_projection(recipe: Recipe, adapter, site, store, work: Path, steps: Steps) -> dict[str, Any]:
    """``edit.kind: projection``: fit the eraser of ``probe.column`` on the capture (no SAE, no probing), then
    export (folded into the weights, or patched), validate, eval and bench like an SAE variant."""
    e = recipe.edit
    fair = read_fair_directions(Path(e.fair_from)) if e.fair_from else None
    provenance = {"recipe": recipe.source, "recipe_name": recipe.name, "seed": recipe.seed, "model": recipe.model.spec,
                  "site": site.name, "probe_column": recipe.probe.column}
    edit = steps("fit-projection", lambda: fit_from_capture(
        store, recipe.probe.column, method=e.method, fold=e.fold, adapter=adapter, fair=fair, strength=e.strength,
        amplify=e.amplify, center=e.center, model=recipe.model.spec, activations=e.fit_on, keep=e.keep,
        provenance=dict(provenance)))
    if edit.provenance.get("unlabelled_skipped"):
        log(f"{recipe.name}: skipped {edit.provenance['unlabelled_skipped']} input(s) with a blank {recipe.probe.column!r} label")
    edit.save(work / "edit")

    def make_edit(b: float) -> "ProjectionEdit":
        # the sweep's alpha is the strength b; the edit keeps its fold mode, so eval installs it folded
        # (every_writer and output folds are not single-site patches), as export ships it
        return dataclasses.replace(edit, strength=b)

    exported = _export_bench(recipe, adapter, edit, site, work, steps, provenance, bench=False)
    rank = 0 if edit.in_dirs is None else int(edit.in_dirs.shape[1])
    summary: dict[str, Any] = {"variant": recipe.name, "kind": "projection", "site": site.name, "tower": site.tower,
                               "mode": e.method, "method": e.method, "fold": e.fold, "rank": rank,
                               "fair_rank": 0 if edit.fair is None else int(edit.fair.shape[1]), "center": e.center,
                               "alpha": e.strength, "neurons": [], "stock": exported["stock"],
                               "fitted_on": edit.provenance.get("activations")}
    at_strength = dataclasses.replace(recipe, edit=dataclasses.replace(e, alpha=e.strength))  # eval "at alpha" = at b
    return _eval_bench_record(at_strength, adapter, make_edit, edit, site, work, steps, summary)


def _bench(recipe: Recipe, adapter, edit, site, out: Path) -> dict[str, Any]:
    name = "folded" if getattr(edit, "fold", "none") != "none" else "patched"  # folded: zero extra ops, ratio ~1
    variants = {name: PatchSet.compile(name, adapter, [edit])}
    # each exported precision is timed too (int8: onnxruntime only; fp16 on a CPU is reported as skipped)
    dtypes = ["fp32", *(p for p in recipe.export.precisions if p != "fp32")] if recipe.export.onnx else ["fp32"]
    result = run_benchmark(adapter, variants, [site.tower], batch_sizes=recipe.bench.batch_sizes,
                           runtimes=recipe.bench.runtimes, reps=recipe.bench.reps, dtypes=dtypes)
    write_report(result, out, overwrite=True)
    return {"headline": headline(result)}


def _finish(work: Path, out: Path) -> None:
    """Swap the finished partial dir into place; the previous artifact survives until the swap."""
    shutil.rmtree(work / "cache", ignore_errors=True)  # resumption state, not part of the artifact
    apply_default_modes(work)  # safetensors writes 0600 files; publish with the umask's mode like everything else
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old)
