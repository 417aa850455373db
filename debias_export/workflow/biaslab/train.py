"""Training the lab's image tower (LiT-style: the MiniLM text tower stays frozen) and validating it on UTKFace.

Loss ("table", recipe v3): the lab can only ever write a finite set of captions (:func:`caption_table`,
~800), so every step scores each image against *all* of them (image -> caption, soft targets spread
uniformly over the captions consistent with its labels, label-smoothed) and every caption against the
batch's images (caption -> image, multi-positive). This is the same LiT objective as v2's in-batch
InfoNCE, without the variance of sampling one caption per image. No auxiliary heads: the only
supervision is caption text built from the labels.

Determinism: one seeded generator drives data order, augmentation and caption sampling; the thread count
is part of the recipe; ``torch.use_deterministic_algorithms`` is on while training. Same recipe + same
CPU kind -> identical weights; another CPU kind rounds differently (float reductions) and drifts.
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...adapters.hf_clip import CLIP_MEAN, CLIP_STD
from ...analysis.metrics import recall_at_k
from .captions import (
    AGE_GROUPS,
    GENDERS,
    RACE_WORDS,
    caption_index,
    caption_table,
    caption_text,
    consistent,
    sample_captions,
)
from .settings import BiasLabSettings

VAL_ZOOM = 1.4  # validation also at a zoomed-out framing (faces smaller in the frame, like in-the-wild crops)


def cpu_info() -> dict:
    """CPU vendor / model (results are bit-reproducible only on the same CPU kind)."""
    info = {"machine": platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "model name", "cpu family", "model", "stepping") and key not in info:
                info[key] = val.strip()
    except OSError:
        info["processor"] = platform.processor()
    return info


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> CLIP-normalised float."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def _affine(x: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """One ``grid_sample`` per batch: scale > 1 zooms out (reflection padding), angle in radians."""
    n = x.shape[0]
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment(x: torch.Tensor, s: BiasLabSettings, g: torch.Generator) -> torch.Tensor:
    """Random zoom / rotation / shift / flip, colour jitter and grayscale (uint8 in, CLIP-normalised out).

    Every random number comes from ``g`` in a fixed order, so a seed fixes the augmented batch.
    """
    n = x.shape[0]
    scale = s.zoom_in_min + torch.rand(n, generator=g) * (s.zoom_out_max - s.zoom_in_min)
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(s.rotate_deg)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * s.shift
    jitter = 1 + (torch.rand(n, 3, generator=g) * 2 - 1) * s.color  # brightness, contrast, saturation
    gray_p = torch.rand(n, generator=g) < s.grayscale_p
    photo = s.channel_gain > 0 or s.blur_p > 0 or s.lowres_p > 0
    if photo:  # v4 draws, after v3's and only when used: a recipe without them trains exactly as before
        gain = 1 + (torch.rand(n, 3, generator=g) * 2 - 1) * s.channel_gain
        blur_on = torch.rand(n, generator=g) < s.blur_p
        sigma = torch.rand(n, generator=g) * s.blur_sigma_max
        lowres_on = torch.rand(n, generator=g) < s.lowres_p
        side = s.lowres_min + (torch.rand(n, generator=g) * (x.shape[-1] - s.lowres_min)).long()
    xf = _affine(x.float() / 255, scale, angle, flip, shift)
    xf = xf * jitter[:, 0].view(n, 1, 1, 1)
    if photo:
        xf = xf * gain.view(n, 3, 1, 1)
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    xf = (xf - mean) * jitter[:, 1].view(n, 1, 1, 1) + mean
    gray = (0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2]).unsqueeze(1)
    sat = torch.where(gray_p, 0.0, jitter[:, 2]).view(n, 1, 1, 1)
    xf = ((xf - gray) * sat + gray).clamp(0, 1)
    if photo:
        xf = _lowres(xf, torch.where(lowres_on, side, xf.shape[-1]))
        xf = _blur(xf, torch.where(blur_on, sigma, 0.0))
    return normalise(xf * 255)


def _lowres(x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Down-scale each image to ``side[i]`` px (antialiased) and back (bilinear): a small face in a large photo."""
    out = x.clone()
    size = x.shape[-1]
    for i in (side < size).nonzero().flatten().tolist():
        small = F.interpolate(x[i:i + 1], size=int(side[i]), mode="bilinear", antialias=True, align_corners=False)
        out[i] = F.interpolate(small, size=size, mode="bilinear", align_corners=False)[0]
    return out


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (0 = unchanged), reflect-padded."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3).view(n, 1)) ** 2)
    k = torch.where((sigma > 0).view(n, 1), k, (t == 0).to(x.dtype))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n * c, taps]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def zoomed(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Deterministic centred zoom-out of uint8 images (validation framing), CLIP-normalised."""
    n = x.shape[0]
    out = _affine(x.float() / 255, torch.full((n,), zoom), torch.zeros(n), torch.ones(n), torch.zeros(n, 2))
    return normalise(out * 255)


@torch.no_grad()
def pooled_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """MiniLM pooled outputs (frozen body + pooler), before the trained projection."""
    model.text_model.eval()
    out = []
    for i in range(0, len(texts), 128):
        tok = tokenizer(texts[i:i + 128], padding=True, return_tensors="pt")
        out.append(model.text_model(**tok).pooler_output)
    return torch.cat(out)


def image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def _soft_ce(logits: torch.Tensor, pos: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against targets spread uniformly over each row's positives (rows without one skipped)."""
    has = pos.any(1)
    target = pos[has].float() / pos[has].float().sum(1, keepdim=True)
    if smoothing:
        target = (1 - smoothing) * target + smoothing / target.shape[1]
    return -(target * logits[has].log_softmax(1)).sum(1).mean()


def lab_loss(model, pixels: torch.Tensor, labels: torch.Tensor, pooled: torch.Tensor, table_keys: torch.Tensor,
             s: BiasLabSettings, g: torch.Generator) -> torch.Tensor:
    img = F.normalize(image_embeds(model, pixels), dim=-1)
    txt_all = F.normalize(model.text_projection(pooled), dim=-1)
    scale = model.logit_scale.exp()
    loss = img.new_zeros(())
    if s.loss in ("table", "both"):
        logits = scale * txt_all @ img.T  # [captions, images]
        pos = consistent(table_keys, labels)
        loss = loss + 0.5 * (_soft_ce(logits.T, pos.T, s.label_smoothing) + _soft_ce(logits, pos))
    if s.loss in ("batch", "both"):  # v2: one sampled caption per image, in-batch InfoNCE
        keys = sample_captions(labels, s.drop_age_p, s.drop_race_p, g)
        logits = scale * txt_all[caption_index(keys, table_keys)] @ img.T
        pos = consistent(keys, labels)
        loss = loss + 0.5 * (_soft_ce(logits, pos) + _soft_ce(logits.T, pos.T))
    return loss


@torch.no_grad()
def validation_metrics(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                       shifted: torch.Tensor | None = None) -> dict:
    """Zero-shot gender / age / race accuracy and label-caption recall@10 on held-out UTKFace images.

    Measured at the crop's own framing ("tight"), zoomed out x1.4 ("zoom") and, if given, on ``shifted``: the
    same faces as uint8 images already degraded (:mod:`.shifted`, the photo-domain stress test); prompts are
    the lab's own caption forms ("a photo of a woman", "a photo of a young person", "a photo of a Black person").
    """
    model.eval()
    races = [r for r in RACE_WORDS if RACE_WORDS[r]]
    prompts = {"gender": [caption_text(0, None, g, None) for g in GENDERS],
               "age": [caption_text(0, a, None, None) for a in range(len(AGE_GROUPS))],
               "race": [caption_text(0, None, None, r) for r in races]}
    truth = [caption_text(0, int(a), GENDERS[int(gi)], list(RACE_WORDS)[int(ri)] if RACE_WORDS[list(RACE_WORDS)[int(ri)]] else None)
             for a, gi, ri in labels.tolist()]
    queries = sorted(set(truth))
    relevant = torch.tensor([[t == q for t in truth] for q in queries])
    text = {k: F.normalize(model.text_projection(pooled_texts(model, tokenizer, v)), dim=-1) for k, v in prompts.items()}
    text["captions"] = F.normalize(model.text_projection(pooled_texts(model, tokenizer, queries)), dim=-1)
    named_race = labels[:, 2] < len(races)
    out: dict = {"images": int(labels.shape[0])}
    views = [("tight", images, normalise), ("zoom", images, lambda x: zoomed(x, VAL_ZOOM))]
    if shifted is not None:
        views.append(("shifted", shifted, normalise))
    for view, imgs, prep in views:
        emb = torch.cat([image_embeds(model, prep(imgs[i:i + batch_size])) for i in range(0, len(imgs), batch_size)])
        emb = F.normalize(emb, dim=-1)
        res = {f"{k}_acc": float(((emb @ text[k].T).argmax(1) == labels[:, col]).float()[mask].mean())
               for k, col, mask in (("gender", 1, slice(None)), ("age", 0, slice(None)), ("race", 2, named_race))}
        res["caption_recall@10"] = recall_at_k(text["captions"] @ emb.T, relevant, 10)
        out[view] = res
    n_rel = relevant.float().sum(1)
    out["caption_recall@10_chance"] = float((10 * n_rel / len(truth) / n_rel.clamp(max=10)).mean())
    out["caption_queries"] = len(queries)
    return out


def run_training(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, s: BiasLabSettings,
                 log: Callable[[str], None] = print, progress: bool = True,
                 on_epoch: Callable[[int], None] | None = None, extra_loss: torch.nn.Module | None = None) -> dict:
    """Train ``model``'s image tower and projections in place; returns the loss history.

    Call with the recipe's thread count set and deterministic algorithms on (see :func:`deterministic`).
    ``extra_loss``: a term added to every step's loss, called as ``extra_loss(model, idx, pixels)`` with the batch's
    image indices and its augmented pixels (``None``: nothing added); its own parameters train with the model's
    (an experiment's auxiliary head, e.g. distillation from a teacher: ``benchmarks/experiments/lab_distill_pilot.py``).
    """
    t0 = time.time()
    table_texts, table_keys = caption_table()
    pooled = pooled_texts(model, tokenizer, table_texts)
    for p in model.text_model.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + (list(extra_loss.parameters()) if extra_loss else [])
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=s.lr)
    steps_per_epoch = max(1, len(images) // s.batch_size)
    total = steps_per_epoch * s.epochs
    warm = max(1, int(s.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(s.seed)
    history: list[float] = []
    bar = _progress(total, progress)
    for epoch in range(s.epochs):
        model.vision_model.train()
        perm = torch.randperm(len(images), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * s.batch_size:(i + 1) * s.batch_size]
            pixels = augment(images[idx], s, g)
            loss = lab_loss(model, pixels, labels[idx], pooled, table_keys, s, g)
            if extra_loss is not None:
                loss = loss + extra_loss(model, idx, pixels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the learnable temperature
            history.append(loss.item())
            bar.update(1)
        mean = sum(history[-steps_per_epoch:]) / steps_per_epoch
        bar.set_postfix(epoch=epoch, loss=f"{mean:.3f}")
        log(f"bias-lab: epoch {epoch + 1}/{s.epochs} mean loss {mean:.4f} ({time.time() - t0:.0f}s)")
        if on_epoch is not None:
            on_epoch(epoch + 1)
    bar.close()
    model.eval()
    return {"steps": total, "loss_per_epoch": [round(sum(history[i:i + steps_per_epoch]) / steps_per_epoch, 5)
                                               for i in range(0, len(history), steps_per_epoch)],
            "final_loss": sum(history[-steps_per_epoch:]) / steps_per_epoch}


class deterministic:
    """Context: the recipe's thread count and deterministic algorithms, restored afterwards."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        self.prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(True)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev[0])
        torch.use_deterministic_algorithms(self.prev[1])
        return False


def _progress(total: int, enabled: bool):
    return tqdm(total=total, disable=not enabled, desc="bias-lab", unit="step", mininterval=5)
