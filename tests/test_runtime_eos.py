"""The text tower's per-row EOS edit: same numbers as the literal gather/edit/scatter, and the exported graph keeps
onnxruntime's Add + LayerNormalization -> SkipLayerNormalization fusion (issue #18)."""
from collections import Counter

import pytest
import torch

from debias_export import SAEEdit, apply_edits
from debias_export.export import export_onnx
from debias_export.runtime import add_at_positions
from debias_export.workflow.testing import random_sae, tiny_clip


def scatter_formula(h, pos, edit):
    """The previous implementation: gather each row's position, edit it, scatter it back."""
    index = pos.view(-1, 1, 1).expand(-1, 1, h.shape[-1])
    return h.scatter(1, index, edit(h.gather(1, index)))


def test_add_at_positions_equals_scatter():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 9, 16, generator=g) * 30
    pos = torch.tensor([0, 8, 3, 3, 5])
    W = torch.randn(16, 16, generator=g)
    edit = lambda x: x @ W + 1.0  # noqa: E731 -- any map of the picked rows
    got, want = add_at_positions(h, pos, edit), scatter_formula(h, pos, edit)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    rows = torch.arange(9).view(1, -1) != pos.view(-1, 1)
    assert torch.equal(got[rows], h[rows])  # untouched positions stay bit-exact
    assert not torch.allclose(got[~rows], h[~rows])  # and the edited ones did change


def test_patched_text_tower_matches_scatter_formula():
    adapter = tiny_clip(seed=0)
    ids = torch.randint(1, 90, (3, 7), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = adapter.model.config.text_config.eos_token_id
    mask = torch.ones_like(ids)
    apply_edits(adapter, SAEEdit(site="text.-1", sae=random_sae(32, 96, seed=2), neurons=list(range(0, 96, 3)), alpha=0.8))
    site_edit = next(m for m in adapter.model.modules() if type(m).__name__ == "SiteEdit")
    with torch.no_grad():
        new = adapter.embed("text", {"input_ids": ids, "attention_mask": mask})
        real = site_edit.edit_hidden
        # the literal formula on the very same module: scatter the edited rows back
        site_edit.edit_hidden = lambda h: scatter_formula(h, site_edit._dynamic_pos.long(), site_edit.apply_edits)
        old = adapter.embed("text", {"input_ids": ids, "attention_mask": mask})
        site_edit.edit_hidden = real
    assert torch.allclose(new, old, rtol=1e-6, atol=1e-6 * float(old.abs().max()))


def fused_ops(path, config):
    # onnxruntime's transformer optimizer (shipped with onnxruntime): what production applies before serving
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(path), model_type="clip", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, opt_level=0)
    return Counter(n.op_type for n in model.model.graph.node)


@pytest.mark.filterwarnings("ignore")
def test_text_edit_keeps_skip_layernorm_fusion(tmp_path):
    # TorchScript graphs: onnxruntime's symbolic shape inference, which the fusions need, gives up on the tiny
    # model's dynamo graph (patched or not), so there the optimizer fuses nothing to compare
    adapter = tiny_clip(seed=0)
    export_onnx(adapter, tmp_path / "base", towers=["text"], allow_unpatched=True, exporter="torchscript")
    apply_edits(adapter, SAEEdit(site="text.-1", sae=random_sae(32, 96, seed=2), neurons=list(range(0, 96, 3)), alpha=0.8))
    export_onnx(adapter, tmp_path / "edit", towers=["text"], exporter="torchscript")
    cfg = adapter.model.config.text_config
    base, edit = fused_ops(tmp_path / "base" / "text_model.onnx", cfg), fused_ops(tmp_path / "edit" / "text_model.onnx", cfg)
    # every Add + LayerNorm pair fuses, the final one included (2 per block: the scatter form lost the last one)
    assert base["SkipLayerNormalization"] == 2 * cfg.num_hidden_layers
    assert edit["SkipLayerNormalization"] == base["SkipLayerNormalization"]
    assert edit["LayerNormalization"] == base["LayerNormalization"]
