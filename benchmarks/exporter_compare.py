"""Old (TorchScript) vs new (torch.export / dynamo) ONNX exporter on CLIP ViT-B/16, image and text towers.

Random weights (``arch:clip-vit-base-patch16``); one SAE edit at the last block of the tower (random
SAE, F = 8*d, 5 neurons, a = 0.6, reconstruct mode: the same synthetic edit as ``bench --random-sae``).
For each tower, both exporters write the unmodified and the patched graph through the package's own
export path (``bench.towers.export_variants`` -> ``export.export_graph``; traced at batch 2, text
padded to the 77-token context), then:

* exporter, opset, ONNX node count (as saved and after onnxruntime's ``all`` optimisations), file size,
  export seconds;
* max |onnxruntime - PyTorch| of every graph at batch 1 and 8 (shapes other than the traced one) and,
  for text, on unpadded prompts (a text length other than 77);
* onnxruntime CPU latency, 1 thread: the four sessions (2 exporters x unmodified/patched) timed
  interleaved in the same rounds (rotating start), batch 1 and 8; patched / unmodified per exporter as
  ratio of medians and paired median (95% CI), plus dynamo / torchscript per graph;
* the same ratio from ORT's profiler within one session's runs: 1 + (time in the patch's own nodes) /
  (time in the rest), which load drift cannot skew (``bench --profile``'s measure).

Writes ``benchmarks/results/exporter-compare/{results.json,results.md}``::

    nice .venv/bin/python benchmarks/exporter_compare.py [--reps 15] [--warmup 2] [--towers image,text]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from debias_export.workflow.model_specs import load_model_spec
from debias_export.bench.patchsets import PatchSet, VariantSwitch
from debias_export.bench.runners import machine_info, ort_profile, ort_session
from debias_export.bench.towers import bench_inputs, export_variants
from debias_export.bench.timing import paired_ratios, summarize, time_interleaved
from debias_export.cli.bench import random_sae_edits
from debias_export.export.onnx_export import DEFAULT_OPSET, exporter_info, graph_ops

ARCH = "arch:clip-vit-base-patch16"
EXPORTERS = ("torchscript", "dynamo")
OUT = Path(__file__).resolve().parent / "results" / "exporter-compare"


def optimized_nodes(path: Path) -> int:
    """Node count of the graph onnxruntime actually runs (``all`` optimisations, CPU EP)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # the "optimised model is hardware specific" notice: we only count its nodes
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def parity_cases(adapter, tower: str) -> dict[str, dict[str, torch.Tensor]]:
    cases = {f"b{b}": bench_inputs(adapter, tower, b) for b in (1, 8)}
    if tower == "text":  # unpadded: the longest prompt's length, not the 77-token context
        prompts = ["a photo of a nurse", "a close-up photo of a doctor smiling in a hospital corridor", "an engineer"]
        cases["b3_unpadded"] = dict(adapter.prepare_texts(prompts))
    return cases


def run_tower(adapter, tower: str, reps: int, warmup: int, work: Path, log) -> dict:
    site = adapter.default_site(tower).name
    edits = random_sae_edits(adapter, ["reconstruct"], [site], expansion=8, n_neurons=5)["reconstruct"]
    switch = VariantSwitch(adapter.model, {"unmodified": None, "patched": PatchSet.compile("patched", adapter, edits)})
    e = edits[0]
    out: dict = {"site": site, "edit": {"mode": e.mode, "alpha": e.alpha, "neurons": list(e.neurons),
                                        "d_in": e.sae.cfg.d_in, "num_latents": e.sae.cfg.num_latents},
                 "graphs": {}}
    paths: dict[str, Path] = {}
    for exporter in EXPORTERS:
        log(f"[{tower}] exporting with {exporter}")
        t0 = time.perf_counter()
        got = export_variants(adapter, tower, switch, work / exporter, exporter=exporter)
        seconds = time.perf_counter() - t0
        for variant, path in got.items():
            ops, opset = graph_ops(path)
            files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
            paths[f"{exporter}/{variant}"] = path
            out["graphs"][f"{exporter}/{variant}"] = {
                "exporter": exporter, "variant": variant, "opset": opset, "nodes": sum(ops.values()),
                "nodes_after_ort_optimisation": optimized_nodes(path), "ops": ops,
                "size_bytes": sum(p.stat().st_size for p in files), "files": sorted(p.name for p in files),
                "export_seconds_both_variants": round(seconds, 1)}
    # parity: every graph against the PyTorch model in the same variant, on shapes other than the traced one
    sessions = {k: ort_session(p, threads=1) for k, p in paths.items()}
    for name, inputs in parity_cases(adapter, tower).items():
        for variant in ("unmodified", "patched"):
            switch.activate(variant)
            with torch.inference_mode():
                ref = adapter.embed(tower, inputs).float()
            for exporter in EXPORTERS:
                sess = sessions[f"{exporter}/{variant}"]
                feeds = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
                got = torch.from_numpy(sess.run(None, feeds)[0])
                diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
                out["graphs"][f"{exporter}/{variant}"].setdefault("max_abs_diff_vs_torch", {})[
                    f"{name} {list(next(iter(inputs.values())).shape)}"] = diff
    switch.reset()
    # latency: all four sessions in the same interleaved rounds
    out["latency"] = {}
    for batch in (1, 8):
        inputs = bench_inputs(adapter, tower, batch)
        feeds = {k: v.numpy() for k, v in inputs.items()}
        calls = {}
        for key, sess in sessions.items():
            names = {i.name for i in sess.get_inputs()}
            calls[key] = (lambda s=sess, f={k: v for k, v in feeds.items() if k in names}: s.run(None, f))
        log(f"[{tower}] timing batch {batch}: {warmup} warm-up + {reps} interleaved rounds x {len(calls)} sessions")
        samples = time_interleaved(calls, reps=reps, warmup=warmup, order="rotate")
        row = {"stats_s": {k: summarize(v) for k, v in samples.items()}, "samples_s": samples}
        for exporter in EXPORTERS:
            row[f"{exporter} patched/unmodified"] = paired_ratios(samples[f"{exporter}/patched"],
                                                                  samples[f"{exporter}/unmodified"])
        for variant in ("unmodified", "patched"):
            row[f"{variant} dynamo/torchscript"] = paired_ratios(samples[f"dynamo/{variant}"],
                                                                 samples[f"torchscript/{variant}"])
        out["latency"][f"b{batch}"] = row
    # within-run attribution (insensitive to load drift): ORT profiler time in the patch's own nodes / the rest
    mods = [p for p, _, _ in switch.variants["patched"].entries]
    out["profile"] = {}
    for batch in (1, 8):
        for exporter in EXPORTERS:
            log(f"[{tower}] profiling {exporter}/patched at batch {batch}")
            prof = ort_profile(paths[f"{exporter}/patched"], bench_inputs(adapter, tower, batch), runs=3, threads=1,
                               patch_modules=mods)
            out["profile"][f"b{batch} {exporter}"] = {k: prof[k] for k in ("ms_total", "ms_patch", "patch_over_rest",
                                                                            "ms_patch_by_op")}
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# ONNX exporters on {res['model']}: TorchScript (old) vs torch.export / dynamo (new)", "",
             f"{res['date']}; {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']} CPU EP, 1 thread, "
             f"torch {m['torch']}; load average at start {m.get('loadavg')}. Random weights ({res['model']}); SAE edit "
             f"(reconstruct, F = 8d, 5 neurons, a = 0.6) at the last block. Command: `{res['command']}`.", "",
             "| tower | exporter | opset | nodes (saved -> after ORT opt.) | patched nodes | max abs diff vs PyTorch "
             "(all graphs, b1 / b8 / other text length) | ORT latency patched/unmodified b1 | b8 | profiler b1 / b8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tower, t in res["towers"].items():
        for exporter in EXPORTERS:
            u, p = t["graphs"][f"{exporter}/unmodified"], t["graphs"][f"{exporter}/patched"]
            diff = max(max(g["max_abs_diff_vs_torch"].values()) for g in (u, p))
            cells = []
            for b in ("b1", "b8"):
                r = t["latency"][b][f"{exporter} patched/unmodified"]
                ci = r.get("paired_median_ci95")
                cells.append(f"{r['ratio_of_medians']:.3f} (paired {r['paired_median']:.3f}"
                             + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + ")")
            prof = [t["profile"][f"{b} {exporter}"]["patch_over_rest"] for b in ("b1", "b8")]
            prof_cell = " / ".join("-" if x is None else f"{1 + x:.4f}" for x in prof)
            lines.append(f"| {tower} | {exporter} | {p['opset']} | {u['nodes']} -> {u['nodes_after_ort_optimisation']} "
                         f"| {p['nodes']} -> {p['nodes_after_ort_optimisation']} | {diff:.2g} | {cells[0]} | {cells[1]} "
                         f"| {prof_cell} |")
    lines += ["", "Same graph, dynamo / torchscript latency (paired median over the same rounds):", "",
              "| tower | graph | b1 | b8 | file MB (torchscript / dynamo) | export s, both variants (torchscript / dynamo) |",
              "|---|---|---|---|---|---|"]
    for tower, t in res["towers"].items():
        for variant in ("unmodified", "patched"):
            r1, r8 = (t["latency"][b][f"{variant} dynamo/torchscript"]["paired_median"] for b in ("b1", "b8"))
            ts, dy = t["graphs"][f"torchscript/{variant}"], t["graphs"][f"dynamo/{variant}"]
            lines.append(f"| {tower} | {variant} | {r1:.3f} | {r8:.3f} | {ts['size_bytes'] / 1e6:.1f} / {dy['size_bytes'] / 1e6:.1f} "
                         f"| {ts['export_seconds_both_variants']} / {dy['export_seconds_both_variants']} |")
    lines += ["", "Per-graph medians (ms):", ""]
    for tower, t in res["towers"].items():
        for b, row in t["latency"].items():
            cells = ", ".join(f"{k} {v['median'] * 1e3:.1f}" for k, v in row["stats_s"].items())
            lines.append(f"- {tower} {b}: {cells}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--towers", default="image,text")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--model", default=ARCH, help="model spec (default: the ViT-B/16 architecture; tiny-clip for a smoke run)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": "benchmarks/exporter_compare.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine_info(1), "model": a.model, "opset": DEFAULT_OPSET,
           "exporters": {e: exporter_info(e, DEFAULT_OPSET) for e in EXPORTERS}, "towers": {}}
    for tower in [t.strip() for t in a.towers.split(",") if t.strip()]:
        adapter = load_model_spec(a.model)  # fresh model per tower: only one tower's sessions in memory at a time
        adapter.model.eval()
        with tempfile.TemporaryDirectory(prefix="exporter-compare-") as tmp:
            res["towers"][tower] = run_tower(adapter, tower, a.reps, a.warmup, Path(tmp), log)
        del adapter
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
