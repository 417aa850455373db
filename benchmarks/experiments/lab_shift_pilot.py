"""Photo-domain pilots for the bias lab (issue #15): fine-tune the shipped v3 lab for a few epochs with an
augmentation setting, score on the clean UTKFace validation split AND its shifted view (:mod:`...shifted`).
FairFace / PAIRS are never touched here.

    PYTHONPATH=$PWD nice -n 19 python benchmarks/experiments/lab_shift_pilot.py v3              # shipped lab, no training
    PYTHONPATH=$PWD nice -n 19 python benchmarks/experiments/lab_shift_pilot.py NAME key=value ...
    PYTHONPATH=$PWD python benchmarks/experiments/lab_shift_pilot.py --table
    PYTHONPATH=$PWD python benchmarks/experiments/lab_shift_pilot.py --pick    # the pre-registered rule

A pilot is the recipe-v4 fine-tune stage ``base = shipped v3 recipe`` with :data:`STAGE` and the overrides
(exactly what ``lab_ship.py train`` / ``bias-lab --retrain`` would run after retraining v3 on this CPU kind).
Writes benchmarks/experiments/results/lab_shift_NAME.json. Images are cached under $LAB_PILOT_CACHE.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from debias_export.adapters.dual_encoder import minilm_path
from debias_export.workflow.biaslab import lab as lab_mod
from debias_export.workflow.biaslab.data import label_tensor, load_utkface, preload_images, split_utkface, subsample
from debias_export.workflow.biaslab.settings import V4_NEUTRAL, BiasLabSettings
from debias_export.workflow.biaslab.shifted import shifted_images
from debias_export.workflow.biaslab.train import cpu_info, deterministic, run_training, validation_metrics

DATA = os.environ.get("DEBIAS_EXPORT_DATA", "/work/shared/data")
CACHE = Path(os.environ.get("LAB_PILOT_CACHE", "/tmp/lab-pilot"))
OUT = Path(__file__).parent / "results"
STAGE = {"version": 4, "epochs": 4, "lr": 3e-4, "warmup_frac": 0.05}  # the pilots' fine-tune length / rate


def parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return None if value == "None" else value


def stage_settings(overrides: dict) -> BiasLabSettings:
    """The fine-tune stage on top of the shipped v3 recipe."""
    base = BiasLabSettings.from_dict(lab_mod.read_recipe()["settings"])
    return dataclasses.replace(base, **STAGE, base=base, **overrides)


def table() -> str:
    """Markdown: every pilot, clean (zoom view, the v3 headline) and shifted view."""
    base = BiasLabSettings.from_dict(lab_mod.read_recipe()["settings"]).to_dict()
    lines = ["| pilot | differs from v3 | clean gender / age / race / R@10 | shifted gender / age / race / R@10 | s |",
             "|---|---|---|---|---|"]
    for f in sorted(OUT.glob("lab_shift_*.json")):
        r = json.loads(f.read_text())
        m = r["metrics"]
        diff = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k in base and base[k] != v and k != "version")
        diff += "".join(f", {k}={v}" for k, v in r["settings"].items() if k not in base and k != "base" and V4_NEUTRAL.get(k) != v)
        cell = lambda v: " / ".join(f"{m[v][k]:.3f}" for k in ("gender_acc", "age_acc", "race_acc", "caption_recall@10"))  # noqa: E731
        lines.append(f"| {r['name']} | {diff.strip(', ') or '-'} | {cell('zoom')} | {cell('shifted')} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def pick(candidates: tuple[str, ...] = ("S0", "S1", "S2", "S3")) -> str:
    """The pre-registered rule (README, written before any pilot score): eligible if clean gender accuracy and
    clean caption recall@10 (zoom view) are >= 0.98 x v3's (else retry at 0.95 x); winner = the eligible pilot
    with the highest shifted gender accuracy + shifted caption recall@10."""
    res = {n: json.loads((OUT / f"lab_shift_{n}.json").read_text())["metrics"] for n in ("v3", *candidates)}
    ref = res["v3"]["zoom"]
    for keep in (0.98, 0.95):
        ok = [n for n in candidates if all(res[n]["zoom"][m] >= keep * ref[m] for m in ("gender_acc", "caption_recall@10"))]
        if ok:
            score = {n: res[n]["shifted"]["gender_acc"] + res[n]["shifted"]["caption_recall@10"] for n in ok}
            print(f"eligible at {keep} x v3: " + ", ".join(f"{n} ({score[n]:.4f})" for n in ok))
            return max(ok, key=score.get)
    raise SystemExit("no pilot is eligible")


def main() -> None:
    args = sys.argv[1:]
    if args == ["--table"]:
        print(table())
        return
    if args == ["--pick"]:
        print("winner:", pick())
        return
    name, overrides = args[0], {k: parse(v) for k, v in (a.split("=", 1) for a in args[1:])}
    rows = load_utkface(DATA)
    train_rows, val_rows = split_utkface(rows, 10)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    va_img = preload_images([r["path"] for r in val_rows], 48, CACHE / "val_10_48.safetensors")
    va_shift = shifted_images(val_rows, 48, CACHE / "val_10_48_shifted_v1.safetensors")
    va_lab = label_tensor(val_rows)
    t1 = time.time()
    if name == "v3":
        model, _, recipe = lab_mod.load_lab()
        s, hist = BiasLabSettings.from_dict(recipe["settings"]), {}
        with deterministic(1):
            metrics = validation_metrics(model, tok, va_img, va_lab, shifted=va_shift)
    else:
        s = stage_settings(overrides)
        train_rows = subsample(train_rows, s.max_images, s.seed)
        tr_img = preload_images([r["path"] for r in train_rows], 48, CACHE / f"train_10_48_{len(train_rows)}.safetensors")
        with deterministic(s.threads):
            model = lab_mod.start_model(s, lab_mod.ASSETS)
            hist = run_training(model, tok, tr_img, label_tensor(train_rows), s, progress=False)
            lab_mod.round_trained(model, lab_mod.STORAGE_DTYPE)  # measured as it would be stored
            metrics = validation_metrics(model, tok, va_img, va_lab, shifted=va_shift)
    result = {"name": name, "settings": s.to_dict(), "cpu": cpu_info(), "metrics": metrics, **hist,
              "train_seconds": round(time.time() - t1, 1)}
    print(json.dumps(metrics), flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / f"lab_shift_{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
