"""``debias-export run RECIPE``: capture -> train-sae -> probe -> patch -> export -> validate (-> bench -> eval).

Everything is written under ``<output.dir>.partial/`` and renamed to ``output.dir`` only when every step
succeeded, so a failed run never leaves a half-written artifact where a finished one is expected. The
partial directory is kept on failure: capture shards and SAE checkpoints in it are keyed by a hash of
their settings, so rerunning the same recipe resumes instead of starting over.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .adapters.specs import load_model_spec
from .errors import DebiasError
from .recipe import Recipe


def _log(msg: str) -> None:
    print(f"[debias-export] {msg}", flush=True)


class _Steps:
    """Times each step and records its outputs for ``run.json``."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        _log(f"{name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.record[name] = {"seconds": round(time.perf_counter() - t0, 3)}
        return result


def _data_source(recipe: Recipe):
    from .data import LabelledImages, TextPrompts, default_data_dir

    base = Path(recipe.data.dir) if recipe.data.dir else default_data_dir()
    if recipe.data.images:
        image_dir = base / recipe.data.image_dir if recipe.data.image_dir else None
        return LabelledImages(base / recipe.data.images, image_dir=image_dir, limit=recipe.data.limit)
    return TextPrompts(base / recipe.data.texts, limit=recipe.data.limit)


def run_recipe(recipe: Recipe, overwrite: bool | None = None, progress: bool = True) -> Path:
    """Run every step of ``recipe``; returns the finished output directory."""
    from .capture import ActivationStore, capture_activations
    from .edits import SAEEdit, apply_edits
    from .export import export_bundle
    from .probe import neurons_from_report, probe_social_neurons
    from .sae.train import TrainConfig, train_sae

    out = Path(recipe.output.dir)
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    if out.exists() and not overwrite:
        raise DebiasError(f"output {out} already exists (set output.overwrite or pass --overwrite)")
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    torch.manual_seed(recipe.seed)

    adapter = steps("load model", lambda: load_model_spec(recipe.model.spec, recipe.model.family))
    site = adapter.resolve_site(recipe.site)
    if recipe.data.texts and site.tower != "text" or recipe.data.images and site.tower == "text":
        raise DebiasError(f"site {site.name} is on the {site.tower} tower but data.{'texts' if recipe.data.texts else 'images'} feeds the other tower")
    source = _data_source(recipe)

    capture_dir = work / "capture"
    steps("capture", lambda: capture_activations(adapter, site, source, capture_dir, tokens=recipe.capture.tokens,
                                                  k=recipe.capture.k, batch_size=recipe.capture.batch_size,
                                                  seed=recipe.seed, overwrite=False, progress=progress))
    store = ActivationStore(capture_dir)

    def get_sae():
        if recipe.sae.path:
            from .sae.importers import load_any

            return load_any(recipe.sae.path, d_in=adapter.width(site.tower))
        cfg = TrainConfig(d_in=adapter.width(site.tower), expansion=recipe.sae.expansion, k=recipe.sae.k,
                          batch_size=recipe.sae.batch_size, lr=recipe.sae.lr, steps=recipe.sae.steps, seed=recipe.seed,
                          metadata={"model": recipe.model.spec, "tower": site.tower, "site": site.name, "layer": site.layer})
        return train_sae(store.activations(), cfg, checkpoint_dir=work / "sae_checkpoints", progress=progress)

    sae = steps("train-sae", get_sae)
    sae.save(work / "sae")

    def probe():
        with torch.no_grad():
            latents = sae.encode(store.mean_activations())
        report = probe_social_neurons(latents, store.labels(recipe.probe.column), tau=recipe.probe.tau,
                                      top_n=recipe.probe.top_n)
        report["sources"] = {"capture": str(capture_dir), "sae": str(work / "sae"), "column": recipe.probe.column}
        (work / "probe.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=float) + "\n")
        return report

    report = steps("probe", probe)
    neurons = recipe.edit.neurons or neurons_from_report(report)
    if not neurons:
        raise DebiasError(f"probing found no social neurons for column {recipe.probe.column!r} at tau={recipe.probe.tau}; "
                          "lower probe.tau, train the SAE longer, or give edit.neurons")
    provenance = {"recipe": recipe.source, "recipe_name": recipe.name, "seed": recipe.seed, "model": recipe.model.spec,
                  "site": site.name, "sae": dict(sae.cfg.metadata), "probe_column": recipe.probe.column}
    edit = SAEEdit(site=site.name, sae=sae, neurons=neurons, value=recipe.edit.value, alpha=recipe.edit.alpha,
                   mode=recipe.edit.mode, model=recipe.model.spec, provenance=provenance)
    edit.save(work / "edit")
    steps("patch", lambda: apply_edits(adapter, edit))
    export_dir = work / "export"
    export_report = steps("export+validate", lambda: export_bundle(adapter, export_dir, onnx=recipe.export.onnx,
                                                                  opset=recipe.export.opset, atol=recipe.export.atol,
                                                                  overwrite=True, provenance=provenance))
    (work / "validate.json").write_text(json.dumps(export_report, indent=2, sort_keys=True, default=str) + "\n")
    summary = {"recipe": recipe.name, "site": site.name, "neurons": neurons, "alpha": recipe.edit.alpha,
               "mode": recipe.edit.mode, "sae": {k: v for k, v in sae.cfg.metadata.items() if k in ("fvu", "final_fvu")},
               "steps": steps.record}
    (work / "run.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    _finish(work, out)
    _log(f"done: {out} (neurons {neurons})")
    return out


def _finish(work: Path, out: Path) -> None:
    """Swap the finished partial dir into place; the previous artifact survives until the swap."""
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old)
