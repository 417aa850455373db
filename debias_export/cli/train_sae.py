"""``debias-export train-sae``: train a Matryoshka BatchTopK SAE on captured activations."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import click
import torch

from ..core.errors import DebiasError, check_finite
from ..sae.model import read_safetensors
from .common import NON_NEGATIVE_INT, POSITIVE_INT, SEED, FiniteFloat, FloatList


class ActivationShards:
    """Re-iterable ``[N, d]`` tensors named ``activations`` in every ``*.safetensors`` of a folder, by name."""

    def __init__(self, folder: str | Path, key: str = "activations"):
        self.folder, self.key = Path(folder), key
        self.files = sorted(p for p in self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        if not self.files:
            raise DebiasError(f"no *.safetensors activation shards in {self.folder}")

    def __iter__(self) -> Iterator[torch.Tensor]:
        for path in self.files:
            tensors = read_safetensors(path)
            if self.key not in tensors:
                raise DebiasError(f"shard {path} has no tensor named {self.key!r}")
            check_finite(f"activations in {path}", tensors[self.key])
            yield tensors[self.key]


def open_activations(folder: Path) -> tuple[Any, int, dict[str, Any]]:
    """``(re-iterable [N, d] tensors, d, metadata)`` from a capture dir or a folder of plain shards."""
    from ..capture.store import MANIFEST, ActivationStore

    if (folder / MANIFEST).is_file():
        store = ActivationStore(folder)
        s = store.settings
        site = str(store.site)
        layer = site.split(".")[1] if site.count(".") >= 1 else None
        meta = {"model": s.get("model"), "tower": s.get("tower"), "site": site, **store.model_record,
                "layer": int(layer) if layer and layer.lstrip("-").isdigit() else None,
                "capture": {"dir": str(folder), "tokens": s.get("tokens"), "num_tokens": store.num_tokens,
                            "source": s.get("source")}}
        return store, store.width, meta  # train_sae reads its shards one at a time
    shards = ActivationShards(folder)
    first = next(iter(shards))
    if first.ndim != 2:
        raise DebiasError(f"{shards.files[0]}: activations have shape {tuple(first.shape)}, expected [N, d]")
    return shards, int(first.shape[1]), {"capture": {"dir": str(folder)}}


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
    from ..sae.train import DEFAULT_GROUPS, TrainConfig, train_sae as run_training
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
