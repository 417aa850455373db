"""ONNX parity with a discontinuous SAE edit: a latent exactly at its threshold may flip between PyTorch and
onnxruntime. Such flips pass (and are reported); a graph whose decisions or weights are genuinely off fails."""
import json

import numpy as np
import onnx
import pytest
import torch

from debias_export import SAEEdit, apply_edits
from debias_export.core.errors import ValidationError
from debias_export.export import export_onnx, onnx_export
from debias_export.runtime import FusedSAEEdit
from debias_export.workflow.testing import random_sae, tiny_clip

LATENT = 0  # the constructed latent (a kept one: the edit zeroes neurons 2 and 9)


def at_threshold(adapter, offset: float = 0.0):
    """A reconstruct edit whose latent LATENT has pre-activation exactly ``threshold + offset`` on every token.

    Its encoder column is zero, so ``z = b_enc`` in any kernel (a sum of exact zeros), and its decoder row is
    large, so flipping it moves the output far past the ONNX tolerance.
    """
    apply_edits(adapter, SAEEdit(site="image.-1", sae=random_sae(32, 96, seed=1), neurons=[2, 9], alpha=0.8))
    edit = next(m for m in adapter.model.modules() if isinstance(m, FusedSAEEdit))
    with torch.no_grad():
        edit.W_enc[:, LATENT] = 0.0
        edit.b_enc[LATENT] = edit.threshold + offset  # offset 0: z > threshold is False -> inactive in PyTorch
        edit.W_dec[LATENT] = torch.linspace(-4.0, 4.0, edit.W_dec.shape[1])  # not constant: LayerNorm would remove that
    return edit


def graph_damage(monkeypatch, b_enc_shift=None, ulp_up=False, weights=1.0, latent=LATENT):
    """Export normally, then edit the saved graph: the edit's encoder bias of LATENT (by ``b_enc_shift``, or up by
    one float32 ulp -- what a different GEMM kernel can do; ``latent`` may be a slice) and/or the largest weight of the tower (x ``weights``)."""
    real = onnx_export.export_graph

    def damaged(spec, module, example, path, **kw):
        used = real(spec, module, example, path, **kw)
        model = onnx.load(str(path))
        bias = next(t for t in model.graph.initializer if t.name.endswith("debias_edit.edits.0.b_enc"))
        arr = onnx.numpy_helper.to_array(bias).copy()
        if ulp_up:
            arr[LATENT] = np.nextafter(arr[LATENT], np.float32(np.inf), dtype=np.float32)
        if b_enc_shift is not None:
            arr[latent] += np.float32(b_enc_shift)
        bias.CopyFrom(onnx.numpy_helper.from_array(arr, bias.name))
        if weights != 1.0:
            big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
            big.CopyFrom(onnx.numpy_helper.from_array((onnx.numpy_helper.to_array(big) * weights).astype(np.float32), big.name))
        onnx.save(model, str(path))
        return used

    monkeypatch.setattr(onnx_export, "export_graph", damaged)


def test_flip_at_threshold_passes_and_is_reported(tmp_path, monkeypatch):
    adapter = tiny_clip(seed=0)
    at_threshold(adapter)
    graph_damage(monkeypatch, ulp_up=True)  # the graph's z is 1 ulp above the threshold: active there only
    report = export_onnx(adapter, tmp_path / "onnx", towers=["image"])
    val = report["graphs"]["vision_model"]["validation"]
    # the raw difference is kept, and it is well past the tolerance: the flip is not hidden ...
    assert val["max_abs_diff"]["image_embeds"] > 10 * val["tolerance"]["image_embeds"]
    # ... and explained: one flipped decision per input row (the edit runs on CLS only), at distance 0
    flips = val["boundary_flips"]
    assert [(f["batch"], f["flipped_latents"], f["rows_with_flips"]) for f in flips] == [(1, 1, 1), (3, 3, 3)]
    for f in flips:
        assert f["max_boundary_distance_rel"] == 0.0 and f["latent_decisions"] == f["batch"] * 94
        assert f["flipped_share"] == pytest.approx(1 / 94) and set(f["outputs"]) >= {"image_embeds"}
        assert max(f["max_abs_diff_with_graph_decisions"].values()) <= 1e-4
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["boundary_flips"]["vision_model"] == json.loads(json.dumps(flips))


def test_no_flip_no_report(tmp_path):
    adapter = tiny_clip(seed=0)
    at_threshold(adapter)  # PyTorch and onnxruntime both compute z == threshold exactly: no flip
    report = export_onnx(adapter, tmp_path / "onnx", towers=["image"])
    assert "boundary_flips" not in report["graphs"]["vision_model"]["validation"]
    assert "boundary_flips" not in json.loads((tmp_path / "onnx" / "manifest.json").read_text())


def test_flip_far_from_threshold_fails(tmp_path, monkeypatch):
    adapter = tiny_clip(seed=0)
    at_threshold(adapter, offset=-0.5)  # clearly inactive in PyTorch
    graph_damage(monkeypatch, b_enc_shift=1.0)  # clearly active in the graph: a wrong decision, not rounding
    with pytest.raises(ValidationError, match=r"differs from the PyTorch model by .* > atol .*not at the threshold"):
        export_onnx(adapter, tmp_path / "onnx", towers=["image"])
    assert list(tmp_path.iterdir()) == []


def test_flip_plus_damaged_weights_fails(tmp_path, monkeypatch):
    adapter = tiny_clip(seed=0)
    at_threshold(adapter)
    graph_damage(monkeypatch, ulp_up=True, weights=1.01)  # the flip is legit, the rest of the graph is not
    with pytest.raises(ValidationError, match=r"with the graph's own latent decisions PyTorch still differs"):
        export_onnx(adapter, tmp_path / "onnx", towers=["image"])
    assert list(tmp_path.iterdir()) == []


def test_damaged_graph_without_flips_still_fails(tmp_path, monkeypatch):
    adapter = tiny_clip(seed=0)
    at_threshold(adapter)
    graph_damage(monkeypatch, weights=1.01)
    with pytest.raises(ValidationError, match=r"no latent decision differs"):
        export_onnx(adapter, tmp_path / "onnx", towers=["image"])


def test_cli_export_of_graph_with_wrong_decisions_exits_2(tmp_path, monkeypatch, capsys):
    from debias_export.cli.main import main

    sae = random_sae(32, 64, seed=3)
    sae.save(tmp_path / "sae")
    assert main(["patch", "--model", "tiny-clip", "--sae", str(tmp_path / "sae"), "--site", "image.-1",
                 "--neurons", "3,7", "--out", str(tmp_path / "edit")]) == 0
    graph_damage(monkeypatch, b_enc_shift=1.0, latent=slice(None))  # every latent's decisions moved far off
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--model", "tiny-clip", "--edit", str(tmp_path / "edit"), "--tower", "image",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not explained by threshold flips" in err[0]
    assert not out.exists()


def test_cli_export_reports_explained_flips(tmp_path, monkeypatch, capsys):
    from debias_export.cli.main import main

    sae = random_sae(32, 64, seed=3)
    with torch.no_grad():  # latent LATENT at the threshold on every token, as in at_threshold (b_dec folds exactly)
        sae.W_enc[:, LATENT] = 0.0
        sae.b_enc[LATENT] = sae.threshold
        sae.W_dec[LATENT] = torch.linspace(-4.0, 4.0, 32)
    sae.save(tmp_path / "sae")
    assert main(["patch", "--model", "tiny-clip", "--sae", str(tmp_path / "sae"), "--site", "image.-1",
                 "--neurons", "3,7", "--out", str(tmp_path / "edit")]) == 0
    graph_damage(monkeypatch, ulp_up=True)
    capsys.readouterr()
    assert main(["export", "--model", "tiny-clip", "--edit", str(tmp_path / "edit"), "--tower", "image",
                 "--out", str(tmp_path / "export")]) == 0
    assert "(4 SAE latents flipped at their threshold, explained)" in capsys.readouterr().out
    report = json.loads((tmp_path / "export" / "onnx" / "onnx_report.json").read_text())
    assert sum(f["flipped_latents"] for f in report["graphs"]["vision_model"]["validation"]["boundary_flips"]) == 4
