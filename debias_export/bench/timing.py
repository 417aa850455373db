"""Interleaved (ABAB...) timing of model variants and the statistics reported for them.

Why interleave: on a shared machine load drifts over seconds to minutes. Timing all of A and then
all of B folds that drift into the A/B difference; alternating A, B, A, B ... exposes both variants
to the same drift, and each rep's (A, B) pair gives a *paired* ratio whose median is robust to it.
The clock is injectable so the maths can be tested deterministically.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

Timer = Callable[[], float]


ORDERS = ("abab", "rotate")


def interleaved_schedule(names: Sequence[str], reps: int, order: str = "abab") -> list[tuple[int, str]]:
    """``(rep, name)`` in run order: every variant once per rep.

    ``abab``: always in the given order (AB AB ...). ``rotate``: round ``r`` starts at variant
    ``r mod n`` (AB BA AB ... / ABC BCA CAB ...), so a cost tied to the position within a round
    (e.g. the first call after the previous round) is spread over all variants instead of one.
    """
    if reps < 1:
        raise ValueError("reps must be >= 1")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    names = list(names)
    out = []
    for r in range(reps):
        k = r % len(names) if order == "rotate" else 0
        out += [(r, n) for n in names[k:] + names[:k]]
    return out


def time_interleaved(fns: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1,
                     timer: Timer = time.perf_counter, sync: Callable[[], None] | None = None,
                     order: str = "abab") -> dict[str, list[float]]:
    """Run each callable ``warmup`` times (interleaved, untimed), then ``reps`` timed interleaved rounds.

    A callable's optional ``prepare()`` attribute runs before the clock starts. Returns seconds per call, per variant, in rep order (index ``i`` of every list is the same round,
    which is what :func:`paired_ratios` pairs). ``sync`` (e.g. ``torch.cuda.synchronize``) is called
    before reading the clock on both sides of a call so asynchronous devices are timed correctly.
    """
    names = list(fns)
    for _, name in interleaved_schedule(names, warmup, order) if warmup > 0 else []:
        _prepare(fns[name])
        fns[name]()
    if sync is not None:
        sync()
    out: dict[str, list[float]] = {n: [] for n in names}
    for _, name in interleaved_schedule(names, reps, order):
        _prepare(fns[name])
        if sync is not None:
            sync()
        t0 = timer()
        fns[name]()
        if sync is not None:
            sync()
        out[name].append(timer() - t0)
    return out


def _prepare(fn: Callable[[], object]) -> None:
    # Untimed per-call setup (e.g. swapping the variant's patch into a shared model).
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (IQR), p10/p90, min and mean of a list of timings (seconds)."""
    q1, q3 = quantile(xs, 0.25), quantile(xs, 0.75)
    return {"n": len(xs), "median": quantile(xs, 0.5), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "p10": quantile(xs, 0.10), "p90": quantile(xs, 0.90), "min": min(xs) if xs else float("nan"),
            "mean": sum(xs) / len(xs) if xs else float("nan")}


def median_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median (binomial order statistics).

    ``None`` when there are too few samples for the level (n < 6 at 95%): the p10/p90 spread is
    then all there is.
    """
    n = len(xs)
    s = sorted(xs)
    tail = (1.0 - level) / 2
    j, cdf = 0, 0.0
    # largest j with P(Binomial(n, 1/2) <= j - 1) <= tail; the interval is [s[j-1], s[n-j]] (0-based)
    while True:
        p_next = math.comb(n, j) / 2 ** n
        if cdf + p_next > tail:
            break
        cdf += p_next
        j += 1
    if j == 0:
        return None
    return s[j - 1], s[n - j]


def paired_ratios(test: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """Headline ratios of ``test`` (patched) over ``base`` (unmodified) timed in the same rounds.

    ``ratio_of_medians`` = median(test) / median(base); ``paired_median`` = median over rounds of
    test[i] / base[i], with its p10/p90 and quartiles as the spread.
    """
    if len(test) != len(base) or not test:
        raise ValueError(f"paired ratios need equally long non-empty series, got {len(test)} and {len(base)}")
    per = [t / b for t, b in zip(test, base)]
    ci = median_ci(per)
    return {"paired_median_ci95": list(ci) if ci else None, "ratio_of_medians": quantile(test, 0.5) / quantile(base, 0.5), "paired_median": quantile(per, 0.5),
            "paired_p10": quantile(per, 0.10), "paired_p90": quantile(per, 0.90),
            "paired_q1": quantile(per, 0.25), "paired_q3": quantile(per, 0.75), "n_pairs": len(per)}
