"""A deterministic timer for the benchmark tests (shared by test_bench and test_export_variants)."""
from __future__ import annotations


class TickClock:
    """Every read advances 1 s: each timed call measures exactly 1 s, whatever it does."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now
