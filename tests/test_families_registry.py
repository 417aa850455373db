"""Every registered model family has a tiny builder, and compiled == reference hook on its default site.

Adding a family to the registry without adding a builder here fails ``test_every_family_has_a_builder``.
"""
import warnings

import pytest
import torch

from debias_export import SAEEdit, apply_edits
from debias_export.adapters import adapter_for, registered_families
from debias_export.edits import reference_hook
from debias_export.workflow.testing import random_sae


def _hf_clip():
    from debias_export.workflow.testing import tiny_clip

    return tiny_clip(seed=0)


def _open_clip():
    from debias_export.adapters.open_clip_family import tiny_open_clip

    return tiny_open_clip(seed=0)


def _llava():
    from debias_export.adapters.llava import tiny_llava

    return tiny_llava(seed=0)


def _hf_dual_encoder():
    from transformers import BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig

    from debias_export.adapters.dual_encoder import DualEncoderAdapter

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = BertConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      max_position_embeddings=64)
    return DualEncoderAdapter.from_config(VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16))


BUILDERS = {"hf_clip": _hf_clip, "open_clip": _open_clip, "llava": _llava, "hf_dual_encoder": _hf_dual_encoder}


def tower_inputs(adapter, tower):
    g = torch.Generator().manual_seed(1)
    if tower == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if adapter.family == "hf_dual_encoder":  # no tokenizer files offline for a 512-word BERT: random ids
        ids = torch.randint(5, 500, (2, 9), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return adapter.prepare_texts(["a photo of a nurse", "an engineer at work"])


def test_every_family_has_a_builder():
    assert set(BUILDERS) == set(registered_families())


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_default_site_compiled_matches_reference(family):
    adapter = BUILDERS[family]()
    assert adapter.family == family and adapter_for(adapter.model).family == family
    for tower in adapter.towers():
        site = adapter.default_site(tower)
        assert site.layer == adapter.consumed_layer(tower)
        edit = SAEEdit(site=site.name, sae=random_sae(adapter.width(tower), 128), neurons=[1, 5, 9], value=-0.2)
        inp = tower_inputs(adapter, tower)
        with torch.no_grad(), warnings.catch_warnings():
            # the default site is always consumed: no "lies after the layer" warning
            warnings.filterwarnings("error", message=".*lies after the layer.*")
            base = adapter.embed(tower, inp)
            hook = reference_hook(adapter, edit)
            ref = adapter.embed(tower, inp)
            hook.remove()
            patch = apply_edits(adapter, edit)
            out = adapter.embed(tower, inp)
            patch.remove()
        assert (out - ref).abs().max() < 1e-5, (family, tower)
        assert (out - base).abs().max() > 1e-4, (family, tower)
