"""``debias-export compare``: two runs' conclusions side by side (workflow/compare_runs.py).

Synthetic summaries pin the criterion (each point inside the other's 95% interval), then the committed runs of the
main job check it on real data: a run against itself agrees everywhere, the two independently trained labs do not.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from debias_export.cli.main import main
from debias_export.workflow.compare_runs import Estimate, compare_summaries, comparison_markdown, estimates, read_summary

ROOT = Path(__file__).resolve().parents[1]
V5 = ROOT / "benchmarks/results/demo-protocol-v5"
V5_LAB1 = ROOT / "benchmarks/results/demo-protocol-v5-lab1"


def variant(name: str, change: float, low: float, high: float, *, control: tuple[float, float, float] | None = None,
            chosen: dict | None = None, before: float = 0.2) -> dict:
    ev = {"max_skew_gender_seeds": {"occupations": {"change": change, "ci_low": low, "ci_high": high, "seeds": 3}},
          "max_skew_gender_before": {"occupations": before},
          "utility_before": {"caption_recall@10": 0.5}, "utility_after": {"caption_recall@10": 0.49},
          "controls": {"reconstruction": {"not_applicable": "residual mode"}}}
    if control is not None:
        c, lo, hi = control
        ev["controls"]["random"] = {"edit_minus_control": {"change": {"occupations": c}, "ci": {"occupations": [lo, hi]}}}
    return {"variant": name, "chosen": chosen or {"edit.alpha": 0.5}, "eval": ev}


def test_estimate_verdicts_and_containment():
    assert Estimate(-0.09, -0.14, -0.05).verdict == "lower"
    assert Estimate(0.04, 0.01, 0.08).verdict == "higher"
    assert Estimate(-0.02, -0.05, 0.0).verdict == "n.s."  # an interval that touches 0 does not exclude it
    assert Estimate(-0.02, -0.05, 0.01).contains(0.01) and not Estimate(-0.02, -0.05, 0.01).contains(0.0101)


def test_points_inside_each_others_interval_agree_even_when_the_verdict_flips():
    a = [variant("img", -0.09, -0.14, -0.05, control=(-0.01, -0.04, 0.03))]
    b = [variant("img", -0.06, -0.12, 0.01, control=(0.0, -0.03, 0.03))]
    cmp = compare_summaries(a, b)
    assert [r.quantity for r in cmp.rows] == ["MaxSkew occupations", "edit - random: occupations"]
    assert all(r.agree for r in cmp.rows) and cmp.ok
    assert [r.same_verdict for r in cmp.rows] == [False, True]  # lower / n.s.: listed, not a failure
    assert "**conclusions agree**" in comparison_markdown(cmp, "A", "B") and "**lower / n.s.**" in comparison_markdown(cmp, "A", "B")


def test_one_point_outside_the_other_interval_disagrees():
    # -0.09 [-0.14, -0.05] vs +0.02 [-0.03, +0.07]: the sign flip the issue saw between two machines
    cmp = compare_summaries([variant("img", -0.09, -0.14, -0.05)], [variant("img", 0.02, -0.03, 0.07)])
    assert not cmp.ok and [r.quantity for r in cmp.disagreements] == ["MaxSkew occupations"]
    # containment must hold both ways: B's point is inside A's wide interval, A's is outside B's narrow one
    cmp = compare_summaries([variant("img", -0.10, -0.20, 0.05)], [variant("img", 0.0, -0.02, 0.02)])
    assert not cmp.ok and cmp.rows[0].a.contains(cmp.rows[0].b.change)
    assert compare_summaries([variant("img", -0.10, -0.20, 0.05)], [variant("img", 0.0, -0.02, 0.02)]).to_dict()["disagree"] == 1


def test_variants_built_in_one_run_only_fail_and_settings_and_baselines_are_reported():
    a = [variant("img", -0.05, -0.1, 0.0, chosen={"site": "image.3"}), variant("txt", 0.0, -0.02, 0.02)]
    b = [variant("img", -0.05, -0.1, 0.0, chosen={"site": "image.2"}, before=0.21),
         {"variant": "txt", "kind": "sae", "site": "text.2", "not_built": "no social neuron"}]
    cmp = compare_summaries(a, b)
    assert not cmp.ok and cmp.only_in == {"a": ["txt"], "b": []}
    assert cmp.settings == {"img": {"site": ["image.3", "image.2"]}}
    assert cmp.baseline_rel_diff == pytest.approx(0.01 / 0.21)
    text = comparison_markdown(cmp, "A", "B")
    assert "built only in A: txt" in text and "site image.3 / image.2" in text and "did not measure the same model" in text


def test_quantities_without_a_finite_interval_are_skipped():
    v = variant("img", -0.05, -0.1, 0.0)
    v["eval"]["max_skew_gender_seeds"]["adjectives"] = {"change": float("nan"), "ci_low": -0.1, "ci_high": 0.1}
    v["eval"]["max_skew_gender_seeds"]["activities"] = {"change": -0.01, "ci_low": None, "ci_high": 0.1}
    assert list(estimates(v)) == ["MaxSkew occupations"]
    with pytest.raises(Exception, match="nothing to compare"):
        compare_summaries([{"variant": "x", "eval": {}}], [{"variant": "x", "eval": {}}])


def test_the_committed_main_job_agrees_with_itself_and_not_with_the_second_lab():
    v5 = read_summary(V5)
    same = compare_summaries(v5, copy.deepcopy(v5))
    assert same.ok and len(same.rows) == 112 and same.baseline_rel_diff == 0.0
    assert all(r.same_verdict for r in same.rows) and not same.settings
    assert "112 of 112 bootstrapped changes agree" in comparison_markdown(same, "A", "A")
    assert "unmodified model's MaxSkew identical" in comparison_markdown(same, "A", "A")
    labs = compare_summaries(v5, read_summary(V5_LAB1 / "summary.json"))
    assert not labs.ok and labs.baseline_rel_diff > 0.1  # another lab: another unmodified model
    every_writer = {r.quantity: r for r in labs.rows if r.variant == "image-leace-every-writer"}
    assert not every_writer["MaxSkew occupations"].agree  # -14.1% [-18, -10] vs -3.9% [-12, +6] (README)
    assert labs.settings["image-reconstruct"]["site"] == ["image.3", "image.2"]


def test_utility_columns_follow_the_metrics_the_runs_measured():
    """A metric only the newer run measured (gender-free recall, protocol v6) gets a column with "-" for the older
    run; two runs without it get no empty column."""
    old, new = [variant("img", -0.09, -0.14, -0.05)], [variant("img", -0.09, -0.14, -0.05)]
    new[0]["eval"]["utility_before"]["caption_recall_no_gender@10"] = 0.40
    new[0]["eval"]["utility_after"]["caption_recall_no_gender@10"] = 0.30
    md = comparison_markdown(compare_summaries(old, new), "A", "B")
    assert "caption_recall_no_gender@10" in md and "| img | -2.0% / -2.0% | - / -25.0% |" in md
    assert "no_gender" not in comparison_markdown(compare_summaries(old, old), "A", "A")


def test_cli_exit_codes_and_json(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, change in ((a, -0.09), (b, -0.08)):
        d.mkdir()
        (d / "summary.json").write_text(json.dumps([variant("img", change, change - 0.05, change + 0.04)]))
    assert main(["compare", str(a), str(b / "summary.json"), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Run comparison") and "| img | MaxSkew occupations | -9.0% [-14, -5] | -8.0% [-13, -4] | yes |" in out
    assert json.loads((tmp_path / "c.json").read_text())["ok"] is True
    assert main(["compare", str(a), str(b), "--json", str(tmp_path / "c.json")]) == 2  # never clobbered silently
    assert "already exists" in capsys.readouterr().err
    (b / "summary.json").write_text(json.dumps([variant("img", 0.05, 0.01, 0.09)]))
    assert main(["compare", str(a), str(b)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: conclusions differ: 1 of 1 changes outside the other run's interval"]


@pytest.mark.parametrize("content, words", [
    (None, "no summary.json"),
    ("{", "not valid JSON"),
    ('{"variant": "x"}', "not a run summary"),
    ('[{"name": "x"}]', "not a run summary"),
    ('[{"variant": "x"}, {"variant": "x"}]', "variant names repeat (x)"),
])
def test_bad_summaries_are_one_line_errors(tmp_path, capsys, content, words):
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "summary.json").write_text(content)
    assert main(["compare", str(V5), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
