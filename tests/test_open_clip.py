"""Family "open_clip": open_clip CLIP / CustomTextCLIP, tiny random weights, no downloads."""
import warnings

import pytest
import torch

from debias_export import DebiasError, SAEEdit, apply_edits
from debias_export.adapters import adapter_for
from debias_export.adapters.open_clip_family import OpenCLIPAdapter, save_base, tiny_open_clip
from debias_export.edits import reference_hook
from debias_export.workflow.testing import random_sae

TEXTS = ["a photo of a nurse", "an engineer", "a long caption about a doctor at work today"]


@pytest.fixture(scope="module")
def oc():
    return tiny_open_clip(seed=0)


def inputs_for(adapter, tower):
    if tower == "image":
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    return adapter.prepare_texts(TEXTS)


def check_compiled_matches_reference(adapter, edit, tower):
    inp = inputs_for(adapter, tower)
    with torch.no_grad():
        base = adapter.embed(tower, inp)
        hook = reference_hook(adapter, edit)
        ref = adapter.embed(tower, inp)
        hook.remove()
        patch = apply_edits(adapter, edit)
        records = list(patch.records)
        out = adapter.embed(tower, inp)
        patch.remove()
        restored = adapter.embed(tower, inp)
    assert (out - ref).abs().max() < 1e-5
    assert (out - base).abs().max() > 1e-3
    assert torch.equal(restored, base)
    return records


def test_structure(oc):
    assert oc.family == "open_clip" and adapter_for(oc.model).family == "open_clip"
    assert oc.towers() == ("image", "text")
    assert oc.num_layers("image") == 3 and oc.width("image") == 32 and oc.width("text") == 32
    assert oc.site_module_path("image.1.attn_out") == "visual.transformer.resblocks.1.attn"
    assert oc.site_module_path("text.-1.mlp_out") == "transformer.resblocks.2.mlp.c_proj"
    assert oc.output_positions("image").static_index == 0
    pos = oc.output_positions("text")
    assert pos.rule["rule"] == "ids_argmax" and pos.hook_path == "token_embedding"
    assert oc.model.transformer.batch_first and oc.model.visual.transformer.batch_first


def test_inputs_and_embed_semantics(oc):
    from PIL import Image

    txt = oc.prepare_texts(TEXTS)
    assert txt["input_ids"].shape == (3, oc.model.context_length)
    eot = oc.output_token_index("text", txt)
    assert torch.equal(eot, txt["attention_mask"].sum(1) - 1)  # mask covers tokens up to the pooled EOT
    img = oc.prepare_images([Image.new("RGB", (50, 40), (200, 10, 10))])
    assert img["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(oc.embed("text", txt), oc.model.encode_text(txt["input_ids"]))  # not normalised


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("kind", ["resid_post", "attn_out", "mlp_out"])
@pytest.mark.parametrize("layer", [0, -1])
def test_compiled_matches_reference(oc, tower, kind, layer):
    edit = SAEEdit(site=f"{tower}.{layer}.{kind}", sae=random_sae(32, 128), neurons=[1, 5, 9], value=-0.2,
                   mode="residual" if kind == "attn_out" else "reconstruct")
    records = check_compiled_matches_reference(oc, edit, tower)
    pruned = kind == "resid_post" and layer == -1
    assert (records[0]["positions"] is not None) == pruned


@pytest.mark.parametrize("tower", ["image", "text"])
def test_pruned_equals_all_tokens(oc, tower):
    inp = inputs_for(oc, tower)
    kw = dict(site=f"{tower}.-1", sae=random_sae(32, 128, activation="topk"), neurons=[2, 3], alpha=0.7)
    with torch.no_grad():
        p = apply_edits(oc, SAEEdit(prune=True, **kw))
        pruned = oc.embed(tower, inp)
        p.remove()
        p = apply_edits(oc, SAEEdit(prune=False, **kw))
        full = oc.embed(tower, inp)
        p.remove()
    assert torch.allclose(pruned, full, atol=1e-6)


@pytest.mark.parametrize("variant,image_pos,text_rule", [
    ({"vision_cfg": {"pool_type": "avg"}}, None, "ids_argmax"),
    ({"vision_cfg": {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 4}}, None, "ids_argmax"),
    ({"text_cfg": {"pool_type": "eos", "eos_id": 49407}}, 0, "eos_first"),
    ({"custom_text": True}, 0, "ids_argmax"),
])
def test_pooling_variants(variant, image_pos, text_rule):
    adapter = tiny_open_clip(seed=1, **variant)
    pos = adapter.output_positions("image")
    assert (pos.static_index if pos else None) == image_pos
    assert adapter.output_positions("text").rule["rule"] == text_rule
    for tower in ("image", "text"):
        check_compiled_matches_reference(adapter, SAEEdit(site=f"{tower}.-1", sae=random_sae(32, 64), neurons=[4]), tower)


def test_custom_text_paths_and_last_pooling():
    adapter = tiny_open_clip(seed=2, custom_text=True)
    assert adapter.blocks_path("text") == "text.transformer.resblocks"
    assert adapter.output_positions("text").hook_path == "text.token_embedding"
    last = tiny_open_clip(seed=2, custom_text=True, text_cfg={"pool_type": "last"})
    assert last.output_positions("text") is None  # runtime has no static -1: every token is edited
    check_compiled_matches_reference(last, SAEEdit(site="text.-1", sae=random_sae(32, 64), neurons=[4]), "text")


def test_seq_first_stack_disables_pruning(oc, monkeypatch):
    monkeypatch.setattr(oc.model.visual.transformer, "batch_first", False)
    assert oc.output_positions("image") is None


def test_load_errors_are_one_line():
    with pytest.raises(DebiasError, match="unknown open_clip model 'NoSuchNet'"):
        OpenCLIPAdapter.load("open_clip:NoSuchNet")
    with pytest.raises(DebiasError, match="needs weights"):
        OpenCLIPAdapter.load("open_clip:ViT-B-32")  # refuses a silent random init
    with pytest.raises(DebiasError, match="no tower 'audio'"):
        tiny_open_clip().resolve_site("audio.1")


def test_local_dir_round_trip(tmp_path, oc):
    import open_clip

    save_base(oc, tmp_path)
    loaded = OpenCLIPAdapter.load(str(tmp_path))
    stock = open_clip.create_model(f"local-dir:{tmp_path}").eval()  # eval like the adapter: the same code path
    txt = oc.prepare_texts(TEXTS)
    with torch.no_grad():
        want = oc.embed("text", txt)
        assert torch.equal(loaded.embed("text", txt), want)
        assert torch.equal(stock.encode_text(txt["input_ids"]), want)


def test_export_bundle_safetensors_and_onnx(tmp_path):
    import open_clip

    from debias_export.export import export_bundle, load_patched, validate_bundle

    adapter = tiny_open_clip(seed=3)
    inp = {t: inputs_for(adapter, t) for t in ("image", "text")}
    with torch.no_grad():
        base = {t: adapter.embed(t, inp[t]) for t in inp}
    edits = [SAEEdit(site="image.-1", sae=random_sae(32, 128), neurons=[1, 2]),
             SAEEdit(site="text.0", sae=random_sae(32, 128, seed=3), neurons=[4]),
             SAEEdit(site="text.-1", sae=random_sae(32, 128, seed=4), neurons=[7])]
    apply_edits(adapter, edits)
    with torch.no_grad():
        patched = {t: adapter.embed(t, inp[t]) for t in inp}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_bundle(adapter, tmp_path / "b")
    for name in ("image_encoder", "text_encoder"):
        graph = report["onnx"]["graphs"][name]
        assert graph["validation"]["edit_effect"] > 1e-3  # the graph carries an edit that matters
        assert graph["exporter"] == "dynamo" and graph["opset"] == 20  # the default exporter
        assert max(graph["validation"]["max_abs_diff"].values()) < 1e-4
    # open_clip alone: base weights; eval mode like the adapter, so it runs the same attention code path (train mode
    # takes nn.MultiheadAttention's slow path, which rounds differently)
    stock = open_clip.create_model(f"local-dir:{tmp_path / 'b' / 'hf'}").eval()
    reloaded = load_patched(tmp_path / "b")
    with pytest.raises(DebiasError, match="load_patched"):  # the stock loader would silently drop the edits
        OpenCLIPAdapter.load(str(tmp_path / "b" / "hf"))
    with torch.no_grad():
        assert torch.equal(stock.encode_image(inp["image"]["pixel_values"]), base["image"])
        assert torch.equal(stock.encode_text(inp["text"]["input_ids"]), base["text"])
        for t in inp:
            assert torch.equal(reloaded.embed(t, inp[t]), patched[t])
    assert set(validate_bundle(tmp_path / "b")["onnx"]) == {"image_encoder", "text_encoder"}
