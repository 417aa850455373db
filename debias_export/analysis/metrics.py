"""Bias and utility metrics on embeddings (pure torch; no model or data access here).

* MaxSkew@k and NDKL for text-to-image retrieval (Geyik et al. 2019, as used by DeBiasLens/SANER):
  rank images by cosine similarity to a neutral prompt, look at the attribute classes of the top k.
* Counterfactual confidence gaps on parallel images (PAIRS): the same scene with different people
  should get the same zero-shot label probabilities.
* Utility/fidelity: cosine between patched and base embeddings, zero-shot agreement, recall@k.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import DebiasError


def cosine_scores(text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """``[texts, images]`` cosine similarities (embeddings are normalised here)."""
    if text_emb.shape[-1] != image_emb.shape[-1]:
        raise DebiasError(f"text embeddings have width {text_emb.shape[-1]} but image embeddings {image_emb.shape[-1]}")
    return F.normalize(text_emb.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T


def _class_counts(labels: Sequence[str], classes: Sequence[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    counts = torch.zeros(len(classes), dtype=torch.float64)
    for lab in labels:
        if lab not in index:
            raise DebiasError(f"label {lab!r} is not one of the attribute classes {list(classes)}")
        counts[index[lab]] += 1
    return counts


def max_skew(top_labels: Sequence[str], classes: Sequence[str]) -> float:
    """MaxSkew of one ranked list's top k: ``max_c ln(p_c / (1/|C|))``, ``p_c = count_c / k``.

    A class absent from the top k counts as ``1/k`` (DeBiasLens' smoothing; otherwise ln 0).
    """
    k = len(top_labels)
    if k == 0 or len(classes) < 2:
        raise DebiasError(f"MaxSkew needs k >= 1 and >= 2 classes (got k={k}, {len(classes)} classes)")
    p = _class_counts(top_labels, classes) / k
    p = torch.where(p == 0, torch.full_like(p, 1.0 / k), p)
    return float(torch.log(p * len(classes)).max())


def ndkl(ranked_labels: Sequence[str], classes: Sequence[str]) -> float:
    """Normalised discounted KL divergence of the top-i class distribution from uniform, i = 1..k.

    ``NDKL = (1/Z) sum_i KL(D_i || U) / log2(i + 1)`` with ``Z = sum_i 1/log2(i + 1)``; 0 log 0 = 0.
    """
    k = len(ranked_labels)
    if k == 0 or len(classes) < 2:
        raise DebiasError(f"NDKL needs k >= 1 and >= 2 classes (got k={k}, {len(classes)} classes)")
    index = {c: i for i, c in enumerate(classes)}
    counts = torch.zeros(len(classes), dtype=torch.float64)
    total, z = 0.0, 0.0
    for i, lab in enumerate(ranked_labels, start=1):
        if lab not in index:
            raise DebiasError(f"label {lab!r} is not one of the attribute classes {list(classes)}")
        counts[index[lab]] += 1
        d = counts / i
        nz = d > 0
        kl = float((d[nz] * torch.log(d[nz] * len(classes))).sum())
        w = 1.0 / math.log2(i + 1)
        total += w * kl
        z += w
    return total / z


def retrieval_skew(scores: torch.Tensor, labels: Sequence[str], k: int, classes: Sequence[str] | None = None,
                   keep: torch.Tensor | None = None) -> dict:
    """MaxSkew@k and NDKL@k per prompt for ``scores[prompts, images]``; ``keep`` masks the image pool."""
    labels = list(labels)
    if scores.shape[1] != len(labels):
        raise DebiasError(f"scores cover {scores.shape[1]} images but {len(labels)} labels were given")
    pool = torch.arange(scores.shape[1]) if keep is None else torch.nonzero(keep).flatten()
    classes = sorted({labels[i] for i in pool.tolist()}) if classes is None else list(classes)
    if k > len(pool):
        raise DebiasError(f"k={k} is larger than the image pool ({len(pool)} images)")
    top = pool[scores[:, pool].topk(k, dim=1).indices]  # [P, k] image indices, best first
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({labels[i] for i in pool.tolist()} - set(index))
    if missing:
        raise DebiasError(f"labels {missing} are not among the attribute classes {classes}")
    cls = torch.tensor([index.get(lab, -1) for lab in labels])[top]
    skews, ndkls = _skew_ndkl(cls, len(classes))
    return {"k": k, "classes": classes, "pool": len(pool), "max_skew": sum(skews) / len(skews),
            "ndkl": sum(ndkls) / len(ndkls), "max_skew_per_prompt": skews, "ndkl_per_prompt": ndkls}


def _skew_ndkl(cls: torch.Tensor, n_classes: int) -> tuple[list[float], list[float]]:
    """Vectorised :func:`max_skew` and :func:`ndkl` for ``cls[prompts, k]`` class indices (same formulas)."""
    k = cls.shape[1]
    onehot = F.one_hot(cls, n_classes).double()  # [P, k, C]
    cum = onehot.cumsum(1)
    p = cum[:, -1] / k
    p = torch.where(p == 0, torch.full_like(p, 1.0 / k), p)
    skew = torch.log(p * n_classes).max(1).values
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    d = cum / ranks[None, :, None]
    kl = torch.where(d > 0, d * torch.log((d * n_classes).clamp_min(1e-300)), torch.zeros_like(d)).sum(-1)  # [P, k]
    w = 1.0 / torch.log2(ranks + 1)
    nd = (kl * w).sum(1) / w.sum()
    return skew.tolist(), nd.tolist()


def shuffled_skew(scores: torch.Tensor, labels: Sequence[str], k: int, shuffles: int = 10, seed: int = 0,
                  classes: Sequence[str] | None = None, keep: torch.Tensor | None = None) -> dict:
    """Noise floor: the same metrics with the labels randomly permuted (mean and sd over shuffles)."""
    g = torch.Generator().manual_seed(seed)
    labels = list(labels)
    runs = []
    pool = list(range(len(labels))) if keep is None else torch.nonzero(keep).flatten().tolist()
    for _ in range(shuffles):
        # Permute only inside the pool, so the class set and its sizes stay those of the real labels.
        perm = torch.randperm(len(pool), generator=g).tolist()
        shuffled = list(labels)
        for dst, src in zip(pool, perm):
            shuffled[dst] = labels[pool[src]]
        runs.append(retrieval_skew(scores, shuffled, k, classes, keep))
    ms = torch.tensor([r["max_skew"] for r in runs])
    nd = torch.tensor([r["ndkl"] for r in runs])
    return {"k": k, "shuffles": shuffles, "max_skew": float(ms.mean()), "max_skew_sd": float(ms.std()) if shuffles > 1 else 0.0,
            "ndkl": float(nd.mean()), "ndkl_sd": float(nd.std()) if shuffles > 1 else 0.0}


def zero_shot_probs(image_emb: torch.Tensor, label_emb: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``[images, labels]`` softmax of scaled cosine (CLIP zero-shot classification)."""
    return (scale * cosine_scores(image_emb, label_emb)).softmax(dim=-1)


def confidence_gap(probs: torch.Tensor, groups: Sequence[str]) -> dict:
    """Counterfactual gap for one scenario: ``probs[images, labels]`` of parallel images of ``groups``.

    Per label, the group confidence is the mean probability over that group's images; the gap is
    max - min over groups, and ``kl`` is KL(q || uniform) of ``q_g = conf_g / sum_g conf_g``.
    Returned values are means over labels, plus the per-label numbers.
    """
    names = sorted(set(groups))
    if len(names) < 2:
        raise DebiasError(f"a confidence gap needs images of >= 2 groups, got {names}")
    conf = torch.stack([probs[[i for i, g in enumerate(groups) if g == n]].mean(0) for n in names])  # [G, L]
    gap = conf.max(0).values - conf.min(0).values
    q = conf / conf.sum(0, keepdim=True).clamp_min(1e-12)
    kl = (q * torch.log((q * len(names)).clamp_min(1e-12))).sum(0)
    return {"gap": float(gap.mean()), "kl": float(kl.mean()), "gap_per_label": gap.tolist(), "kl_per_label": kl.tolist(),
            "groups": names}


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Row-wise cosine between patched and base embeddings: mean and min."""
    if a.shape != b.shape:
        raise DebiasError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    c = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"mean": float(c.mean()), "min": float(c.min())}


def zero_shot_agreement(base_probs: torch.Tensor, patched_probs: torch.Tensor) -> float:
    """Fraction of images whose zero-shot top-1 label is unchanged by the patch."""
    return float((base_probs.argmax(-1) == patched_probs.argmax(-1)).float().mean())


def accuracy(probs: torch.Tensor, targets: Sequence[int]) -> float:
    """Top-1 accuracy of zero-shot probabilities against class indices."""
    return float((probs.argmax(-1) == torch.as_tensor(list(targets))).float().mean())


def recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Query-to-item retrieval recall@k with several relevant items per query.

    Captions built from labels match many images, so per query the hit count in the top k is divided
    by ``min(k, #relevant)`` (1.0 = the top k is all relevant, or holds every relevant item).
    Queries without any relevant item are skipped.
    """
    if scores.shape != relevant.shape:
        raise DebiasError(f"scores {tuple(scores.shape)} and relevance {tuple(relevant.shape)} differ in shape")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hits = relevant.gather(1, top).float().sum(1)
    n_rel = relevant.float().sum(1)
    ok = n_rel > 0
    if not bool(ok.any()):
        raise DebiasError("recall@k: no query has a relevant item")
    return float((hits[ok] / n_rel[ok].clamp(max=k)).mean())


def paired_bootstrap_change(before: Sequence[float], after: Sequence[float], clusters: Sequence[Any],
                            n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Relative change of a mean metric (after vs before, paired per item) with a cluster-bootstrap CI.

    Items are resampled by cluster (e.g. all templates of one occupation move together), so the interval
    reflects which concepts happen to be in the prompt set. Returns ``{"change", "ci_low", "ci_high", "n"}``
    as fractions (``-0.1`` = 10% lower).
    """
    if not (len(before) == len(after) == len(clusters)) or not before:
        raise DebiasError(f"paired bootstrap needs equally long, non-empty before/after/clusters "
                          f"({len(before)}/{len(after)}/{len(clusters)})")
    b, a = torch.tensor(before, dtype=torch.float64), torch.tensor(after, dtype=torch.float64)
    names = sorted(set(clusters), key=str)
    index = {c: i for i, c in enumerate(names)}
    member = torch.tensor([index[c] for c in clusters])
    sums_b = torch.zeros(len(names), dtype=torch.float64).index_add_(0, member, b)
    sums_a = torch.zeros(len(names), dtype=torch.float64).index_add_(0, member, a)
    g = torch.Generator().manual_seed(seed)
    draw = torch.randint(len(names), (n, len(names)), generator=g)
    # sums over resampled clusters: the mean's normaliser (item count) cancels in the ratio
    rel = sums_a[draw].sum(1) / sums_b[draw].sum(1).clamp_min(1e-300) - 1
    lo, hi = torch.quantile(rel, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"change": float(a.sum() / b.sum().clamp_min(1e-300) - 1), "ci_low": lo, "ci_high": hi, "n": n}
