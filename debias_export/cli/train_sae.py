"""``debias-export train-sae``: train a Matryoshka BatchTopK SAE on captured activations."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from ..core.choices import TRAIN_PRECISIONS
from ..core.errors import DebiasError
from ..core.fileio import refuse_existing
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
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:i]",
              help="Where to train (auto: this process's GPU if CUDA is there, else the CPU).")
@click.option("--precision", type=click.Choice(TRAIN_PRECISIONS), default="fp32", show_default=True,
              help="bf16 autocasts the matmuls; SAE weights, Adam state and the threshold stay fp32.")
@click.option("--checkpoint-dir", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Save resumable checkpoints here; rerunning resumes from the newest "
                   "(default with --max-steps-this-run: OUT.checkpoints, removed when training finishes).")
@click.option("--checkpoint-every", default=1000, show_default=True, type=POSITIVE_INT)
@click.option("--max-steps-this-run", default=None, type=POSITIVE_INT,
              help="Stop after this many steps; the same command again resumes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_sae(act_dir: Path, out_dir: Path, k: int, expansion: int, batch_size: int, steps: int | None,
              tokens: int | None, lr: float | None, warmup_steps: int | None, decay_fraction: float,
              groups: list[float] | None, dead_tokens: int, seed: int, device: str, precision: str,
              checkpoint_dir: Path | None, checkpoint_every: int, max_steps_this_run: int | None, overwrite: bool,
              no_progress: bool) -> None:
    """Train a Matryoshka BatchTopK SAE on ACTIVATIONS and save it to OUT (cfg.json + sae.safetensors).

    Runs as it is under `torchrun --nproc_per_node N` or `accelerate launch` (data parallel: each process
    computes on its share of every batch, gradients are summed; same result as one process).
    """
    from ..capture.shards import open_activations
    from ..export.manifest import atomic_output_dir
    from ..sae.distributed import distributed_session
    from ..sae.train import DEFAULT_GROUPS, TrainConfig
    from ..sae.train import train_sae as run_training

    resume_from = _unfinished_run(out_dir) if out_dir.exists() and not overwrite else None
    if resume_from is None:
        refuse_existing(out_dir, overwrite)
    default_ckpt = Path(f"{out_dir}.checkpoints")
    ckpt = checkpoint_dir or resume_from or (default_ckpt if max_steps_this_run else None)
    if not act_dir.is_dir():
        raise DebiasError(f"activations folder not found: {act_dir}")
    fractions = list(groups) if groups else list(DEFAULT_GROUPS)
    source, width, meta = open_activations(act_dir)
    cfg = TrainConfig(d_in=width, expansion=expansion, k=k, batch_size=batch_size, lr=lr, steps=steps, tokens=tokens,
                      warmup_steps=warmup_steps, decay_fraction=decay_fraction, group_fractions=fractions,
                      dead_tokens=dead_tokens, seed=seed, device=device, precision=precision,
                      checkpoint_every=checkpoint_every, metadata=meta)
    with distributed_session(device) as (dist, _):
        if dist.is_main and overwrite and checkpoint_dir is None:
            shutil.rmtree(default_ckpt, ignore_errors=True)  # --overwrite starts afresh, not from our old checkpoint
        dist.barrier()
        sae = run_training(source, cfg, ckpt, max_steps_this_call=max_steps_this_run, progress=not no_progress,
                           dist=dist)
        t = sae.cfg.metadata["training"]
        if not t["finished"]:
            t["checkpoint_dir"] = str(ckpt)  # what a rerun of the same command resumes from
        if dist.is_main:
            with atomic_output_dir(out_dir, overwrite or resume_from is not None) as tmp:  # written whole or not at all
                sae.save(tmp)
            if t["finished"] and ckpt is not None and checkpoint_dir is None:
                shutil.rmtree(ckpt, ignore_errors=True)  # our default folder: the finished SAE replaces it
        dist.barrier()
    if not dist.is_main:
        return
    run = t["runtime"]
    seconds = getattr(sae, "run_seconds", 0.0)
    rate = f", {run['steps_this_run'] / seconds:.2f} steps/s" if seconds > 0 else ""
    procs = f" on {run['processes']} processes" if run["processes"] > 1 else ""
    state = (f"finished {t['steps_done']} steps" if t["finished"] else
             f"stopped at step {t['steps_done']} of {t['total_steps']} (run the same command again to resume from {ckpt})")
    nxt = (f"; next: debias-export probe --capture {act_dir} --sae {out_dir} --column gender --out {out_dir}-probe.json"
           if t["finished"] and "capture" in meta and meta.get("site") else "")
    click.echo(f"SAE {sae.d_in} -> {sae.num_latents} latents (k={cfg.k}) {state} in {seconds:.1f} s"
               f"{procs}{rate}; FVU {t['final_fvu']:.4f}; threshold {t['threshold']:.4g}; saved to {out_dir}{nxt}")


def _unfinished_run(out_dir: Path) -> Path | None:
    """The checkpoint folder an SAE that ``--max-steps-this-run`` stopped early resumes from (else None)."""
    try:
        training = json.loads((out_dir / "cfg.json").read_text())["metadata"]["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = training.get("checkpoint_dir") if isinstance(training, dict) and not training.get("finished", True) else None
    return Path(folder) if folder and Path(folder).is_dir() else None
