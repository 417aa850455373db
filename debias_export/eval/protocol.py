"""Numbers of the held-out protocol: selection scores, prompt-half views and intervals over SAE seeds.

Settings are chosen on a selection split (faces + the ``select`` half of every prompt set's concepts); the
evaluation data (FairFace 540, PAIRS) is read once, afterwards. An edit trained with several SAE seeds is
reported as the relative change of the seed-averaged MaxSkew, with a 95% interval from a two-level
bootstrap: every replicate resamples the seeds (with replacement) and, independently, the prompt concepts
(a concept's templates move together). Why both: the concept draw is the metric's sampling noise (which
prompts happen to be in a set), the seed draw is the edit's own variability (which SAE and neurons came
out); a t-interval over 3 seeds alone has 2 degrees of freedom and ignores the prompt noise, a concept
bootstrap alone ignores the seed. With 3 seeds the seed level of the bootstrap under-states the seed
variance (a bootstrap of n values has (n-1)/n of their variance), so the per-seed changes and a seed-only
t-interval are reported beside it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..core.errors import DebiasError
from .retrieval import HELD_OUT_HALF, concept_half

# two-sided 95% Student t quantiles by degrees of freedom (no scipy dependency for eleven numbers)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def seed_change_ci(before: Sequence[float], afters: Sequence[Sequence[float]], clusters: Sequence[Any],
                   n: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Relative change of the seed-averaged mean metric (per-prompt ``before``, ``afters[seed][prompt]``) with
    the two-level (seeds x concepts) bootstrap interval; also per-seed changes, their sd and a seed t-interval.
    Fractions: ``-0.1`` = 10% lower."""
    if not afters or any(len(a) != len(before) for a in afters) or len(clusters) != len(before) or not before:
        raise DebiasError(f"seed interval needs per-prompt values of equal length for every seed "
                          f"({len(before)} before, {[len(a) for a in afters]} after, {len(clusters)} clusters)")
    b = torch.tensor(list(before), dtype=torch.float64)
    a = torch.tensor([list(x) for x in afters], dtype=torch.float64)  # [S, P]
    names = sorted(set(clusters), key=str)
    member = torch.tensor([names.index(c) for c in clusters])
    sb = torch.zeros(len(names), dtype=torch.float64).index_add_(0, member, b)  # [C]
    sa = torch.zeros(a.shape[0], len(names), dtype=torch.float64).index_add_(1, member, a)  # [S, C]
    g = torch.Generator().manual_seed(seed)
    S, C = sa.shape
    draw_s = torch.randint(S, (n, S), generator=g)
    draw_c = torch.randint(C, (n, C), generator=g)
    picked = sa[draw_s]  # [n, S, C]
    num = torch.gather(picked, 2, draw_c[:, None, :].expand(n, S, C)).sum(2).mean(1)
    rel = num / sb[draw_c].sum(1).clamp_min(1e-300) - 1
    lo, hi = torch.quantile(rel, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    per_seed = (sa.sum(1) / sb.sum().clamp_min(1e-300) - 1).tolist()
    mean = sum(per_seed) / S
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / (S - 1)) if S > 1 else 0.0
    half = _T95.get(S - 1, 1.96) * sd / math.sqrt(S) if S > 1 else None
    return {"change": float(a.sum(1).mean() / b.sum().clamp_min(1e-300) - 1), "ci_low": lo, "ci_high": hi,
            "per_seed": per_seed, "seed_sd": sd, "seeds": S, "concepts": C, "n": n,
            "seed_t_ci": None if half is None else [mean - half, mean + half]}


def half_view(per_prompt: Sequence[float], concepts: Sequence[str], half: str = HELD_OUT_HALF) -> tuple[list[float], list[str]]:
    """The per-prompt values and concepts of one concept half (:func:`~.retrieval.concept_half`)."""
    keep = [i for i, c in enumerate(concepts) if concept_half(c) == half]
    return [per_prompt[i] for i in keep], [concepts[i] for i in keep]


def relative(before: float | None, after: float | None) -> float | None:
    """``after / before - 1`` (None when undefined)."""
    if before is None or after is None or before == 0:
        return None
    return after / before - 1


def selection_score(base: dict, after: dict, column: str, utility: Sequence[str]) -> dict[str, Any]:
    """One grid cell on the selection split: the relative MaxSkew change of ``column`` per prompt set and their
    mean (``skew_change``, lower is better) and the relative change of each utility metric (``utility_change``;
    ``utility_loss`` = the worst drop, 0 when none dropped)."""
    sets = {name: relative(per[column]["max_skew"], after["retrieval"][name][column]["max_skew"])
            for name, per in base["retrieval"].items() if column in per}
    if not sets:
        raise DebiasError(f"the selection split has no label column {column!r} to measure skew on")
    missing = [m for m in utility if m not in base["utility"]]
    if missing:
        raise DebiasError(f"select.utility: {', '.join(missing)} cannot be measured on the selection split "
                          f"(its labels give: {', '.join(sorted(k for k in base['utility'] if not k.startswith('caption_queries')))})")
    util = {m: relative(base["utility"][m], after["utility"][m]) for m in utility}
    return {"skew_change": sum(sets.values()) / len(sets), "skew_change_per_set": sets, "utility_change": util,
            "utility_loss": max([0.0] + [-(u or 0.0) for u in util.values()])}
