"""How reports write a relative change and its interval ("-9.0% [-14, -5]"): one rule for the run report and the
run comparison. Pure Python (``debias-export compare`` imports it without torch)."""
from __future__ import annotations


def pct(x: float | None) -> str:
    """A fraction as a signed percentage with one decimal (``-0.09`` -> ``-9.0%``); ``-`` when missing."""
    return "-" if x is None else f"{100 * x:+.1f}%"


def ci_suffix(ci: list[float] | tuple[float, float] | None) -> str:
    """A 95% interval of fractions as `` [-14, -5]`` (whole percents, leading space); empty when missing."""
    return "" if not ci else f" [{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}]"
