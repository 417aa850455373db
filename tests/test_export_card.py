"""Model cards: valid Hugging Face metadata (parsed offline by huggingface_hub), lineage, results, integrity."""
import json

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from debias_export import SAEEdit, apply_edits
from debias_export.core.errors import ConfigError
from debias_export.export import export_bundle, update_card, verify_manifest
from debias_export.export.card import base_relation
from debias_export.export.manifest import sha256_file
from debias_export.workflow.testing import random_sae, tiny_clip

SKEW = {"task_type": "zero-shot-image-classification", "dataset_type": "fairface", "dataset_name": "FairFace 540",
        "metric_type": "max_skew", "metric_name": "gender MaxSkew@10", "metric_value": 0.12}


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    adapter = tiny_clip(seed=0)
    apply_edits(adapter, SAEEdit(site="image.-1", sae=random_sae(32, 96, seed=1), neurons=[2, 9], alpha=0.8, value=0.5))
    out = tmp_path_factory.mktemp("card") / "b"
    export_bundle(adapter, out, towers=["image"], precisions=["fp32", "int8"], exporter="torchscript",
                  provenance={"model": "openai/clip-vit-base-patch16", "recipe": "r.yaml", "seed": 3},
                  card_results=[SKEW])
    return out


def test_card_metadata_parses_with_huggingface_hub(edited):
    card = ModelCard.load(edited / "README.md")
    assert card.data.base_model == "openai/clip-vit-base-patch16"
    assert card.data.base_model_relation == "finetune" and card.data.library_name == "transformers"
    assert {"debias-export", "onnx", "sae-edit"} <= set(card.data.tags)
    meta = metadata_load(edited / "README.md")
    name, results = model_index_to_eval_results(meta["model-index"])
    by = {r.metric_name: r for r in results}
    assert by["gender MaxSkew@10"].metric_value == 0.12 and by["gender MaxSkew@10"].dataset_type == "fairface"
    assert 0.95 <= by["vision_model_quantized.onnx embedding cosine vs fp32 (min)"].metric_value <= 1.0
    assert by["vision_model_quantized.onnx edit effect cosine vs fp32 (min)"].metric_value >= 0.99
    assert by["vision_model.onnx vs PyTorch max |diff|"].metric_value < 1e-3


def test_card_body_describes_edit_loading_and_integrity(edited):
    text = (edited / "README.md").read_text()
    assert "2 neuron(s) [2, 9] set to v = 0.5 with strength a = 0.8, mode reconstruct" in text
    assert "SAE threshold with 96 latents" in text and "recipe: `r.yaml`" in text
    assert text.count("from_pretrained") >= 2 and "InferenceSession" in text and "## Limitations" in text
    for part in ("hf", "onnx"):  # the nested manifests (which cover every weight / graph file) are pinned by hash
        assert sha256_file(edited / part / "manifest.json") in text
    assert "README.md" in json.loads((edited / "manifest.json").read_text())["files"]


def test_update_card_adds_results_and_keeps_the_bundle_valid(edited, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(edited, b)
    before = json.loads((b / "manifest.json").read_text())
    update_card(b, [SKEW, {**SKEW, "metric_name": "race MaxSkew@10", "metric_value": 0.3}])
    verify_manifest(b)
    after = json.loads((b / "manifest.json").read_text())
    assert after["provenance"] == before["provenance"] and after["edited"] is True
    _, results = model_index_to_eval_results(metadata_load(b / "README.md")["model-index"])
    assert {"gender MaxSkew@10", "race MaxSkew@10"} <= {r.metric_name for r in results}
    with pytest.raises(ConfigError, match="lacks metric_value"):
        update_card(b, [{k: v for k, v in SKEW.items() if k != "metric_value"}])


def test_baseline_cards_and_relation_rules(tmp_path):
    assert base_relation(True, ["fp32", "int8"]) == "finetune"
    assert base_relation(False, ["fp32", "int8"]) == "quantized"
    assert base_relation(False, ["fp32", "fp16"]) is None  # a format conversion: the Hub has no relation for it
    export_bundle(tiny_clip(seed=0), tmp_path / "base", onnx=False)
    card = ModelCard.load(tmp_path / "base" / "README.md")
    assert card.data.base_model is None  # "tiny-clip" is not a Hub id
    assert card.data.get("base_model_relation") is None and "unmodified baseline" in card.text
    assert "sae-edit" not in card.data.tags
