"""Matryoshka BatchTopK SAE training, following sae-for-vlm / dictionary_learning.

One step on a batch ``x`` (already divided by the input scale, see below):

- ``pre = relu((x - b_dec) @ W_enc + b_enc)``; BatchTopK keeps the ``k * B`` largest entries of the
  whole batch (not ``k`` per row), giving ``f``.
- Matryoshka loss: latents are split into nested groups (fractions 1/16, 1/8, 1/4, rest); the loss is
  the mean over groups of the squared reconstruction error of the prefix reconstruction using groups
  ``1..g`` (per-row squared L2 summed over features, averaged over rows, as dictionary_learning does).
- Aux-k loss (weight ``aux_k_coef``): the top ``k_aux = d // 2`` pre-activations of *dead* latents
  (no firing for ``dead_tokens`` tokens) reconstruct the detached residual, normalised by its variance.
- Adam, gradient component parallel to each decoder row removed, grad-norm clip, unit-norm decoder
  rows after every step; lr warmup -> constant -> linear decay to 0; ``b_dec`` starts at the
  geometric median of the first batch.
- Inference threshold: EMA (0.999) of the smallest positive BatchTopK activation, after warmup.

Input scaling (dictionary_learning / sae-for-vlm convention): activations are divided by
``s = sqrt(mean ||x||^2)`` so that scaled inputs have mean squared norm **1**. The saved SAE takes raw
activations: ``b_enc, b_dec, threshold`` are multiplied by ``s`` (:func:`fold_input_scale`), so
``saved.encode(x) == s * trained.encode(x / s)`` and ``saved(x) == s * trained(x / s)``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import save_file

from ..core.errors import ConfigError, DebiasError, IntegrityError, ShapeError, check_finite
from ..core.fileio import apply_default_modes
from .model import SAEConfig, SparseAutoencoder, read_safetensors

DEFAULT_GROUPS = [0.0625, 0.125, 0.25, 0.5625]
NORM_BATCHES = 100  # batches used to estimate the input scale (dictionary_learning uses 100)
# Settings that do not change the trained weights and may differ between a run and its resume.
_NON_TRAINING_FIELDS = ("checkpoint_every", "metadata", "device")


@dataclass
class TrainConfig:
    """Settings of one Matryoshka BatchTopK training run (defaults: sae-for-vlm / dictionary_learning)."""

    d_in: int
    expansion: int = 8
    k: int = 20
    batch_size: int = 4096
    lr: float | None = None  # None: 2e-4 / sqrt(F / 2**14)
    steps: int | None = None  # give steps or tokens
    tokens: int | None = None
    warmup_steps: int | None = None  # None: min(1000, steps // 10)
    decay_fraction: float = 0.2  # the last 20% of steps decay linearly to lr 0
    group_fractions: list[float] = field(default_factory=lambda: list(DEFAULT_GROUPS))
    aux_k_coef: float = 0.03
    k_aux: int | None = None  # None: d_in // 2
    dead_tokens: int = 10_000_000
    threshold_beta: float = 0.999
    seed: int = 0
    grad_clip: float = 1.0
    normalize: bool = True
    checkpoint_every: int = 1000
    device: str = "cpu"  # bit-for-bit determinism is promised on CPU only
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.expansion <= 0 or self.batch_size <= 0:
            raise ConfigError(f"d_in, expansion and batch_size must be positive (got {self.d_in}, "
                              f"{self.expansion}, {self.batch_size})")
        if (self.steps is None) == (self.tokens is None):
            raise ConfigError("give exactly one of steps or tokens for SAE training")
        if self.total_steps <= 0:
            raise ConfigError(f"SAE training needs at least one step (steps={self.steps}, tokens={self.tokens})")
        if not 0 < self.k <= self.num_latents:
            raise ConfigError(f"k={self.k} must be in 1..{self.num_latents} (expansion * d_in)")
        if not 0.0 <= self.decay_fraction <= 1.0:  # also refuses NaN
            raise ConfigError(f"decay_fraction={self.decay_fraction} must be within [0, 1]")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr} must be a finite number > 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.dead_tokens <= 0 or self.checkpoint_every <= 0:
            raise ConfigError(f"dead_tokens and checkpoint_every must be positive (got {self.dead_tokens}, {self.checkpoint_every})")
        if self.warmup + int(self.decay_fraction * self.total_steps) > self.total_steps:
            raise ConfigError(f"warmup_steps={self.warmup} plus decay steps exceed total steps {self.total_steps}")
        self.group_sizes()  # validates the fractions

    @property
    def num_latents(self) -> int:
        return self.expansion * self.d_in

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else math.ceil(self.tokens / self.batch_size)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.total_steps // 10)

    @property
    def learning_rate(self) -> float:
        # 1/sqrt(F) scaling law (Gao et al. 2024, fig. 3) as in dictionary_learning.
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.num_latents / 2 ** 14)

    def group_sizes(self) -> list[int]:
        """Matryoshka group sizes: ``int(f * F)`` for all but the last group, which gets the remainder."""
        fr, F = list(self.group_fractions), self.num_latents
        if not fr or not all(math.isfinite(f) and f > 0 for f in fr) or sum(fr) > 1 + 1e-6:
            raise ConfigError(f"group_fractions {fr} must be positive and sum to at most 1")
        sizes = [int(f * F) for f in fr[:-1]]
        sizes.append(F - sum(sizes))
        if any(s <= 0 for s in sizes):
            raise ConfigError(f"group_fractions {fr} give an empty group for {F} latents")
        return sizes

    def settings_hash(self) -> str:
        """Hash of every setting that changes the result (a checkpoint from other settings is refused)."""
        d = {k: v for k, v in asdict(self).items() if k not in _NON_TRAINING_FIELDS}
        d["total_steps"], d["warmup"], d["lr_resolved"] = self.total_steps, self.warmup, self.learning_rate
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, constant, then linear decay to 0 at the last step."""
    total, warm = cfg.total_steps, cfg.warmup
    decay_start = total - int(cfg.decay_fraction * total)
    if step < warm:
        return (step + 1) / warm
    if step >= decay_start:
        return (total - step) / max(1, total - decay_start)
    return 1.0


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld iterations starting from the mean."""
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        prev = guess
        w = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-8)
        guess = (w[:, None] * points).sum(0) / w.sum()
        if (guess - prev).norm() < tol:
            break
    return guess


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k * B`` largest entries of the whole ``[B, F]`` batch."""
    flat = pre.flatten()
    vals, idx = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).reshape(pre.shape)


def fold_input_scale(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """Copy of ``sae`` (trained on ``x / scale``) that takes raw ``x``; latents and outputs scale by ``scale``."""
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.b_enc.mul_(scale)
        out.b_dec.mul_(scale)
        if bool((out.threshold >= 0).all()):
            out.threshold = out.threshold * scale
    return out


class MatryoshkaTrainer:
    """Holds the SAE being trained (in scaled space), its Adam state and dead-latent counters."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.sae = SparseAutoencoder(SAEConfig(d_in=cfg.d_in, num_latents=cfg.num_latents, activation="threshold",
                                                   k=cfg.k, group_fractions=list(cfg.group_fractions)))
        try:
            self.device = torch.device(cfg.device)
            self.sae.to(self.device)
        except (RuntimeError, AssertionError) as exc:
            raise ConfigError(f"cannot train on device {cfg.device!r}: {str(exc).splitlines()[0]}") from None
        self.sae.threshold = torch.tensor(-1.0, device=self.device)  # -1: unset until the EMA starts after warmup
        self.sizes = cfg.group_sizes()
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(cfg.num_latents, dtype=torch.long, device=self.device)
        self.scale = 1.0
        self.step_count = 0

    def scale_from(self, batches: Iterable[torch.Tensor], n: int) -> None:
        """Input scale ``sqrt(mean ||x||^2)`` over the first ``n`` batches (streamed, not stored)."""
        if not self.cfg.normalize:
            return
        msn = sum(float(next(batches).double().pow(2).sum(-1).mean()) for _ in range(n)) / n
        if not math.isfinite(msn) or msn <= 0:
            raise DebiasError(f"activations have mean squared norm {msn}; cannot normalise them")
        self.scale = math.sqrt(msn)

    def _aux_loss(self, residual: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        dead = self.since_fired >= self.cfg.dead_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return residual.new_zeros(())
        k_aux = min(self.cfg.k_aux or max(1, self.cfg.d_in // 2), n_dead)
        vals, idx = torch.where(dead[None], pre, -torch.inf).topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals)
        err = (residual - acts @ self.sae.W_dec).pow(2).sum(-1).mean()  # no bias: it models the residual
        denom = (residual - residual.mean(0, keepdim=True)).pow(2).sum(-1).mean()
        return (err / denom).nan_to_num(0.0)

    def train_step(self, raw: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a raw batch; returns loss, FVU and dead-latent count."""
        cfg, sae = self.cfg, self.sae
        x = raw.to(self.device).float() / self.scale
        if self.step_count == 0:
            with torch.no_grad():
                sae.b_dec.copy_(geometric_median(x))
        pre = sae.pre_acts(x)
        f = batch_topk(pre, cfg.k)
        if self.step_count >= cfg.warmup:
            self._update_threshold(f.detach())
        recon = sae.b_dec.expand_as(x)
        losses, start = [], 0
        for size in self.sizes:  # nested prefix reconstructions
            recon = recon + f[:, start:start + size] @ sae.W_dec[start:start + size]
            losses.append((x - recon).pow(2).sum(-1).mean())
            start += size
        l2 = torch.stack(losses).mean()
        fired = (f > 0).any(0)
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        aux = self._aux_loss((x - recon).detach(), pre)
        loss = l2 + cfg.aux_k_coef * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder rows on the unit sphere: drop the radial gradient
            W, g = sae.W_dec, sae.W_dec.grad
            g.sub_((g * W).sum(1, keepdim=True) * W)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(self.step_count, cfg)
        self.opt.step()
        self.step_count += 1
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
        return {"loss": float(loss.detach()), "fvu": fvu, "aux": float(aux.detach()),
                "dead": int((self.since_fired >= cfg.dead_tokens).sum())}

    def _update_threshold(self, f: torch.Tensor) -> None:
        active = f[f > 0]
        m = active.min() if active.numel() else f.new_zeros(())
        thr, beta = self.sae.threshold, self.cfg.threshold_beta
        self.sae.threshold = m.clone() if float(thr) < 0 else beta * thr + (1 - beta) * m

    def export(self, threshold_batches: list[torch.Tensor] | None = None) -> SparseAutoencoder:
        """The trained SAE taking raw activations (scale folded in), eval mode, with metadata."""
        sae = copy.deepcopy(self.sae).cpu()
        if float(sae.threshold) < 0 and threshold_batches:
            # Training ended before warmup: take the mean smallest BatchTopK activation instead of the EMA.
            with torch.no_grad():
                mins = [batch_topk(sae.pre_acts(b.float() / self.scale), self.cfg.k) for b in threshold_batches]
                sae.threshold = torch.stack([m[m > 0].min() if (m > 0).any() else torch.tensor(0.0) for m in mins]).mean()
        out = fold_input_scale(sae, self.scale).eval()
        for p in out.parameters():
            p.requires_grad_(False)
        for name, t in out.state_tensors().items():
            check_finite(f"trained SAE {name}", t)
        return out

    # ----- checkpoint state ---------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"sae.{k}": v.cpu().clone().contiguous() for k, v in self.sae.state_tensors().items()}
        tensors["since_fired"] = self.since_fired.cpu().clone()
        for name, p in self.sae.named_parameters():
            for key, value in self.opt.state.get(p, {}).items():
                tensors[f"adam.{name}.{key}"] = value.detach().cpu().clone().contiguous()
        return tensors, {"step": self.step_count, "scale": self.scale}

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(self.sae, name).copy_(tensors[f"sae.{name}"])
            self.sae.threshold = tensors["sae.threshold"].to(self.device).clone()
        self.since_fired = tensors["since_fired"].to(self.device).clone()
        for name, p in self.sae.named_parameters():
            if f"adam.{name}.exp_avg" in tensors:
                # Adam keeps its step counter on the CPU unless fused/capturable
                self.opt.state[p] = {key: tensors[f"adam.{name}.{key}"].to("cpu" if key == "step" else self.device)
                                     for key in ("step", "exp_avg", "exp_avg_sq")}
        self.step_count, self.scale = int(info["step"]), float(info["scale"])


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
              progress: bool = True) -> SparseAutoencoder:
    """Train a Matryoshka BatchTopK SAE on ``[N, d_in]`` activations.

    ``activations``: a tensor, a re-iterable of shard tensors (list, ...), an ``ActivationStore``, or a
    one-shot iterator (read into memory once, since epochs and resuming re-read the data).

    With ``checkpoint_dir`` the state is saved every ``cfg.checkpoint_every`` steps (and at the end)
    and a rerun resumes from the newest checkpoint. ``max_steps_this_call`` stops early (after a
    checkpoint) for time-limited jobs. Same data + seed give byte-identical weights on the same machine and
    library versions (another CPU may round differently: equal up to float rounding there).
    """
    from tqdm.auto import tqdm

    source = _as_source(activations)
    trainer = MatryoshkaTrainer(cfg)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    latest = None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        latest = _latest_checkpoint(ckpt)
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
    bar = tqdm(total=cfg.total_steps, initial=trainer.step_count, disable=not progress, desc="train-sae")
    stats: dict[str, float] = {}
    saved_step = trainer.step_count if ckpt is not None and latest is not None else None
    while trainer.step_count < stop:
        stats = trainer.train_step(next(batches))
        if not math.isfinite(stats["loss"]):
            raise DebiasError(f"SAE training diverged at step {trainer.step_count} (loss {stats['loss']}); lower --lr")
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4g}", fvu=f"{stats['fvu']:.3f}", dead=stats["dead"])
        if ckpt is not None and trainer.step_count % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, trainer)
            saved_step = trainer.step_count
    bar.close()
    if ckpt is not None and saved_step != trainer.step_count:
        _save_checkpoint(ckpt, trainer)
    sae = trainer.export(first)
    eval_fvu = fvu(sae, first)
    sae.cfg.metadata = {**cfg.metadata, "training": {
        "method": "matryoshka_batchtopk", "steps_done": trainer.step_count, "total_steps": cfg.total_steps,
        "finished": trainer.step_count >= cfg.total_steps, "input_scale": trainer.scale,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "metadata"}, "lr": cfg.learning_rate,
        "warmup_steps": cfg.warmup, "group_sizes": trainer.sizes, "seed": cfg.seed,
        "final_train_fvu": stats.get("fvu"), "final_fvu": eval_fvu,  # on the first <= 8 training batches
        "threshold": float(sae.threshold)}}
    return sae


@torch.no_grad()
def fvu(sae: SparseAutoencoder, batches: list[torch.Tensor] | torch.Tensor) -> float:
    """Fraction of variance unexplained of the SAE's inference reconstruction on raw activations."""
    x = torch.cat(list(batches)) if not isinstance(batches, torch.Tensor) else batches
    x = x.float()
    return float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
