"""FLOPs and parameter counts of unmodified vs patched models, two independent ways.

1. PyTorch: :class:`torch.utils.flop_counter.FlopCounterMode` around an eager forward. It counts
   matmul-family ops (mm/bmm/addmm/baddbmm/convolution/SDPA) as ``2*m*n*k`` and ignores
   elementwise ops, softmax and layernorms. Models must use eager attention so attention matmuls show.
2. ONNX: our own counter over the exported graph. Graph inputs are pinned to concrete shapes, ONNX
   shape inference (with data propagation, so Shape->Gather->Reshape chains resolve) fills in every
   intermediate shape, and each ``MatMul``/``Gemm``/``Conv`` node is counted with the same
   conventions as PyTorch (``2*m*n*k``, broadcast batch dims multiplied in, biases not counted).
   If ONNX inference leaves a shape unknown we retry with onnxruntime's symbolic shape inference;
   nodes still unresolved are reported in ``unresolved`` rather than silently dropped.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import onnx
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

COUNTED_OPS = ("MatMul", "Gemm", "Conv")


def torch_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of one call of ``fn`` (no grad), as counted by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def count_params(module: nn.Module, buffers: bool = False) -> int:
    """Number of parameter (and optionally buffer) elements; shared tensors counted once."""
    seen, total = set(), 0
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    for t in tensors:
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            total += t.numel()
    return total


def edit_params(wrappers: list[nn.Module]) -> int:
    """Elements held by fused edit modules (their buffers; the wrapped base layers are excluded)."""
    return sum(count_params(edit, buffers=True) for w in wrappers for edit in w.edits)


# ----- ONNX ----------------------------------------------------------------------------------------
def _dims(vi) -> list[int | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _pin_inputs(model, input_shapes: Mapping[str, tuple[int, ...]]) -> None:
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if inp.name not in input_shapes:
            raise ValueError(f"no concrete shape given for ONNX input {inp.name!r}")
        shape = input_shapes[inp.name]
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ValueError(f"ONNX input {inp.name!r} has rank {len(dims)}, got shape {shape}")
        for d, v in zip(dims, shape):
            d.Clear()
            d.dim_value = int(v)


def _shape_table(model) -> dict[str, list[int | None]]:
    table = {vi.name: _dims(vi) for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
    for init in model.graph.initializer:
        table[init.name] = list(init.dims)
    for node in model.graph.node:  # Constant nodes carry their shape in the attribute
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    table[node.output[0]] = list(a.t.dims)
    return table


def _node_flops(node, shapes: dict[str, list[int | None]]) -> int | None:
    def get(i):
        s = shapes.get(node.input[i]) if i < len(node.input) else None
        return None if not s or any(d is None for d in s) else s

    a, b = get(0), get(1)
    if a is None or b is None:
        return None
    if node.op_type == "MatMul":
        if len(a) == 1:
            a = [1] + a
        if len(b) == 1:
            b = b + [1]
        m, k, n = a[-2], a[-1], b[-1]
        batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])) if len(a) > 2 or len(b) > 2 else ()
        return 2 * math.prod(batch) * m * k * n
    if node.op_type == "Gemm":
        attrs = {x.name: x.i for x in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return 2 * m * k * n
    if node.op_type == "Conv":
        out = shapes.get(node.output[0])
        if not out or any(d is None for d in out):
            return None
        return 2 * math.prod(out) * math.prod(b[1:])  # out elems * (Cin/groups * kernel)
    return None


def onnx_flops(model_or_path: Any, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """FLOPs of ``MatMul``/``Gemm``/``Conv`` nodes for concrete input shapes (see module docstring).

    Returns ``{"total": int, "by_op": {op: int}, "nodes": int, "unresolved": [node names],
    "shape_inference": "onnx"|"onnx+symbolic", "initializer_params": int}``.
    """
    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else onnx.ModelProto.FromString(
        model_or_path.SerializeToString())
    _pin_inputs(model, input_shapes)
    method = "onnx"
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shape_table(inferred)
    result = _count(inferred, shapes)
    if result["unresolved"]:
        # optional extra ([cpu] / [gpu]): only to run graphs
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        try:
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception as exc:  # noqa: BLE001 - its asserts fail on some graphs (open_clip's MHA Reshape)
            method = f"onnx (symbolic inference failed: {type(exc).__name__})"
        else:
            result = _count(inferred, _shape_table(inferred))
            method = "onnx+symbolic"
    result["shape_inference"] = method
    result["initializer_params"] = sum(math.prod(i.dims) for i in model.graph.initializer if i.data_type in (1, 10, 11, 16))
    return result


def _count(model, shapes) -> dict[str, Any]:
    by_op = {op: 0 for op in COUNTED_OPS}
    unresolved, nodes = [], 0
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        nodes += 1
        f = _node_flops(node, shapes)
        if f is None:
            unresolved.append(node.name or node.output[0])
        else:
            by_op[node.op_type] += f
    return {"total": sum(by_op.values()), "by_op": by_op, "nodes": nodes, "unresolved": unresolved}
