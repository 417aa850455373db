"""Bias and utility evaluation: MaxSkew/NDKL retrieval skew, PAIRS confidence gaps, fidelity, reports."""
from .report import write_report
from .retrieval import EvalData, compare, evaluate, sweep_alpha

__all__ = ["EvalData", "compare", "evaluate", "sweep_alpha", "write_report"]
