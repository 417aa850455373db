"""Family "llava": LLaVA-1.5 / LLaVA-NeXT with tiny random configs; VLAGenderBias mechanics."""
import warnings

import pytest
import torch

from debias_export import DebiasError, SAEEdit, apply_edits
from debias_export.adapters import adapter_for
from debias_export.adapters.llava import LlavaAdapter, tiny_llava
from debias_export.edits import reference_hook
from debias_export.eval import llava_bias as vb
from debias_export.workflow.testing import random_sae

IMAGE_TOKEN = 159
N_IMAGE_TOKENS = 16  # (32 / 8)^2 patches, CLS dropped


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def pixels():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def prompt_ids():
    return torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * N_IMAGE_TOKENS + [7, 8, 9]])


def test_consumed_layer_is_hidden_states_minus_two(llava, pixels):
    assert llava.towers() == ("image",) and adapter_for(llava.model).family == "llava"
    assert llava.consumed_layer("image") == 1  # L = 3 blocks; hidden_states[-2] = output of block L-2
    assert llava.resolve_site("image.-2").layer == 1
    assert llava.output_positions("image") is None
    seen = {}
    blocks = llava.blocks("image")
    hooks = [blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i in range(3)]
    with torch.no_grad():
        hidden = llava.model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    assert len(hidden) == 4 and torch.equal(hidden[-2], seen[1]) and torch.equal(hidden[-1], seen[2])


@pytest.mark.parametrize("layer,expected", [(-1, 2), (0, -1), ([-3, -2], 1), (2, 1)])
def test_feature_layer_mapping(layer, expected):
    adapter = tiny_llava(vision_feature_layer=layer)
    if expected < 0:
        with pytest.raises(DebiasError, match="embedding output"):
            adapter.consumed_layer("image")
    else:
        assert adapter.consumed_layer("image") == expected


@pytest.mark.parametrize("site", ["image.-2", "image.0", "image.-2.attn_out", "image.-2.mlp_out"])
def test_compiled_matches_reference(llava, pixels, site):
    edit = SAEEdit(site=site, sae=random_sae(32, 128), neurons=[1, 2, 3], value=-0.3, alpha=0.8)
    with torch.no_grad():
        base = llava.embed("image", pixels)
        hook = reference_hook(llava, edit)
        ref = llava.embed("image", pixels)
        hook.remove()
        patch = apply_edits(llava, edit)
        out = llava.embed("image", pixels)
        assert patch.records[0]["positions"] is None  # every patch token reaches the LM
        patch.remove()
        assert torch.equal(llava.embed("image", pixels), base)
    assert base.shape == (2, N_IMAGE_TOKENS, 48)
    assert (out - ref).abs().max() < 1e-5  # fused (float64-folded) vs literal formula: rounding only
    assert (out - base).abs().max() > 1e-3


def test_last_block_edit_warns_and_changes_nothing(llava, pixels):
    with torch.no_grad():
        base = llava.embed("image", pixels)
        with pytest.warns(UserWarning, match="lies after the layer the model consumes"):
            patch = apply_edits(llava, SAEEdit(site="image.-1", sae=random_sae(32, 128), neurons=[1, 2]))
        out = llava.embed("image", pixels)
        patch.remove()
    assert torch.equal(out, base)


def test_generation_through_patched_model(llava, pixels):
    ids, px = prompt_ids(), pixels["pixel_values"][:1]
    edit = SAEEdit(site="image.-2", sae=random_sae(32, 128), neurons=[1, 2, 3], value=-0.3)
    with torch.no_grad():
        base = llava.model(input_ids=ids, pixel_values=px).logits
        hook = reference_hook(llava, edit)
        ref = llava.model(input_ids=ids, pixel_values=px).logits
        hook.remove()
        patch = apply_edits(llava, edit)
        out = llava.model(input_ids=ids, pixel_values=px).logits
        gen = llava.model.generate(input_ids=ids, pixel_values=px, max_new_tokens=4, do_sample=False)
        patch.remove()
    assert (out - ref).abs().max() < 1e-5 and (out - base).abs().max() > 1e-5
    assert gen.shape == (1, ids.shape[1] + 4) and torch.equal(gen[:, :ids.shape[1]], ids)


def test_run_tower_runs_vision_only(llava, pixels):
    calls = []
    h1 = llava.model.model.language_model.register_forward_hook(lambda *a: calls.append("lm"))
    h2 = llava.blocks("image")[2].register_forward_hook(lambda *a: calls.append("last_block"))
    with torch.no_grad():
        llava.run_tower("image", pixels)
    h1.remove(), h2.remove()
    assert calls == ["last_block"]
    with pytest.raises(DebiasError, match="only the image tower"):
        llava.prepare_texts(["hello"])


def test_llava_next_style():
    adapter = tiny_llava(seed=1, next_style=True)
    assert type(adapter.model).__name__ == "LlavaNextForConditionalGeneration"
    g = torch.Generator().manual_seed(2)
    x = {"pixel_values": torch.randn(2, 2, 3, 32, 32, generator=g), "image_sizes": torch.tensor([[32, 32], [30, 32]])}
    edit = SAEEdit(site="image.-2", sae=random_sae(32, 128), neurons=[1, 2, 3], value=-0.3)
    with torch.no_grad():
        base = adapter.embed("image", x)
        hook = reference_hook(adapter, edit)
        ref = adapter.embed("image", x)
        hook.remove()
        patch = apply_edits(adapter, edit)
        out = adapter.embed("image", x)
        feats = adapter.model.get_image_features(pixel_values=x["pixel_values"][:1], image_sizes=x["image_sizes"][:1])
        n = getattr(feats, "pooler_output", feats)[0].shape[0]  # transformers 5 returns an output object
        ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * n + [7]])
        gen = adapter.model.generate(input_ids=ids, pixel_values=x["pixel_values"][:1], image_sizes=x["image_sizes"][:1],
                                     max_new_tokens=2, do_sample=False)
        patch.remove()
    assert base.dim() == 2 and base.shape[1] == 48  # packed anyres features of both images, concatenated
    assert (out - ref).abs().max() < 1e-6 and (out - base).abs().max() > 1e-3
    assert gen.shape[1] == ids.shape[1] + 2


def test_export_safetensors_generation_and_onnx(tmp_path, pixels):
    from transformers import AutoModelForImageTextToText

    from debias_export.export import export_bundle, load_patched

    adapter = tiny_llava(seed=3)
    apply_edits(adapter, SAEEdit(site="image.-2", sae=random_sae(32, 128), neurons=[1, 2, 3], value=-0.3))
    ids, px = prompt_ids(), pixels["pixel_values"][:1]
    with torch.no_grad():
        logits = adapter.model(input_ids=ids, pixel_values=px).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_bundle(adapter, tmp_path / "b")
        remote = AutoModelForImageTextToText.from_pretrained(tmp_path / "b" / "hf", trust_remote_code=True)
    val = report["onnx"]["graphs"]["vision_features"]["validation"]
    assert val["max_abs_diff"]["image_features"] < 1e-4 and val["edit_effect"] > 1e-3
    assert val["shapes"][0][0] != 2  # validated on batch sizes other than the traced one
    assert report["onnx"]["graphs"]["vision_features"]["exporter"] == "dynamo"  # the default exporter
    reloaded = load_patched(tmp_path / "b")
    assert isinstance(reloaded, LlavaAdapter)
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids, pixel_values=px).logits, logits)
        assert torch.equal(remote(input_ids=ids, pixel_values=px).logits, logits)
        gen = reloaded.model.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3


# ----- VLAGenderBias -------------------------------------------------------------------------------
WORDS = ["[PAD]", "<s>", "</s>", "[UNK]", "USER:", "ASSISTANT:", "A.", "B.", "A", "B", "Yes", "No", "Answer", "with",
         "the", "option's", "letter", "from", "given", "choices", "directly.", "Is", "this", "person", "a", "an",
         "kind", "doctor", "?", "Does", "like", "painting", "kind?", "doctor?", "painting?"]


@pytest.fixture(scope="module")
def processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


QUESTIONS = [vb.Question("Is this person kind?", "trait", "kind"), vb.Question("Is this person a doctor?", "occupation", "doctor"),
             vb.Question("Does this person like painting?", "activity", "painting")]


def random_images(n, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 255, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)]


def test_yes_probabilities_batch_invariant_and_patch_sensitive(processor):
    adapter = tiny_llava(seed=0, image_token_index=len(processor.tokenizer) - 1, vocab_size=len(processor.tokenizer))
    images = random_images(4)
    p4 = vb.yes_probabilities(adapter, processor, images, QUESTIONS, batch_size=5)
    p1 = vb.yes_probabilities(adapter.model, processor, images, QUESTIONS, batch_size=1)
    assert p4.shape == (4, 3) and ((p4 > 0) & (p4 < 1)).all()
    assert (p4 - p1).abs().max() < 1e-6  # right padding + last-real-token read: batching changes nothing
    patch = apply_edits(adapter, SAEEdit(site="image.-2", sae=random_sae(32, 128), neurons=list(range(40)), value=2.0, alpha=1.0))
    patched = vb.yes_probabilities(adapter, processor, images, QUESTIONS, batch_size=5)
    patch.remove()
    assert (patched - p4).abs().max() > 1e-6  # the image features reach the answer
    report = vb.gender_bias_report(p4, ["female", "female", "male", "male"], QUESTIONS)
    assert report["n_female"] == 2 and len(report["questions"]) == 3 and 0 <= report["disproportion_rate"] <= 1


def test_mann_whitney_and_corrections():
    # hand-checkable: complete separation of 5 vs 5 -> U = 25 (x larger), z = (25 - 12.5 - 0.5) / sqrt(22.9167)
    u, p = vb.mann_whitney_u([6, 7, 8, 9, 10], [1, 2, 3, 4, 5])
    assert u == 25.0 and abs(p - 0.012185) < 1e-5
    assert vb.mann_whitney_u([1, 1, 1], [1, 1])[1] == 1.0  # all tied
    assert vb.adjust_pvalues([0.01, 0.04, 0.03, 0.2, 0.001]) == pytest.approx([0.025, 0.05, 0.05, 0.2, 0.005])
    assert vb.adjust_pvalues([0.01, 0.3], "bonferroni") == pytest.approx([0.02, 0.6])
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(30, generator=g) * 10).round().tolist(), (torch.rand(25, generator=g) * 10 + 1).round().tolist()
    want = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
    got = vb.mann_whitney_u(x, y)
    assert got[0] == pytest.approx(want.statistic) and got[1] == pytest.approx(want.pvalue, rel=1e-9)


def test_bias_report_detects_a_planted_gap():
    g = torch.Generator().manual_seed(0)
    genders = ["female"] * 20 + ["male"] * 20
    p = torch.rand(40, 4, generator=g) * 0.2 + 0.4
    p[:20, 0] += 0.3  # question 0: women get "yes" far more often
    report = vb.gender_bias_report(p, genders, [vb.Question(f"q{i}", "trait", f"c{i}") for i in range(4)])
    sig = [q["significant"] for q in report["questions"]]
    assert sig == [True, False, False, False] and report["disproportion_rate"] == 0.25
    assert report["n_significant_female_higher"] == 1
    assert report["mean_abs_dev"] == pytest.approx(float((p - 0.5).abs().mean()))
    with pytest.raises(DebiasError, match="does not match"):
        vb.gender_bias_report(p[:, :2], genders, [vb.Question("q", "t", "c")])
    with pytest.raises(DebiasError, match="unknown gender labels"):
        vb.gender_bias_report(p, ["x"] * 40, [vb.Question(f"q{i}", "t", "c") for i in range(4)])


def test_questions_and_faces_from_shared_data(shared_data, processor):
    questions = vb.questions_from_prompts(shared_data)
    assert {q.category for q in questions} == {"trait", "occupation", "activity"}
    assert any(q.text == "Is this person a doctor?" for q in questions)
    paths, genders = vb.load_labelled_faces(shared_data, "fairface540", per_gender=2)
    assert genders == ["female", "female", "male", "male"] and all(p.is_file() for p in paths)
    adapter = tiny_llava(seed=0, image_token_index=len(processor.tokenizer) - 1, vocab_size=len(processor.tokenizer))
    report = vb.evaluate_gender_bias(adapter, processor, paths, genders, QUESTIONS, batch_size=6)
    assert report["n_female"] == 2 and report["n_male"] == 2 and report["n_questions"] == 3


# ----- the metric through the CLI and recipes ---------------------------------------------------------
def test_tiny_llava_processor_fits_the_model():
    adapter = tiny_llava(seed=0)
    tok = adapter.processor.tokenizer
    assert len(tok) == adapter.model.config.text_config.vocab_size
    assert tok.convert_tokens_to_ids("<image>") == adapter.model.config.image_token_index
    assert len(vb.option_token_ids(tok)) == 2
    assert tok.encode("Is this person a nurse?", add_special_tokens=False).count(tok.unk_token_id) == 0
    assert tiny_llava(seed=0, vocab_size=40, image_token_index=39).processor is None  # does not fit: none attached


def test_eval_cli_before_after_sweep_and_errors(tmp_path, shared_data, capsys):
    import json

    from debias_export.cli.main import main

    SAEEdit(site="image.-2", sae=random_sae(32, 128), neurons=list(range(40)), value=2.0, alpha=1.0).save(tmp_path / "edit")
    common = ["--model", "tiny-llava", "--data", shared_data, "--limit", "4", "--prompt-sets", "adjectives"]
    assert main(["eval", *common, "--edit", str(tmp_path / "edit"), "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    assert res["metric"] == "vla_gender_bias" and res["base"]["n_questions"] == 29  # adjectives.csv concepts
    assert res["base"]["n_female"] == res["base"]["n_male"] == 2
    assert res["fidelity"]["mean_abs_delta_p_yes"] > 1e-4  # the edit reaches the answers
    assert "Before / after the patch (LLaVA gender bias)" in (tmp_path / "cmp" / "report.md").read_text()
    assert main(["eval", *common, "--edit", str(tmp_path / "edit"), "--alphas", "0,1", "--out", str(tmp_path / "sw")]) == 0
    rows = json.loads((tmp_path / "sw" / "metrics.json").read_text())
    assert [r["alpha"] for r in rows] == [0.0, 1.0] and rows[0]["fidelity"]["max_abs_delta_p_yes"] < 1e-5
    assert rows[1]["mean_abs_dev"] == pytest.approx(res["patched"]["mean_abs_dev"], abs=1e-6)
    assert (tmp_path / "sw" / "tradeoff.png").is_file()
    capsys.readouterr()
    assert main(["eval", *common, "-k", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "--k do(es) not apply to the llava family" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llava", "--data", shared_data, "--prompt-sets", "stereotypes",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "do not apply to the LLaVA metric" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-clip", "--data", shared_data, "--faces", "utkface", "--out", str(tmp_path / "bad")]) == 2
    assert "--faces do(es) not apply to the hf_clip family" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_recipe_eval_on_tiny_llava_carries_the_metric(tmp_path, shared_data):
    import json
    import math

    import yaml

    from debias_export.cli.main import main

    recipe = {"name": "tiny-llava-eval", "seed": 0, "model": {"spec": "tiny-llava"}, "site": "image.-2",
              "data": {"dir": shared_data, "images": "fairface540/labels.csv", "limit": 8},
              "sae": {"k": 4, "expansion": 4, "batch_size": 64, "steps": 10},
              "edit": {"alpha": 1.0, "value": 2.0, "neurons": list(range(40))}, "export": {"onnx": False},
              "eval": {"alphas": [0.0, 1.0], "k": 5, "limit": 6}, "output": {"dir": str(tmp_path / "out")},
              "variants": [{"name": "strong"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml"), "--no-progress"]) == 0
    ev = json.loads((tmp_path / "out" / "strong" / "run.json").read_text())["eval"]
    assert ev["metric"] == "vla_gender_bias" and ev["data"]["faces"] == 6  # eval.limit, not data.limit
    for when in ("before", "after"):
        nums = ev[f"vla_gender_bias_{when}"]
        assert 0.0 <= nums["disproportion_rate"] <= 1.0
        assert all(math.isfinite(nums[k]) for k in ("disproportion_rate", "mean_abs_dev", "mean_abs_gap"))
    assert ev["vla_gender_bias_before"]["mean_abs_dev"] != ev["vla_gender_bias_after"]["mean_abs_dev"]
    assert [r["alpha"] for r in ev["sweep"]] == [0.0, 1.0]
    assert ev["sweep"][1]["mean_abs_dev"] == pytest.approx(ev["vla_gender_bias_after"]["mean_abs_dev"], abs=1e-6)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## LLaVA gender bias" in report and "| strong | image.1.resid_post | 1.0 |" in report
    assert (tmp_path / "out" / "strong" / "eval" / "compare" / "report.md").is_file()
