"""The SAE training loop: activation batches (memory, a capture, or shards), checkpoints with resume, ``fvu``.

The optimisation itself (loss, BatchTopK, Matryoshka groups, input scaling) is :mod:`.trainer`.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..core.errors import ConfigError, DebiasError, IntegrityError, ShapeError
from ..core.fileio import apply_default_modes
from .distributed import Dist
from .model import SparseAutoencoder, read_safetensors
from .trainer import DEFAULT_GROUPS, NORM_BATCHES, MatryoshkaTrainer, TrainConfig

__all__ = ["DEFAULT_GROUPS", "TrainConfig", "train_sae", "fvu", "iterate_batches"]


# ----- data ---------------------------------------------------------------------------------------
class _StoreShards:
    """Token activations of an ``ActivationStore`` (anything with ``iter_shards()``), one shard at a time."""

    def __init__(self, store: Any):
        self.store = store

    def __iter__(self) -> Iterator[torch.Tensor]:
        for shard in self.store.iter_shards():
            yield shard["activations"]


def _as_source(activations: Any) -> Iterable[torch.Tensor]:
    """A re-iterable source: epochs and resuming read the data again from the start."""
    if isinstance(activations, torch.Tensor):
        return [activations]
    if hasattr(activations, "iter_shards"):
        return _StoreShards(activations)
    if iter(activations) is activations:  # a one-shot iterator cannot be re-read: keep it in memory
        return list(activations)
    return activations


def iterate_batches(source: Iterable[torch.Tensor], batch_size: int, seed: int, d_in: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches; each epoch re-iterates ``source`` (rows of a shard are permuted)."""
    epoch, carry = 0, None
    while True:
        seen = 0
        for i, shard in enumerate(source):
            if not isinstance(shard, torch.Tensor) or shard.ndim != 2 or shard.shape[1] != d_in:
                shape = tuple(shard.shape) if isinstance(shard, torch.Tensor) else type(shard).__name__
                raise ShapeError(f"activation shard {i} has shape {shape}, expected [N, {d_in}]")
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + i)
            rows = shard[torch.randperm(shard.shape[0], generator=g)].float()
            seen += rows.shape[0]
            carry = rows if carry is None else torch.cat([carry, rows])
            while carry.shape[0] >= batch_size:
                yield carry[:batch_size]
                carry = carry[batch_size:]
        if seen == 0:
            raise DebiasError("activation source is empty (or a one-shot iterator that was already used up)")
        epoch += 1


# ----- checkpoints and the training loop ------------------------------------------------------
def _latest_checkpoint(folder: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if (p / "state.json").is_file()
             and p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def _save_checkpoint(folder: Path, trainer: MatryoshkaTrainer) -> Path:
    tensors, info = trainer.state()
    info["settings_hash"] = trainer.cfg.settings_hash()
    info["settings"] = {k: v for k, v in asdict(trainer.cfg).items() if k != "metadata"}
    final = folder / f"step-{trainer.step_count:09d}"
    tmp = folder / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")  # written last
    apply_default_modes(tmp)  # safetensors writes 0600
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in folder.glob("step-*"):  # keep only the newest complete checkpoint
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, trainer: MatryoshkaTrainer) -> None:
    try:
        info = json.loads((path / "state.json").read_text())
    except ValueError as exc:
        raise DebiasError(f"bad checkpoint state {path / 'state.json'}: {exc}") from None
    want = trainer.cfg.settings_hash()
    if info.get("settings_hash") != want:
        raise ConfigError(f"checkpoint {path} was written with different training settings "
                          f"(hash {info.get('settings_hash')} != {want}); use another --checkpoint-dir")
    try:
        trainer.load_state(read_safetensors(path / "state.safetensors"), info)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise IntegrityError(f"damaged checkpoint {path}: {type(exc).__name__} {exc}") from None


def train_sae(activations: Iterable[torch.Tensor] | torch.Tensor, cfg: TrainConfig,
              checkpoint_dir: str | Path | None = None, *, max_steps_this_call: int | None = None,
              progress: bool = True, dist: Dist | None = None) -> SparseAutoencoder:
    """Train a Matryoshka BatchTopK SAE on ``[N, d_in]`` activations.

    ``activations``: a tensor, a re-iterable of shard tensors (list, ...), an ``ActivationStore``, or a
    one-shot iterator (read into memory once, since epochs and resuming re-read the data).

    With ``checkpoint_dir`` the state is saved every ``cfg.checkpoint_every`` steps (and at the end)
    and a rerun resumes from the newest checkpoint. ``max_steps_this_call`` stops early (after a
    checkpoint) for time-limited jobs. Same data + seed give byte-identical weights on the same machine and
    library versions (another CPU may round differently: equal up to float rounding there).

    Under a process group (``dist``, default: the initialised one) every rank reads the same stream of global
    batches (one shard in memory at a time) and computes on its ``1 / world`` slice of each; gradients and the
    batch statistics are reduced across ranks (:meth:`MatryoshkaTrainer.train_step`), so the result equals
    the single-process run with the same ``batch_size`` up to float rounding. Rank 0 writes the checkpoints
    (a shared ``checkpoint_dir``); every rank resumes from the newest.
    """
    dist = dist or Dist.current()
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"batch size {cfg.batch_size} does not split evenly over {dist.world_size} processes")
    source = _as_source(activations)
    trainer = MatryoshkaTrainer(cfg, dist)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    latest = None
    if ckpt is not None:
        if dist.is_main:
            ckpt.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        latest = _latest_checkpoint(ckpt)
        dist.check_same("newest checkpoint", str(latest))  # a checkpoint dir that is not shared fails here
        if latest is not None:
            _load_checkpoint(latest, trainer)
    batches = iterate_batches(source, cfg.batch_size, cfg.seed, cfg.d_in)
    first = [next(batches) for _ in range(min(8, cfg.total_steps))]  # for the threshold fallback and final FVU
    if trainer.step_count == 0:
        trainer.scale_from(iterate_batches(source, cfg.batch_size, cfg.seed, cfg.d_in),
                           min(NORM_BATCHES, cfg.total_steps))
    batches = iterate_batches(source, cfg.batch_size, cfg.seed, cfg.d_in)  # restart: train from batch 0
    for _ in range(trainer.step_count):  # resume: skip the batches already trained on
        next(batches)
    stop = cfg.total_steps if max_steps_this_call is None else min(cfg.total_steps, trainer.step_count + max_steps_this_call)
    bar = tqdm(total=cfg.total_steps, initial=trainer.step_count, disable=not (progress and dist.is_main),
               desc="train-sae", file=sys.stderr, dynamic_ncols=True)
    stats: dict[str, float] = {}
    saved_step = trainer.step_count if ckpt is not None and latest is not None else None
    share = cfg.batch_size // dist.world_size
    start_step, start_time = trainer.step_count, time.perf_counter()
    while trainer.step_count < stop:
        stats = trainer.train_step(next(batches)[dist.rank * share:(dist.rank + 1) * share])
        if not math.isfinite(stats["loss"]):
            raise DebiasError(f"SAE training diverged at step {trainer.step_count} (loss {stats['loss']}); lower --lr")
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4g}", fvu=f"{stats['fvu']:.3f}", dead=stats["dead"])
        if ckpt is not None and trainer.step_count % cfg.checkpoint_every == 0:
            if dist.is_main:
                _save_checkpoint(ckpt, trainer)
            saved_step = trainer.step_count
    bar.close()
    seconds = time.perf_counter() - start_time
    if ckpt is not None and saved_step != trainer.step_count and dist.is_main:
        _save_checkpoint(ckpt, trainer)
    dist.barrier()  # the checkpoint is on disk before any rank moves on
    sae = trainer.export(first)
    eval_fvu = fvu(sae, first)
    sae.cfg.metadata = {**cfg.metadata, "training": {
        "method": "matryoshka_batchtopk", "steps_done": trainer.step_count, "total_steps": cfg.total_steps,
        "finished": trainer.step_count >= cfg.total_steps, "input_scale": trainer.scale,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "metadata"}, "lr": cfg.learning_rate,
        "warmup_steps": cfg.warmup, "group_sizes": trainer.sizes, "seed": cfg.seed,
        "final_train_fvu": stats.get("fvu"), "final_fvu": eval_fvu,  # on the first <= 8 training batches
        "threshold": float(sae.threshold),
        "runtime": {"device": trainer.device.type, "precision": cfg.precision, "processes": dist.world_size,
                    "steps_this_run": trainer.step_count - start_step}}}
    # Wall-clock time is kept off the saved cfg: it would make every SAE file (and every export that records the
    # SAE's provenance) differ between two identical runs, which `reproduce` must not see.
    sae.run_seconds = round(seconds, 3)
    return sae


@torch.no_grad()
def fvu(sae: SparseAutoencoder, batches: list[torch.Tensor] | torch.Tensor) -> float:
    """Fraction of variance unexplained of the SAE's inference reconstruction on raw activations."""
    x = torch.cat(list(batches)) if not isinstance(batches, torch.Tensor) else batches
    x = x.float()
    return float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
