"""``debias-export run RECIPE``: capture -> train-sae -> probe -> patch -> export -> validate (-> bench -> eval).

Everything is written under ``<output.dir>.partial/`` and renamed to ``output.dir`` only when every step
succeeded, so a failed run never leaves a half-written artifact where a finished one is expected. The
partial directory is kept on failure: capture shards and SAE checkpoints in it live under ``cache/``,
keyed by a hash of their settings, so rerunning the same recipe resumes instead of starting over (and
variants that share a capture or an SAE compute it once).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..analysis.probe import neurons_from_report, probe_social_neurons
from ..bench import PatchSet, headline, run_benchmark
from ..bench.report import write_report
from ..capture import ActivationStore, capture_activations
from ..core.errors import DebiasError
from ..core.fileio import apply_default_modes
from ..core.model_match import FINGERPRINT_KEY, check_made_for, model_fingerprint, record_of
from ..data.captions import label_caption
from ..data.datasets import LabelledImages, TextPrompts, default_data_dir, read_csv_table
from ..edits import SAEEdit, apply_edits
from ..edits.install import install_edits
from ..edits.projection import ProjectionEdit, fit_from_capture, read_fair_directions
from ..eval.recipe_eval import recipe_eval
from ..export import export_bundle
from ..sae import SparseAutoencoder
from ..sae.importers import load_any
from ..sae.train import TrainConfig, train_sae
from .model_specs import load_model_spec
from .recipe import Recipe, expand_variants
from .report import write_run_report


def _log(msg: str) -> None:
    print(f"[debias-export] {msg}", flush=True)


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class _Steps:
    """Times each step for ``run.json``."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.record: dict[str, Any] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        _log(f"{self.prefix}{name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.record[name] = {"seconds": round(time.perf_counter() - t0, 3)}
        return result


def _caption_csv(src: Path, dst: Path) -> Path:
    """Labelled captions ("a photo of a young Black woman") from an image label CSV, for text-tower probing."""
    header, rows = read_csv_table(src, "data.captions_from file")
    if not rows or "gender" not in header:
        raise DebiasError(f"data.captions_from {src}: needs a 'gender' column")
    out = [{"text": text, **{k: row.get(k, "") for k in ("gender", "race", "age")}}
           for row in rows if (text := label_caption(row)) is not None]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "gender", "race", "age"])
        writer.writeheader()
        writer.writerows(out)
    return dst


def _data_source(recipe: Recipe, cache: Path):
    base = Path(recipe.data.dir) if recipe.data.dir else default_data_dir()
    if recipe.data.images:
        image_dir = base / recipe.data.image_dir if recipe.data.image_dir else None
        return LabelledImages(base / recipe.data.images, image_dir=image_dir, limit=recipe.data.limit)
    if recipe.data.captions_from:
        path = _caption_csv(base / recipe.data.captions_from, cache / f"captions-{_key(recipe.data.captions_from)}.csv")
        return TextPrompts(path, limit=recipe.data.limit)
    return TextPrompts(base / recipe.data.texts, limit=recipe.data.limit)


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
    summaries = []
    for r in runs:
        sub = work / r.name if recipe.variants else work
        spec = (r.model.spec, r.model.family)
        if spec not in adapters:
            adapters[spec] = load_model_spec(*spec)
        summaries.append(_run_one(r, adapters[spec], sub, work / "cache", progress))
    if recipe.variants:
        _write_json(work / "summary.json", summaries)
        write_run_report(work, summaries, recipe)
    _finish(work, out)
    _log(f"done: {out}")
    return out


def _run_one(recipe: Recipe, adapter, work: Path, cache: Path, progress: bool) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    steps = _Steps(f"{recipe.name}: ")
    torch.manual_seed(recipe.seed)
    site = adapter.resolve_site(recipe.site)
    if (recipe.data.images is not None) == (site.tower == "text"):
        fed = "data.images feeds the image tower" if recipe.data.images else "data.texts/captions_from feed the text tower"
        raise DebiasError(f"site {site.name} is on the {site.tower} tower but {fed}")
    source = _data_source(recipe, cache)
    columns = getattr(source, "columns", None) or (list(source.rows[0]) if source.rows else [])
    if recipe.probe.column not in columns:
        raise DebiasError(f"no label column {recipe.probe.column!r} (probe.column) in the data; columns: {', '.join(columns)}")

    cap_key = _key(recipe.model.spec, site.name, dataclasses.asdict(recipe.data), dataclasses.asdict(recipe.capture), recipe.seed)
    capture_dir = cache / f"capture-{cap_key}"
    steps("capture", lambda: capture_activations(adapter, site, source, capture_dir, tokens=recipe.capture.tokens,
                                                  k=recipe.capture.k, batch_size=recipe.capture.batch_size,
                                                  seed=recipe.seed, overwrite=False, progress=progress))
    store = ActivationStore(capture_dir)
    if recipe.edit.kind == "projection":
        return _run_projection(recipe, adapter, site, store, work, steps)

    sae_dir = cache / f"sae-{_key(cap_key, dataclasses.asdict(recipe.sae))}"

    def get_sae():
        if recipe.sae.path:
            sae = load_any(recipe.sae.path, d_in=adapter.width(site.tower))
            check_made_for(f"the SAE {recipe.sae.path} (sae.path)", record_of(sae.cfg.metadata), adapter, site)
            return sae
        if (sae_dir / "sae.safetensors").is_file():
            return SparseAutoencoder.load(sae_dir)
        cfg = TrainConfig(d_in=adapter.width(site.tower), expansion=recipe.sae.expansion, k=recipe.sae.k,
                          batch_size=recipe.sae.batch_size, lr=recipe.sae.lr, steps=recipe.sae.steps, seed=recipe.seed,
                          metadata={"model": recipe.model.spec, "tower": site.tower, "site": site.name, "layer": site.layer,
                                    FINGERPRINT_KEY: model_fingerprint(adapter)})
        sae = train_sae(store.activations(), cfg, checkpoint_dir=cache / f"{sae_dir.name}-checkpoints", progress=progress)
        sae.save(sae_dir)
        return sae

    sae = steps("train-sae", get_sae)
    sae.save(work / "sae")

    def probe():
        with torch.no_grad():
            x = store.output_activations() if recipe.probe.activations == "output" else store.mean_activations()
            latents = sae.encode(x)
        report = probe_social_neurons(latents, store.labels(recipe.probe.column), tau=recipe.probe.tau,
                                      top_n=recipe.probe.top_n)
        report["sources"] = {"capture": str(capture_dir), "sae": str(work / "sae"), "column": recipe.probe.column,
                             "activations": recipe.probe.activations}
        _write_json(work / "probe.json", report)
        if report["num_unlabelled"]:
            _log(f"{recipe.name}: skipped {report['num_unlabelled']} input(s) with a blank {recipe.probe.column!r} label")
        return report

    report = steps("probe", probe)
    neurons = recipe.edit.neurons or neurons_from_report(report)
    if not neurons:
        raise DebiasError(f"probing found no social neurons for column {recipe.probe.column!r} at tau={recipe.probe.tau}; "
                          "lower probe.tau, train the SAE longer, or give edit.neurons")
    provenance = {"recipe": recipe.source, "recipe_name": recipe.name, "seed": recipe.seed, "model": recipe.model.spec,
                  "site": site.name, "sae": dict(sae.cfg.metadata), "probe_column": recipe.probe.column,
                  FINGERPRINT_KEY: model_fingerprint(adapter)}

    def make_edit(alpha: float) -> SAEEdit:
        return SAEEdit(site=site.name, sae=sae, neurons=neurons, value=recipe.edit.value, alpha=alpha,
                       mode=recipe.edit.mode, model=recipe.model.spec, provenance=provenance)

    edit = make_edit(recipe.edit.alpha)
    edit.save(work / "edit")
    handle = steps("patch", lambda: apply_edits(adapter, edit))
    try:
        export_dir = work / "export"
        export_report = steps("export+validate", lambda: export_bundle(
            adapter, export_dir, onnx=recipe.export.onnx, opset=recipe.export.opset, atol=recipe.export.atol,
            exporter=recipe.export.exporter, overwrite=True, provenance=provenance, towers=[site.tower]))
        _write_json(work / "validate.json", export_report)
    finally:
        handle.remove()  # the adapter is shared with later variants and the eval/bench steps
    summary: dict[str, Any] = {"variant": recipe.name, "kind": "sae", "site": site.name, "tower": site.tower, "mode": recipe.edit.mode,
                               "alpha": recipe.edit.alpha, "neurons": neurons,
                               "sae_fvu": (sae.cfg.metadata.get("training") or {}).get("final_fvu"), "probe": {
                                   g: [n["index"] for n in v["neurons"]] for g, v in report["groups"].items()}}
    return _eval_bench_record(recipe, adapter, make_edit, edit, site, work, steps, summary)


def _eval_bench_record(recipe: Recipe, adapter, make_edit, edit, site, work: Path, steps: _Steps,
                       summary: dict[str, Any]) -> dict[str, Any]:
    """The variant's eval and bench steps (when the recipe has them), then ``run.json``."""
    if recipe.eval is not None:
        summary["eval"] = steps("eval", lambda: recipe_eval(recipe, adapter, make_edit, work / "eval"))
    if recipe.bench is not None:
        summary["bench"] = steps("bench", lambda: _bench(recipe, adapter, edit, site, work / "bench"))
    summary["steps"] = steps.record
    _write_json(work / "run.json", summary)
    return summary


def _run_projection(recipe: Recipe, adapter, site, store, work: Path, steps: _Steps) -> dict[str, Any]:
    """``edit.kind: projection``: fit the eraser of ``probe.column`` on the capture (no SAE, no probing), then
    export (folded into the weights, or patched), validate, eval and bench like an SAE variant."""
    e = recipe.edit
    fair = read_fair_directions(Path(e.fair_from)) if e.fair_from else None
    provenance = {"recipe": recipe.source, "recipe_name": recipe.name, "seed": recipe.seed, "model": recipe.model.spec,
                  "site": site.name, "probe_column": recipe.probe.column}
    edit = steps("fit-projection", lambda: fit_from_capture(
        store, recipe.probe.column, method=e.method, fold=e.fold, adapter=adapter, fair=fair, strength=e.strength,
        amplify=e.amplify, center=e.center, model=recipe.model.spec, provenance=dict(provenance)))
    if edit.provenance.get("unlabelled_skipped"):
        _log(f"{recipe.name}: skipped {edit.provenance['unlabelled_skipped']} input(s) with a blank {recipe.probe.column!r} label")
    edit.save(work / "edit")

    def make_edit(b: float) -> "ProjectionEdit":
        # the sweep's alpha is the strength b; the edit keeps its fold mode, so eval installs it folded
        # (every_writer and output folds are not single-site patches), as export ships it
        return dataclasses.replace(edit, strength=b)

    handle = steps("fold" if e.fold != "none" else "patch", lambda: install_edits(adapter, edit))
    try:
        folds = handle.fold_records()
        export_report = steps("export+validate", lambda: export_bundle(
            adapter, work / "export", onnx=recipe.export.onnx, opset=recipe.export.opset, atol=recipe.export.atol,
            exporter=recipe.export.exporter, overwrite=True, provenance=provenance, towers=[site.tower], folds=folds))
        _write_json(work / "validate.json", export_report)
    finally:
        handle.remove()
    rank = 0 if edit.in_dirs is None else int(edit.in_dirs.shape[1])
    summary: dict[str, Any] = {"variant": recipe.name, "kind": "projection", "site": site.name, "tower": site.tower,
                               "mode": e.method, "method": e.method, "fold": e.fold, "rank": rank,
                               "fair_rank": 0 if edit.fair is None else int(edit.fair.shape[1]), "center": e.center,
                               "alpha": e.strength, "neurons": [], "stock": export_report["stock"],
                               "fitted_on": edit.provenance.get("activations")}
    at_strength = dataclasses.replace(recipe, edit=dataclasses.replace(e, alpha=e.strength))  # eval "at alpha" = at b
    return _eval_bench_record(at_strength, adapter, make_edit, edit, site, work, steps, summary)


def _bench(recipe: Recipe, adapter, edit, site, out: Path) -> dict[str, Any]:
    name = "folded" if getattr(edit, "fold", "none") != "none" else "patched"  # folded: zero extra ops, ratio ~1
    variants = {name: PatchSet.compile(name, adapter, [edit])}
    result = run_benchmark(adapter, variants, [site.tower], batch_sizes=recipe.bench.batch_sizes,
                           runtimes=recipe.bench.runtimes, reps=recipe.bench.reps)
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
