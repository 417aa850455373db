"""Family "hf_dual_encoder": VisionTextDualEncoderModel (CLIP vision + BERT text), tiny random weights."""
import pytest
import torch

from debias_export import DebiasError, SAEEdit, apply_edits
from debias_export.adapters import adapter_for, load_adapter
from debias_export.adapters.dual_encoder import DualEncoderAdapter
from debias_export.adapters.transformers_compat import pooled
from debias_export.edits import reference_hook
from debias_export.workflow.testing import random_sae

W = 32
TEXTS = ["a photo of a nurse", "an engineer", "a long caption about a doctor at work today in the city"]


def tiny_dual_config():
    from debias_export.adapters.dual_encoder import tiny_dual_encoder_config

    return tiny_dual_encoder_config(width=W)


@pytest.fixture(scope="module")
def dual():
    return DualEncoderAdapter.from_config(tiny_dual_config(), seed=0)


@pytest.fixture(scope="module")
def dual_inputs(dual):
    g = torch.Generator().manual_seed(1)
    return {"image": {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}, "text": dual.prepare_texts(TEXTS)}


def test_structure_and_positions(dual, dual_inputs):
    assert dual.towers() == ("image", "text")
    assert dual.num_layers("text") == 3 and dual.width("text") == W
    assert dual.site_module_path("text.1.attn_out") == "text_model.encoder.layer.1.attention.output.dense"
    assert dual.site_module_path("text.-1.mlp_out") == "text_model.encoder.layer.2.output.dense"
    # the CLIP vision transformer sits at vision_model.vision_model on transformers 4.x, vision_model on 5.x
    assert dual.site_module_path("image.0.mlp_out") in ("vision_model.vision_model.encoder.layers.0.mlp.fc2",
                                                        "vision_model.encoder.layers.0.mlp.fc2")
    assert dual.output_positions("text").static_index == 0
    assert dual.output_token_index("text", dual_inputs["text"]).tolist() == [0, 0, 0]
    assert dual_inputs["text"]["attention_mask"][1].sum() < dual_inputs["text"]["attention_mask"][2].sum()
    assert adapter_for(dual.model).family == "hf_dual_encoder"


@pytest.mark.parametrize("tower", ["image", "text"])
def test_only_position_zero_of_last_block_reaches_output(dual, dual_inputs, tower):
    """The claim behind static pruning: perturbing non-CLS positions of the last block changes nothing."""
    block = dual.blocks(tower)[-1]

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 1:] += 5.0
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    with torch.no_grad():
        base = dual.embed(tower, dual_inputs[tower])
        handle = block.register_forward_hook(hook)
        out = dual.embed(tower, dual_inputs[tower])
        handle.remove()
    assert torch.allclose(out, base, atol=1e-6)


@pytest.mark.parametrize("tower,layer", [(t, l) for t in ("image", "text") for l in (0, 2)])
@pytest.mark.parametrize("mode", ["reconstruct", "residual"])
@pytest.mark.parametrize("activation", ["threshold", "topk"])
def test_compiled_matches_reference(dual, dual_inputs, tower, layer, mode, activation):
    sae = random_sae(W, 256, activation=activation)
    edit = SAEEdit(site=f"{tower}.{layer}", sae=sae, neurons=[3, 7, 100], value=-0.3, alpha=0.6, mode=mode)
    inp = dual_inputs[tower]
    with torch.no_grad():
        base = dual.embed(tower, inp)
        hook = reference_hook(dual, edit)
        ref = dual.embed(tower, inp)
        hook.remove()
        patch = apply_edits(dual, edit)
        out = dual.embed(tower, inp)
        patch.remove()
        restored = dual.embed(tower, inp)
    assert (out - ref).abs().max() < 1e-5
    assert (out - base).abs().max() > 1e-3
    assert torch.equal(restored, base)


@pytest.mark.parametrize("site", ["text.1.attn_out", "text.0.mlp_out", "image.1.attn_out", "image.2.mlp_out"])
def test_write_sites_match_reference(dual, dual_inputs, site):
    edit = SAEEdit(site=site, sae=random_sae(W, 128), neurons=[1, 5], value=0.2, alpha=1.0)
    inp = dual_inputs[site.split(".")[0]]
    with torch.no_grad():
        base = dual.embed(site.split(".")[0], inp)
        hook = reference_hook(dual, edit)
        ref = dual.embed(site.split(".")[0], inp)
        hook.remove()
        patch = apply_edits(dual, edit)
        out = dual.embed(site.split(".")[0], inp)
        patch.remove()
    assert (out - ref).abs().max() < 1e-5
    assert (out - base).abs().max() > 1e-4


@pytest.mark.parametrize("tower", ["image", "text"])
def test_pruned_equals_all_token_application(dual, dual_inputs, tower):
    kw = dict(site=f"{tower}.-1", sae=random_sae(W, 128), neurons=[1, 2], alpha=0.6)
    inp = dual_inputs[tower]
    with torch.no_grad():
        p = apply_edits(dual, SAEEdit(prune=True, **kw))
        assert p.records[0]["positions"] == {"static": 0}
        pruned = dual.embed(tower, inp)
        p.remove()
        p = apply_edits(dual, SAEEdit(prune=False, **kw))
        full = dual.embed(tower, inp)
        p.remove()
    assert torch.allclose(pruned, full, atol=1e-6)


def test_save_load_round_trip(tmp_path, dual, dual_inputs):
    dual.model.save_pretrained(tmp_path / "m")
    dual.processor.save_pretrained(tmp_path / "m")
    again = load_adapter(str(tmp_path / "m"))
    assert isinstance(again, DualEncoderAdapter)
    with torch.no_grad():
        for tower in ("image", "text"):
            inp = dual_inputs[tower] if tower == "image" else again.prepare_texts(TEXTS)
            assert torch.allclose(again.embed(tower, inp), dual.embed(tower, dual_inputs[tower]), atol=1e-6)


def test_errors(dual):
    with pytest.raises(DebiasError, match="out of range"):
        dual.resolve_site("text.3")
    with pytest.raises(DebiasError, match="no tower 'audio'"):
        dual.resolve_site("audio.0")
    with pytest.raises(DebiasError, match="unknown model spec '/nonexistent/dir' .local directory not found"):
        DualEncoderAdapter.load("/nonexistent/dir")  # offline first: refused before any hub lookup


def test_prepare_images_uses_vision_size(dual):
    from PIL import Image

    px = dual.prepare_images([Image.new("RGB", (100, 60), (200, 10, 10))])["pixel_values"]
    assert px.shape == (1, 3, 32, 32)


def test_export_round_trips_and_onnx_parity(tmp_path, dual_inputs):
    """The bias-lab family exports like CLIP: load_patched and trust_remote_code identical, ONNX validated."""
    import transformers

    from debias_export import SAEEdit, apply_edits, load_patched
    from debias_export.export import export_bundle
    from debias_export.workflow.testing import random_sae

    model = DualEncoderAdapter.from_config(tiny_dual_config(), seed=3)
    handle = apply_edits(model, [SAEEdit(site="image.-1", sae=random_sae(W, 128), neurons=[1, 5]),
                                 SAEEdit(site="text.1", sae=random_sae(W, 128, seed=1), neurons=[2], mode="residual")])
    with torch.no_grad():
        want = {t: model.embed(t, dual_inputs[t]) for t in ("image", "text")}
    report = export_bundle(model, tmp_path / "out")
    assert (tmp_path / "out" / "onnx" / "vision_model.onnx").is_file() and (tmp_path / "out" / "onnx" / "text_model.onnx").is_file()
    for g in report["onnx"]["graphs"].values():  # default exporter, validated on other batch sizes / text lengths
        assert g["exporter"] == "dynamo" and max(g["validation"]["max_abs_diff"].values()) < 1e-4
    loaded = load_patched(tmp_path / "out")
    remote = transformers.AutoModel.from_pretrained(tmp_path / "out" / "hf", trust_remote_code=True).eval()
    assert type(remote).__name__ == "DebiasVisionTextDualEncoderModel"
    with torch.no_grad():
        for tower in ("image", "text"):
            assert torch.equal(loaded.embed(tower, dual_inputs[tower]), want[tower])
        assert torch.equal(pooled(remote.get_image_features(**dual_inputs["image"])), want["image"])
        assert torch.equal(pooled(remote.get_text_features(**dual_inputs["text"])), want["text"])
    handle.remove()


def test_onnx_export_leaves_the_model_in_eval_mode(tmp_path):
    """BERT has dropout: an export that flipped the shared model to train mode would make outputs random."""
    from debias_export import SAEEdit, apply_edits
    from debias_export.export import export_onnx
    from debias_export.workflow.testing import random_sae

    model = DualEncoderAdapter.from_config(tiny_dual_config(), seed=4)
    apply_edits(model, SAEEdit(site="text.0", sae=random_sae(W, 64), neurons=[3]))
    export_onnx(model, tmp_path / "onnx", towers=["text"])
    assert not any(m.training for m in model.model.modules())
