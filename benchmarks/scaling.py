"""Throughput of `capture` (images/s) and `train-sae` (steps/s) with 1 vs 2 processes (torchrun, gloo, CPU).

Each configuration runs the CLI as a user would: one process alone (1 torch thread, and 2 threads for reference)
and two processes under `python -m torch.distributed.run --standalone --nproc_per_node 2` (1 thread each, what
torchrun sets). The rates are the commands' own timings (capture.json `timing`, the SAE's `runtime`), which
leave out start-up and model loading. The machine's load average is recorded before and after: on a shared
box other jobs compete for the same cores.

    python benchmarks/scaling.py --out benchmarks/results/scaling [--images 64] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEBIAS_EXPORT_DATA", ROOT.parent / "shared" / "data"))


def cli(argv: list[str], procs: int, threads: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
              if procs > 1 else [sys.executable])
    proc = subprocess.run(launch + ["-m", "debias_export.cli.main"] + argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({procs} processes): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="arch:clip-vit-base-patch16")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sae-batch", type=int, default=1024)
    ap.add_argument("--expansion", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="debias-scaling-"))  # captures and SAEs: scratch, not results
    labels = DATA / "fairface540" / "labels.csv"
    configs = [(1, 1), (2, 1), (1, 2)]  # (processes, torch threads per process)
    rows, load_before = [], os.getloadavg()
    for procs, threads in configs:
        tag = f"p{procs}t{threads}"
        cap = work / f"cap-{tag}"
        cli(["capture", "--model", args.model, "--site", "image.-1", "--images", str(labels), "--limit", str(args.images),
             "--tokens", "all", "--shard-size", str(max(1, args.images // 4)), "--batch-size", "8", "--device", "cpu",
             "--no-progress", "--overwrite", "--out", str(cap)], procs, threads)
        timing = json.loads((cap / "capture.json").read_text())["timing"]
        sae = work / f"sae-{tag}"
        said = cli(["train-sae", "--activations", str(work / "cap-p1t1"), "--out", str(sae), "--steps", str(args.steps),
             "--batch-size", str(args.sae_batch), "--expansion", str(args.expansion), "--k", "20", "--device", "cpu",
             "--no-progress", "--overwrite"], procs, threads)
        run = json.loads((sae / "cfg.json").read_text())["metadata"]["training"]["runtime"]
        # the cfg holds no wall-clock time (it must not differ between identical runs): read the summary line
        run["seconds_this_run"] = float(re.search(r" in ([0-9.]+) s", said).group(1))
        rows.append({"processes": procs, "threads_per_process": threads,
                     "capture_images_per_s": round(timing["computed_inputs"] / timing["seconds"], 3),
                     "capture_seconds": timing["seconds"],
                     "sae_steps_per_s": round(run["steps_this_run"] / run["seconds_this_run"], 4),
                     "sae_seconds": run["seconds_this_run"], "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]), "model": args.model,
              "site": "image.-1", "images": args.images, "tokens": "all", "sae": {"d_in": 768, "expansion": args.expansion,
              "k": 20, "batch_size": args.sae_batch, "steps": args.steps}, "cpu_count": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "loadavg_before": [round(x, 2) for x in load_before], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# capture / train-sae throughput, 1 vs 2 processes ({result['date']})", "",
             f"`{result['command']}` on {os.cpu_count()} shared CPU cores; {args.model} site image.-1, {args.images} FairFace "
             f"images, all tokens; SAE d=768, F={768 * args.expansion}, k=20, batch {args.sae_batch}, {args.steps} steps. "
             f"Load average before: {result['loadavg_before']} (other jobs share the cores).", "",
             "| processes | threads each | capture images/s | SAE steps/s | load avg after |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['threads_per_process']} | {r['capture_images_per_s']} | "
                     f"{r['sae_steps_per_s']} | {r['loadavg_after'][0]} |")
    lines += ["", "On a shared box the rates measure CPU share as much as scaling: compare the load averages."]
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
