"""A/A test of the timing harness: "patched" variants that are identical to the unmodified model.

Any ratio far from 1 here is harness bias (e.g. a cost tied to the position within an interleaved
round), not an edit. Run with both interleaving orders::

    .venv/bin/python benchmarks/aa_test.py [--arch clip-vit-base-patch16] [--tower image] [--reps 20]

writes ``benchmarks/results/aa-<arch>-<tower>-<order>/`` (bench.json/.md/.png).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="clip-vit-base-patch16")
    p.add_argument("--tower", default="image")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runtimes", default="torch,ort")
    p.add_argument("--orders", default="abab,rotate")
    a = p.parse_args(argv)

    from debias_export.bench import PatchSet, run_benchmark
    from debias_export.bench.report import write_report
    from debias_export.adapters.real_configs import random_clip

    adapter = random_clip(a.arch, tower=a.tower)
    for order in a.orders.split(","):
        # two empty patch sets: installing them changes nothing, so every variant is the same model
        variants = {"same_1": PatchSet("same_1", []), "same_2": PatchSet("same_2", [])}
        result = run_benchmark(adapter, variants, [a.tower], batch_sizes=[int(b) for b in a.batch_sizes.split(",")],
                               runtimes=a.runtimes.split(","), reps=a.reps, warmup=a.warmup, order=order,
                               count_flops=False, log=lambda m: print(m, file=sys.stderr),
                               meta={"arch": a.arch, "aa_test": "variants identical to the unmodified model"})
        out = write_report(result, RESULTS / f"aa-{a.arch}-{a.tower}-{order}", overwrite=True)
        for h in result["headline"]:
            print(f"{order:6s} {h['runtime']:5s} b={h['batch']:<3d} {h['variant']}: ratio_of_medians="
                  f"{h['ratio_of_medians']:.4f} paired={h['paired_median']:.4f} CI={h['paired_median_ci95']}")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
