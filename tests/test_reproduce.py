"""``debias-export reproduce``: re-run the recipe an export records and compare every artifact hash."""
import json
from pathlib import Path

import yaml

from debias_export.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, shared_data):
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
    raw.pop("variants", None)
    raw["data"].update(dir=shared_data, limit=96)
    raw["sae"]["steps"] = 30
    raw["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_reproduce_confirms_a_recipe_and_reports_differences(tmp_path, shared_data, capsys):
    path = _recipe(tmp_path, shared_data)
    assert main(["run", str(path), "--no-progress"]) == 0
    export = tmp_path / "out" / "export"
    prov = json.loads((export / "manifest.json").read_text())["provenance"]
    assert prov["recipe_text"] == path.read_text() and prov["recipe"] == str(path)
    path.unlink()  # the manifest carries the recipe: the file is not needed any more
    capsys.readouterr()
    assert main(["reproduce", str(export)]) == 0
    out = capsys.readouterr().out
    assert "identical" in out, out[-1500:]

    # the same export claiming another seed: its artifacts do not come out of that recipe
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["provenance"]["recipe_text"] = manifest["provenance"]["recipe_text"].replace("seed: 0", "seed: 1")
    (export / "manifest.json").write_text(json.dumps(manifest))
    assert main(["reproduce", str(export)]) == 1
    cap = capsys.readouterr()
    assert "differs: hf/debias_patches.safetensors" in cap.out and "error: not reproduced" in cap.err


def test_reproduce_bad_inputs(tmp_path, capsys):
    assert main(["export", "--model", "tiny-clip", "--out", str(tmp_path / "b"), "--no-onnx"]) == 0
    capsys.readouterr()
    assert main(["reproduce", str(tmp_path / "b")]) == 2
    assert "records no recipe" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["reproduce", str(tmp_path / "plain")]) == 2
