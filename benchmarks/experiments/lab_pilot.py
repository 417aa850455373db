"""Pilot runs for the bias-lab recipe (issue #15 part 1): train on the UTKFace training split, score on the
fixed UTKFace validation split only (FairFace / PAIRS are never touched here).

    PYTHONPATH=$PWD nice python benchmarks/experiments/lab_pilot.py NAME key=value ... [--val-every N]
    PYTHONPATH=$PWD python benchmarks/experiments/lab_pilot.py --table   # markdown summary of all pilots

Writes benchmarks/experiments/results/lab_pilot_NAME.json (settings, loss, validation metrics per checkpoint,
seconds). Decoded images are cached under $LAB_PILOT_CACHE (default /tmp/lab-pilot).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from debias_export.workflow.biaslab.data import label_tensor, load_utkface, preload_images, split_utkface, subsample
from debias_export.workflow.biaslab.model import build_model
from debias_export.adapters.dual_encoder import minilm_path
from debias_export.workflow.biaslab.settings import BiasLabSettings
from debias_export.workflow.biaslab.train import cpu_info, deterministic, run_training, validation_metrics

DATA = os.environ.get("DEBIAS_EXPORT_DATA", "/work/shared/data")
CACHE = Path(os.environ.get("LAB_PILOT_CACHE", "/tmp/lab-pilot"))
OUT = Path(__file__).parent / "results"


def parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return None if value == "None" else value


def table() -> str:
    """Markdown table of every pilot's last checkpoint (validation split; tight / zoomed-out framing)."""
    base = BiasLabSettings().to_dict()
    lines = ["| pilot | differs from the shipped recipe | gender acc | age acc | race acc | caption R@10 | s |",
             "|---|---|---|---|---|---|---|"]
    for f in sorted(OUT.glob("lab_pilot_*.json")):
        r = json.loads(f.read_text())
        c = r["checkpoints"][-1]
        diff = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if base.get(k) != v and k != "version")
        cell = lambda m: f"{c['tight'][m]:.3f} / {c['zoom'][m]:.3f}"  # noqa: E731
        lines.append(f"| {r['name']} | {diff} | {cell('gender_acc')} | {cell('age_acc')} | {cell('race_acc')} | "
                     f"{cell('caption_recall@10')} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if args == ["--table"]:
        print(table())
        return
    val_every = 0
    if "--val-every" in args:
        i = args.index("--val-every")
        val_every = int(args[i + 1])
        del args[i:i + 2]
    name, overrides = args[0], dict(a.split("=", 1) for a in args[1:])
    s = dataclasses.replace(BiasLabSettings(), **{k: parse(v) for k, v in overrides.items()})
    rows = load_utkface(DATA)
    train_rows, val_rows = split_utkface(rows, s.val_mod)
    train_rows = subsample(train_rows, s.max_images, s.seed)
    t0 = time.time()
    tr_img = preload_images([r["path"] for r in train_rows], s.image_size, CACHE / f"train_{s.val_mod}_{s.image_size}_{len(train_rows)}.safetensors")
    va_img = preload_images([r["path"] for r in val_rows], s.image_size, CACHE / f"val_{s.val_mod}_{s.image_size}.safetensors")
    tr_lab, va_lab = label_tensor(train_rows), label_tensor(val_rows)
    print(f"{len(train_rows)} train / {len(val_rows)} val images ({time.time() - t0:.0f}s)", flush=True)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    result = {"name": name, "settings": s.to_dict(), "cpu": cpu_info(), "checkpoints": []}

    with deterministic(s.threads):
        model = build_model(s)
        t1 = time.time()

        def on_epoch(epoch: int) -> None:
            if (val_every and epoch % val_every == 0) or epoch == s.epochs:
                m = validation_metrics(model, tok, va_img, va_lab)
                m.update(epoch=epoch, seconds=round(time.time() - t1, 1))
                result["checkpoints"].append(m)
                print(json.dumps(m), flush=True)

        hist = run_training(model, tok, tr_img, tr_lab, s, progress=False, on_epoch=on_epoch)
    result.update(hist, train_seconds=round(time.time() - t1, 1))
    OUT.mkdir(exist_ok=True)
    (OUT / f"lab_pilot_{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
