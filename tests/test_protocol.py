"""The held-out protocol (``select:`` + ``seeds:``): selection reads no evaluation data, seeds give an interval,
the report keeps the two splits apart; the numbers behind it (seed x concept bootstrap, concept halves)."""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from debias_export.cli.main import main
from debias_export.core.errors import DebiasError
from debias_export.eval.protocol import half_view, seed_change_ci, selection_score
from debias_export.eval.retrieval import HELD_OUT_HALF, SELECT_HALF, concept_half, load_prompt_sets
from debias_export.workflow import protocol

ROOT = Path(__file__).resolve().parents[1]
_AUDIT: dict = {"on": False, "opened": []}


def _audit(event, args):
    if _AUDIT["on"] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        _AUDIT["opened"].append(str(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while a test switches it on


def _protocol_recipe(tmp_path, shared_data, **extra) -> Path:
    raw = {"name": "proto", "seeds": [0, 1, 2], "model": {"spec": "tiny-clip"}, "site": "image.-1",
           "data": {"dir": shared_data, "images": "utkface/labels.csv", "limit": 64},
           "capture": {"tokens": "random-k", "k": 2, "batch_size": 64},
           "sae": {"k": 8, "expansion": 4, "batch_size": 64, "steps": 10},
           "probe": {"column": "gender", "tau": 0.2, "top_n": 2},
           "edit": {"neurons": [1, 2], "alpha": 0.6, "mode": "reconstruct"}, "export": {"onnx": False},
           "select": {"limit": 40, "k": 5, "grid": {"edit.alpha": [0.3, 1.0]}},
           "eval": {"alphas": [0.0, 1.0], "k": 5, "limit": 30}, "output": {"dir": str(tmp_path / "out")}}
    raw.update(extra)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_selection_reads_no_evaluation_data_and_the_report_keeps_splits_apart(tmp_path, shared_data, monkeypatch):
    """Every file opened while the grid is scored is recorded: none is FairFace or PAIRS; the fit data leaves
    the selection faces out; seeds give per-seed numbers and a CI; the report shows both splits."""
    real_select = protocol.select_variant

    def select_audited(*args, **kwargs):
        _AUDIT["on"] = True
        try:
            return real_select(*args, **kwargs)
        finally:
            _AUDIT["on"] = False

    from debias_export.workflow import pipeline
    monkeypatch.setattr(pipeline, "select_variant", select_audited)
    _AUDIT["opened"].clear()
    assert main(["run", str(_protocol_recipe(tmp_path, shared_data)), "--no-progress"]) == 0
    opened = _AUDIT["opened"]
    assert any("utkface" in p for p in opened)  # the recorder works: selection did read its own faces
    assert not [p for p in opened if "fairface540" in p or "/pairs/" in p or p.endswith("/pairs")]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())[0]
    selection = json.loads((out / "selection.json").read_text())
    assert len(selection["cells"]) == 2 and sum(bool(c.get("chosen")) for c in selection["cells"]) == 1
    assert summary["chosen"] == next(c["cell"] for c in selection["cells"] if c.get("chosen"))
    assert summary["alpha"] == summary["chosen"]["edit.alpha"]
    ev = summary["eval"]
    assert summary["seeds"] == [0, 1, 2]
    for name in ("occupations", "occupations/held-out"):
        lo, hi = ev["max_skew_gender_change_ci"][name]
        detail = ev["max_skew_gender_seeds"][name]
        assert lo <= hi and detail["seeds"] == 3 and len(detail["per_seed"]) == 3
    report = (out / "report.md").read_text()
    assert "## Selection split" in report and "occupations/held-out" in report
    assert "| proto | sae |" in report and (out / "sweep.png").stat().st_size > 1000


def test_fit_data_leaves_the_selection_faces_out(tmp_path, shared_data):
    from debias_export.workflow.biaslab import validation_split
    from debias_export.workflow.recipe import load_recipe
    from debias_export.workflow.steps import data_source

    recipe = load_recipe(_protocol_recipe(tmp_path, shared_data, data={"dir": shared_data, "images": "utkface/labels.csv"}))
    val = {r["file"] for r in validation_split(shared_data)}
    source = data_source(recipe, tmp_path, exclude=val)
    files = {r["file"] for r in source.rows}
    assert files and not files & val and len(files) + len(val) >= 9700


def test_seed_change_ci_combines_seeds_and_concepts():
    g = torch.Generator().manual_seed(0)
    before = (torch.rand(60, generator=g) + 0.5).tolist()
    concepts = [f"c{i // 3}" for i in range(60)]
    afters = [[b * f for b in before] for f in (0.7, 0.8, 0.9)]
    res = seed_change_ci(before, afters, concepts)
    assert res["change"] == pytest.approx(-0.2) and res["per_seed"] == pytest.approx([-0.3, -0.2, -0.1])
    assert res["ci_low"] < -0.2 < res["ci_high"] and res["ci_high"] < 0  # seed spread widens it, all below 0
    assert res["seed_sd"] == pytest.approx(0.1) and res["seeds"] == 3 and res["concepts"] == 20
    lo, hi = res["seed_t_ci"]
    assert lo == pytest.approx(-0.2 - 4.303 * 0.1 / 3 ** 0.5) and hi == pytest.approx(-0.2 + 4.303 * 0.1 / 3 ** 0.5)
    one = seed_change_ci(before, afters[1:2], concepts)  # one seed: the interval is the concept bootstrap only
    assert one["ci_low"] == pytest.approx(-0.2) and one["ci_high"] == pytest.approx(-0.2) and one["seed_t_ci"] is None
    with pytest.raises(DebiasError, match="equal length"):
        seed_change_ci(before, [before[:-1]], concepts)


def test_concept_halves_split_every_prompt_set(shared_data):
    full = load_prompt_sets(shared_data)
    sel, held = load_prompt_sets(shared_data, half=SELECT_HALF), load_prompt_sets(shared_data, half=HELD_OUT_HALF)
    for name, prompts in full.items():
        cs, ch = {c for _, c in sel[name]}, {c for _, c in held[name]}
        assert cs and ch and not cs & ch and cs | ch == {c for _, c in prompts}, name
    values, kept = half_view([1.0, 2.0, 3.0], ["nurse", "pilot", "nurse"])
    assert all(concept_half(c) == HELD_OUT_HALF for c in kept) and len(values) == len(kept)


def test_selection_score_and_missing_utility():
    base = {"retrieval": {"occ": {"gender": {"max_skew": 0.2}}}, "utility": {"age_zero_shot_acc": 0.5, "caption_recall@10": 0.4}}
    after = {"retrieval": {"occ": {"gender": {"max_skew": 0.15}}}, "utility": {"age_zero_shot_acc": 0.49, "caption_recall@10": 0.42}}
    s = selection_score(base, after, "gender", ["age_zero_shot_acc", "caption_recall@10"])
    assert s["skew_change"] == pytest.approx(-0.25) and s["utility_loss"] == pytest.approx(0.02)
    with pytest.raises(DebiasError, match="race_zero_shot_acc cannot be measured"):
        selection_score(base, after, "gender", ["race_zero_shot_acc"])
    with pytest.raises(DebiasError, match="no label column 'sex'"):
        selection_score(base, after, "sex", [])


@pytest.mark.parametrize("extra,words", [
    ({"select": {"grid": {"edit.gamma": [1]}}}, "select.grid"),
    ({"select": {"utility": ["accuracy"]}}, "select.utility"),
    ({"seeds": []}, "seeds"),
    ({"select": {"grid": {"edit.alpha": [2.0]}}}, "edit.alpha"),
    ({"select": {"grid": {"edit.value": [0.0, "median"]}}}, "edit.value"),
])
def test_bad_protocol_keys_exit_2_with_one_line(tmp_path, shared_data, capsys, extra, words):
    assert main(["run", str(_protocol_recipe(tmp_path, shared_data, **extra)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not (tmp_path / "out").exists()


def test_user_selection_split_without_the_needed_label_is_one_error(tmp_path, shared_data, capsys):
    csv = tmp_path / "faces.csv"
    csv.write_text("file,mood\n" + "".join(f"{f},x\n" for f in sorted((Path(shared_data) / "utkface" / "images").iterdir())[:8]
                                           if f.name.endswith(".jpg")))
    path = _protocol_recipe(tmp_path, shared_data, select={"images": str(csv), "image_dir": str(Path(shared_data) / "utkface" / "images"),
                                                           "k": 2})
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no label column 'gender'" in err[0]


@pytest.mark.parametrize("protocol", [True, False])
def _no_neurons_at_tau(monkeypatch, tau: float) -> None:
    """Probing at ``tau`` finds no social neuron (whether a toy SAE has one is data- and CPU-dependent, so the
    probe's answer is fixed here; everything after it is the real pipeline)."""
    from debias_export.workflow import pipeline

    for module in (protocol, pipeline):
        real = module.neurons_from_report
        monkeypatch.setattr(module, "neurons_from_report",
                            lambda report, _real=real: [] if report["tau"] == tau else _real(report))


@pytest.mark.parametrize("protocol_run", [True, False])
def test_a_variant_without_social_neurons_is_reported_not_built_and_the_run_goes_on(tmp_path, shared_data, capsys,
                                                                                     monkeypatch, protocol_run):
    """A variant whose probe finds no social neuron has no edit: the run keeps the other variant, reports the
    missing one with its reason and the evidence file, and warns once."""
    _no_neurons_at_tau(monkeypatch, 0.77)
    extra = {"edit": {"alpha": 0.6, "mode": "reconstruct"}, "seeds": [0],
             "variants": [{"name": "none-found", "probe": {"tau": 0.77}}, {"name": "given", "edit": {"neurons": [1, 2]}}]}
    if not protocol_run:
        extra.update(seeds=None, select=None, eval=None)
    path = _protocol_recipe(tmp_path, shared_data, **extra)
    assert main(["run", str(path), "--no-progress"]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: variant")]
    words = "social neurons for column 'gender' on every seed (at most 0 of 1" if protocol_run else "no social neurons"
    assert len(err) == 1 and "none-found not built" in err[0] and words in err[0]
    out = tmp_path / "out"
    summaries = json.loads((out / "summary.json").read_text())
    assert [s["variant"] for s in summaries] == ["none-found", "given"]
    assert "social neurons" in summaries[0]["not_built"] and "not_built" not in summaries[1]
    assert (out / "given" / "export").is_dir() and not (out / "none-found" / "export").exists()
    evidence = out / "none-found" / ("selection.json" if protocol_run else "probe.json")
    assert evidence.is_file()
    if protocol_run:
        assert all(c.get("skipped") for c in json.loads(evidence.read_text())["cells"])
    report = (out / "report.md").read_text()
    assert "## Not built" in report and "**none-found**" in report and "| none-found |" not in report


def test_a_run_where_no_variant_can_be_built_stops_with_one_line(tmp_path, shared_data, capsys, monkeypatch):
    _no_neurons_at_tau(monkeypatch, 0.77)
    path = _protocol_recipe(tmp_path, shared_data, seeds=[0], probe={"column": "gender", "tau": 0.77},
                            edit={"alpha": 0.6, "mode": "reconstruct"}, variants=[{"name": "a"}, {"name": "b"}])
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no variant could be built: a: no select.grid cell has social neurons")
    assert not (tmp_path / "out").exists()


def test_cells_that_build_the_same_edit_are_scored_once(tmp_path, shared_data, monkeypatch):
    # edit.neurons is given, so top_n changes nothing: two cells, one edit per seed, scored once per seed
    calls = []
    real = protocol.selection_score
    monkeypatch.setattr(protocol, "selection_score", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = _protocol_recipe(tmp_path, shared_data, select={"limit": 40, "k": 5, "grid": {"probe.top_n": [2, 10]}})
    assert main(["run", str(path), "--no-progress"]) == 0
    cells = json.loads((tmp_path / "out" / "selection.json").read_text())["cells"]
    assert len(calls) == 3 and [c["skew_change"] for c in cells][0] == cells[1]["skew_change"]
    assert cells[0]["per_seed"] == cells[1]["per_seed"]
