"""Latency and FLOPs of patched vs unmodified encoders (``debias-export bench``).

:func:`run_benchmark` times every variant (unmodified first, then each patched variant) in the
same process with interleaved repetitions, per tower x runtime x dtype x batch size, counts FLOPs
with PyTorch and from the exported ONNX graphs, and returns one JSON-serialisable dict that
:mod:`debias_export.bench.report` turns into ``bench.json`` + ``bench.md`` + ``bench_latency.png``.
"""
from __future__ import annotations

import datetime as _dt
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..adapters import ModelAdapter
from ..core.errors import DebiasError
from ..export.onnx_export import DEFAULT_EXPORTER, DEFAULT_OPSET, check_exporter, exporter_info
from .flops import count_params, edit_params, onnx_flops, torch_flops
from .patchsets import PatchSet, VariantSwitch
from .runners import OrtRunner, TorchRunner, available_runtimes, dtype_skip_reason, machine_info, ort_profile
from .towers import DTYPES, bench_inputs, export_variants
from .timing import paired_ratios, summarize, time_interleaved

BASELINE = "unmodified"
SCHEMA = "debias-export-bench/1"


def run_benchmark(adapter: ModelAdapter, variants: dict[str, PatchSet], towers: Sequence[str],
                  batch_sizes: Sequence[int] = (1, 8, 32), runtimes: Sequence[str] = ("torch", "ort"),
                  dtypes: Sequence[str] = ("fp32",), reps: int = 20, warmup: int = 3, threads: int = 1,
                  opt_level: str = "all", order: str = "abab", count_flops: bool = True, profile: bool = False,
                  work_dir: Path | None = None, timer: Callable[[], float] = time.perf_counter,
                  log: Callable[[str], None] = lambda m: None, meta: dict[str, Any] | None = None,
                  exporter: str = DEFAULT_EXPORTER) -> dict[str, Any]:
    """Benchmark ``variants`` (name -> compiled :class:`PatchSet`) against the unmodified model.

    The model must be unmodified on entry (for a loaded patched model, pass the discovered patch
    set after uninstalling it). ``threads`` fixes both ``torch.set_num_threads`` and ORT's
    intra-op threads. ``exporter`` writes the ONNX graphs the ``ort`` runtimes run and the ONNX
    FLOPs count reads (:func:`debias_export.export.export_graph`). Returns the result dict (see
    ``benchmarks/README.md`` for its layout).
    """
    if not variants:
        raise DebiasError("nothing to benchmark: no patched variant given")
    if BASELINE in variants:
        raise DebiasError(f"variant name {BASELINE!r} is reserved for the unmodified model")
    for t in towers:
        adapter.check_tower(t)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise DebiasError(f"unknown dtype(s) {bad}; known: {', '.join(DTYPES)}")
    check_exporter(exporter, DEFAULT_OPSET)
    torch.set_num_threads(threads)
    avail = available_runtimes()
    unknown = [r for r in runtimes if r not in avail]
    if unknown:
        raise DebiasError(f"unknown runtime(s) {unknown}; known: {', '.join(avail)}")
    switch = VariantSwitch(adapter.model, {BASELINE: None, **variants})
    result: dict[str, Any] = {
        "schema": SCHEMA, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(threads), "model": {**adapter.describe(), **(meta or {})},
        "settings": {"towers": list(towers), "batch_sizes": list(batch_sizes), "runtimes": list(runtimes),
                     "dtypes": list(dtypes), "reps": reps, "warmup": warmup, "threads": threads,
                     "ort_graph_optimization": opt_level, "onnx_exporter": exporter_info(exporter, DEFAULT_OPSET),
                     "order": ("interleaved ABAB per rep, variants in listed order" if order == "abab" else
                               "interleaved, rotating the starting variant each rep (ABC, BCA, CAB, ...)"),
                     "variants": [BASELINE, *variants]},
        "variants": {name: {"records": [{"module": p, "positions": w.positions, "edits": [e.spec() for e in w.edits]}
                                        for p, w, _ in ps.entries],
                            "folded": ps.folds,  # folded edits add no parameters and no ops
                            "edit_params": edit_params(ps.wrappers())} for name, ps in variants.items()},
        "params": {"model": count_params(adapter.model)},
        "skipped": [], "flops": [], "latency": [], "checks": [], "profiles": [],
    }
    own_tmp = None
    if work_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="debias-bench-")
        work_dir = Path(own_tmp.name)
    try:
        for tower in towers:
            _bench_tower(adapter, tower, switch, result, batch_sizes, runtimes, dtypes, reps, warmup, threads,
                         opt_level, order, count_flops, profile, Path(work_dir), timer, avail, log, exporter)
    finally:
        switch.reset()
        if own_tmp is not None:
            own_tmp.cleanup()
    result["headline"] = headline(result)
    return result


def _bench_tower(adapter, tower, switch, result, batch_sizes, runtimes, dtypes, reps, warmup, threads, opt_level, order,
                 count_flops, profile, work_dir, timer, avail, log, exporter=DEFAULT_EXPORTER) -> None:
    names = list(switch.variants)
    onnx_paths: dict[str, dict[str, Path]] = {}
    wanted: set[str] = set()
    if avail["ort"] is None and (count_flops or "ort" in runtimes):
        wanted.add("fp32")  # the ONNX FLOPs cross-check needs the fp32 graphs
    if "ort" in runtimes and avail["ort"] is None:
        wanted |= {d for d in dtypes if dtype_skip_reason("ort", d) is None}
    if "ort-cuda" in runtimes and avail["ort-cuda"] is None:
        wanted |= set(dtypes)
    for dtype in sorted(wanted):
        dev = "cuda" if dtype == "fp16" else "cpu"  # fp16 graphs are traced (and only run) on CUDA
        log(f"[{tower}] exporting ONNX ({dtype}) for {', '.join(names)}")
        onnx_paths[dtype] = export_variants(adapter, tower, switch, work_dir / dtype, dtype=dtype, device=dev,
                                            exporter=exporter)
    adapter.model.to(device="cpu", dtype=torch.float32)
    for ps in switch.variants.values():
        if ps is not None:
            ps.to(device="cpu", dtype=torch.float32)

    if count_flops:
        _count_flops(adapter, tower, switch, result, batch_sizes, onnx_paths.get("fp32"), log)

    for runtime in runtimes:
        if avail[runtime] is not None:
            result["skipped"].append({"tower": tower, "runtime": runtime, "dtype": "*", "reason": avail[runtime]})
            continue
        for dtype in dtypes:
            reason = dtype_skip_reason(runtime, dtype)
            if reason:
                result["skipped"].append({"tower": tower, "runtime": runtime, "dtype": dtype, "reason": reason})
                continue
            device = "cuda" if runtime.endswith("cuda") else "cpu"
            if runtime.startswith("ort"):
                runner = OrtRunner(onnx_paths[dtype], dtype, device=device, threads=threads, opt_level=opt_level)
            else:
                runner = TorchRunner(adapter, tower, switch, dtype, device=device)
            _check_outputs(adapter, tower, runner, runtime, dtype, result)
            for batch in batch_sizes:
                inputs = bench_inputs(adapter, tower, batch)
                log(f"[{tower}] {runtime} {dtype} batch {batch}: {warmup} warm-up + {reps} interleaved reps")
                samples = time_interleaved(runner.calls(inputs), reps=reps, warmup=warmup, timer=timer, sync=runner.sync,
                                           order=order)
                switch.reset()
                _record_latency(result, tower, runtime, dtype, batch, samples)
            if profile and runtime == "ort" and dtype == "fp32":
                batch = sorted(batch_sizes)[len(batch_sizes) // 2]  # the middle batch size
                inputs = bench_inputs(adapter, tower, batch)
                for name, path in onnx_paths[dtype].items():
                    ps = switch.variants[name]
                    mods = [p for p, _, _ in ps.entries] if ps is not None else []
                    prof = ort_profile(path, inputs, threads=threads, opt_level=opt_level, patch_modules=mods)
                    result["profiles"].append({"tower": tower, "runtime": runtime, "variant": name, "batch": batch, **prof})
            del runner
            adapter.model.to(device="cpu", dtype=torch.float32)
            for ps in switch.variants.values():
                if ps is not None:
                    ps.to(device="cpu", dtype=torch.float32)


def _check_outputs(adapter, tower, runner, runtime, dtype, result) -> None:
    """Sanity: each runtime's variants differ from the baseline (the edit is really in the graph)."""
    outs = runner.outputs(bench_inputs(adapter, tower, 2, seed=123))
    base = outs[BASELINE]
    for name, out in outs.items():
        if name != BASELINE:
            result["checks"].append({"tower": tower, "runtime": runtime, "dtype": dtype, "variant": name,
                                     "max_abs_diff_vs_unmodified": float((out - base).abs().max())})


def _record_latency(result, tower, runtime, dtype, batch, samples: dict[str, list[float]]) -> None:
    base = samples[BASELINE]
    for name, xs in samples.items():
        row = {"tower": tower, "runtime": runtime, "dtype": dtype, "batch": batch, "variant": name,
               "samples_s": xs, "summary": summarize(xs)}
        if name != BASELINE:
            row["ratio"] = paired_ratios(xs, base)
        result["latency"].append(row)


def _count_flops(adapter, tower, switch, result, batch_sizes, paths, log) -> None:
    """PyTorch FLOPs at the smallest batch (a real forward); ONNX FLOPs at every batch (static count)."""
    b0 = min(batch_sizes)
    inputs0 = bench_inputs(adapter, tower, b0)
    log(f"[{tower}] counting FLOPs")
    torch_counts = {}
    for name in switch.variants:
        switch.activate(name)
        torch_counts[name] = torch_flops(lambda: adapter.embed(tower, inputs0))
    switch.reset()
    for batch in batch_sizes:
        shapes = {k: tuple(v.shape) for k, v in bench_inputs(adapter, tower, batch).items()}
        onnx_counts = {name: onnx_flops(p, shapes) for name, p in paths.items()} if paths else {}
        for name in switch.variants:
            row: dict[str, Any] = {"tower": tower, "batch": batch, "variant": name,
                                   "torch_flops": torch_counts[name] if batch == b0 else None}
            if name in onnx_counts:
                oc = onnx_counts[name]
                row.update(onnx_flops=oc["total"], onnx_by_op=oc["by_op"], onnx_unresolved=len(oc["unresolved"]),
                           onnx_shape_inference=oc["shape_inference"], onnx_initializer_params=oc["initializer_params"])
            if name != BASELINE:
                if row["torch_flops"] is not None:
                    row["torch_ratio"] = row["torch_flops"] / torch_counts[BASELINE]
                if name in onnx_counts:
                    row["onnx_ratio"] = oc["total"] / onnx_counts[BASELINE]["total"]
            result["flops"].append(row)


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per patched variant x tower x runtime x dtype x batch: latency and FLOPs ratios."""
    flops = {(r["tower"], r["batch"], r["variant"]): r for r in result["flops"]}
    rows = []
    for r in result["latency"]:
        if r["variant"] == BASELINE:
            continue
        f = flops.get((r["tower"], r["batch"], r["variant"]), {})
        rows.append({"tower": r["tower"], "runtime": r["runtime"], "dtype": r["dtype"], "batch": r["batch"],
                     "variant": r["variant"], "ratio_of_medians": r["ratio"]["ratio_of_medians"],
                     "paired_median": r["ratio"]["paired_median"], "paired_p10": r["ratio"]["paired_p10"],
                     "paired_p90": r["ratio"]["paired_p90"],
                     "paired_median_ci95": r["ratio"].get("paired_median_ci95"), "flops_ratio": f.get("onnx_ratio", f.get("torch_ratio"))})
    return rows


__all__ = ["run_benchmark", "headline", "PatchSet", "BASELINE"]
