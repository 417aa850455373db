"""Real-size latency/FLOPs benchmarks of SAE edits (random weights, real architectures).

Each case is one ``debias-export bench`` invocation (so the JSON records the exact options) writing
``benchmarks/results/<case>/``. Run a case with::

    .venv/bin/python benchmarks/run_real.py b16-last [--reps N] [--threads N] [--batch-sizes 1,8]

``--list`` prints the cases. Cases are sized to finish in < 10 minutes on 2 busy CPU cores; raise
``--reps`` on a quiet machine. Weights are random (``real_configs.random_clip``) and the SAE is
random (F = 8*d, 5 neurons): latency and FLOPs do not depend on the weight values because every
op is dense.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# case -> CLI arguments (without --out); see benchmarks/README.md for what each measures.
CASES = {
    # SAE edit at the last block of CLIP ViT-B/16 (position-pruned to CLS / EOS); one run per tower
    # keeps each run under 10 minutes on 2 busy cores.
    "b16-image-last": ["--arch", "clip-vit-base-patch16", "--towers", "image", "--site", "image.-1",
                       "--random-sae", "reconstruct,residual", "--batch-sizes", "1,8", "--reps", "10",
                       "--warmup", "1", "--profile"],
    "b16-text-last": ["--arch", "clip-vit-base-patch16", "--towers", "text", "--site", "text.-1",
                      "--random-sae", "reconstruct,residual", "--batch-sizes", "1,8,32", "--reps", "10",
                      "--warmup", "1", "--profile"],
    # Same edit, ViT-L/14-336 image tower (LLaVA-1.5's vision tower), last block.
    "l14-336-last": ["--arch", "clip-vit-large-patch14-336", "--towers", "image", "--site", "image.-1",
                     "--random-sae", "reconstruct", "--batch-sizes", "1", "--reps", "8", "--warmup", "1"],
    # A site read at every token: LLaVA-1.5's vision tower at layer -2 (576 patch tokens + CLS reach the
    # projector; no position pruning), image features as the LM receives them (LM stubbed out).
    "llava-every-token": ["--arch", "llava-1.5-7b", "--towers", "image", "--site", "image.-2",
                          "--random-sae", "reconstruct,residual", "--runtimes", "ort", "--batch-sizes", "1",
                          "--reps", "6", "--warmup", "1", "--profile"],
    # FLOPs only (no timing) for the same kind of site on the bare ViT-L/14-336 tower, batch 1 and 8.
    "l14-336-every-token-flops": ["--arch", "clip-vit-large-patch14-336", "--towers", "image", "--site", "image.11",
                                  "--random-sae", "reconstruct,residual", "--runtimes", "", "--batch-sizes", "1,8"],
    # Smoke case (seconds): tiny random CLIP; checks the pipeline end to end.
    "tiny": ["--model", "tiny-clip", "--random-sae", "reconstruct,residual", "--batch-sizes", "1,8,32",
             "--reps", "10", "--warmup", "2"],
}


def _override(args: list[str], flag: str, value: str | None) -> list[str]:
    if value is None:
        return args
    if flag in args:
        i = args.index(flag)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [flag, value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", nargs="?", choices=sorted(CASES))
    p.add_argument("--list", action="store_true")
    p.add_argument("--reps")
    p.add_argument("--warmup")
    p.add_argument("--threads")
    p.add_argument("--batch-sizes")
    p.add_argument("--runtimes")
    p.add_argument("--opt-level")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", help="default: benchmarks/results/<case>")
    a = p.parse_args(argv)
    if a.list or not a.case:
        for name, args in CASES.items():
            print(f"{name}: {' '.join(args)}")
        return 0
    args = list(CASES[a.case])
    for flag, value in (("--reps", a.reps), ("--warmup", a.warmup), ("--threads", a.threads),
                        ("--batch-sizes", a.batch_sizes), ("--runtimes", a.runtimes), ("--opt-level", a.opt_level)):
        args = _override(args, flag, value)
    if a.profile:
        args.append("--profile")
    out = Path(a.out) if a.out else RESULTS / a.case
    cmd = ["bench", *args, "--out", str(out), "--overwrite"]
    print("debias-export " + " ".join(cmd), file=sys.stderr)
    from debias_export.cli.main import main as cli_main

    return cli_main(cmd)


if __name__ == "__main__":
    sys.exit(main())
