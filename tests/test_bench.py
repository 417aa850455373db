"""Benchmark harness: interleaving, ratio maths (fake clock), FLOPs counters, result structure, CLI."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from debias_export import SAEEdit, apply_edits
from debias_export.bench import BASELINE, PatchSet, run_benchmark
from debias_export.bench.flops import onnx_flops, torch_flops
from debias_export.bench.patchsets import VariantSwitch
from debias_export.bench.timing import interleaved_schedule, paired_ratios, quantile, summarize, time_interleaved
from debias_export.workflow.testing import random_sae
from fake_clock import TickClock


class FakeClock:
    """Advances only when a benchmarked call runs, by that variant's scripted duration."""

    def __init__(self):
        self.now, self.log = 0.0, []

    def __call__(self) -> float:
        return self.now

    def fn(self, name, durations):
        it = iter(durations)

        def call():
            self.log.append(name)
            self.now += next(it)

        return call




def test_interleaving_order_and_paired_maths():
    clock = FakeClock()
    a = [9.0, 1.0, 2.0, 4.0, 3.0]  # first value is the (untimed) warm-up
    b = [9.0, 1.5, 2.0, 6.0, 3.25]
    fns = {"A": clock.fn("A", a), "B": clock.fn("B", b)}
    out = time_interleaved(fns, reps=4, warmup=1, timer=clock)
    assert clock.log == ["A", "B"] * 5  # warm-up round then ABAB..., never AAAA BBBB
    assert out == {"A": a[1:], "B": b[1:]}
    r = paired_ratios(out["B"], out["A"])
    assert r["ratio_of_medians"] == pytest.approx(np.median(b[1:]) / np.median(a[1:]))
    assert r["paired_median"] == pytest.approx(np.median([1.5, 1.0, 1.5, 3.25 / 3]))
    assert r["paired_p10"] == pytest.approx(np.quantile([1.5, 1.0, 1.5, 3.25 / 3], 0.1))
    assert r["n_pairs"] == 4


def test_paired_ratio_differs_from_ratio_of_medians_under_drift():
    # Load drifts up 10x during the run; the patched variant is always exactly 2% slower than its pair.
    base = [1.0, 2.0, 5.0, 10.0, 10.0]
    test = [x * 1.02 for x in base]
    r = paired_ratios(test, base)
    assert r["paired_median"] == pytest.approx(1.02)
    assert r["paired_p10"] == pytest.approx(1.02) and r["paired_p90"] == pytest.approx(1.02)
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_prepare_runs_outside_the_timed_region():
    clock = FakeClock()

    class Call:
        def __init__(self):
            self.prepared = 0

        def prepare(self):
            self.prepared += 1
            clock.now += 100.0  # would dominate if it were timed

        def __call__(self):
            clock.now += 1.0

    c = Call()
    out = time_interleaved({"A": c}, reps=3, warmup=2, timer=clock)
    assert out["A"] == [1.0, 1.0, 1.0] and c.prepared == 5


def test_median_ci_uses_binomial_order_statistics():
    from debias_export.bench.timing import median_ci

    assert median_ci([5.0, 1.0, 3.0, 2.0, 4.0]) is None  # n=5: no 95% interval exists
    assert median_ci([float(i) for i in range(1, 21)]) == (6.0, 15.0)  # textbook ranks for n=20
    assert median_ci([float(i) for i in range(100, 0, -1)]) == (40.0, 61.0)


def test_schedule_and_quantiles_match_numpy():
    assert interleaved_schedule(["u", "p", "q"], 2) == [(0, "u"), (0, "p"), (0, "q"), (1, "u"), (1, "p"), (1, "q")]
    rot = [n for _, n in interleaved_schedule(["u", "p", "q"], 4, order="rotate")]
    assert rot == ["u", "p", "q", "p", "q", "u", "q", "u", "p", "u", "p", "q"]
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert quantile(xs, q) == pytest.approx(np.quantile(xs, q))
    s = summarize(xs)
    assert s["iqr"] == pytest.approx(np.quantile(xs, 0.75) - np.quantile(xs, 0.25)) and s["n"] == 8


class MatmulOnly(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(12, 20, generator=g))
        self.lin = nn.Linear(20, 7)
        self.conv = nn.Conv2d(3, 5, kernel_size=3, stride=2, bias=False)

    def forward(self, x, img):
        y = self.lin(x @ self.w1)  # [B, T, 12] @ [12, 20] then Linear(20 -> 7)
        return y, self.conv(img)


def test_flops_of_known_module_are_exact_in_torch_and_onnx(tmp_path):
    B, T = 3, 5
    x, img = torch.randn(B, T, 12), torch.randn(2, 3, 9, 9)
    conv_out = 2 * (2 * 5 * 4 * 4) * (3 * 3 * 3)  # 2 * out elements * (Cin * kh * kw)
    expected = 2 * B * T * 12 * 20 + 2 * B * T * 20 * 7 + conv_out
    m = MatmulOnly().eval()
    assert torch_flops(lambda: m(x, img)) == expected
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (x, img), str(path), input_names=["x", "img"], output_names=["y", "c"], dynamo=False,
                      opset_version=17, dynamic_axes={"x": {0: "b", 1: "t"}, "img": {0: "n"}})
    counted = onnx_flops(path, {"x": (B, T, 12), "img": (2, 3, 9, 9)})
    assert counted["total"] == expected and counted["unresolved"] == []
    assert counted["by_op"]["Conv"] == conv_out
    # the dynamic axes really are re-pinned: doubling the batch doubles the matmul FLOPs
    assert onnx_flops(path, {"x": (2 * B, T, 12), "img": (2, 3, 9, 9)})["total"] == 2 * (expected - conv_out) + conv_out
    with pytest.raises(ValueError, match="no concrete shape"):
        onnx_flops(path, {"x": (B, T, 12)})


def _variants(clip):
    mk = lambda mode: [SAEEdit(site="image.-1", sae=random_sae(32, 256), neurons=[1, 5], mode=mode),
                       SAEEdit(site="text.-1", sae=random_sae(32, 256, seed=1), neurons=[2], mode=mode)]
    return {m: PatchSet.compile(m, clip, mk(m)) for m in ("reconstruct", "residual")}


def test_patch_switch_reproduces_apply_edits_and_restores(clip, clip_inputs):
    inp = clip_inputs["text"]
    with torch.no_grad():
        base = clip.embed("text", inp)
        edits = [SAEEdit(site="text.-1", sae=random_sae(32, 256, seed=1), neurons=[2], mode="reconstruct")]
        h = apply_edits(clip, edits)
        want = clip.embed("text", inp)
        h.remove()
        switch = VariantSwitch(clip.model, {BASELINE: None, "p": PatchSet.compile("p", clip, edits)})
        for name, expect in [("p", want), (BASELINE, base), ("p", want), (BASELINE, base)]:
            switch.activate(name)
            assert torch.equal(clip.embed("text", inp), expect)


def test_run_benchmark_result_structure(clip, tmp_path):
    from debias_export.bench.report import markdown, write_report

    # the legacy exporter here (6 graphs: ~5x faster to export); the default (dynamo) runs the same bench code in
    # the LLaVA test below and in test_command_coverage's bench per family. The profile reads either's node scopes.
    result = run_benchmark(clip, _variants(clip), ["image", "text"], batch_sizes=(1, 2), runtimes=("torch", "ort"),
                           dtypes=("fp32", "fp16"), reps=2, warmup=1, timer=TickClock(), work_dir=tmp_path / "w",
                           profile=True, exporter="torchscript")
    assert result["settings"]["variants"] == [BASELINE, "reconstruct", "residual"]
    assert result["settings"]["onnx_exporter"]["exporter"] == "torchscript"
    # 2 towers x 2 runtimes x 1 dtype x 2 batches x 3 variants; fp16 on CPU skipped with a reason
    assert len(result["latency"]) == 24 and len(result["headline"]) == 16
    assert {(s["runtime"], s["dtype"]) for s in result["skipped"]} == {("torch", "fp16"), ("ort", "fp16")}
    assert all(s["reason"] for s in result["skipped"])
    for row in result["latency"]:
        assert row["samples_s"] == [1.0, 1.0] and ("ratio" in row) == (row["variant"] != BASELINE)
    assert all(h["ratio_of_medians"] == 1.0 and h["paired_median"] == 1.0 for h in result["headline"])
    for f in result["flops"]:  # the two independent counters agree on a real (tiny) CLIP
        assert f["onnx_unresolved"] == 0
        if f["torch_flops"] is not None:
            assert f["onnx_flops"] == f["torch_flops"]
        if f["variant"] != BASELINE:
            assert f["onnx_ratio"] > 1.0
    by = {(f["tower"], f["batch"], f["variant"]): f["onnx_flops"] for f in result["flops"]}
    assert by[("image", 2, "residual")] < by[("image", 2, "reconstruct")]
    assert all(c["max_abs_diff_vs_unmodified"] > 1e-4 for c in result["checks"])  # the edits are in the graphs
    assert result["variants"]["residual"]["edit_params"] < result["variants"]["reconstruct"]["edit_params"]
    # ORT profile attributes node time to the patch's own nodes (found by their ONNX scope)
    assert {(p["tower"], p["variant"]) for p in result["profiles"]} == {(t, v) for t in ("image", "text")
                                                                         for v in (BASELINE, "reconstruct", "residual")}
    for p in result["profiles"]:
        assert (p["ms_patch"] > 0) == (p["variant"] != BASELINE) and p["ms_total"] > p["ms_patch"]
    json.dumps(result)
    assert "| image | ort | fp32 | 2 | residual |" in markdown(result)
    out = write_report(result, tmp_path / "r")
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench_latency.png"]
    with pytest.raises(Exception, match="already exists"):
        write_report(result, tmp_path / "r")
    # the model is left unmodified
    assert not any(type(m).__name__ == "SiteEdit" for m in clip.model.modules())


def test_cli_bench(tmp_path):
    from debias_export.cli.main import main

    edit_dir = tmp_path / "edit"
    SAEEdit(site="image.-1", sae=random_sae(32, 256), neurons=[3]).save(edit_dir)
    out = tmp_path / "out"
    argv = ["bench", "--model", "tiny-clip", "--edit", str(edit_dir), "--batch-sizes", "1", "--runtimes", "torch",
            "--reps", "2", "--warmup", "0", "--no-flops", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "bench.json").read_text())
    assert res["settings"]["towers"] == ["image"] and [h["variant"] for h in res["headline"]] == ["edit"]
    assert main(argv) == 2  # existing output refused
    assert main(argv[:-2] + ["--out", str(tmp_path / "o2"), "--batch-sizes", "0"]) == 2
    assert main(["bench", "--model", "tiny-clip", "--out", str(tmp_path / "o3")]) == 2  # nothing to compare


def test_llava_every_token_site_counts_agree_on_the_edit(tmp_path):
    from debias_export.adapters.llava import tiny_llava

    llava = tiny_llava()
    variants = {m: PatchSet.compile(m, llava, [SAEEdit(site="image.-2", sae=random_sae(32, 256), neurons=[1, 5], mode=m)])
                for m in ("reconstruct", "residual")}
    assert variants["reconstruct"].wrappers()[0].positions is None  # every token reaches the LM: no pruning
    res = run_benchmark(llava, variants, ["image"], batch_sizes=(2,), runtimes=("ort",), reps=1, warmup=0,
                        timer=TickClock(), work_dir=tmp_path, profile=True)
    assert res["settings"]["onnx_exporter"]["exporter"] == "dynamo"  # the default: the profile maps its node metadata
    assert all((p["ms_patch"] > 0) == (p["variant"] != BASELINE) for p in res["profiles"])
    f = {r["variant"]: r for r in res["flops"]}
    # eager HF computes the unused last block; the traced graph drops it, so totals differ by one block,
    # but the edit's own cost is identical in both counters
    for m in ("reconstruct", "residual"):
        assert f[m]["torch_flops"] - f[BASELINE]["torch_flops"] == f[m]["onnx_flops"] - f[BASELINE]["onnx_flops"] > 0
    assert f[BASELINE]["onnx_flops"] < f[BASELINE]["torch_flops"]
    assert all(c["max_abs_diff_vs_unmodified"] > 0 for c in res["checks"])


def test_cli_bench_exported_dir(tmp_path, clip):
    export = pytest.importorskip("debias_export.export.safetensors_export")
    apply_edits(clip, SAEEdit(site="text.-1", sae=random_sae(32, 256), neurons=[3, 4]))
    export.export_patched(clip, tmp_path / "exp")
    from debias_export.cli.main import main

    out = tmp_path / "out"
    argv = ["bench", "--export", str(tmp_path / "exp"), "--batch-sizes", "2", "--runtimes", "torch,ort",
            "--reps", "2", "--warmup", "0", "--out", str(out)]
    assert main(argv + ["--exporter", "optimum"]) == 2  # bench graphs have no optimum OnnxConfig: not a choice
    assert main(argv + ["--exporter", "torchscript"]) == 0  # the legacy tracer on request (the default is dynamo)
    res = json.loads((out / "bench.json").read_text())
    assert res["settings"]["onnx_exporter"]["exporter"] == "torchscript"
    assert res["settings"]["towers"] == ["text"] and {h["variant"] for h in res["headline"]} == {"patched"}
    assert all(c["max_abs_diff_vs_unmodified"] > 1e-4 for c in res["checks"])
