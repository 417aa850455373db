"""Per-neuron SAE edit values and ``edit.value: mean`` (mean ablation): the compiled edit equals the paper's
formula with each chosen neuron set to its own value, the value is each neuron's group-balanced mean activation
over the probed inputs, and recipes / the CLI accept ``mean`` and refuse anything else in one line."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from debias_export import SAEEdit, apply_edits
from debias_export.adapters.dual_encoder import DualEncoderAdapter, tiny_dual_encoder_config
from debias_export.analysis.probe import balanced_means, probe_social_neurons, values_from_report
from debias_export.cli.main import main
from debias_export.core.errors import ConfigError, DebiasError
from debias_export.edits import load_edit, reference_hook
from debias_export.workflow.recipe import load_recipe
from debias_export.workflow.testing import random_sae
from test_pipeline import _recipe
from test_protocol import _protocol_recipe

W = 32


@pytest.fixture(scope="module")
def dual():
    return DualEncoderAdapter.from_config(tiny_dual_encoder_config(width=W), seed=0)


@pytest.fixture(scope="module")
def pixels():
    return {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _embed(dual, pixels, edit=None, reference=False):
    with torch.no_grad():
        if edit is None:
            return dual.embed("image", pixels)
        handle = reference_hook(dual, edit) if reference else apply_edits(dual, edit)
        try:
            return dual.embed("image", pixels)
        finally:
            handle.remove()


@pytest.mark.parametrize("mode", ["reconstruct", "residual"])
@pytest.mark.parametrize("activation", ["threshold", "topk"])
def test_per_neuron_values_compile_to_the_reference_formula(dual, pixels, mode, activation):
    sae = random_sae(W, 256, activation=activation)
    edit = SAEEdit(site="image.1", sae=sae, neurons=[3, 7, 100], value=[0.4, -0.2, 1.5], alpha=0.6, mode=mode)
    ref, out = _embed(dual, pixels, edit, reference=True), _embed(dual, pixels, edit)
    assert (out - ref).abs().max() < 1e-5
    # each neuron really gets its own value: the same edit with one shared value lands elsewhere
    shared = SAEEdit(site="image.1", sae=sae, neurons=[3, 7, 100], value=0.4, alpha=0.6, mode=mode)
    assert (_embed(dual, pixels, shared) - out).abs().max() > 1e-4


def test_equal_per_neuron_values_are_the_scalar_edit(dual, pixels):
    sae = random_sae(W, 256)
    one = SAEEdit(site="image.2", sae=sae, neurons=[3, 7], value=0.25, alpha=0.8)
    each = SAEEdit(site="image.2", sae=sae, neurons=[3, 7], value=[0.25, 0.25], alpha=0.8)
    assert (_embed(dual, pixels, one) - _embed(dual, pixels, each)).abs().max() < 1e-6


def test_per_neuron_values_survive_save_and_load(tmp_path, dual, pixels):
    edit = SAEEdit(site="image.1", sae=random_sae(W, 128), neurons=[1, 5], value=[0.3, -0.7], alpha=0.5)
    edit.save(tmp_path / "e")
    assert json.loads((tmp_path / "e" / "edit_config.json").read_text())["value"] == [0.3, -0.7]
    back = load_edit(tmp_path / "e")
    assert back.value == [0.3, -0.7]
    assert torch.equal(_embed(dual, pixels, back), _embed(dual, pixels, edit))


@pytest.mark.parametrize("value, message", [
    ([0.1], "1 values for 2 neurons"),
    ([0.1, float("nan")], "must be finite"),
    ([0.1, True], "a number or a list of numbers"),
    ("mean", "a number or a list of numbers"),  # the word is resolved by the recipe / CLI, never by the edit
    (float("inf"), "must be finite"),
])
def test_bad_values_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        SAEEdit(site="image.1", sae=random_sae(W, 64), neurons=[1, 2], value=value)


def test_balanced_means_weigh_every_group_the_same():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [100.0, 100.0]])
    labels = ["a", "a", "b", None]  # group a: 2 rows, b: 1 row, one unlabelled row left out
    # neuron 0: mean(a) = 2, mean(b) = 5 -> 3.5 (the row mean would be 3); neuron 1: (0 + 2) / 2
    assert balanced_means(z, labels, [0, 1]) == [3.5, 1.0]
    assert balanced_means(z, labels, [1]) == [1.0]
    with pytest.raises(DebiasError, match="no labelled rows"):
        balanced_means(z, [None] * 4, [0])


def test_the_probe_report_records_each_neurons_balanced_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(60, 40, generator=g))
    z[:30, 5] = 0.0  # latent 5 fires only for group "w", latent 9 only for "m"
    z[30:, 9] = 0.0
    labels = ["m"] * 30 + ["w"] * 30
    report = probe_social_neurons(z, labels, tau=0.1, top_n=1)
    chosen = sorted({n["index"] for g in report["groups"].values() for n in g["neurons"]})
    assert set(chosen) == {5, 9}
    assert values_from_report(report, chosen) == pytest.approx(balanced_means(z, labels, chosen), rel=1e-6)
    with pytest.raises(DebiasError, match="no balanced_mean_activation for neuron"):
        values_from_report(report, [0])


def _recipe_with(tmp_path, shared_data, **edit):
    path = _recipe(tmp_path, shared_data)
    raw = yaml.safe_load(path.read_text())
    raw["edit"].update(edit)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("value, message", [
    ("median", "edit.value: must be a number or 'mean', got 'median'"),
    (True, "edit.value: expected a finite number or a string, got True"),
    (float("nan"), "edit.value: expected a finite number or a string"),
])
def test_recipe_refuses_a_bad_value(tmp_path, shared_data, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(_recipe_with(tmp_path, shared_data, value=value))


def test_recipe_refuses_a_value_on_a_projection(tmp_path, shared_data):
    with pytest.raises(ConfigError, match="edit.value: only applies to edit.kind: sae"):
        load_recipe(_recipe_with(tmp_path, shared_data, kind="projection", value="mean", neurons=None))


def test_run_with_value_mean_sets_each_neuron_to_its_balanced_mean(tmp_path, shared_data, monkeypatch):
    # spies: which latents the probe ranked, and what the value step averaged (a random model's probe neurons
    # depend on float rounding, so the recipe's explicit neurons are edited and the wiring is what is checked)
    from debias_export.workflow import steps

    seen: dict = {}

    def probe_spy(z, labels, **kw):
        seen["probe"] = (z, list(labels))
        return probe_social_neurons(z, labels, **kw)

    def means_spy(z, labels, neurons):
        seen["means"] = (z, list(labels), list(neurons))
        seen["values"] = balanced_means(z, labels, neurons)
        return seen["values"]

    monkeypatch.setattr(steps, "probe_social_neurons", probe_spy)
    monkeypatch.setattr(steps, "balanced_means", means_spy)
    path = _recipe_with(tmp_path, shared_data, value="mean")
    assert load_recipe(path).edit.value == "mean"
    assert main(["run", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    cfg = json.loads((out / "edit" / "edit_config.json").read_text())
    z, labels, neurons = seen["means"]
    assert neurons == cfg["neurons"] == [1, 2]
    assert z is seen["probe"][0] and labels == seen["probe"][1]  # the very latents and labels the probe used
    assert cfg["value"] == seen["values"] and json.loads((out / "run.json").read_text())["value"] == cfg["value"]
    assert len(set(labels) - {None}) == 2 and z.shape[1] == load_edit(out / "edit").sae.num_latents


def test_patch_value_mean_reads_the_probe_report(tmp_path, capsys):
    sae = random_sae(32, 128)
    sae.save(tmp_path / "sae")
    report = {"groups": {"m": {"neurons": [{"index": 3, "balanced_mean_activation": 0.25}]},
                         "w": {"neurons": [{"index": 8, "balanced_mean_activation": 0.5}]}}}
    (tmp_path / "probe.json").write_text(json.dumps(report))
    base = ["patch", "--model", "tiny-clip", "--sae", str(tmp_path / "sae"), "--site", "image.1"]
    assert main([*base, "--probe-report", str(tmp_path / "probe.json"), "--value", "mean", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "edit_config.json").read_text())["value"] == [0.25, 0.5]
    assert "value per neuron 0.25, 0.5" in capsys.readouterr().out
    for extra, message in ((["--neurons", "3", "--value", "mean"], "give --probe-report"),
                           (["--neurons", "3", "--value", "nan"], "must be a finite number or mean"),
                           (["--neurons", "3", "--value", "median"], "must be a finite number or mean")):
        assert main([*base, *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()


def test_the_protocol_sweeps_zeroing_against_mean_ablation(tmp_path, shared_data):
    path = _protocol_recipe(tmp_path, shared_data, select={"limit": 40, "k": 5, "grid": {"edit.value": [0.0, "mean"]}})
    assert main(["run", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    table = json.loads((out / "selection.json").read_text())
    cells = [row["cell"]["edit.value"] for row in table["cells"]]
    assert cells == [0.0, "mean"]
    run = json.loads((out / "run.json").read_text())
    values = run["value_per_seed"]
    assert sorted(values) == ["0", "1", "2"] or sorted(values) == [0, 1, 2]
    if run["chosen"]["edit.value"] == "mean":  # each seed's SAE has its own means
        assert all(isinstance(v, list) and len(v) == 2 for v in values.values())
    else:
        assert all(v == 0.0 for v in values.values())
