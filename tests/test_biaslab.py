"""Bias lab: captions from labels only, multi-positive targets, cached reproducible training, CLI."""
import dataclasses
import json

import pytest
import torch

from debias_export import biaslab
from debias_export.biaslab import (BiasLabSettings, caption_index, caption_table, caption_text, consistent,
                                   ensure_trained, sample_captions)


TINY = BiasLabSettings(image_size=32, patch_size=8, layers=1, width=32, heads=2, mlp=64, projection_dim=16, epochs=1,
                       batch_size=32, max_images=64)


def test_captions_from_labels_only(shared_data):
    from debias_export.eval.retrieval import PAIRS_LABELS, load_prompt_sets

    assert caption_text(0, 3, "Female", "Black") == "a photo of a young Black woman"
    assert caption_text(0, 6, "Male", "Indian") == "a photo of an elderly Indian man"
    assert caption_text(4, None, "Male", None) == "man"
    assert caption_text(1, 1, "Female", None) == "a face of a little girl"
    texts, keys = caption_table()
    assert len(texts) == len(set(texts)) == keys.shape[0]
    words = {w.lower() for t in texts for w in t.split()}
    concepts = {c for v in load_prompt_sets(shared_data).values() for _, c in v}
    concepts |= {c for v in PAIRS_LABELS.values() for c in v}
    for concept in concepts:  # no occupation / trait word ever reaches a training caption
        assert not set(concept.lower().replace("-", " ").split()) <= words, concept


def test_multi_positive_targets():
    labels = torch.tensor([[3, 0, 1], [3, 1, 1], [5, 0, 0]])  # (age group, gender, race)
    caps = torch.tensor([[0, 3, 0, 1], [0, -1, 0, -1], [0, -1, 1, 1]])  # young Black woman / woman / Black man
    assert consistent(caps, labels).tolist() == [[True, False, False], [True, False, True], [False, True, False]]
    texts, table = caption_table()
    assert texts[int(caption_index(caps[:1], table))] == "a photo of a young Black woman"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s = BiasLabSettings()
    a, b = sample_captions(labels, s, g1), sample_captions(labels, s, g2)
    assert torch.equal(a, b) and consistent(a, labels).diagonal().all()  # a caption always fits its own image


def test_augment_zooms_out_and_normalises():
    x = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    x[:, :, 4:12, 4:12] = 255
    out = biaslab._augment(x, dataclasses.replace(BiasLabSettings(), zoom_out_max=1.0), torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert out.max() > 1.5  # CLIP-normalised white


def test_training_is_cached_reproducible_and_loadable(shared_data, tmp_path):
    from debias_export.adapters import load_adapter
    from debias_export.adapters.dual_encoder import DualEncoderAdapter

    logs = []
    path = ensure_trained(TINY, shared_data, tmp_path / "cache", progress=False, log=logs.append)
    info = json.loads((path / "biaslab.json").read_text())
    assert info["settings"] == TINY.to_dict() and info["train_images"] == 64
    assert (tmp_path / "cache" / "images").is_dir()
    adapter = load_adapter(str(path))
    assert isinstance(adapter, DualEncoderAdapter) and adapter.num_layers("image") == 1
    # the text tower is the frozen pretrained MiniLM: identical to the package's weights
    from transformers import BertModel

    ref = BertModel.from_pretrained(biaslab.minilm_path())
    assert torch.equal(adapter.model.text_model.pooler.dense.weight, ref.pooler.dense.weight)
    assert torch.equal(adapter.model.text_model.encoder.layer[3].output.dense.weight, ref.encoder.layer[3].output.dense.weight)
    logs.clear()
    again = ensure_trained(TINY, shared_data, tmp_path / "cache", progress=False, log=logs.append)
    assert again == path and any("reusing" in m for m in logs)
    # a fresh training with the same settings reproduces the weights exactly
    other = ensure_trained(TINY, shared_data, tmp_path / "cache2", progress=False, log=logs.append)
    a = load_adapter(str(other)).model.visual_projection.weight
    assert torch.equal(a, adapter.model.visual_projection.weight)
    assert ensure_trained(dataclasses.replace(TINY, seed=1), shared_data, tmp_path / "cache", progress=False,
                          log=logs.append) != path


def test_cli_bias_lab_smoke(shared_data, tmp_path, monkeypatch):
    from debias_export.cli.main import main

    monkeypatch.setenv("DEBIAS_EXPORT_CACHE", str(tmp_path / "c"))
    out = tmp_path / "lab"
    args = ["bias-lab", "--out", str(out), "--data", shared_data, "--max-images", "48", "--epochs", "1",
            "--shuffles", "2", "--no-progress"]
    assert main(args) == 0
    info = json.loads((out / "biaslab.json").read_text())
    ev = info["evaluation"]
    assert ev["max_skew_gender/occupations"]["prompts"] == 287 and 0 <= ev["utility"]["gender_zero_shot_acc"] <= 1
    assert (out / "report" / "report.md").is_file() and (out / "config.json").is_file()
    assert main(args) == 2  # refuses to overwrite
    assert main(args[:-3] + ["--epochs", "0", "--overwrite"]) == 2
