"""Do two runs of a recipe reach the same conclusions? (``debias-export compare``)

Issue #15 asks that the main job's conclusions agree within their confidence intervals on another machine
(Intel vs AMD, where MKL and the vectorised kernels round differently, so SAE training and everything after it
are not bit-identical). This reads two runs' ``summary.json`` and, for every variant both built, puts each
bootstrapped change side by side: MaxSkew's relative change per prompt set (and held-out half) and every SAE
control's paired "edit minus control" difference.

Two estimates *agree* when each one's point lies inside the other's 95% interval. That is the criterion, not
equal significance verdicts: a change whose interval ends near 0 flips from "lower" to "n.s." under any noise,
so verdict changes are listed but only disagreement (or a variant built in one run only) fails the comparison.
Utility changes carry no interval in the summary and are shown, not judged. The test suits its purpose, two runs
of one recipe on the same data: their intervals share the concept and seed resampling, so what can move a point out
of the other's interval is the run itself (kernels, training). Runs on *different* data would disagree by chance
alone (two independent estimates of equal precision: ~17% of quantities). Pure Python: no torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import DebiasError
from .percent import ci_suffix, pct

SUMMARY = "summary.json"
UTILITY_KEYS = ("caption_recall@10", "caption_recall_no_gender@10", "age_zero_shot_acc", "race_zero_shot_acc",
                "gender_zero_shot_acc")
BASELINE_RTOL = 1e-3  # the unmodified model's MaxSkew: equal up to float noise when both runs used the same lab


@dataclass(frozen=True)
class Estimate:
    """A relative change with its 95% interval (fractions: -0.09 is -9%)."""

    change: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``lower`` / ``higher`` when the interval excludes 0, else ``n.s.``."""
        return "lower" if self.high < 0 else "higher" if self.low > 0 else "n.s."

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass
class Row:
    """One compared quantity of one variant."""

    variant: str
    quantity: str
    a: Estimate
    b: Estimate

    @property
    def agree(self) -> bool:
        return self.a.contains(self.b.change) and self.b.contains(self.a.change)

    @property
    def same_verdict(self) -> bool:
        return self.a.verdict == self.b.verdict


@dataclass
class Comparison:
    """Everything :func:`compare_summaries` found; ``ok`` is the exit-status criterion."""

    rows: list[Row] = field(default_factory=list)
    only_in: dict[str, list[str]] = field(default_factory=dict)  # "a" / "b" -> variants built in that run only
    settings: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # variant -> key -> [a, b]
    utility: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)  # variant -> key -> [a, b]
    baseline_rel_diff: float = 0.0  # largest relative difference of the unmodified model's MaxSkew

    @property
    def disagreements(self) -> list[Row]:
        return [r for r in self.rows if not r.agree]

    @property
    def ok(self) -> bool:
        return not self.disagreements and not any(self.only_in.values())

    def to_dict(self) -> dict[str, Any]:
        rows = [{**asdict(r), "agree": r.agree, "verdicts": [r.a.verdict, r.b.verdict]} for r in self.rows]
        return {"ok": self.ok, "rows": rows, "only_in": self.only_in, "settings_differ": self.settings,
                "utility_change": self.utility, "baseline_max_rel_diff": self.baseline_rel_diff,
                "compared": len(self.rows), "disagree": len(self.disagreements),
                "verdicts_differ": sum(not r.same_verdict for r in self.rows)}


def read_summary(path: str | Path) -> list[dict[str, Any]]:
    """A run's variant summaries, from its output directory or its ``summary.json``; one-line errors."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY
    if not p.is_file():
        raise DebiasError(f"{path}: no {SUMMARY} (give a `debias-export run` output directory or its {SUMMARY})")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DebiasError(f"{p}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, list) or not all(isinstance(s, dict) and isinstance(s.get("variant"), str) for s in data):
        raise DebiasError(f"{p}: not a run summary (expected a list of variant records, each with a 'variant' name)")
    names = [s["variant"] for s in data]
    if len(set(names)) != len(names):
        raise DebiasError(f"{p}: variant names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return data


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _estimate(change: Any, ci: Any) -> Estimate | None:
    """An estimate when the change and both interval ends are finite numbers (else the quantity is skipped)."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    values = [_number(change), _number(ci[0]), _number(ci[1])]
    if any(v is None for v in values):
        return None
    return Estimate(*values)  # type: ignore[arg-type]


def estimates(summary: dict[str, Any]) -> dict[str, Estimate]:
    """Every bootstrapped change of one variant: ``MaxSkew <set>`` and ``edit - <control>: <set>``."""
    ev = summary.get("eval") or {}
    out: dict[str, Estimate] = {}
    for name, s in (ev.get("max_skew_gender_seeds") or {}).items():
        if isinstance(s, dict) and (e := _estimate(s.get("change"), [s.get("ci_low"), s.get("ci_high")])):
            out[f"MaxSkew {name}"] = e
    for kind, control in (ev.get("controls") or {}).items():
        diff = (control or {}).get("edit_minus_control") if isinstance(control, dict) else None
        if not isinstance(diff, dict):
            continue  # not applicable (projection edits, residual mode's reconstruction)
        for name, change in (diff.get("change") or {}).items():
            if e := _estimate(change, (diff.get("ci") or {}).get(name)):
                out[f"edit - {kind}: {name}"] = e
    return out


def _utility_change(summary: dict[str, Any]) -> dict[str, float | None]:
    ev = summary.get("eval") or {}
    before, after = ev.get("utility_before") or {}, ev.get("utility_after") or {}
    out: dict[str, float | None] = {}
    for key in UTILITY_KEYS:
        b, a = _number(before.get(key)), _number(after.get(key))
        out[key] = None if b in (None, 0.0) or a is None else (a - b) / b
    return out


def compare_summaries(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> Comparison:
    """Compare two runs' summaries variant by variant (see the module docstring for the criterion)."""
    built_a = {s["variant"]: s for s in a if "not_built" not in s}
    built_b = {s["variant"]: s for s in b if "not_built" not in s}
    cmp = Comparison(only_in={"a": sorted(set(built_a) - set(built_b)), "b": sorted(set(built_b) - set(built_a))})
    for name in [n for n in built_a if n in built_b]:
        sa, sb = built_a[name], built_b[name]
        ea, eb = estimates(sa), estimates(sb)
        cmp.rows += [Row(name, q, ea[q], eb[q]) for q in ea if q in eb]
        ca, cb = sa.get("chosen") or {}, sb.get("chosen") or {}
        differ = {k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
        if differ:
            cmp.settings[name] = differ
        ua, ub = _utility_change(sa), _utility_change(sb)
        cmp.utility[name] = {k: [ua[k], ub[k]] for k in UTILITY_KEYS}
        base_a, base_b = (((s.get("eval") or {}).get("max_skew_gender_before") or {}) for s in (sa, sb))
        for key, before in base_a.items():
            x, y = _number(before), _number(base_b.get(key))
            if x is not None and y is not None and max(abs(x), abs(y)) > 0:
                cmp.baseline_rel_diff = max(cmp.baseline_rel_diff, abs(x - y) / max(abs(x), abs(y)))
    if not cmp.rows and not any(cmp.only_in.values()):
        raise DebiasError("the two runs have no built variant with a bootstrapped change in common: nothing to compare")
    return cmp


def comparison_markdown(cmp: Comparison, label_a: str, label_b: str) -> str:
    """The comparison as a markdown report: verdict line, per-variant table, settings and utility."""
    lines = [f"# Run comparison: A = {label_a}, B = {label_b}", ""]
    verdict = "**conclusions agree**" if cmp.ok else "**conclusions differ**"
    lines.append(f"{verdict}: {len(cmp.rows) - len(cmp.disagreements)} of {len(cmp.rows)} bootstrapped changes agree "
                 f"(each run's point inside the other's 95% interval); significance verdicts differ on "
                 f"{sum(not r.same_verdict for r in cmp.rows)}; unmodified model's MaxSkew "
                 + (f"differs by at most {100 * cmp.baseline_rel_diff:.2g}% (relative)" if cmp.baseline_rel_diff else "identical")
                 + ("" if cmp.baseline_rel_diff <= BASELINE_RTOL else ": the runs did not measure the same model / data")
                 + ".")
    for side, label in (("a", label_a), ("b", label_b)):
        if cmp.only_in.get(side):
            lines.append(f"- built only in {label}: {', '.join(cmp.only_in[side])}")
    lines += ["", "| variant | quantity | A | B | agree | verdicts |", "|---|---|---|---|---|---|"]
    for r in cmp.rows:
        mark = "yes" if r.agree else "**no**"
        verdicts = r.a.verdict if r.same_verdict else f"**{r.a.verdict} / {r.b.verdict}**"
        lines.append(f"| {r.variant} | {r.quantity} | {pct(r.a.change)}{ci_suffix((r.a.low, r.a.high))} | {pct(r.b.change)}{ci_suffix((r.b.low, r.b.high))} | {mark} | {verdicts} |")
    if cmp.settings:
        lines += ["", "Settings the selection chose differently (A / B):", ""]
        for name, differ in cmp.settings.items():
            lines.append(f"- {name}: " + ", ".join(f"{k} {va} / {vb}" for k, (va, vb) in differ.items()))
    keys = [k for k in UTILITY_KEYS if any(u[k] != [None, None] for u in cmp.utility.values())]  # runs may predate a metric
    lines += ["", "Utility change on the evaluation data (A / B; no interval, not judged):", "",
              "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, util in cmp.utility.items():
        lines.append(f"| {name} | " + " | ".join(f"{pct(util[k][0])} / {pct(util[k][1])}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
