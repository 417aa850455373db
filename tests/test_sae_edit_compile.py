"""Compiled (fused) SAE edits vs the literal reference hook; pruning, identities, errors."""
import pytest
import torch

from debias_export import DebiasError, SAEEdit, apply_edits
from debias_export.edits import reference_hook
from debias_export.workflow.testing import random_sae

CASES = [(t, l) for t in ("image", "text") for l in (0, 1, 2)]


@pytest.mark.parametrize("tower,layer", CASES)
@pytest.mark.parametrize("mode", ["reconstruct", "residual"])
@pytest.mark.parametrize("activation", ["threshold", "topk", "relu"])
def test_compiled_matches_reference(clip, clip_inputs, tower, layer, mode, activation):
    sae = random_sae(32, 256, activation=activation)
    edit = SAEEdit(site=f"{tower}.{layer}", sae=sae, neurons=[3, 7, 100], value=-0.3, alpha=0.6, mode=mode)
    inp = clip_inputs[tower]
    with torch.no_grad():
        base = clip.embed(tower, inp)
        hook = reference_hook(clip, edit)
        ref = clip.embed(tower, inp)
        hook.remove()
        patch = apply_edits(clip, edit)
        out = clip.embed(tower, inp)
        patch.remove()
        restored = clip.embed(tower, inp)
    assert (out - ref).abs().max() < 1e-5
    assert (out - base).abs().max() > 1e-3  # the edit does something
    assert torch.equal(restored, base)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_pruned_equals_all_token_application(clip, clip_inputs, tower):
    sae = random_sae(32, 128)
    kw = dict(site=f"{tower}.-1", sae=sae, neurons=[1, 2], alpha=0.6)
    inp = clip_inputs[tower]
    with torch.no_grad():
        p = apply_edits(clip, SAEEdit(prune=True, **kw))
        assert p.records[0]["positions"] is not None
        pruned = clip.embed(tower, inp)
        p.remove()
        p = apply_edits(clip, SAEEdit(prune=False, **kw))
        full = clip.embed(tower, inp)
        p.remove()
    # the edit's GEMMs run on [B, 1, d] rows vs [B, T, d]: different shapes may take different BLAS kernels
    # (MKL does on AMD), so equal up to float rounding, not bit for bit
    torch.testing.assert_close(pruned, full, rtol=1e-6, atol=1e-6)


def test_pruning_only_at_consumed_layer(clip):
    sae = random_sae(32, 64)
    p = apply_edits(clip, SAEEdit(site="image.1", sae=sae, neurons=[0]))
    assert p.records[0]["positions"] is None
    p.remove()


@pytest.mark.parametrize("tower", ["image", "text"])
def test_alpha_zero_is_exact_identity(clip, clip_inputs, tower):
    inp = clip_inputs[tower]
    with torch.no_grad():
        base = clip.embed(tower, inp)
        for mode in ("reconstruct", "residual"):
            p = apply_edits(clip, SAEEdit(site=f"{tower}.1", sae=random_sae(32, 64), neurons=[5], alpha=0.0, mode=mode))
            assert torch.equal(clip.embed(tower, inp), base)
            p.remove()


def test_compiled_graph_has_no_masking_of_neurons(clip):
    sae = random_sae(32, 64)
    p = apply_edits(clip, SAEEdit(site="image.1", sae=sae, neurons=[5, 9]))
    fused = p.site_edits[0].edits[0]
    assert fused.W_enc.shape == (32, 62)  # zeroed neurons dropped from the encoder entirely
    assert not hasattr(fused, "select")
    p.remove()
    p = apply_edits(clip, SAEEdit(site="image.1", sae=sae, neurons=[5, 9], mode="residual"))
    assert p.site_edits[0].edits[0].W_enc.shape == (32, 2)  # O(d * |S|)
    p.remove()


def test_errors_name_the_problem(clip):
    with pytest.raises(DebiasError, match="width 48 does not match"):
        apply_edits(clip, SAEEdit(site="image.1", sae=random_sae(48, 64), neurons=[1]))
    with pytest.raises(DebiasError, match="out of range"):
        apply_edits(clip, SAEEdit(site="image.7", sae=random_sae(32, 64), neurons=[1]))
    with pytest.raises(DebiasError, match="no tower 'audio'"):
        apply_edits(clip, SAEEdit(site="audio.1", sae=random_sae(32, 64), neurons=[1]))
    with pytest.raises(DebiasError, match=r"neurons \[64\] out of range"):
        SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[64])
    with pytest.raises(DebiasError, match="duplicated"):
        SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[3, 3])
    with pytest.raises(DebiasError, match=r"alpha \(a\) must be in \[0, 1\]"):
        SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[3], alpha=1.5)
    with pytest.raises(DebiasError, match="already patched"):
        apply_edits(clip, SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[1]))
        apply_edits(clip, SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[1]))


def test_edit_save_load_round_trip(tmp_path, clip, clip_inputs):
    from debias_export import load_edit

    edit = SAEEdit(site="text.2", sae=random_sae(32, 64, activation="topk"), neurons=[4, 8], value=0.5, mode="residual")
    edit.save(tmp_path / "e")
    again = load_edit(tmp_path / "e")
    assert again.to_json() == edit.to_json()
    for k, v in edit.tensors().items():
        assert torch.equal(again.tensors()[k], v)


def test_edit_file_bytes_are_deterministic(tmp_path):
    """Byte-identical edit files across saves (safetensors metadata order is not stable with >1 key)."""
    edit = SAEEdit(site="image.1", sae=random_sae(32, 64), neurons=[3])
    blobs = {(edit.save(tmp_path / str(i)) / "edit.safetensors").read_bytes() for i in range(8)}
    assert len(blobs) == 1
