"""Matryoshka BatchTopK SAE training, following sae-for-vlm / dictionary_learning.

One step on a batch ``x`` (already divided by the input scale, see below):

- ``pre = relu((x - b_dec) @ W_enc + b_enc)``; BatchTopK keeps the ``k * B`` largest entries of the
  whole batch (not ``k`` per row; ties with the ``k * B``-th all kept), giving ``f``.
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
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from ..core.choices import TRAIN_PRECISIONS
from ..core.errors import ConfigError, DebiasError, check_finite
from .distributed import Dist, autocast, resolve_device
from .model import SAEConfig, SparseAutoencoder

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
    device: str = "cpu"  # auto | cpu | cuda[:i]; bit-for-bit determinism is promised on CPU only
    precision: str = "fp32"  # fp32 | bf16: autocast of the matmuls; weights, Adam state and threshold stay fp32
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
        if self.precision not in TRAIN_PRECISIONS:
            raise ConfigError(f"SAE training precision {self.precision!r} unknown; expected one of "
                              f"{', '.join(TRAIN_PRECISIONS)} (fp16 would need loss scaling: use bf16)")
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
        if d["precision"] == "fp32":  # only then: checkpoints from before --precision still resume
            del d["precision"]
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


def batch_topk(pre: torch.Tensor, k: int, dist: Dist | None = None) -> torch.Tensor:
    """Keep the ``k * B`` largest entries of the whole ``[B, F]`` batch (entries tied with the ``k * B``-th are
    all kept).

    Ties come from rows that repeat (random-k draws with replacement, epoch wrap-around); keeping every tied
    entry treats equal rows alike, where ``topk``'s choice among them would depend on the memory layout, and
    so the result does not depend on how the batch is split. Under a process group ``pre`` is this rank's
    rows of the global batch (every rank has as many) and the ``k * B_global`` largest over all ranks are kept.
    """
    world = dist.world_size if dist is not None else 1
    n_keep = k * pre.shape[0] * world
    local = pre.detach().flatten()
    top = local.topk(min(n_keep, local.numel()), sorted=False).values
    if world > 1:
        top = dist.cat(top)
        if top.numel() > n_keep:
            top = top.topk(n_keep, sorted=False).values
    if top.numel() < n_keep:  # fewer entries than asked for: keep everything
        return pre
    return torch.where(pre >= top.min(), pre, torch.zeros_like(pre))


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

    def __init__(self, cfg: TrainConfig, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist or Dist()
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.sae = SparseAutoencoder(SAEConfig(d_in=cfg.d_in, num_latents=cfg.num_latents, activation="threshold",
                                                   k=cfg.k, group_fractions=list(cfg.group_fractions)))
        try:
            self.device = resolve_device(cfg.device, self.dist.local_rank)
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

    def _aux_loss(self, residual: torch.Tensor, pre: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """This rank's share of the aux-k loss (shares sum to the loss of the global batch of ``n`` rows)."""
        n = n or residual.shape[0] * self.dist.world_size
        dead = self.since_fired >= self.cfg.dead_tokens
        n_dead = int(dead.sum())  # since_fired is the same on every rank: all take the same branch
        if n_dead == 0:
            return residual.new_zeros(())
        k_aux = min(self.cfg.k_aux or max(1, self.cfg.d_in // 2), n_dead)
        vals, idx = torch.where(dead[None], pre, -torch.inf).topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals)
        with self._autocast():
            decoded = (acts @ self.sae.W_dec).float()
        err = (residual - decoded).pow(2).sum() / n  # no bias: it models the residual
        mean = self.dist.sum_(residual.sum(0)) / n
        denom = self.dist.sum_((residual - mean).pow(2).sum()) / n
        return (err / denom).nan_to_num(0.0)

    def _autocast(self):
        return autocast(self.device, self.cfg.precision)

    def train_step(self, raw: torch.Tensor) -> dict[str, float]:
        """One optimisation step; returns loss, FVU and dead-latent count of the global batch.

        ``raw``: the batch (unscaled), or under a process group this rank's equal share of the global batch.
        Each rank's loss is its share of the global-batch loss and the gradients are summed over ranks (DDP
        semantics), so every rank takes the step one process would take on the whole batch.
        """
        cfg, sae, dist = self.cfg, self.sae, self.dist
        x = raw.to(self.device).float() / self.scale
        n = x.shape[0] * dist.world_size
        if self.step_count == 0:
            with torch.no_grad():
                sae.b_dec.copy_(geometric_median(dist.cat(x)))
        with self._autocast():
            pre = sae.pre_acts(x).float()
        f = batch_topk(pre, cfg.k, dist)
        if self.step_count >= cfg.warmup:
            self._update_threshold(f.detach())
        recon = sae.b_dec.expand_as(x)
        losses, start = [], 0
        for size in self.sizes:  # nested prefix reconstructions
            with self._autocast():
                part = (f[:, start:start + size] @ sae.W_dec[start:start + size]).float()
            recon = recon + part
            losses.append((x - recon).pow(2).sum() / n)
            start += size
        l2 = torch.stack(losses).mean()
        fired = dist.max_((f > 0).any(0).to(torch.int32)).bool()
        self.since_fired += n
        self.since_fired[fired] = 0
        aux = self._aux_loss((x - recon).detach(), pre, n)
        loss = l2 + cfg.aux_k_coef * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in sae.parameters():
                if p.grad is not None:
                    dist.sum_(p.grad)
            # keep decoder rows on the unit sphere: drop the radial gradient
            W, g = sae.W_dec, sae.W_dec.grad
            g.sub_((g * W).sum(1, keepdim=True) * W)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(self.step_count, cfg)
        self.opt.step()
        self.step_count += 1
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            mean = dist.sum_(x.sum(0)) / n
            sums = dist.sum_(torch.stack([(x - recon).pow(2).sum(), (x - mean).pow(2).sum(), loss.detach(),
                                          aux.detach()]))
        return {"loss": float(sums[2]), "fvu": float(sums[0] / sums[1].clamp_min(1e-12)), "aux": float(sums[3]),
                "dead": int((self.since_fired >= cfg.dead_tokens).sum())}

    def _update_threshold(self, f: torch.Tensor) -> None:
        active = f[f > 0]
        m = active.min() if active.numel() else f.new_tensor(math.inf)
        m = self.dist.min_(m.float().reshape(1)).reshape(())  # smallest kept activation of the global batch
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
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
