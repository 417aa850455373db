"""`debias-export run` on the offline tiny recipe: every artifact produced, loadable, atomic on failure."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from debias_export.cli.main import main
from debias_export.workflow.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, shared_data, **edits):
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
    raw.pop("variants", None)  # the base SAE recipe as one run (test_projection_pipeline runs the variants)
    raw.pop("eval", None)  # tests that need eval set their own
    raw["data"]["dir"] = shared_data
    raw["output"]["dir"] = str(tmp_path / "out")
    for key, value in edits.items():
        section, _, name = key.partition("__")
        raw[section][name] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_recipe_in_repo_parses():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(path)


def test_run_tiny_recipe_end_to_end(tmp_path, shared_data, capsys):
    from debias_export import load_patched
    from debias_export.export import verify_manifest

    path = _recipe(tmp_path, shared_data)
    assert main(["run", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    for rel in ("sae/sae.safetensors", "sae/cfg.json", "probe.json", "edit/edit_config.json",
                "export/hf/manifest.json", "export/onnx", "run.json", "validate.json"):
        assert (out / rel).exists(), rel
    assert not (tmp_path / "out.partial").exists()
    assert not (out / "cache").exists()  # capture shards / checkpoints are resumption state, not artifact
    run = json.loads((out / "run.json").read_text())
    assert run["neurons"] and run["site"] == "image.2.resid_post"
    assert 0.0 <= run["sae_fvu"] < 1.0
    verify_manifest(out / "export" / "hf")
    adapter = load_patched(out / "export")
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        assert adapter.embed("image", x).shape == (2, 16)
    # same recipe again: refused without --overwrite, output untouched
    assert main(["run", str(path), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "run.json").exists()


def test_failed_run_leaves_no_output(tmp_path, shared_data, capsys):
    # fp32 onnxruntime vs PyTorch differ by ~1e-6, so a zero tolerance (absolute and relative) forces the failure
    path = _recipe(tmp_path, shared_data, export__atol=0.0, export__rtol=0.0, data__limit=64, edit__neurons=[1, 2], sae__steps=20)
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_multi_variant_recipe_with_eval_and_bench(tmp_path, shared_data):
    """Image + text tower variants, both modes, eval (with a-sweep) and bench in one report directory."""
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
    raw["data"]["dir"] = shared_data
    raw["output"]["dir"] = str(tmp_path / "demo")
    raw["eval"] = {"alphas": [0.0, 1.0], "k": 20}
    raw["bench"] = {"batch_sizes": [1], "reps": 2, "runtimes": ["torch"]}
    raw["variants"] = [{"name": "image-reconstruct"},
                       {"name": "text-residual", "site": "text.-1", "edit": {"mode": "residual"},
                        "data": {"images": None, "captions_from": "fairface540/labels.csv"}}]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--no-progress"]) == 0
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["variant"] for s in summary] == ["image-reconstruct", "text-residual"]
    assert summary[1]["site"] == "text.2.resid_post" and summary[1]["mode"] == "residual"
    for s in summary:
        ev = s["eval"]
        assert set(ev["max_skew_gender_before"]) == {"activities", "adjectives", "occupations", "stereotypes"}
        assert [r["alpha"] for r in ev["sweep"]] == [0.0, 1.0]
        # a = 0 is the unmodified model exactly
        assert ev["sweep"][0]["max_skew_gender"] == ev["max_skew_gender_before"]
        assert s["bench"]["headline"] and (out / s["variant"] / "bench" / "bench.json").is_file()
        assert (out / s["variant"] / "export" / "hf" / "manifest.json").is_file()
    report = (out / "report.md").read_text()
    assert "| image-reconstruct | sae | image.2.resid_post | reconstruct |" in report
    assert (out / "sweep.png").stat().st_size > 1000
    assert not (out / "cache").exists()


def test_same_recipe_and_seed_reproduce_byte_identical_artifacts(tmp_path, shared_data):
    """SAE, edit and patch tensors and every manifest hash are identical across two runs of one recipe."""
    path = _recipe(tmp_path, shared_data, data__limit=96, edit__neurons=[1, 2], sae__steps=30, export__onnx=False)
    runs = []
    for name in ("first", "second"):
        assert main(["run", str(path), "--no-progress"]) == 0
        (tmp_path / "out").rename(tmp_path / name)
        out = tmp_path / name
        manifest = json.loads((out / "export" / "hf" / "manifest.json").read_text())
        runs.append({"sae": (out / "sae" / "sae.safetensors").read_bytes(),
                     "edit": (out / "edit" / "edit.safetensors").read_bytes(),
                     "files": {n: e["sha256"] for n, e in manifest["files"].items()}})
    assert runs[0]["sae"] == runs[1]["sae"]
    assert runs[0]["edit"] == runs[1]["edit"]
    assert runs[0]["files"] == runs[1]["files"]


@pytest.mark.parametrize("spec,site", [("tiny-open-clip", "image.-1"), ("tiny-open-clip", "text.-1"),
                                       ("tiny-llava", "image.-2")])
def test_recipe_runs_on_other_families(tmp_path, shared_data, spec, site):
    """The same recipe machinery drives open_clip and LLaVA (vision tower read at layer -2, every token)."""
    path = _recipe(tmp_path, shared_data, data__limit=64, edit__neurons=[1, 2], sae__steps=30)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["spec"], raw["site"] = spec, site
    if site.startswith("text"):
        raw["data"] = {"dir": shared_data, "captions_from": "fairface540/labels.csv", "limit": 64}
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert (out / "export" / "hf" / "manifest.json").is_file()
    assert any((out / "export" / "onnx").glob("*.onnx"))
    run = json.loads((out / "run.json").read_text())
    assert run["site"].startswith(site.split(".")[0] + ".")


def test_probe_on_output_token_activations(tmp_path, shared_data):
    """probe.activations: output encodes the pooled token (what a last-block edit touches), not the token mean."""
    import json

    from debias_export.core.errors import ConfigError
    from debias_export.workflow.recipe import parse_recipe

    path = _recipe(tmp_path, shared_data, probe__activations="output", data__limit=48)
    assert main(["run", str(path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert report["sources"]["activations"] == "output"
    raw = yaml.safe_load(path.read_text())
    raw["probe"]["activations"] = "cls"
    with pytest.raises(ConfigError, match="probe.activations: must be mean or output"):
        parse_recipe(raw)


def test_eval_limit_is_validated_and_limits_faces(tmp_path, shared_data):
    from debias_export.core.errors import ConfigError
    from debias_export.workflow.recipe import parse_recipe

    raw = yaml.safe_load(_recipe(tmp_path, shared_data).read_text())
    raw["eval"] = {"alphas": [0.0], "k": 5, "limit": 1}
    with pytest.raises(ConfigError, match="eval.limit: must be >= 2"):
        parse_recipe(raw)
    raw["eval"]["limit"] = 40
    raw["data"]["limit"] = 48
    raw["export"]["onnx"] = False
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "r.yaml"), "--no-progress"]) == 0
    compare = json.loads((tmp_path / "out" / "eval" / "compare" / "metrics.json").read_text())
    assert compare["base"]["fairface_images"] == 40
    ci = json.loads((tmp_path / "out" / "run.json").read_text())["eval"]["max_skew_gender_change_ci"]
    change = compare["bias_change"]["occupations"]["gender"]
    assert ci["occupations"] == [change["ci_low"], change["ci_high"]] and change["ci_low"] <= change["ci_high"]
    before = compare["base"]["retrieval"]["occupations"]["gender"]["max_skew"]
    after = compare["patched"]["retrieval"]["occupations"]["gender"]["max_skew"]
    assert change["change"] == pytest.approx(after / before - 1)


def test_run_report_names_the_data_used_and_says_when_nothing_was_evaluated(tmp_path, shared_data, monkeypatch):
    """The report names the data directory actually read ($DEBIAS_EXPORT_DATA, not a hard-coded default) and,
    without an eval section, says so instead of printing an empty table and an empty plot."""
    from debias_export.workflow.recipe import parse_recipe
    from debias_export.workflow.report import write_run_report
    from debias_export.workflow.steps import data_base

    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
    raw.pop("eval")
    recipe = parse_recipe(raw)
    monkeypatch.setenv("DEBIAS_EXPORT_DATA", shared_data)
    assert data_base(recipe) == Path(shared_data).resolve()
    summary = {"variant": "v", "kind": "sae", "site": "image.2.resid_post", "tower": "image", "mode": "reconstruct",
               "alpha": 0.6, "neurons": [1, 2]}
    report = write_run_report(tmp_path, [summary], recipe, str(data_base(recipe))).read_text()
    assert f"data `{Path(shared_data).resolve()}`" in report and "../shared/data" not in report
    assert "No variant has an `eval` section" in report and not (tmp_path / "sweep.png").exists()
    assert yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())["eval"]  # the smoke recipe evaluates
