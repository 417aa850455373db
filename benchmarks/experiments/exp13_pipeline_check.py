"""Exp 13: run the proposed image variants through the real pipeline (run_recipe), emulating the proposed
``probe.activations: output`` option by pointing ActivationStore.mean_activations at output_activations for the
duration of the run (probing is the pipeline's only caller of it). No ONNX, no bench. Output in
$DEMO_STUDY_CACHE/pipeline-check; prints the report's occupations numbers.
"""
from __future__ import annotations

import json

from debias_export.capture.store import ActivationStore
from debias_export.workflow.pipeline import run_recipe
from debias_export.workflow.recipe import parse_recipe
from study_common import CACHE, DATA

RECIPE = {
    "name": "demo-proposal-check", "seed": 0, "model": {"spec": "biaslab"}, "site": "image.1",
    "data": {"dir": str(DATA), "images": "utkface/labels.csv"},
    "capture": {"tokens": "random-k", "k": 2, "batch_size": 128},
    "sae": {"k": 16, "expansion": 8, "batch_size": 1024, "steps": 600},
    "probe": {"column": "gender", "tau": 0.2, "top_n": 3},
    "edit": {"alpha": 1.0, "value": 0.0, "mode": "residual"},
    "export": {"onnx": False},
    "eval": {"alphas": [0.0, 0.6, 1.0], "k": 50},
    "variants": [{"name": "image-residual"}, {"name": "image-reconstruct", "edit": {"mode": "reconstruct", "alpha": 0.6}}],
    "output": {"dir": str(CACHE / "pipeline-check"), "overwrite": True},
}


def main() -> None:
    original = ActivationStore.mean_activations
    ActivationStore.mean_activations = ActivationStore.output_activations
    try:
        out = run_recipe(parse_recipe(RECIPE), overwrite=True, progress=False)
    finally:
        ActivationStore.mean_activations = original
    for s in json.loads((out / "summary.json").read_text()):
        ev = s["eval"]
        print(s["variant"], s["neurons"], {k: (round(ev["max_skew_gender_before"][k], 4), round(ev["max_skew_gender_after"][k], 4))
                                           for k in ev["max_skew_gender_before"]}, ev["utility_after"].get("caption_recall@50"))


if __name__ == "__main__":
    main()
