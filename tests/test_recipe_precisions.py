"""Recipe key ``export.precisions``: one recipe exports fp32 + fp16 + int8 ONNX variants, each validated on the
edit, and its bench step times them; bad values fail at load with the key named."""
import json
from pathlib import Path

import pytest
import yaml

from debias_export.cli.main import main
from debias_export.core.errors import ConfigError
from debias_export.export.quantize import PRECISIONS
from debias_export.workflow.recipe import EXPORT_PRECISIONS, load_recipe
from debias_export.workflow.testing import random_sae

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, shared_data, export=None, bench=None):
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
    raw.pop("variants", None)
    raw.pop("eval", None)
    raw["data"].update({"dir": shared_data, "limit": 64})
    raw["sae"]["steps"] = 20
    # The SAE is given (sae.path), the one tests/test_export_variants.py shows to survive int8 on this tower. SAEs
    # trained here for 20 steps do not (the export refuses them, as it should: effect cosine ~0.76 with a quarter
    # of the latents zeroed in residual mode, fidelity 0.92 in reconstruct mode; a patched LEACE eraser 0.97).
    random_sae(32, 96, seed=1).save(tmp_path / "sae")
    raw["sae"]["path"] = str(tmp_path / "sae")
    raw["edit"].update({"neurons": [2, 9], "alpha": 0.8, "mode": "reconstruct"})
    raw["output"]["dir"] = str(tmp_path / "out")
    raw["export"].update(export or {})
    if bench is not None:
        raw["bench"] = bench
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_recipe_precisions_list_matches_the_exporter():
    assert EXPORT_PRECISIONS == PRECISIONS  # recipe.py keeps its own copy so that loading a recipe needs no onnx


@pytest.mark.parametrize("value,words", [(["fp64"], "fp64"), (["fp32", "fp32"], "distinct"), ([], "distinct"),
                                         ("fp16", "list")])
def test_bad_precisions_are_refused_naming_the_key(tmp_path, value, words):
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
    raw["export"]["precisions"] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="export.precisions") as err:
        load_recipe(path)
    assert words in str(err.value)


def test_precisions_need_onnx(tmp_path):
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-clip-fairface.yaml").read_text())
    raw["export"].update({"onnx": False, "precisions": ["fp32", "int8"]})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="export.onnx: true"):
        load_recipe(path)


def test_one_recipe_exports_every_precision_validated_and_benchmarked(tmp_path, shared_data):
    path = _recipe(tmp_path, shared_data, export={"precisions": ["fp32", "fp16", "int8"]},
                   bench={"batch_sizes": [1], "reps": 2, "runtimes": ["ort"]})
    assert main(["run", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    names = {p.name for p in (out / "export" / "onnx").iterdir()}
    assert {"vision_model.onnx", "vision_model_fp16.onnx", "vision_model_quantized.onnx"} <= names
    assert (out / "export" / "config.json").is_file() and (out / "export" / "preprocessor_config.json").is_file()
    variants = json.loads((out / "validate.json").read_text())["onnx"]["graphs"]["vision_model"]["variants"]
    assert set(variants) == {"fp16", "int8"}
    for v in variants.values():
        assert v["edit_inputs"] > 0 and v["edit_cosine_min"] >= 0.99  # validated on the edit (else the export fails)
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert bench["settings"]["dtypes"] == ["fp32", "fp16", "int8"]
    timed = {(r["runtime"], r["dtype"]) for r in bench["latency"] if "ratio" in r}  # patched / unmodified ratios
    assert timed == {("ort", "fp32"), ("ort", "int8")}
    assert {(s["runtime"], s["dtype"]) for s in bench["skipped"]} == {("ort", "fp16")}  # CPU: few fp16 kernels
