"""ONNX export of (patched) encoders: one graph per tower, validated in onnxruntime.

Graphs come from the family's :mod:`.onnx_specs`. The module exported is the live model itself
(for a two-tower model, a stock one-tower shell over its real submodules), so the trace runs
through the :class:`~debias_export.runtime.EditedModule` wrappers and the text tower's position
pre-hook: the fused edits and the per-row EOS gather/scatter become ordinary ONNX ops
(MatMul/Greater/ArgMax/GatherElements/ScatterElements), no custom ops.
"""
from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..errors import ConfigError, DebiasError, ValidationError
from .manifest import atomic_output_dir, write_manifest
from .onnx_specs import GraphSpec, graph_specs

ONNX_REPORT = "onnx_report.json"
MIN_OPSET = 17
# Validation shapes (batch, text length): deliberately unlike each spec's export_shape (2, 7), so a
# graph whose batch or sequence axis got frozen during tracing fails here.
VALIDATION_SHAPES: tuple[tuple[int, int], ...] = ((1, 5), (3, 11))
STANDARD_DOMAINS = {"", "ai.onnx"}


class _NamedIO(nn.Module):
    """Positional-in / tuple-out view of a graph module for ``torch.onnx.export``."""

    def __init__(self, module: nn.Module, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        self.module, self.input_names, self.output_names = module, list(inputs), list(outputs)

    def forward(self, *args: torch.Tensor):
        out = self.module(**dict(zip(self.input_names, args)))
        return tuple(out[name] for name in self.output_names)


def _export_graph(adapter: ModelAdapter, spec: GraphSpec, module: nn.Module, path: Path, opset: int) -> str:
    """Trace ``module`` to ``path``; returns which exporter ran."""
    with warnings.catch_warnings():
        # TracerWarnings flag Python-side shape checks that become constants; harmless here because
        # every graph is then validated on other batch sizes and text lengths.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")  # chosen on purpose
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        return _trace(adapter, spec, module, path, opset)


def _trace(adapter: ModelAdapter, spec: GraphSpec, module: nn.Module, path: Path, opset: int) -> str:
    batch, seq = spec.export_shape
    if spec.optimum_config is not None:
        from optimum.exporters.onnx.convert import export as optimum_export

        optimum_export(module, spec.optimum_config(module), path, opset=opset,
                       input_shapes={"batch_size": batch, "sequence_length": seq})
        return "optimum"
    # Families without an optimum OnnxConfig (e.g. open_clip towers): the same TorchScript exporter
    # optimum drives, called directly with the spec's names and dynamic axes.
    example = spec.example_inputs(adapter, batch, seq, torch.Generator().manual_seed(0))
    names = list(spec.inputs)
    # eval(): torch.onnx.export restores the wrapper's train/eval mode afterwards, recursively -- a fresh
    # wrapper (train mode) would otherwise switch the shared model's dropout on for everyone after export.
    with torch.no_grad():
        torch.onnx.export(_NamedIO(module, names, list(spec.outputs)).eval(), tuple(example[n] for n in names), str(path),
                          input_names=names, output_names=list(spec.outputs), dynamic_axes={**spec.inputs, **spec.outputs},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    return "torch.onnx"


def graph_ops(path: Path) -> tuple[dict[str, int], int]:
    """Op-type counts of a graph (custom domains -> ValidationError) and its opset."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ValidationError(f"{path.name} uses custom ops {', '.join(custom)}")
    opset = max((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), default=0)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items())), opset


def providers() -> list[str]:
    """onnxruntime providers to validate on: CUDA when available, always CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


@torch.no_grad()
def check_graph(adapter: ModelAdapter, spec: GraphSpec, path: Path, atol: float, module: nn.Module | None = None,
                shapes: Sequence[tuple[int, int]] = VALIDATION_SHAPES, seed: int = 0) -> dict[str, Any]:
    """Compare an ONNX graph with the live (patched) PyTorch model on ``shapes``; ValidationError over ``atol``.

    Also records ``edit_effect``: how far the patched PyTorch output is from the unpatched one, so a
    report shows the graph carries an edit that matters (parity + effect > atol => edit present).
    """
    import onnxruntime as ort

    from .safetensors_export import unpatched

    module = module if module is not None else spec.build(adapter)
    handle = getattr(adapter.model, "_debias_patch", None)
    g = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {"shapes": [list(s) for s in shapes], "max_abs_diff": {}, "providers": {}}
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
            for name, arr in zip(spec.outputs, got):
                want = ref[name]
                if tuple(arr.shape) != tuple(want.shape):
                    raise ValidationError(f"{path.name} output {name} has shape {tuple(arr.shape)} on {provider}, "
                                          f"PyTorch gives {tuple(want.shape)} (batch {b}, seq {s})")
                diff = float((torch.from_numpy(arr).float() - want).abs().max())
                per[name] = max(per.get(name, 0.0), diff)
                if not diff <= atol:  # also catches NaN
                    raise ValidationError(f"{path.name} output {name} differs from the PyTorch model by {diff:.3g} > atol "
                                          f"{atol:g} on {provider} (batch {b}, seq {s})")
        report["providers"][provider] = per
        for name, d in per.items():
            report["max_abs_diff"][name] = max(report["max_abs_diff"].get(name, 0.0), d)
    return report


def export_onnx(adapter: "ModelAdapter | nn.Module", out_dir: str | Path, towers: Sequence[str] | None = None,
                opset: int = MIN_OPSET, validate: bool = True, atol: float = 1e-4, overwrite: bool = False,
                allow_unpatched: bool = False, shapes: Sequence[tuple[int, int]] = VALIDATION_SHAPES,
                provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export each tower of the (patched) model to ``out_dir/<graph>.onnx`` and validate it; returns the report.

    An unpatched model is an error unless ``allow_unpatched`` (then the plain model is exported,
    e.g. as a latency baseline). Atomic: any failure (export, custom op, validation over ``atol``)
    leaves no ``out_dir`` behind. The report (also ``onnx_report.json``) holds opset, op-type
    counts, file sizes, max |diff| per output and provider, and the edit's effect size.
    """
    adapter = adapter_for(adapter)
    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    if atol < 0:
        raise ConfigError(f"atol must be >= 0, got {atol}")
    handle = getattr(adapter.model, "_debias_patch", None)
    patched = bool(handle is not None and handle.records)
    if not patched and not allow_unpatched:
        raise DebiasError("model has no debias patch to export; apply_edits(...) first (or allow_unpatched=True to export the plain model)")
    specs = graph_specs(adapter, list(towers) if towers else None)
    was_training = adapter.model.training
    adapter.model.eval()
    report: dict[str, Any] = {"opset": opset, "atol": atol, "patched": patched, "family": adapter.family,
                              "source_model": adapter.source, "graphs": {}}
    try:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            for spec in specs:
                t0 = time.perf_counter()
                module = spec.build(adapter)
                path = tmp / f"{spec.name}.onnx"
                exporter = _export_graph(adapter, spec, module, path, opset)
                ops, graph_opset = graph_ops(path)
                files = sorted(p for p in tmp.iterdir() if p.name.startswith(spec.name + ".onnx"))
                entry = {"tower": spec.tower, "file": path.name, "exporter": exporter, "opset": graph_opset,
                         "inputs": {k: {str(a): n for a, n in v.items()} for k, v in spec.inputs.items()},
                         "outputs": {k: {str(a): n for a, n in v.items()} for k, v in spec.outputs.items()},
                         "size_bytes": {p.name: p.stat().st_size for p in files}, "ops": ops,
                         "export_seconds": round(time.perf_counter() - t0, 2)}
                if validate:
                    t1 = time.perf_counter()
                    entry["validation"] = check_graph(adapter, spec, path, atol, module=module, shapes=shapes)
                    entry["validation_seconds"] = round(time.perf_counter() - t1, 2)
                report["graphs"][spec.name] = entry
            (tmp / ONNX_REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
            write_manifest(tmp, kind="onnx", provenance=provenance or {"source_model": adapter.source},
                           extra={"family": adapter.family})
    finally:
        adapter.model.train(was_training)
    return report


def validate_onnx_dir(onnx_dir: str | Path, adapter: ModelAdapter, atol: float = 1e-4,
                      shapes: Sequence[tuple[int, int]] = VALIDATION_SHAPES, seed: int = 0) -> dict[str, Any]:
    """Re-check every graph of an ONNX export directory against ``adapter`` (e.g. from :func:`load_patched`)."""
    onnx_dir = Path(onnx_dir)
    out = {}
    for spec in graph_specs(adapter):
        path = onnx_dir / f"{spec.name}.onnx"
        if path.is_file():
            out[spec.name] = check_graph(adapter, spec, path, atol, shapes=shapes, seed=seed)
    if not out:
        raise DebiasError(f"{onnx_dir} holds none of the graphs {', '.join(s.name + '.onnx' for s in graph_specs(adapter))}")
    return out
