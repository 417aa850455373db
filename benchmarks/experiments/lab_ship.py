"""Train, measure and ship the bias lab (issue #15 part 1). Run from the repository root with PYTHONPATH=$PWD:

    nice python benchmarks/experiments/lab_ship.py train   FOLDER [--recipe JSON] [key=value ...]  # recipe defaults + overrides
    nice python benchmarks/experiments/lab_ship.py measure FOLDER                  # FairFace 540 / PAIRS, once
    python      benchmarks/experiments/lab_ship.py ship    FOLDER                  # -> debias_export/assets/biaslab/
    python      benchmarks/experiments/lab_ship.py record  FOLDER NAME            # -> benchmarks/results/biaslab/NAME/

``train`` never looks at FairFace or PAIRS. ``--recipe``: start from the settings of a recipe.json instead of the
defaults. A fine-tune stage (recipe v4, ``settings.base``) whose base is the shipped recipe starts from the shipped
weights (what retraining the base gives on the CPU kind it was trained on; ``training.base_weights_sha256``
records which), any other base is retrained (cached) first. ``measure`` evaluates the fp16-rounded lab (what ships) and the
fp32 weights it was rounded from, and records both: the evaluation is reported, never used to choose settings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from debias_export.adapters.dual_encoder import DualEncoderAdapter
from debias_export.workflow.biaslab import lab as lab_mod
from debias_export.workflow.biaslab.data import load_utkface, split_utkface
from debias_export.workflow.biaslab.settings import BiasLabSettings
from debias_export.export.manifest import atomic_output_dir

ROOT = Path(__file__).resolve().parents[2]
DATA = os.environ.get("DEBIAS_EXPORT_DATA", str(ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results" / "biaslab"


def parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return None if value == "None" else value


def train(folder: Path, overrides: list[str]) -> None:
    start = BiasLabSettings()
    if overrides[:1] == ["--recipe"]:
        start = BiasLabSettings.from_dict(json.loads(Path(overrides[1]).read_text())["settings"])
        overrides = overrides[2:]
    s = dataclasses.replace(start, **{k: parse(v) for k, v in (a.split("=", 1) for a in overrides)})
    print(json.dumps(s.to_dict()), flush=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    base = None
    if s.base is not None:
        shipped = lab_mod.read_recipe()["settings"]
        base = lab_mod.ASSETS if s.base.to_dict() == shipped else lab_mod.ensure_trained(s.base, DATA, log=log)
    with atomic_output_dir(folder) as tmp:
        recipe = lab_mod.train_lab(s, DATA, tmp, progress=False, log=log,
                                   image_cache=Path(os.environ.get("LAB_PILOT_CACHE", "/tmp/lab-pilot")) / "ship",
                                   val_every=int(os.environ.get("LAB_VAL_EVERY", "0")), base_folder=base,
                                   shifted_view=True)
    print(json.dumps(recipe["validation"], indent=1), recipe["training"]["seconds"], flush=True)


def measure(folder: Path) -> None:
    out = {}
    for name, weights in (("fp16_shipped", lab_mod.WEIGHTS), ("fp32", lab_mod.WEIGHTS_FP32)):
        model, tok, _ = lab_mod.load_lab(folder, weights)
        _, summary = lab_mod.measure_bias(DualEncoderAdapter(model, source=str(folder), processor=tok), DATA, k=50,
                                          shuffles=20, seed=0)
        out[name] = summary
        print(name, json.dumps(summary["utility"]), flush=True)
        for key, e in summary.items():
            if key.startswith("max_skew_gender/"):
                print(f"  {key}: {e['real']:.4f} (floor {e['shuffled']:.4f} +- {e['shuffled_sd']:.4f})", flush=True)
    (folder / "evaluation.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def ship(folder: Path) -> None:
    recipe = lab_mod.read_recipe(folder)
    ev = json.loads((folder / "evaluation.json").read_text())
    recipe["evaluation"] = ev["fp16_shipped"]
    recipe["evaluation_fp32_weights"] = {k: ev["fp32"][k] for k in ("utility",)} | {
        k: {"real": v["real"]} for k, v in ev["fp32"].items() if k.startswith("max_skew_gender/")}
    dest = lab_mod.ASSETS
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / lab_mod.WEIGHTS, dest / lab_mod.WEIGHTS)
    lab_mod.write_recipe(dest, recipe)
    record(folder, "seed0", recipe)


def record(folder: Path, name: str, recipe: dict | None = None) -> None:
    recipe = recipe or lab_mod.read_recipe(folder)
    if "evaluation" not in recipe:
        ev = json.loads((folder / "evaluation.json").read_text())
        recipe["evaluation"] = ev["fp16_shipped"]
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    lab_mod.write_recipe(out, recipe)
    shutil.copy(folder / "evaluation.json", out / "evaluation_fp16_vs_fp32.json")
    if name == "seed0":
        _, val = split_utkface(load_utkface(DATA), recipe["settings"]["val_mod"])
        (RESULTS / "utkface_val_files.txt").write_text("".join(f"{r['file']}\n" for r in sorted(val, key=lambda r: r["file"])))


if __name__ == "__main__":
    cmd, folder = sys.argv[1], Path(sys.argv[2])
    {"train": lambda: train(folder, sys.argv[3:]), "measure": lambda: measure(folder), "ship": lambda: ship(folder),
     "record": lambda: record(folder, sys.argv[3])}[cmd]()
