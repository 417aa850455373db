"""Runtimes that execute one tower of an unmodified and a patched model side by side.

Variants share one set of base weights: a :class:`PatchSet` holds compiled
:class:`~debias_export.runtime.SiteEdit` modules and installs / removes them on the model's own
modules (a hook per site, done outside the timed region), so the eager comparison measures exactly the
edit and not two copies of the model competing for cache. ONNX variants are exported from the same
in-memory model with the patch installed or not, and run in separate onnxruntime sessions.

Runtimes: ``torch`` (eager, CPU), ``torch-cuda``, ``ort`` (onnxruntime CPU EP) and ``ort-cuda``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..core.errors import DebiasError
from ..export.onnx_export import DEFAULT_EXPORTER, DEFAULT_OPSET, export_graph
from ..export.onnx_specs import GraphSpec
from ..runtime import EDIT_ATTR, InstalledSiteEdit, SiteEdit

RUNTIMES = ("torch", "ort", "torch-cuda", "ort-cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


# ----- patch sets -----------------------------------------------------------------------------------
@dataclass
class PatchSet:
    """Compiled wrappers for one variant, detached from the model until :meth:`install`."""

    name: str
    entries: list[tuple[str, SiteEdit, str | None]] = field(default_factory=list)  # (module path, site edit, position module)
    # folded edits: (module path, parent, child name, original module, folded copy), swapped like wrappers
    swaps: list[tuple[str, nn.Module, str, nn.Module, nn.Module]] = field(default_factory=list)
    folds: list[dict[str, Any]] = field(default_factory=list)  # fold records (edits.projection.fold_record)
    _installed: list[InstalledSiteEdit] = field(default_factory=list)

    @classmethod
    def compile(cls, name: str, adapter: ModelAdapter, edits: list) -> "PatchSet":
        """Compile ``edits`` with :func:`apply_edits`, then take the wrappers out again (model restored).

        Projection edits that record a fold mode are folded instead: the folded copies of the modules they
        change (same class, same shapes, so zero extra ops) are kept and the original weights restored.
        """
        import copy

        from ..edits import apply_edits
        from ..edits.install import install_edits
        from ..edits.projection.edit import split_folded

        to_fold, to_patch = split_folded(list(edits))
        swaps, folds = [], []
        if to_fold:
            installed = install_edits(adapter, to_fold)  # folds only: to_fold holds no patch edits
            try:
                folds = installed.fold_records()
                paths = list(dict.fromkeys(p for _, h in installed.folds for p in h.folded))
                copies = {p: copy.deepcopy(adapter.model.get_submodule(p)) for p in paths}
            finally:
                installed.remove()
            for path, folded in copies.items():
                parent_name, _, child = path.rpartition(".")
                parent = adapter.model.get_submodule(parent_name) if parent_name else adapter.model
                swaps.append((path, parent, child, getattr(parent, child), folded))
        entries = []
        if to_patch or not to_fold:  # apply_edits also gives the error for an empty edit list
            handle = apply_edits(adapter, to_patch)
            entries = _entries(adapter, handle._installed)
            handle.remove()
        clash = {p for p, _, _ in entries} & {s[0] for s in swaps}
        if clash:
            raise DebiasError(f"variant {name!r} both folds into and patches {sorted(clash)[0]}; use separate variants")
        return cls(name, entries, swaps=swaps, folds=folds)

    def paths(self) -> list[str]:
        """Every module path this variant changes (patched or folded)."""
        return [p for p, _, _ in self.entries] + [s[0] for s in self.swaps]

    @classmethod
    def discover(cls, name: str, adapter: ModelAdapter) -> "PatchSet":
        """The site edits :func:`~debias_export.export.load_patched` installed (the model stays patched)."""
        installed = list(getattr(adapter, "installed_patches", []) or [])
        if not installed:
            raise DebiasError("the loaded model has no debias patches to benchmark")
        return cls(name, _entries(adapter, installed), _installed=installed)

    def wrappers(self) -> list[SiteEdit]:
        return [w for _, w, _ in self.entries]

    def install(self, model: nn.Module) -> None:
        # parents are held as objects, so a fold inside a block that a wrapper also wraps still lands
        for _, parent, child, _, folded in self.swaps:
            setattr(parent, child, folded)
        for path, site_edit, position_path in self.entries:
            position = model.get_submodule(position_path) if position_path is not None else None
            self._installed.append(InstalledSiteEdit(model.get_submodule(path), site_edit, position))

    def uninstall(self, model: nn.Module) -> None:
        for item in reversed(self._installed):
            item.remove()
        self._installed.clear()
        for _, parent, child, original, _ in self.swaps:
            setattr(parent, child, original)

    def to(self, **kw: Any) -> "PatchSet":
        for w in self.wrappers():
            w.to(**kw)  # the patched modules move with the model
        for _, _, _, original, folded in self.swaps:  # whichever of the two is outside the model now
            original.to(**kw)
            folded.to(**kw)
        return self


def _entries(adapter: ModelAdapter, installed: list[InstalledSiteEdit]) -> list[tuple[str, SiteEdit, str | None]]:
    """(module path, site edit, position module path) of installed site edits, for re-installing later."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    return [(names[id(item.module)], item.site_edit,
             names[id(item.position_module)] if item.position_module is not None else None) for item in installed]


class VariantSwitch:
    """Keeps at most one :class:`PatchSet` installed in a model; ``None`` means unmodified."""

    def __init__(self, model: nn.Module, variants: dict[str, PatchSet | None]):
        self.model, self.variants, self.current = model, variants, None

    def activate(self, name: str) -> None:
        if name == self.current:
            return
        if self.current is not None and self.variants[self.current] is not None:
            self.variants[self.current].uninstall(self.model)
        if self.variants[name] is not None:
            self.variants[name].install(self.model)
        self.current = name

    def reset(self) -> None:
        """Leave the model unmodified (the patched state of a loaded patched model is restored by caller)."""
        for name, ps in self.variants.items():
            if ps is None:
                self.activate(name)
                return


class Call:
    """A timed callable with an untimed ``prepare`` step (variant switching, input placement)."""

    def __init__(self, fn: Callable[[], object], prepare: Callable[[], None] | None = None):
        self.fn, self.prepare = fn, prepare

    def __call__(self) -> object:
        return self.fn()


# ----- inputs and tower wrappers --------------------------------------------------------------------
def bench_inputs(adapter: ModelAdapter, tower: str, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs: random pixels, or real CLIP-BPE prompts padded to the full context length."""
    g = torch.Generator().manual_seed(seed)
    if tower == "image":
        size = _image_size(adapter)
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    prompts = ["a photo of a nurse", "a photo of an engineer at work", "a portrait of a person",
               "a close-up photo of a doctor smiling in a hospital corridor"]
    tok = adapter.prepare_texts([prompts[i % len(prompts)] for i in range(batch)])
    if not hasattr(adapter, "_tower_config"):
        return tok
    ctx = int(adapter._tower_config("text").max_position_embeddings)  # CLIP deployments pad to the context
    ids, mask = tok["input_ids"], tok["attention_mask"]
    pad = ctx - ids.shape[1]
    if pad > 0:
        ids = torch.nn.functional.pad(ids, (0, pad), value=0)
        mask = torch.nn.functional.pad(mask, (0, pad), value=0)
    return {"input_ids": ids, "attention_mask": mask}


def _image_size(adapter: ModelAdapter) -> int:
    if hasattr(adapter, "image_size"):
        return int(adapter.image_size())
    if hasattr(adapter, "vision_config"):  # LLaVA
        return int(adapter.vision_config.image_size)
    raise DebiasError(f"cannot tell the image size of a {adapter.family} model for benchmark inputs")


def random_llava_vision(seed: int = 0) -> ModelAdapter:
    """LLaVA-1.5-7B's image path with random weights: real ViT-L/14-336 tower read at layer -2 and the
    real 1024->4096->4096 projector; the Llama LM is cut to 0 layers and a 64-token vocabulary because
    ``embed("image")`` (what the LM receives) never runs it and 7B weights do not fit this machine."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from ..adapters.llava import LlavaAdapter
    from ..adapters.real_configs import LLAVA_15_7B

    vision = {k: v for k, v in LLAVA_15_7B["vision_config"].items() if k != "model_type"}
    t = LLAVA_15_7B["text_config"]
    text = LlamaConfig(vocab_size=64, hidden_size=t["hidden_size"], intermediate_size=16, num_hidden_layers=0,
                       num_attention_heads=t["num_attention_heads"])
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_index=63,
                      vision_feature_layer=LLAVA_15_7B["vision_feature_layer"],
                      vision_feature_select_strategy=LLAVA_15_7B["vision_feature_select_strategy"],
                      projector_hidden_act=LLAVA_15_7B["projector_hidden_act"])
    adapter = LlavaAdapter.from_config(cfg, seed=seed)
    adapter.source = "config:llava-1.5-7b (vision tower + projector; LM stubbed)"
    return adapter


class TowerModule(nn.Module):
    """``pixel_values -> embeds`` or ``(input_ids, attention_mask) -> embeds`` for export."""

    def __init__(self, adapter: ModelAdapter, tower: str):
        super().__init__()
        self.adapter, self.tower = adapter, tower
        self.model = adapter.model  # registered so .to()/parameters() see the weights

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embeds": self.adapter.embed(self.tower, inputs)}


def input_names(tower: str) -> list[str]:
    return ["pixel_values"] if tower == "image" else ["input_ids", "attention_mask"]


def export_tower_onnx(adapter: ModelAdapter, tower: str, path: Path, inputs: dict[str, torch.Tensor],
                      opset: int = DEFAULT_OPSET, exporter: str = DEFAULT_EXPORTER) -> Path:
    """ONNX export of one tower's ``embed`` (batch and sequence axes dynamic) with the package's exporter.

    Position-pruning pre-hooks on the text tower run during tracing, so they are in the graph.
    """
    axes = {0: "batch"} if tower == "image" else {0: "batch", 1: "sequence"}
    spec = GraphSpec(path.stem, tower, {n: dict(axes) for n in input_names(tower)}, {"embeds": {0: "batch"}},
                     build=lambda a: TowerModule(a, tower), example_inputs=lambda a, b, s, g: dict(inputs))
    path.parent.mkdir(parents=True, exist_ok=True)
    export_graph(spec, TowerModule(adapter, tower).eval(), inputs, path, opset=opset, exporter=exporter)
    return path


# ----- sessions ------------------------------------------------------------------------------------
def ort_session(path: Path, device: str = "cpu", threads: int = 1, opt_level: str = "all",
                profile_prefix: str | None = None):
    """onnxruntime session with fixed intra-op threads (recorded) and graph optimisation level."""
    import onnxruntime as ort

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
        import onnxruntime as ort

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
    import ast

    import onnx

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
    import json
    import tempfile

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


def export_variants(adapter: ModelAdapter, tower: str, switch: VariantSwitch, out_dir: Path, dtype: str = "fp32",
                    device: str = "cpu", exporter: str = DEFAULT_EXPORTER) -> dict[str, Path]:
    """Export one ONNX graph per variant (the model is switched to each variant for its trace)."""
    adapter.model.to(device=device, dtype=DTYPES[dtype])
    for ps in switch.variants.values():
        if ps is not None:
            ps.to(device=device, dtype=DTYPES[dtype])
    example = {k: (v.to(device, DTYPES[dtype]) if v.is_floating_point() else v.to(device))
               for k, v in bench_inputs(adapter, tower, 2).items()}
    paths = {}
    for name in switch.variants:
        switch.activate(name)
        paths[name] = export_tower_onnx(adapter, tower, out_dir / f"{tower}_{name}_{dtype}.onnx", example, exporter=exporter)
    switch.reset()
    return paths


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core count, library versions and thread settings for the result JSON."""
    import platform

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
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return info
