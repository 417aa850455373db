"""Edits take effect however the model collects states: block output, ``output_hidden_states``, hooks, LLaVA features.

transformers 5 records ``hidden_states`` with forward hooks on the layer classes, installed lazily the first
time states are requested; an edit that wrapped the layer would be invisible to them (LLaVA then ran
unedited). Each case compares against the literal reference formula applied by a hook, with the
recorder hooks already installed before the edit (the order that broke), on whichever lock runs the suite.
"""
import pytest
import torch

from debias_export import SAEEdit, apply_edits
from debias_export.workflow.model_specs import load_model_spec
from debias_export.edits import reference_hook
from debias_export.workflow.testing import random_sae

IMAGE_TOKEN, N_IMAGE_TOKENS = 159, 16


def _inputs(adapter, tower):
    if tower == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))}
    return dict(adapter.prepare_texts(["a photo of a nurse", "an engineer"]))


def _hidden_states(adapter, tower, x):
    """The tower's own ``output_hidden_states`` (HF families)."""
    m = adapter.model
    if adapter.family == "llava":
        return adapter.vision_tower()(x["pixel_values"], output_hidden_states=True).hidden_states
    module = m.vision_model if tower == "image" else m.text_model
    return module(**x, output_hidden_states=True).hidden_states


CASES = [("tiny-clip", "image", "image.1"), ("tiny-clip", "text", "text.1"),
         ("tiny-dual-encoder", "image", "image.1"), ("tiny-dual-encoder", "text", "text.1"),
         ("tiny-open-clip", "image", "image.1"), ("tiny-open-clip", "text", "text.1"),
         ("tiny-llava", "image", "image.-2")]


@pytest.mark.parametrize("spec,tower,site", CASES)
def test_every_consumer_sees_the_edit(spec, tower, site):
    adapter = load_model_spec(spec)
    x = _inputs(adapter, tower)
    edit = SAEEdit(site=site, sae=random_sae(adapter.width(tower), 96, seed=2), neurons=[1, 5, 9], alpha=0.8, value=-0.3)
    layer = adapter.resolve_site(site).layer
    hf = adapter.family != "open_clip"
    seen = {}
    # a user's hook on the block, registered BEFORE the edit: it must still see the edited output
    user = adapter.blocks(tower)[layer].register_forward_hook(
        lambda m, a, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple) else o).detach().clone()))
    with torch.no_grad():
        if hf:
            base_hidden = _hidden_states(adapter, tower, x)  # installs transformers 5's recorder hooks now
        base = adapter.embed(tower, x)
        base_seen = seen["out"]
        ref_handle = reference_hook(adapter, edit)
        ref = adapter.embed(tower, x)
        ref_seen = seen["out"]
        ref_hidden = _hidden_states(adapter, tower, x) if hf else None
        ref_handle.remove()
        patch = apply_edits(adapter, edit)
        out = adapter.embed(tower, x)
        out_seen = seen["out"]
        hidden = _hidden_states(adapter, tower, x) if hf else None
        patch.remove()
        after = adapter.embed(tower, x)
    user.remove()
    # fused (float64-folded) vs the literal formula: rounding only
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_seen, ref_seen, rtol=1e-5, atol=1e-5)
    assert (out - base).abs().max() > 1e-3 and (out_seen - base_seen).abs().max() > 1e-3
    assert torch.equal(after, base)  # remove() restores exactly
    if hf:
        assert len(hidden) == len(base_hidden)
        torch.testing.assert_close(hidden[layer + 1], ref_hidden[layer + 1], rtol=1e-5, atol=1e-5)
        assert (hidden[layer + 1] - base_hidden[layer + 1]).abs().max() > 1e-3  # the recorded state is edited
        assert torch.equal(hidden[layer], base_hidden[layer])  # earlier states are untouched


def test_llava_model_features_and_generation_see_the_edit():
    """The model's OWN get_image_features and generate (not our feature module) run edited."""
    adapter = load_model_spec("tiny-llava")
    m = adapter.model
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * N_IMAGE_TOKENS + [7, 8]])
    edit = SAEEdit(site="image.-2", sae=random_sae(32, 96, seed=2), neurons=[1, 5, 9], alpha=0.8, value=-0.3)

    def features():
        out = m.get_image_features(pixel_values=px, vision_feature_layer=m.config.vision_feature_layer,
                                   vision_feature_select_strategy=m.config.vision_feature_select_strategy)
        out = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    with torch.no_grad():
        base, base_gen = features(), m.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False)
        handle = reference_hook(adapter, edit)
        ref, ref_gen = features(), m.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False)
        handle.remove()
        patch = apply_edits(adapter, edit)
        out, gen = features(), m.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False)
        ours = adapter.embed("image", {"pixel_values": px})
        patch.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, out.view_as(ours), rtol=0, atol=0)  # our feature module == the model's own
    assert (out - base).abs().max() > 1e-3
    assert torch.equal(gen, ref_gen) and not torch.equal(gen, base_gen)  # generation changes, as the reference's does
