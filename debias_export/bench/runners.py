"""Runtimes that execute one tower of an unmodified and a patched model side by side.

Variants (:mod:`.patchsets`) share one set of base weights. ONNX variants are exported from the same
in-memory model with the patch installed or not (:mod:`.towers`), and run in separate onnxruntime sessions.

Runtimes: ``torch`` (eager, CPU), ``torch-cuda``, ``ort`` (onnxruntime CPU EP) and ``ort-cuda``.
"""
from __future__ import annotations

import ast
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch

from ..adapters import ModelAdapter
from ..runtime import EDIT_ATTR
from .patchsets import Call, VariantSwitch
from .towers import DTYPES

RUNTIMES = ("torch", "ort", "torch-cuda", "ort-cuda")


# ----- sessions ------------------------------------------------------------------------------------
def ort_session(path: Path, device: str = "cpu", threads: int = 1, opt_level: str = "all",
                profile_prefix: str | None = None):
    """onnxruntime session with fixed intra-op threads (recorded) and graph optimisation level."""
    import onnxruntime as ort  # optional extra ([cpu] / [gpu]): only to run graphs

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[opt_level]
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=providers)


def available_runtimes() -> dict[str, str | None]:
    """Each runtime -> ``None`` when usable here, else the reason it is skipped."""
    out: dict[str, str | None] = {"torch": None}
    try:
        import onnxruntime as ort  # optional extra ([cpu] / [gpu]): only to run graphs

        ort_ok, cuda_ep = True, "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        ort_ok, cuda_ep = False, False
    out["ort"] = None if ort_ok else "onnxruntime is not installed"
    has_cuda = torch.cuda.is_available()
    out["torch-cuda"] = None if has_cuda else "no CUDA device"
    out["ort-cuda"] = None if (has_cuda and cuda_ep) else ("no CUDA device" if not has_cuda else "onnxruntime CUDA EP not installed")
    return out


def dtype_skip_reason(runtime: str, dtype: str) -> str | None:
    """Why a (runtime, dtype) pair is not benchmarked, or ``None`` when it is."""
    if dtype == "fp32":
        return None
    if dtype == "int8":
        if runtime == "ort":
            return None
        return ("int8 is onnxruntime's dynamic quantization (export --precision int8), a CPU deployment path; "
                f"not benchmarked on {runtime}")
    if dtype != "fp16":
        return f"unknown dtype {dtype}"
    if runtime == "torch":
        return ("PyTorch CPU fp16: not a deployment path; several CPU kernels upcast or run scalar, so timings "
                "would measure kernel coverage, not the edit")
    if runtime == "ort":
        return ("onnxruntime CPU EP has fp16 kernels for few ops; a fp16 graph is partitioned with Casts, so "
                "timings would measure cast overhead, not the edit")
    return None


def _np(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).numpy() for k, v in inputs.items()}


class TorchRunner:
    """Eager PyTorch (CPU or CUDA): one shared model, variants switched in the untimed prepare step."""

    def __init__(self, adapter: ModelAdapter, tower: str, switch: VariantSwitch, dtype: str, device: str = "cpu"):
        self.adapter, self.tower, self.switch, self.device, self.dtype = adapter, tower, switch, device, DTYPES[dtype]
        adapter.model.to(device=device, dtype=self.dtype)
        for ps in switch.variants.values():
            if ps is not None:
                ps.to(device=device, dtype=self.dtype)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def calls(self, inputs: dict[str, torch.Tensor]) -> dict[str, Call]:
        dev_inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}

        def make(name: str) -> Call:
            def fn():
                with torch.inference_mode():
                    return self.adapter.embed(self.tower, dev_inputs)

            return Call(fn, prepare=lambda: self.switch.activate(name))

        return {name: make(name) for name in self.switch.variants}

    def outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, call in self.calls(inputs).items():
            call.prepare()
            out[name] = call().float().cpu()
        self.switch.reset()
        return out


class OrtRunner:
    """onnxruntime (CPU or CUDA EP): one session per variant's exported graph, created once."""

    def __init__(self, onnx_paths: dict[str, Path], dtype: str, device: str = "cpu", threads: int = 1,
                 opt_level: str = "all"):
        self.dtype = DTYPES[dtype]
        self.sessions = {name: ort_session(p, device=device, threads=threads, opt_level=opt_level)
                         for name, p in onnx_paths.items()}

    def sync(self) -> None:  # session.run returns host arrays: already synchronous
        return None

    def calls(self, inputs: dict[str, torch.Tensor]) -> dict[str, Call]:
        feeds = _np(inputs, self.dtype)
        return {name: Call(lambda s=sess: s.run(None, feeds)) for name, sess in self.sessions.items()}

    def outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(call()[0]).float() for name, call in self.calls(inputs).items()}


def onnx_scope(module_path: str) -> str:
    """TorchScript-exporter node-name scope of a module: ``a.b.layers.11`` -> ``a/b/layers.11``."""
    parts: list[str] = []
    for p in module_path.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        else:
            parts.append(p)
    return "/".join(parts)


def _scoped_node_names(path: Path) -> dict[str, str]:
    """Node name -> TorchScript-style scoped name (``/a/b/layers.11/Op``) for a dynamo-exported graph.

    The dynamo exporter names nodes ``node_<Op>_<n>`` and records each node's module path in its
    ``pkg.torch.onnx.name_scopes`` metadata; the TorchScript exporter puts the scope in the name itself.
    """
    out = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in meta:
            scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])  # [root, module paths..., fx node]
            module = next((s for s in reversed(scopes[:-1]) if s), "")
            out[node.name] = "/" + (onnx_scope(module) + "/" if module else "") + node.op_type
    return out


def ort_profile(path: Path, inputs: dict[str, torch.Tensor], runs: int = 3, threads: int = 1,
                opt_level: str = "all", patch_modules: list[str] = ()) -> dict[str, Any]:
    """ORT's built-in profiler over ``runs`` calls (after one warm-up): ms per call by op type, and the
    ms spent in the patch's own nodes (nodes inside a patched module's ``debias_edit`` scope).
    ``patch_over_rest`` = patch ms / other ms measures the edit's cost *within the same runs*, so unlike
    comparing two timed sessions it is insensitive to load drift.
    """
    # the edit runs as a hook-called child named ``debias_edit``: its nodes carry that scope in their names
    # (TorchScript puts it under the block list's scope, so every patched site shares it)
    scope = f"/{EDIT_ATTR}/"
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, threads=threads, opt_level=opt_level, profile_prefix=str(Path(tmp) / "prof"))
        feeds = _np(inputs, torch.float32)
        sess.run(None, feeds)
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    scoped = _scoped_node_names(path)
    by_op: dict[str, float] = {}
    patch_by_op: dict[str, float] = {}
    patch_ms = total = 0.0
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            ms = ev.get("dur", 0) / 1000.0 / (runs + 1)
            op = ev.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + ms
            total += ms
            name = ev["name"][:-len("_kernel_time")]
            name = scoped.get(name, name)
            if patch_modules and scope in name:
                patch_ms += ms
                patch_by_op[op] = patch_by_op.get(op, 0.0) + ms
    return {"ms_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])), "ms_total": total, "ms_patch": patch_ms,
            "ms_patch_by_op": dict(sorted(patch_by_op.items(), key=lambda kv: -kv[1])),
            "patch_over_rest": patch_ms / (total - patch_ms) if total > patch_ms else None}


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core count, library versions and thread settings for the result JSON."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": threads,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import onnxruntime  # optional extra ([cpu] / [gpu]): only to run graphs

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return info
