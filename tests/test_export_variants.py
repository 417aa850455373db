"""Precision variants (fp16 / int8): transformers.js names, the edit kept and validated, atomic failures, bench."""
import json

import onnx
import pytest

from debias_export import SAEEdit, apply_edits
from debias_export.bench import BASELINE, run_benchmark
from debias_export.bench.patchsets import PatchSet
from debias_export.core.errors import ValidationError
from debias_export.export import export_onnx, quantize
from debias_export.export.onnx_names import edit_nodes, mask_outputs
from debias_export.export.quantize import parse_precisions
from debias_export.workflow.testing import random_sae, tiny_clip
from fake_clock import TickClock

ALL = ["fp32", "fp16", "int8"]


def edits():
    return [SAEEdit(site="image.-1", sae=random_sae(32, 96, seed=1), neurons=[2, 9], alpha=0.8),
            SAEEdit(site="image.1", sae=random_sae(32, 96, seed=3, activation="topk"), neurons=list(range(0, 96, 4)),
                    alpha=0.5, mode="residual"),
            SAEEdit(site="text.-1", sae=random_sae(32, 96, seed=2), neurons=list(range(0, 96, 3)), alpha=0.8)]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    adapter = tiny_clip(seed=0)
    apply_edits(adapter, edits())
    out = tmp_path_factory.mktemp("v") / "onnx"
    return adapter, out, export_onnx(adapter, out, precisions=ALL)


def test_variant_files_and_reports(variants):
    _, out, report = variants
    names = {p.name for p in out.iterdir()}
    for graph in ("vision_model", "text_model"):
        assert {f"{graph}.onnx", f"{graph}_fp16.onnx", f"{graph}_quantized.onnx"} <= names
        v = report["graphs"][graph]["variants"]
        assert set(v) == {"fp16", "int8"}
        for prec, entry in v.items():
            assert entry["fidelity_cosine_min"] >= (0.999 if prec == "fp16" else 0.95)
            assert entry["edit_inputs"] == 16 and entry["edit_cosine_min"] >= 0.99
            assert 0.0 <= entry["latents_agree_share"] <= 1.0 and entry["latent_entries_agree"] > 0.95
            assert entry["kept_fp32_nodes"] > 0
    assert not any(n.startswith(".") for n in names)  # the scratch dir is gone
    manifest = json.loads((out / "manifest.json").read_text())
    assert "vision_model_quantized.onnx" in manifest["files"] and "text_model_fp16.onnx" in manifest["files"]
    assert report["precisions"] == ALL


def test_edit_nodes_named_and_kept_out_of_quantization(variants):
    _, out, _ = variants
    fp32 = onnx.load(str(out / "vision_model.onnx"))
    names = edit_nodes(fp32)
    assert names and all("debias_edit" in n for n in names)
    assert len(mask_outputs(fp32)) == 2  # one threshold compare, one top-k mask
    q = onnx.load(str(out / "vision_model_quantized.onnx"))
    ops = {n.name: n.op_type for n in q.graph.node}
    assert any(op in ("MatMulInteger", "DynamicQuantizeLinear") for op in ops.values())  # the tower is quantized ...
    edit_ops = {ops[n] for n in names if n in ops}
    assert "MatMul" in edit_ops and not edit_ops & {"MatMulInteger", "DynamicQuantizeLinear"}  # ... the edit is not
    h = onnx.load(str(out / "vision_model_fp16.onnx"))
    assert [i.type.tensor_type.elem_type for i in h.graph.input] == [onnx.TensorProto.FLOAT]  # float32 I/O kept
    blocked = {n.name: n for n in h.graph.node}
    init16 = {i.name for i in h.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert init16  # the tower runs in fp16
    assert not any(x in init16 for n in names if n in blocked for x in blocked[n].input)  # the edit does not


@pytest.mark.parametrize("damage", ["drop", "flip-decoder"])
def test_variant_that_loses_the_edit_fails_and_leaves_nothing(tmp_path, monkeypatch, damage):
    adapter = tiny_clip(seed=0)
    # residual mode: the edit's effect is small next to the embedding, so only the edit check can tell
    apply_edits(adapter, SAEEdit(site="image.-1", sae=random_sae(32, 96, seed=1), neurons=[2, 9], alpha=0.1, mode="residual"))
    real = quantize.convert

    def drops_edit(src, dst, precision):  # "converts" the unedited graph in place of the edited one
        base = src.parent / ".variants" / f"{src.stem}_base.onnx"
        return real(base if base.is_file() else src, dst, precision)

    def flips_decoder(src, dst, precision):  # converts, then negates the edit's decoder (latents unchanged)
        out = real(src, dst, precision)
        if "_base" not in src.name:
            model = onnx.load(str(dst))
            inits = {i.name: i for i in model.graph.initializer}
            dec = [n for n in model.graph.node if n.name in set(edit_nodes(model)) and n.op_type == "MatMul"][-1]
            w = next(inits[x] for x in dec.input if x in inits)
            w.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(w), w.name))
            onnx.save(model, str(dst))
        return out

    monkeypatch.setattr(quantize, "convert", drops_edit if damage == "drop" else flips_decoder)
    match = "lost the edit's latent masks" if damage == "drop" else "does not keep the edit"
    with pytest.raises(ValidationError, match=match):
        export_onnx(adapter, tmp_path / "o", towers=["image"], precisions=["fp16"],
                    exporter="torchscript")  # the exporter is not under test
    assert list(tmp_path.iterdir()) == []


def test_parse_precisions():
    assert parse_precisions("int8,fp16") == ALL
    assert parse_precisions(["fp16"]) == ["fp32", "fp16"]
    with pytest.raises(Exception, match="unknown precision 'bf16'"):
        parse_precisions("fp32,bf16")


def test_cli_export_precisions(tmp_path):
    from debias_export.cli.main import main

    edits()[0].save(tmp_path / "edit")
    out = tmp_path / "x"
    base = ["export", "--model", "tiny-clip", "--edit", str(tmp_path / "edit"), "--tower", "image", "--out", str(out)]
    assert main(base + ["--precision", "fp32,int4"]) == 2 and not out.exists()
    assert main(base + ["--precision", "fp32,fp16,int8", "--exporter", "torchscript"]) == 0
    assert {"vision_model_fp16.onnx", "vision_model_quantized.onnx"} <= {p.name for p in (out / "onnx").iterdir()}
    assert main(["verify", str(out)]) == 0




def test_bench_reports_int8_ratio(tmp_path):
    adapter = tiny_clip(seed=0)
    variants = {"reconstruct": PatchSet.compile("reconstruct", adapter, edits()[:1])}
    result = run_benchmark(adapter, variants, ["image"], batch_sizes=(2,), runtimes=("torch", "ort"),
                           dtypes=("fp32", "int8"), reps=2, warmup=1, timer=TickClock(), work_dir=tmp_path / "w",
                           exporter="torchscript", count_flops=False)
    assert {(s["runtime"], s["dtype"]) for s in result["skipped"]} == {("torch", "int8")}
    rows = {(r["runtime"], r["dtype"], r["variant"]) for r in result["latency"]}
    assert ("ort", "int8", "reconstruct") in rows and ("ort", "int8", BASELINE) in rows
    assert any(h["dtype"] == "int8" for h in result["headline"])
    check = next(c for c in result["checks"] if c["dtype"] == "int8")
    assert check["max_abs_diff_vs_unmodified"] > 1e-4  # the edit survived quantization in the benchmarked graph
