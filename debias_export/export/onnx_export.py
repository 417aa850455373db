"""ONNX export of (patched) encoders: one graph per tower, checked for symbolic axes, validated in onnxruntime.

Graphs come from the family's :mod:`.onnx_specs`. The module exported is the live model itself
(for a two-tower model, a stock one-tower shell over its real submodules), treated as an opaque
``nn.Module``: the trace runs through whatever the installed edits are (module wrappers, hooks) and
the text tower's position pre-hook, so the fused edits and the per-row EOS gather/scatter become
ordinary ONNX ops (MatMul/Greater/ArgMax/GatherElements/Equal/Add), no custom ops.

Exporters (:func:`export_graph`): ``dynamo`` (default; ``torch.export`` + onnxscript, opset
:data:`DEFAULT_OPSET`), ``torchscript`` (the legacy tracer, deprecated by PyTorch) and ``optimum``
(optimum-onnx's driver of the legacy tracer, only where that optional package is installed).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx
import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..core.choices import DEFAULT_EXPORTER, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ONNX_EXPORTERS
from ..core.errors import ConfigError, DebiasError, ValidationError
from ..edits import current_patch
from .boundary import explain_flips
from .hf_dir import unpatched
from .manifest import atomic_output_dir, stable_report, write_manifest
from .onnx_names import strip_trace_metadata
from .onnx_specs import GraphSpec, graph_specs
from .quantize import VARIANT_SHAPES, parse_precisions, write_variants

ONNX_REPORT = "onnx_report.json"
EXPORTERS = ONNX_EXPORTERS
# Opset 20: torch.onnx's default target, which the dynamo exporter writes natively and onnxruntime >= 1.17
# runs. Dynamo's translations start at 18 (below, onnx's version converter may silently leave 18); the
# TorchScript tracers need 17 for LayerNormalization and stop at 20.
# Validation shapes (batch, text length): deliberately unlike each spec's export_shape (2, 7), so a
# graph whose batch or sequence axis got frozen during tracing fails here.
VALIDATION_SHAPES: tuple[tuple[int, int], ...] = ((1, 5), (3, 11))
# ONNX vs PyTorch tolerance is scale-aware: an output passes when max|onnx - torch| <= atol + rtol * max|torch|
# (per output, per validation case). float32 accumulates ~1e-7 relative error per op, so a 12-block tower
# lands around 1e-6 of the tensor's scale; rtol 1e-5 leaves 10x margin, while a wrong graph (a dropped edit,
# a corrupted weight) moves outputs by a sizeable fraction of their scale. An absolute bound alone failed
# a folded LEACE export whose fold raised last_hidden_state to ~146 (diff 1.07e-4 > 1e-4, i.e. 7e-7 relative).
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5
STANDARD_DOMAINS = {"", "ai.onnx"}


class _NamedIO(nn.Module):
    """Positional-in / tuple-out view of a graph module for ``torch.onnx.export``."""

    def __init__(self, module: nn.Module, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        self.module, self.input_names, self.output_names = module, list(inputs), list(outputs)

    def forward(self, *args: torch.Tensor):
        out = self.module(**dict(zip(self.input_names, args)))
        return tuple(out[name] for name in self.output_names)


def check_exporter(exporter: str, opset: int) -> None:
    """ConfigError for an unknown exporter or an opset it cannot write (before any slow work)."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if opset < MIN_OPSET[exporter]:
        raise ConfigError(f"opset {opset} is too old for the {exporter} exporter; use {MIN_OPSET[exporter]} or newer")
    top = MAX_OPSET[exporter]
    if opset > top:
        raise ConfigError(f"the {exporter} exporter writes opset {top} at most, got {opset}")
    if exporter == "optimum":
        _optimum_export()


def _optimum_export() -> Callable[..., Any]:
    """optimum-onnx's ``export`` function, or a one-line DebiasError where it is not installed."""
    try:
        # imported here, never at module level: optimum-onnx is optional (it cannot install next to transformers 5)
        from optimum.exporters.onnx.convert import export
    except ImportError:
        raise DebiasError("the optimum exporter needs optimum-onnx, which is not installed here "
                          "(use --exporter dynamo)") from None
    return export


def exporter_info(exporter: str, opset: int) -> dict[str, Any]:
    """What decides the graph's contents, for ``onnx_report.json`` and the manifest's provenance."""
    info: dict[str, Any] = {"exporter": exporter, "opset": opset, "torch": torch.__version__}
    for dist in {"dynamo": ("onnxscript",), "optimum": ("optimum", "optimum-onnx")}.get(exporter, ()):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


@contextlib.contextmanager
def _quiet_exporters():
    """Silence exporter chatter (warnings, log records) that would break the CLI's one-line output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        # TracerWarnings (TorchScript) flag Python-side shape checks that become constants; harmless here
        # because every graph is then checked for symbolic axes and validated on other shapes.
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def export_graph(spec: GraphSpec, module: nn.Module, example: dict[str, torch.Tensor], path: Path,
                 opset: int = DEFAULT_OPSET, exporter: str = DEFAULT_EXPORTER) -> str:
    """Write ``module`` (the graph ``spec`` describes) to ``path`` with ``exporter``; returns the exporter name.

    ``example``: inputs traced at export (their shapes should differ from the validation shapes).
    ``dynamo`` (default): ``torch.onnx.export(dynamo=True)``, i.e. ``torch.export`` + onnxscript's
    optimizer; every axis named in ``spec`` becomes ``Dim.DYNAMIC``, so a model that freezes one to a
    constant fails here instead of exporting a graph that only runs at the traced shape.
    ``torchscript``: the legacy tracer (``dynamo=False``). ``optimum``: optimum-onnx's exporter with the
    spec's ``OnnxConfig``, only where optimum is installed. Weights go to ``<path>.data`` only past
    the exporter's size limit (2 GB protobuf for the tracers, 1.5 GB for dynamo); small graphs are one file.
    The module must be in eval mode. Exporter failures become one-line :class:`DebiasError`s.
    """
    check_exporter(exporter, opset)
    names, outs = list(spec.inputs), list(spec.outputs)
    if exporter == "optimum":
        return _export_optimum(spec, module, path, opset)
    args = tuple(example[n] for n in names)
    # eval(): the TorchScript exporter restores the wrapper's train/eval mode afterwards, recursively -- a fresh
    # wrapper (train mode) would otherwise switch the shared model's dropout on for everyone after export.
    wrapper = _NamedIO(module, names, outs).eval()
    try:
        with torch.no_grad(), _quiet_exporters():
            if exporter == "dynamo":
                # strings -> Dim.DYNAMIC, and the ONNX dims get these names (torch.onnx's compat mapping)
                shapes = (tuple(dict(spec.inputs[n]) or None for n in names),)
                program = torch.onnx.export(wrapper, args, input_names=names, output_names=outs, dynamic_shapes=shapes,
                                            opset_version=opset, dynamo=True, optimize=True, verbose=False)
                strip_trace_metadata(program.model)
                # external_data=False: one file unless the weights pass torch's 1.5 GB limit (then <path>.data)
                program.save(str(path), external_data=False)
            else:
                torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=outs,
                                  dynamic_axes={**spec.inputs, **spec.outputs}, opset_version=opset,
                                  do_constant_folding=True, dynamo=False)
    except DebiasError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types; the cause stays chained
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        lines = [ln.strip().lstrip("- ") for ln in str(cause).splitlines() if ln.strip()]
        first = " ".join(lines[:2])[:400] or type(cause).__name__  # torch.export's reason is often on line 2
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise DebiasError(f"the {exporter} exporter failed on {spec.name}: {type(cause).__name__}: {first} "
                          f"(--exporter {other} uses the other exporter)") from exc
    return exporter


def _export_optimum(spec: GraphSpec, module: nn.Module, path: Path, opset: int) -> str:
    if spec.optimum_config is None:
        raise DebiasError(f"the optimum exporter needs an optimum OnnxConfig; graph {spec.name} has none "
                          f"(use --exporter dynamo)")
    optimum_export = _optimum_export()
    batch, seq = spec.export_shape
    with torch.no_grad(), _quiet_exporters():
        optimum_export(module, spec.optimum_config(module), path, opset=opset,
                       input_shapes={"batch_size": batch, "sequence_length": seq})
    return "optimum"


def check_symbolic_axes(spec: GraphSpec, path: Path) -> None:
    """ValidationError unless every axis ``spec`` names dynamic is a symbolic dim in the saved graph.

    For the dynamo exporter the dims come from ``torch.export``'s symbolic shapes, so this catches an
    axis frozen to the traced size (a sliced buffer, a shape-dependent branch) even where validation
    shapes would happen to pass. The TorchScript tracers label every axis they were told is dynamic,
    frozen or not: for them only validation on other shapes (:data:`VALIDATION_SHAPES`) tells.
    """
    model = onnx.load(str(path), load_external_data=False)
    values = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for name, axes in {**spec.inputs, **spec.outputs}.items():
        if name not in values:
            if name in spec.inputs:
                continue  # an input the graph does not read (e.g. open_clip text ignores attention_mask) may be dropped
            raise ValidationError(f"{path.name} has no output {name!r}")
        dims = values[name].type.tensor_type.shape.dim
        for axis, axis_name in axes.items():
            if axis >= len(dims) or not dims[axis].dim_param:
                got = dims[axis].dim_value if axis < len(dims) else "missing"
                raise ValidationError(f"{path.name}: axis {axis} ({axis_name}) of {name} is not symbolic "
                                      f"(exported as {got}); the exporter froze a dynamic dimension")


def graph_ops(path: Path) -> tuple[dict[str, int], int]:
    """Op-type counts of a graph (custom domains -> ValidationError) and its opset."""
    model = onnx.load(str(path), load_external_data=False)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ValidationError(f"{path.name} uses custom ops {', '.join(custom)}")
    opset = max((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), default=0)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items())), opset


def providers() -> list[str]:
    """onnxruntime providers to validate on: CUDA when available, always CPU."""
    import onnxruntime as ort  # optional extra ([cpu] / [gpu]): only to run graphs

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


@torch.no_grad()
def check_graph(adapter: ModelAdapter, spec: GraphSpec, path: Path, atol: float, module: nn.Module | None = None,
                shapes: Sequence[tuple[int, int]] = VALIDATION_SHAPES, seed: int = 0,
                rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    """Compare an ONNX graph with the live (patched) PyTorch model on ``shapes``; ValidationError when an output
    differs by more than ``atol + rtol * max|reference|`` (see :data:`DEFAULT_RTOL`).

    Also records ``edit_effect``: how far the patched PyTorch output is from the unpatched one, so a
    report shows the graph carries an edit that matters (parity + effect > atol => edit present).
    A miss that SAE threshold flips fully explain (:func:`.boundary.explain_flips`) passes and is listed under
    ``boundary_flips`` (count, share of latent decisions, rows); ``max_abs_diff`` keeps the raw difference.
    """
    import onnxruntime as ort  # optional extra ([cpu] / [gpu]): only to run graphs

    module = module if module is not None else spec.build(adapter)
    handle = current_patch(adapter.model)
    g = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {"shapes": [list(s) for s in shapes], "max_abs_diff": {}, "providers": {},
                              "atol": atol, "rtol": rtol, "tolerance": {}}
    effect = 0.0
    cases = [spec.example_inputs(adapter, b, s, g) for b, s in shapes]
    refs = [{k: v.float() for k, v in module(**inp).items() if k in spec.outputs} for inp in cases]
    if handle is not None and handle.records:
        with unpatched(handle):
            for inp, ref in zip(cases, refs):
                base = module(**inp)
                effect = max(effect, max(float((ref[k] - base[k].float()).abs().max()) for k in spec.outputs))
        report["edit_effect"] = effect
    for provider in providers():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
        feed_names = [i.name for i in sess.get_inputs()]
        per = {}
        for (b, s), inp, ref in zip(shapes, cases, refs):
            got = sess.run(list(spec.outputs), {n: inp[n].numpy() for n in feed_names})
            misses = []
            for name, arr in zip(spec.outputs, got):
                want = ref[name]
                if tuple(arr.shape) != tuple(want.shape):
                    raise ValidationError(f"{path.name} output {name} has shape {tuple(arr.shape)} on {provider}, "
                                          f"PyTorch gives {tuple(want.shape)} (batch {b}, seq {s})")
                diff = float((torch.from_numpy(arr).float() - want).abs().max())
                scale = float(want.abs().max()) if want.numel() else 0.0
                tol = atol + rtol * scale
                per[name] = max(per.get(name, 0.0), diff)
                report["tolerance"][name] = max(report["tolerance"].get(name, 0.0), tol)
                if not diff <= tol:  # also catches NaN
                    misses.append((name, f"{path.name} output {name} differs from the PyTorch model by {diff:.3g} > atol {atol:g} "
                                  f"+ rtol {rtol:g} * max|ref| {scale:.3g} = {tol:.3g} on {provider} (batch {b}, seq {s})"))
            if misses:
                # an SAE edit is discontinuous: a latent at its threshold may flip between kernels (boundary.py);
                # accepted only when such flips explain the whole miss, and then reported, never hidden
                flips, why = explain_flips(module, path, provider, inp, spec.outputs, atol, rtol)
                if flips is None:
                    raise ValidationError(f"{misses[0][1]}; not explained by threshold flips: {why}")
                report.setdefault("boundary_flips", []).append({"provider": provider, "batch": b, "seq": s,
                                                                "outputs": [m[0] for m in misses], **flips})
        report["providers"][provider] = per
        for name, d in per.items():
            report["max_abs_diff"][name] = max(report["max_abs_diff"].get(name, 0.0), d)
    return report


def export_onnx(adapter: "ModelAdapter | nn.Module", out_dir: str | Path, towers: Sequence[str] | None = None,
                opset: int = DEFAULT_OPSET, validate: bool = True, atol: float = DEFAULT_ATOL, overwrite: bool = False,
                allow_unpatched: bool = False, shapes: Sequence[tuple[int, int]] = VALIDATION_SHAPES,
                provenance: dict[str, Any] | None = None, exporter: str = DEFAULT_EXPORTER,
                rtol: float = DEFAULT_RTOL, precisions: Sequence[str] = ("fp32",)) -> dict[str, Any]:
    """Export each tower of the (patched) model to ``out_dir/<graph>.onnx`` and validate it; returns the report.

    ``exporter``: ``dynamo`` (default), ``torchscript`` or ``optimum`` (see :func:`export_graph`).
    An unpatched model is an error unless ``allow_unpatched`` (then the plain model is exported,
    e.g. as a latency baseline). Atomic: any failure (export, frozen dynamic axis, custom op,
    validation over ``atol``) leaves no ``out_dir`` behind. The report (also ``onnx_report.json``)
    holds exporter, torch version, opset, op-type counts, file sizes, max |diff| per output and
    provider, and the edit's effect size; the manifest's provenance records the exporter too.
    ``precisions``: also write fp16 / int8 variants (:mod:`.quantize`, transformers.js file names), each
    validated against the fp32 graph and on the edit itself; a variant that loses either fails the export.
    """
    adapter = adapter_for(adapter)
    check_exporter(exporter, opset)
    if not (atol >= 0 and rtol >= 0):
        raise ConfigError(f"atol and rtol must be >= 0, got atol {atol}, rtol {rtol}")
    precisions = parse_precisions(precisions)
    handle = current_patch(adapter.model)
    patched = bool(handle is not None and handle.records)
    if not patched and not allow_unpatched:
        raise DebiasError("model has no debias patch to export; apply_edits(...) first (or allow_unpatched=True to export the plain model)")
    specs = graph_specs(adapter, list(towers) if towers else None)
    if exporter == "optimum" and any(s.optimum_config is None for s in specs):
        raise DebiasError(f"the optimum exporter has no OnnxConfig for {adapter.family} graphs; use --exporter dynamo "
                          f"or torchscript")
    was_training = adapter.model.training
    adapter.model.eval()
    info = exporter_info(exporter, opset)
    report: dict[str, Any] = {**info, "atol": atol, "rtol": rtol, "precisions": precisions, "patched": patched, "family": adapter.family,
                              "source_model": adapter.source, "graphs": {}}
    try:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            for spec in specs:
                t0 = time.perf_counter()
                module = spec.build(adapter)
                path = tmp / f"{spec.name}.onnx"
                example = spec.example_inputs(adapter, *spec.export_shape, torch.Generator().manual_seed(0))
                used = export_graph(spec, module, example, path, opset=opset, exporter=exporter)
                check_symbolic_axes(spec, path)
                ops, graph_opset = graph_ops(path)
                if graph_opset != opset:
                    raise ValidationError(f"{path.name} came out at opset {graph_opset}, not the requested {opset}")
                files = sorted(p for p in tmp.iterdir() if p.name.startswith(spec.name + ".onnx"))
                entry = {"tower": spec.tower, "file": path.name, "exporter": used, "opset": graph_opset,
                         "inputs": {k: {str(a): n for a, n in v.items()} for k, v in spec.inputs.items()},
                         "outputs": {k: {str(a): n for a, n in v.items()} for k, v in spec.outputs.items()},
                         "size_bytes": {p.name: p.stat().st_size for p in files}, "ops": ops,
                         "nodes": sum(ops.values()), "export_seconds": round(time.perf_counter() - t0, 2)}
                if validate:
                    t1 = time.perf_counter()
                    entry["validation"] = check_graph(adapter, spec, path, atol, module=module, shapes=shapes, rtol=rtol)
                    entry["validation_seconds"] = round(time.perf_counter() - t1, 2)
                if len(precisions) > 1:
                    t1 = time.perf_counter()

                    def export_unmodified(dst: Path, spec=spec, module=module, example=example) -> None:
                        with unpatched(handle):
                            export_graph(spec, module, example, dst, opset=opset, exporter=exporter)

                    g = torch.Generator().manual_seed(1)
                    feeds = [{k: v.numpy() for k, v in spec.example_inputs(adapter, b, s, g).items()}
                             for b, s in VARIANT_SHAPES]
                    entry["variants"] = write_variants(path, tmp, precisions[1:], feeds,
                                                       export_unmodified if patched else None)
                    entry["variants_seconds"] = round(time.perf_counter() - t1, 2)
                report["graphs"][spec.name] = entry
            (tmp / ONNX_REPORT).write_text(json.dumps(stable_report(report), indent=2, sort_keys=True) + "\n")
            flips = {name: g["validation"]["boundary_flips"] for name, g in report["graphs"].items()
                     if "boundary_flips" in g.get("validation", {})}
            write_manifest(tmp, kind="onnx", provenance={**(provenance or {"source_model": adapter.source}), "onnx": info},
                           extra={"family": adapter.family, **({"boundary_flips": flips} if flips else {})})
    finally:
        adapter.model.train(was_training)
    return report


def validate_onnx_dir(onnx_dir: str | Path, adapter: ModelAdapter, atol: float = DEFAULT_ATOL,
                      shapes: Sequence[tuple[int, int]] = VALIDATION_SHAPES, seed: int = 0,
                      rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    """Re-check every graph of an ONNX export directory against ``adapter`` (e.g. from :func:`load_patched`)."""
    onnx_dir = Path(onnx_dir)
    out = {}
    for spec in graph_specs(adapter):
        path = onnx_dir / f"{spec.name}.onnx"
        if path.is_file():
            out[spec.name] = check_graph(adapter, spec, path, atol, shapes=shapes, seed=seed, rtol=rtol)
    if not out:
        raise DebiasError(f"{onnx_dir} holds none of the graphs {', '.join(s.name + '.onnx' for s in graph_specs(adapter))}")
    return out
