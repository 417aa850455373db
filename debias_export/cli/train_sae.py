"""``debias-export train-sae``: train a Matryoshka BatchTopK SAE on captured activations."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import DebiasError
from .common import NON_NEGATIVE_INT, POSITIVE_INT, SEED, FiniteFloat, FloatList


@click.command("train-sae")
@click.option("--activations", "act_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Capture directory (or folder of *.safetensors shards with an 'activations' [N, d] tensor).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output SAE folder.")
@click.option("--k", default=20, show_default=True, type=POSITIVE_INT, help="Average active latents per token (BatchTopK).")
@click.option("--expansion", default=8, show_default=True, type=POSITIVE_INT, help="Latents = expansion x width.")
@click.option("--batch-size", default=4096, show_default=True, type=POSITIVE_INT)
@click.option("--steps", default=None, type=POSITIVE_INT, help="Training steps (or give --tokens).")
@click.option("--tokens", default=None, type=POSITIVE_INT, help="Training tokens; steps = ceil(tokens / batch size).")
@click.option("--lr", default=None, type=FiniteFloat(min=0.0, min_open=True), help="Learning rate (default 2e-4 / sqrt(F / 2^14)).")
@click.option("--warmup-steps", default=None, type=NON_NEGATIVE_INT, help="Linear warmup (default min(1000, steps/10)).")
@click.option("--decay-fraction", default=0.2, show_default=True, type=FiniteFloat(0.0, 1.0), help="Final fraction of steps with linear decay to 0.")
@click.option("--groups", default=None, type=FloatList(FiniteFloat(0.0, 1.0, min_open=True)), help="Matryoshka group fractions, comma-separated (default 0.0625,0.125,0.25,0.5625).")
@click.option("--dead-tokens", default=10_000_000, show_default=True, type=POSITIVE_INT, help="Tokens without firing before a latent counts as dead.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--device", default="cpu", show_default=True, help="Torch device to train on (e.g. cuda).")
@click.option("--checkpoint-dir", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Save resumable checkpoints here; rerunning resumes from the newest.")
@click.option("--checkpoint-every", default=1000, show_default=True, type=POSITIVE_INT)
@click.option("--max-steps-this-run", default=None, type=POSITIVE_INT, help="Stop after this many steps (resume later).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_sae(act_dir: Path, out_dir: Path, k: int, expansion: int, batch_size: int, steps: int | None,
              tokens: int | None, lr: float | None, warmup_steps: int | None, decay_fraction: float,
              groups: list[float] | None, dead_tokens: int, seed: int, device: str, checkpoint_dir: Path | None, checkpoint_every: int,
              max_steps_this_run: int | None, overwrite: bool, no_progress: bool) -> None:
    """Train a Matryoshka BatchTopK SAE on ACTIVATIONS and save it to OUT (cfg.json + sae.safetensors)."""
    from ..capture.shards import open_activations
    from ..sae.train import DEFAULT_GROUPS, TrainConfig
    from ..sae.train import train_sae as run_training
    from .common import refuse_existing

    refuse_existing(out_dir, overwrite)
    if not act_dir.is_dir():
        raise DebiasError(f"activations folder not found: {act_dir}")
    fractions = list(groups) if groups else list(DEFAULT_GROUPS)
    source, width, meta = open_activations(act_dir)
    cfg = TrainConfig(d_in=width, expansion=expansion, k=k, batch_size=batch_size, lr=lr, steps=steps, tokens=tokens,
                      warmup_steps=warmup_steps, decay_fraction=decay_fraction, group_fractions=fractions,
                      dead_tokens=dead_tokens, seed=seed, device=device, checkpoint_every=checkpoint_every, metadata=meta)
    sae = run_training(source, cfg, checkpoint_dir, max_steps_this_call=max_steps_this_run, progress=not no_progress)
    # Atomic output: write next to the target, then rename over it.
    from ..export.manifest import atomic_output_dir

    with atomic_output_dir(out_dir, overwrite) as tmp:
        sae.save(tmp)
    t = sae.cfg.metadata["training"]
    state = "finished" if t["finished"] else f"stopped at step {t['steps_done']} (rerun to resume)"
    click.echo(f"SAE {sae.d_in} -> {sae.num_latents} latents (k={cfg.k}) {state}; FVU {t['final_fvu']:.4f}; "
               f"threshold {t['threshold']:.4g}; saved to {out_dir}")
