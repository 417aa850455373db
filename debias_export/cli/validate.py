"""``debias-export validate``: re-check an export against its own HF model on fresh random inputs."""
from __future__ import annotations

import random

import click

from .common import SEED, FiniteFloat, summary


@click.command("validate")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--atol", default=1e-4, show_default=True, type=FiniteFloat(min=0.0))
@click.option("--seed", default=None, type=SEED, help="Input seed (default: random, printed).")
def validate(path, atol, seed):
    """Verify manifests, load PATH/hf with load_patched, compare every PATH/onnx graph on new shapes."""
    from ..export import validate_bundle

    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    report = validate_bundle(path, atol=atol, seed=seed)
    graphs = report.get("onnx", {})
    parts = [f"{name}.onnx max|diff| {max(g['max_abs_diff'].values()):.2g}"
             + (f" ({sum(f['flipped_latents'] for f in g['boundary_flips'])} SAE latents flipped at their threshold, "
                f"explained)" if g.get("boundary_flips") else "") for name, g in graphs.items()]
    summary(f"ok {path}: manifests verified, hf loads" + (", " + ", ".join(parts) if parts else ", no onnx graphs")
            + f" (atol {atol:g}, seed {seed})",
            next_step=f"debias-export bench --export {path} --out BENCH_DIR, or debias-export eval --model MODEL --patched {path} --out REPORT_DIR")
