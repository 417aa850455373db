"""Start-up time of the CLI: ``debias-export --help`` and ``debias-export COMMAND --help`` for every command.

Each measurement is the wall time of a fresh interpreter (``python -m debias_export.cli.main ... --help``, a
subprocess, so imports are paid every time), median of ``--runs`` (default 5) after one untimed warm-up run
that fills the OS file cache. ``--root`` picks the source tree (default: this checkout), so the same script
measures another checkout (e.g. main before the lazy CLI) with the same interpreter.

    python benchmarks/cli_startup.py                      # writes benchmarks/results/cli-startup/
    python benchmarks/cli_startup.py --root /tmp/main-tree --out /tmp/before --label before
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = ["capture", "train-sae", "probe", "patch", "export", "validate", "verify", "run", "bench", "eval", "locate",
            "bias-lab", "project"]


def time_help(root: Path, args: list[str], runs: int) -> dict:
    """Median / min / max wall seconds of ``python -m debias_export.cli.main *args --help`` in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "debias_export.cli.main", *args, "--help"]
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)  # warm-up: file cache, .pyc files
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=HERE.parent, help="source tree holding debias_export/")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cli-startup")
    ap.add_argument("--label", default="after", help="name of this measurement in results.json")
    ap.add_argument("--limit-s", type=float, default=1.0, help="the target each measurement is checked against")
    args = ap.parse_args()
    load_before = os.getloadavg()
    rows = {"--help": time_help(args.root, [], args.runs)}
    for command in COMMANDS:
        rows[f"{command} --help"] = time_help(args.root, [command], args.runs)
    result = {
        "label": args.label, "root": str(args.root), "python": sys.version.split()[0], "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "limit_s": args.limit_s, "all_under_limit": all(r["median_s"] < args.limit_s for r in rows.values()),
        "commands": rows,
        "command": f"python benchmarks/cli_startup.py --root {args.root} --runs {args.runs} --label {args.label}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    previous[args.label] = result
    path.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")
    lines = ["# CLI start-up time", "",
             "Wall time of a fresh `python -m debias_export.cli.main [COMMAND] --help` (subprocess, median of "
             f"{args.runs} after a warm-up run), written by `benchmarks/cli_startup.py`.", ""]
    labels = sorted(previous, key=lambda k: (k != "before", k))
    lines += ["| invocation | " + " | ".join(f"{lab} (s)" for lab in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name in rows:
        cells = [f"{previous[lab]['commands'][name]['median_s']:.2f}" if name in previous[lab]["commands"] else "-"
                 for lab in labels]
        lines.append(f"| `debias-export {name}` | " + " | ".join(cells) + " |")
    lines += [""] + [f"- **{lab}**: tree `{previous[lab]['root']}`, {previous[lab]['cpus']} CPUs ({previous[lab]['cpu']}), "
                     f"1-min load average {previous[lab]['loadavg_1m_before_after'][0]} -> "
                     f"{previous[lab]['loadavg_1m_before_after'][1]} (a shared machine: times are upper bounds); "
                     f"all under {previous[lab]['limit_s']} s: {previous[lab]['all_under_limit']}; "
                     f"`{previous[lab]['command']}`" for lab in labels]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    for name, r in rows.items():
        print(f"{name:20s} {r['median_s']:.3f} s")


if __name__ == "__main__":
    main()
