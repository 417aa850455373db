"""Controls of an SAE edit (``eval.controls``): the SAE's reconstruction with no latent changed, and frequency-matched
random latents; both evaluated per seed beside the chosen edit and reported with the same interval."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from debias_export import SAEEdit, apply_edits
from debias_export.analysis.probe import matched_random_neurons
from debias_export.cli.main import main
from debias_export.core.errors import ConfigError, DebiasError, ShapeError
from debias_export.edits.sae import reconstruction_only_hook
from debias_export.workflow.recipe import load_recipe
from debias_export.workflow.testing import random_sae
from test_protocol import _protocol_recipe
from test_sae_value_mean import W, dual, pixels  # noqa: F401  (the tiny dual encoder and its pixels: shared fixtures)


def _embed(dual, pixels, install=None):
    with torch.no_grad():
        if install is None:
            return dual.embed("image", pixels)
        handle = install(dual)
        try:
            return dual.embed("image", pixels)
        finally:
            handle.remove()


def _site_hidden(dual, pixels, site="image.1"):
    """The site's output on ``pixels`` (every token), recorded by a plain hook."""
    seen = []
    module = dual.model.get_submodule(dual.site_module_path(dual.resolve_site(site)))
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        _embed(dual, pixels)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("activation", ["threshold", "topk"])
def test_reconstruction_control_is_the_edit_of_a_latent_that_never_fires(dual, pixels, activation):
    # independent oracle: zeroing a latent that is silent on every token changes no latent, so the compiled
    # reconstruct edit of such a latent must equal the control (the SAE's reconstruction mixed in with weight a)
    sae = random_sae(W, 256, activation=activation)
    silent = 5
    with torch.no_grad():
        sae.b_enc[silent] = -1e4  # latent 5 can no longer fire on any input
        assert not (sae.encode(_site_hidden(dual, pixels).float())[..., silent] > 0).any()
    edit = SAEEdit(site="image.1", sae=sae, neurons=[silent], alpha=0.7, mode="reconstruct")
    control = _embed(dual, pixels, lambda a: reconstruction_only_hook(a, edit))
    assert (control - _embed(dual, pixels, lambda a: apply_edits(a, edit))).abs().max() < 1e-5
    assert (control - _embed(dual, pixels)).abs().max() > 1e-4  # and it is not the unmodified model


def test_reconstruction_control_refuses_a_residual_edit(dual):
    edit = SAEEdit(site="image.1", sae=random_sae(W, 64), neurons=[1], mode="residual")
    with pytest.raises(ConfigError, match="needs a reconstruct edit"):
        reconstruction_only_hook(dual, edit)


def test_random_latents_match_each_chosen_neurons_firing_frequency():
    # latent i fires on i of 40 inputs: frequencies are all distinct, so "nearest in frequency" is checkable
    z = torch.zeros(40, 40)
    for i in range(40):
        z[:i, i] = 1.0
    chosen = [10, 30]
    picks = {tuple(matched_random_neurons(z, chosen, seed=s, nearest=4)) for s in range(20)}
    for p in picks:
        assert len(set(p)) == 2 and not set(p) & set(chosen)
        assert all(abs(q - c) <= 2 for q, c in zip(p, chosen))  # the 4 nearest of 10 are 8, 9, 11, 12
    assert len(picks) > 1  # the draw is random across seeds...
    assert matched_random_neurons(z, chosen, seed=3) == matched_random_neurons(z, chosen, seed=3)  # ...and seeded


def test_random_latents_are_refused_when_too_few_or_misshapen():
    with pytest.raises(DebiasError, match="needs 2 latents besides"):
        matched_random_neurons(torch.rand(5, 3), [0, 1], seed=0)
    with pytest.raises(ShapeError, match=r"\[inputs, latents\]"):
        matched_random_neurons(torch.rand(5), [0], seed=0)


def test_the_protocol_reports_both_controls_beside_the_edit(tmp_path, shared_data):
    path = _protocol_recipe(tmp_path, shared_data, edit={"neurons": [1, 2], "alpha": 0.6, "mode": "reconstruct"},
                            eval={"alphas": [0.0, 1.0], "k": 5, "limit": 30, "controls": ["reconstruction", "random"]},
                            variants=[{"name": "sae", "edit": {"value": "mean"}},
                                      {"name": "leace", "edit": {"kind": "projection", "method": "leace", "neurons": None,
                                                                 "strength": 1.0, "fold": "none"},
                                       "select": {"limit": 40, "k": 5, "grid": {"edit.strength": [1.0]}}}])
    assert main(["run", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    leace = json.loads((out / "leace" / "run.json").read_text())["eval"]["controls"]
    assert leace == {k: {"not_applicable": "a projection edit has no SAE neurons to control for"}
                     for k in ("reconstruction", "random")}
    out = out / "sae"
    ev = json.loads((out / "run.json").read_text())["eval"]
    controls = ev["controls"]
    assert set(controls) == {"reconstruction", "random"}
    for res in controls.values():
        lo, hi = res["max_skew_gender_change_ci"]["occupations"]
        assert lo <= hi and res["max_skew_gender_seeds"]["occupations"]["seeds"] == 3
        assert set(res["utility_after"]) == set(ev["utility_after"])
    random = controls["random"]
    assert set(random["edit_minus_control"]["ci"]) >= {"occupations", "occupations/held-out"}
    for seed, neurons in random["neurons_per_seed"].items():
        assert len(neurons) == 2 and not set(neurons) & {1, 2}
        assert isinstance(random["value_per_seed"][seed], list) and len(random["value_per_seed"][seed]) == 2
    # a control is a different edit: its embeddings move differently from the edit's
    assert controls["random"]["fidelity"]["image_cosine"]["mean"] != ev["fidelity"]["image_cosine"]["mean"]
    report = (out.parent / "report.md").read_text()
    assert "| leace | control" not in report  # a projection has no control rows
    assert "## Controls" in report and "control: random latents" in report and "reconstruction only" in report
    assert "edit minus control (occupations)" in report


def test_a_residual_edit_has_no_reconstruction_control(tmp_path, shared_data):
    path = _protocol_recipe(tmp_path, shared_data, edit={"neurons": [1, 2], "alpha": 0.6, "mode": "residual"},
                            select={"limit": 40, "k": 5, "grid": {"edit.alpha": [1.0]}},
                            eval={"alphas": [1.0], "k": 5, "limit": 30, "controls": ["reconstruction", "random"]})
    assert main(["run", str(path), "--no-progress"]) == 0
    controls = json.loads((tmp_path / "out" / "run.json").read_text())["eval"]["controls"]
    assert "residual mode keeps" in controls["reconstruction"]["not_applicable"]
    assert all(v == 0.0 for v in controls["random"]["value_per_seed"].values())  # the edit's rule: v = 0
    assert "not applicable" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("controls, message", [
    (["shuffled"], "eval.controls: must be distinct values from reconstruction, random, got ['shuffled']"),
    (["random", "random"], "eval.controls: must be distinct values"),
    ("random", "eval.controls: expected a list"),
])
def test_recipe_refuses_bad_controls(tmp_path, shared_data, controls, message, capsys):
    path = _protocol_recipe(tmp_path, shared_data, eval={"alphas": [1.0], "k": 5, "controls": controls})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(path)
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.controls" in err[0]
    assert not (tmp_path / "out").exists()


def test_controls_need_the_held_out_protocol(tmp_path, shared_data):
    path = _protocol_recipe(tmp_path, shared_data, eval={"alphas": [1.0], "k": 5, "controls": ["random"]})
    raw = yaml.safe_load(path.read_text())
    del raw["seeds"], raw["select"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="eval.controls: needs the held-out protocol"):
        load_recipe(path)


def _cmps(before, afters):
    """Comparisons of one prompt set, one per seed, as ``compare`` returns them (only what aggregation reads)."""
    def per(values):
        return {"retrieval": {"occupations": {"gender": {"max_skew_per_prompt": list(values)}}}}
    return {s: {"base": per(before), "patched": per(a)} for s, a in enumerate(afters)}


def test_the_paired_difference_from_a_control_is_the_difference_of_sums_over_before():
    from types import SimpleNamespace

    from debias_export.workflow.protocol import _aggregate

    data = SimpleNamespace(prompt_sets={"occupations": [(f"p{i}", f"concept{i}") for i in range(4)]})
    before = [0.2, 0.4, 0.1, 0.3]
    edit = _cmps(before, [[0.1, 0.3, 0.1, 0.2], [0.2, 0.2, 0.1, 0.3]])
    control = _cmps(before, [[0.2, 0.3, 0.0, 0.3], [0.1, 0.4, 0.1, 0.2]])
    paired = _aggregate(edit, data, minus=control)["max_skew_gender_seeds"]["occupations"]
    # sums per seed: edit 0.7 / 0.8, control 0.8 / 0.8, before 1.0
    assert paired["change"] == pytest.approx(((0.7 + 0.8) / 2 - (0.8 + 0.8) / 2) / 1.0)
    assert paired["per_seed"] == pytest.approx([0.7 - 0.8, 0.8 - 0.8])
    same = _aggregate(edit, data, minus=edit)
    assert same["max_skew_gender_seeds"]["occupations"]["change"] == pytest.approx(0.0)
    assert same["max_skew_gender_change_ci"]["occupations"] == pytest.approx([0.0, 0.0])
