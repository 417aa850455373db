"""ONNX export: parity with the patched model on unseen shapes, edit present, atomic failures, fallback exporter, CLI."""
import dataclasses
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from debias_export import DebiasError, SAEEdit, apply_edits
from debias_export.errors import ConfigError, ValidationError
from debias_export.export import check_graph, export_onnx, graph_specs, onnx_export
from debias_export.export.onnx_specs import example_inputs
from debias_export.testing import random_sae, tiny_clip

GRID = [(b, s) for b in (1, 3, 5) for s in (5, 11)]


def patch(adapter):
    """Pruned last-block edits on both towers (CLS static slice, per-row EOS gather/scatter) + a mid-block one."""
    return apply_edits(adapter, [
        SAEEdit(site="image.-1", sae=random_sae(32, 96, seed=1), neurons=[2, 9], alpha=0.8),
        SAEEdit(site="text.-1", sae=random_sae(32, 96, seed=2), neurons=list(range(0, 96, 3)), alpha=0.8, mode="residual"),
        SAEEdit(site="image.0", sae=random_sae(32, 96, seed=3, activation="topk"), neurons=list(range(0, 96, 2)), alpha=0.5),
    ])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    adapter = tiny_clip(seed=0)
    patch(adapter)
    out = tmp_path_factory.mktemp("onnx") / "onnx"
    report = export_onnx(adapter, out, opset=17)
    return adapter, out, report


def run_onnx(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {i.name: inputs[i.name].numpy() for i in sess.get_inputs()})))


def test_report_and_graph_structure(exported):
    adapter, out, report = exported
    assert set(report["graphs"]) == {"vision_model", "text_model"} and report["opset"] == 17 and report["patched"]
    for name, g in report["graphs"].items():
        model = onnx.load(str(out / g["file"]))
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # no custom ops
        assert g["opset"] >= 17 and g["exporter"] == "optimum"
        assert g["size_bytes"][g["file"]] == (out / g["file"]).stat().st_size
        assert sum(g["ops"].values()) == len(model.graph.node)
        assert g["validation"]["edit_effect"] > 1e-2
        assert max(g["validation"]["max_abs_diff"].values()) <= 1e-4
    text = onnx.load(str(out / "text_model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in text.graph.input}
    assert dims == {"input_ids": ["batch_size", "sequence_length"], "attention_mask": ["batch_size", "sequence_length"]}
    # the EOS-position pre-hook was traced: positions come from input_ids, edits are scattered back per row
    assert report["graphs"]["text_model"]["ops"].get("ScatterElements", 0) >= 1
    assert report["graphs"]["text_model"]["ops"].get("ArgMax", 0) >= 2  # hook + CLIP's own pooling
    assert json.loads((out / "onnx_report.json").read_text())["graphs"].keys() == report["graphs"].keys()


def test_parity_on_shape_grid(exported):
    adapter, out, _ = exported
    for spec in graph_specs(adapter):
        rep = check_graph(adapter, spec, out / f"{spec.name}.onnx", atol=1e-4, shapes=GRID, seed=5)
        assert rep["edit_effect"] > 1e-2
        assert max(rep["max_abs_diff"].values()) <= 1e-4


def test_eos_positions_follow_each_row(exported):
    """Same tokens, EOS moved: the ONNX graph must edit the new position (a frozen index would not)."""
    adapter, out, _ = exported
    inp = example_inputs(adapter, "text", batch=3, seq=11, seed=9)
    ids, mask = inp["input_ids"].clone(), inp["attention_mask"].clone()
    ids[1], mask[1] = ids[0], mask[0]
    eos = int((ids[1] == 49407).nonzero()[0])
    ids[1, eos - 3], ids[1, eos], mask[1, eos - 2:] = 49407, 0, 0  # row 1: EOS three tokens earlier
    got = run_onnx(out / "text_model.onnx", {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        want = adapter.embed("text", {"input_ids": ids, "attention_mask": mask})
    assert np.abs(got["text_embeds"] - want.numpy()).max() < 1e-4


def test_patched_graph_differs_from_unpatched_graph(exported, tmp_path):
    _, out, _ = exported
    plain = tiny_clip(seed=0)
    with pytest.raises(DebiasError, match="no debias patch"):
        export_onnx(plain, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    report = export_onnx(plain, tmp_path / "plain", towers=["image"], allow_unpatched=True)
    assert report["patched"] is False and "edit_effect" not in report["graphs"]["vision_model"]["validation"]
    inp = example_inputs(plain, "image", batch=3, seed=4)
    a = run_onnx(out / "vision_model.onnx", inp)["image_embeds"]
    b = run_onnx(tmp_path / "plain" / "vision_model.onnx", inp)["image_embeds"]
    assert np.abs(a - b).max() > 1e-2


def test_corrupted_graph_fails_validation_and_leaves_nothing(tmp_path, clip, monkeypatch):
    patch(clip)
    real = onnx_export._trace

    def corrupting(adapter, spec, module, path, opset):
        exporter = real(adapter, spec, module, path, opset)
        model = onnx.load(str(path))
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        arr = onnx.numpy_helper.to_array(init) * 1.01
        init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        onnx.save(model, str(path))
        return exporter

    monkeypatch.setattr(onnx_export, "_trace", corrupting)
    with pytest.raises(ValidationError, match=r"differs from the PyTorch model by .* > atol"):
        export_onnx(clip, tmp_path / "onnx", towers=["image"])
    assert list(tmp_path.iterdir()) == []


def test_zero_tolerance_failure_keeps_previous_export(tmp_path, clip):
    patch(clip)
    export_onnx(clip, tmp_path / "onnx", towers=["text"], validate=False)
    before = (tmp_path / "onnx" / "text_model.onnx").read_bytes()
    with pytest.raises(ValidationError):
        export_onnx(clip, tmp_path / "onnx", towers=["text"], atol=0.0, overwrite=True)
    assert (tmp_path / "onnx" / "text_model.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_argument_errors(tmp_path, clip):
    patch(clip)
    with pytest.raises(ConfigError, match="opset 13 is too old"):
        export_onnx(clip, tmp_path / "a", opset=13)
    with pytest.raises(DebiasError, match="cannot export tower"):
        export_onnx(clip, tmp_path / "a", towers=["audio"])
    (tmp_path / "a").mkdir()
    with pytest.raises(DebiasError, match="already exists"):
        export_onnx(clip, tmp_path / "a")


def test_torch_onnx_fallback_exporter(tmp_path, clip, monkeypatch):
    """Families without an optimum OnnxConfig go through torch.onnx.export with the same names/axes."""
    patch(clip)
    specs = [dataclasses.replace(s, optimum_config=None) for s in graph_specs(clip)]
    monkeypatch.setattr(onnx_export, "graph_specs", lambda adapter, towers=None: specs)
    report = export_onnx(clip, tmp_path / "onnx", shapes=[(1, 5), (4, 11)])
    for g in report["graphs"].values():
        assert g["exporter"] == "torch.onnx" and max(g["validation"]["max_abs_diff"].values()) <= 1e-4


def test_cli_patch_export_validate_verify(tmp_path):
    from debias_export.cli.main import main

    sae = random_sae(32, 64, seed=3)
    sae.cfg.metadata = {"site": "text.2"}
    sae.save(tmp_path / "sae")
    (tmp_path / "probe.json").write_text(json.dumps({"groups": {"gender": {"neurons": [{"index": 4}, {"index": 9}]},
                                                                "race": {"neurons": [{"index": 9}, {"index": 11}]}}}))
    assert main(["patch", "--model", "tiny-clip", "--sae", str(tmp_path / "sae"), "--probe-report",
                 str(tmp_path / "probe.json"), "--out", str(tmp_path / "edit_t")]) == 0
    cfg = json.loads((tmp_path / "edit_t" / "edit_config.json").read_text())
    assert cfg["neurons"] == [4, 9, 11] and cfg["site"] == "text.2"
    sae.cfg.metadata = {}
    sae.save(tmp_path / "sae_img")
    assert main(["patch", "--model", "tiny-clip", "--sae", str(tmp_path / "sae_img"), "--site", "image.2",
                 "--neurons", "3,7", "--mode", "residual", "--out", str(tmp_path / "edit_i")]) == 0
    assert main(["patch", "--model", "tiny-clip", "--sae", str(tmp_path / "sae_img"), "--neurons", "3",
                 "--out", str(tmp_path / "edit_x")]) == 2  # no --site and none in the SAE metadata
    out = tmp_path / "export"
    args = ["export", "--model", "tiny-clip", "--edit", str(tmp_path / "edit_t"), "--edit", str(tmp_path / "edit_i"),
            "--out", str(out)]
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} == {"hf", "onnx", "export_report.json", "manifest.json"}
    assert main(args) == 2  # refuses the existing output
    assert main(["validate", str(out), "--seed", "1"]) == 0
    assert main(["verify", str(out)]) == 0
    with open(out / "onnx" / "onnx_report.json", "a") as fh:
        fh.write(" ")
    assert main(["verify", str(out)]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DEBIAS_EXPORT_SLOW"), reason="real-size export takes minutes; set DEBIAS_EXPORT_SLOW=1")
def test_vit_b16_architecture_bundle(tmp_path):
    """Real CLIP ViT-B/16 architecture (random weights): hf + onnx bundle, both towers, then re-validation."""
    from debias_export.export import export_bundle, validate_bundle
    from debias_export.real_configs import random_clip

    adapter = random_clip("clip-vit-base-patch16")
    apply_edits(adapter, [
        SAEEdit(site="image.11", sae=random_sae(768, 6144, seed=1, threshold=0.2), neurons=list(range(0, 6144, 64))),
        SAEEdit(site="text.11", sae=random_sae(512, 4096, seed=2, threshold=0.2), neurons=list(range(0, 4096, 64)),
                mode="residual"),
    ])
    report = export_bundle(adapter, tmp_path / "out")
    for g in report["onnx"]["graphs"].values():
        assert max(g["validation"]["max_abs_diff"].values()) <= 1e-4 and g["validation"]["edit_effect"] > 1e-2
    again = validate_bundle(tmp_path / "out", seed=3)
    assert set(again["onnx"]) == {"vision_model", "text_model"}
