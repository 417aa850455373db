"""The GPU check's chain (run by scripts/gpu_check.sh): capture -> train-sae -> patch -> export -> validate -> bench.

Two chains: CLIP ViT-B/16 (``arch:clip-vit-base-patch16``, site image.-1) and LLaVA-1.5's vision tower (CLIP
ViT-L/14-336, ``arch:clip-vit-large-patch14-336``, read at layer -2 as LLaVA does), random weights, on synthetic
labelled images written here (a GPU machine may have no data). Capture autocasts fp16, the SAE trains in bf16,
bench times torch / torch-cuda / ort / ort-cuda in fp32 and fp16. Every step is the CLI command a user would
type, run in this process (imports paid once); each step's time, exit code and last line go to
``gpu_check.json`` and ``gpu_check.md`` in ``--out``. ``--dry-run``: the same chain on the CPU with tiny models.
Exit status: 0 when every step passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from debias_export.cli.main import main

FULL = {
    "settings": {"device": "cuda", "images": 512, "capture_batch": 64, "sae_batch": 4096, "steps": 300, "expansion": 8,
                 "k": 20, "runtimes": "torch,ort,torch-cuda,ort-cuda", "dtypes": "fp32,fp16", "batch_sizes": "1,32",
                 "reps": 10, "warmup": 3},
    "chains": {"clip-vit-b16": ("arch:clip-vit-base-patch16", "image.-1"),
               "llava-1.5-vision-tower": ("arch:clip-vit-large-patch14-336", "image.-2")},
}
DRY = {
    "settings": {"device": "cpu", "images": 8, "capture_batch": 4, "sae_batch": 16, "steps": 4, "expansion": 2, "k": 4,
                 # bench on torch only: the export step already ran ONNX through onnxruntime (keeps CI short)
                 "runtimes": "torch", "dtypes": "fp32", "batch_sizes": "1", "reps": 2, "warmup": 1},
    "chains": {"clip-vit-b16": ("tiny-clip", "image.-1"), "llava-1.5-vision-tower": ("tiny-clip:1", "image.-2")},
}


def write_images(folder: Path, n: int) -> Path:
    """``n`` synthetic 336 x 336 PNGs with a gender column (the chain needs labels, not faces)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows = ["file,gender"]
    for i in range(n):
        pixels = torch.randint(0, 256, (336, 336, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "images" / f"img_{i:04d}.png")
        rows.append(f"img_{i:04d}.png,{'Female' if i % 2 else 'Male'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def step(record: list, chain: str, name: str, argv: list[str]) -> bool:
    """Run one CLI command, recording its time, exit code and last output line."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    seconds = time.perf_counter() - start
    # the command's own last line (its summary, or its error), not a progress line
    streams = (out, err) if rc == 0 else (err, out)
    lines = [ln for ln in streams[0].getvalue().splitlines() if ln.strip()] or streams[1].getvalue().splitlines()
    record.append({"chain": chain, "step": name, "rc": rc, "seconds": round(seconds, 2),
                   "last_line": lines[-1] if lines else "", "argv": argv})
    print(f"[{chain}] {name}: rc {rc} in {seconds:.1f} s: {record[-1]['last_line'][:200]}", file=sys.stderr)
    return rc == 0


def run_chain(record: list, chain: str, model: str, site: str, s: dict, csv: Path, work: Path) -> dict | None:
    dev = ["--device", s["device"]]
    w = work / chain
    ok = step(record, chain, "capture", ["capture", "--model", model, "--site", site, "--images", str(csv), "--tokens",
                                         "random-k", "--k", "8", "--batch-size", str(s["capture_batch"]), "--precision",
                                         "fp16", "--no-progress", "--out", str(w / "cap"), *dev])
    ok = ok and step(record, chain, "train-sae", ["train-sae", "--activations", str(w / "cap"), "--out", str(w / "sae"),
                                                  "--batch-size", str(s["sae_batch"]), "--steps", str(s["steps"]),
                                                  "--expansion", str(s["expansion"]), "--k", str(s["k"]),
                                                  "--precision", "bf16", "--no-progress", *dev])
    ok = ok and step(record, chain, "patch", ["patch", "--model", model, "--sae", str(w / "sae"), "--neurons", "0,1,2",
                                              "--out", str(w / "edit")])
    ok = ok and step(record, chain, "export", ["export", "--model", model, "--edit", str(w / "edit"), "--out",
                                               str(w / "export"), "--onnx", "--tower", "image"])
    ok = ok and step(record, chain, "validate", ["validate", str(w / "export"), "--seed", "0"])
    ok = ok and step(record, chain, "bench", ["bench", "--export", str(w / "export"), "--towers", "image", "--runtimes",
                                              s["runtimes"], "--dtypes", s["dtypes"], "--batch-sizes", s["batch_sizes"],
                                              "--reps", str(s["reps"]), "--warmup", str(s["warmup"]), "--no-flops",
                                              "--out", str(w / "bench")])
    if not ok:
        return None
    return json.loads((w / "bench" / "bench.json").read_text())


def environment() -> dict:
    import onnxruntime as ort  # the check reports which execution providers this machine's onnxruntime has

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "onnxruntime": ort.__version__,
           "ort_providers": ort.get_available_providers()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def markdown(result: dict) -> str:
    lines = [f"# GPU check ({'dry run on CPU' if result['dry_run'] else 'GPU'}), {result['date']}", "",
             f"Command: `{result['command']}`", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()),
             "", "| chain | step | exit | seconds | last line |", "|---|---|---|---|---|"]
    for r in result["steps"]:
        last = r["last_line"].replace("|", "/")[:160]
        lines.append(f"| {r['chain']} | {r['step']} | {r['rc']} | {r['seconds']} | {last} |")
    lines += ["", f"All steps passed: **{result['passed']}** (total {result['seconds']} s). Bench tables: "
              "`<chain>/bench/bench.md` in the work folder (bench.json copied as `bench-<chain>.json`)."]
    return "\n".join(lines) + "\n"


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="Results folder (gpu_check.json, gpu_check.md).")
    parser.add_argument("--dry-run", action="store_true", help="Tiny models on the CPU (what CI runs).")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: OUT/work, removed at the end).")
    args = parser.parse_args()
    plan = DRY if args.dry_run else FULL
    s = plan["settings"]
    if s["device"] == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available to this torch; use --dry-run", file=sys.stderr)
        return 2
    work = args.work or args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    csv = write_images(work / "data", s["images"])
    record: list = []
    benches = {}
    for chain, (model, site) in plan["chains"].items():
        bench = run_chain(record, chain, model, site, s, csv, work)
        if bench is not None:
            benches[chain] = bench
            (args.out / f"bench-{chain}.json").write_text(json.dumps(bench, indent=2, sort_keys=True) + "\n")
            shutil.copy(work / chain / "bench" / "bench.md", args.out / f"bench-{chain}.md")
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": args.dry_run,
              "command": "scripts/gpu_check.sh" + (" --dry-run" if args.dry_run else ""), "settings": s,
              "chains": plan["chains"], "environment": environment(), "steps": record,
              "passed": all(r["rc"] == 0 for r in record) and len(benches) == len(plan["chains"]),
              "seconds": round(time.perf_counter() - start, 1)}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(result))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu check {'passed' if result['passed'] else 'FAILED'} in {result['seconds']} s; wrote "
          f"{args.out}/gpu_check.json, gpu_check.md")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(cli())
