"""`debias-export run` on the offline tiny recipe: every artifact produced, loadable, atomic on failure."""
import json
from pathlib import Path

import torch
import yaml

from debias_export.cli.main import main
from debias_export.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, shared_data, **edits):
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
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
    for rel in ("capture/capture.json", "sae/sae.safetensors", "sae/cfg.json", "probe.json", "edit/edit_config.json",
                "export/hf/manifest.json", "export/onnx", "run.json", "validate.json"):
        assert (out / rel).exists(), rel
    assert not (tmp_path / "out.partial").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["neurons"] and run["site"] == "image.2.resid_post"
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
    # fp32 onnxruntime vs PyTorch differ by ~1e-6, so a zero tolerance forces the validation failure
    path = _recipe(tmp_path, shared_data, export__atol=0.0, data__limit=64, edit__neurons=[1, 2], sae__steps=20)
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "out").exists()
