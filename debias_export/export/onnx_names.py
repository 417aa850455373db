"""ONNX node names: the edit's nodes named after their module, so later transforms can find them by name.

The TorchScript tracer names nodes by module scope (``/vision_model/.../debias_edit/edits.0/MatMul``); the
dynamo exporter names them ``node_<op>_<n>`` and keeps the scope in metadata. :func:`strip_trace_metadata`
renames dynamo's edit nodes to ``<module path>/<name>`` so both exporters' graphs carry the scope
``debias_edit`` (the child name of every installed edit, :data:`debias_export.runtime.EDIT_ATTR`) in the name.
"""
from __future__ import annotations

import ast
import re
from typing import Any

import onnx

from ..runtime import EDIT_ATTR

EDIT_SCOPE = EDIT_ATTR  # "debias_edit": every node an installed edit adds carries it in its name
_MASK_OPS = ("Greater", "And")  # threshold SAEs: z > t; top-k SAEs: (z >= kth) & (z > 0) -- the last one per edit


# Per-node debugging metadata the dynamo exporter records: Python stack traces (with this machine's file
# paths) and FX node dumps. Dropped so an artifact does not depend on where it was built; the module
# scopes (``namespace``, ``pkg.torch.onnx.name_scopes``) stay, for per-module profiling.
_TRACE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def strip_trace_metadata(model: Any) -> None:
    """Remove :data:`_TRACE_METADATA` from every node of an ``onnx_ir`` model (subgraphs and functions too), and
    name the edit's nodes after their module (``vision_model.encoder.layers.2.debias_edit.edits.0/node_gt``).

    The TorchScript tracer already names nodes by module scope (``/.../debias_edit/...``); dynamo names them
    ``node_<op>_<n>``. A recognisable scope lets the precision transforms (:mod:`.quantize`) keep the edit's
    threshold compare and small matrices out of quantization by node name.
    """
    for graph in [model.graph, *model.functions.values()]:
        for node in graph.all_nodes():
            for key in _TRACE_METADATA:
                node.metadata_props.pop(key, None)
            scope = module_scope(node.metadata_props.get(_NAME_SCOPES, ""))
            if EDIT_SCOPE in scope.split(".") and node.name:
                node.name = f"{scope.removeprefix('module.')}/{node.name}"


def module_scope(scopes: str) -> str:
    """The innermost module path of dynamo's ``name_scopes`` record (``"['', 'module', 'module.a', 'op']"``)."""
    try:
        parts = ast.literal_eval(scopes) if scopes else []
    except (ValueError, SyntaxError):
        return ""
    return str(parts[-2]) if isinstance(parts, list) and len(parts) >= 2 else ""


def in_edit(name: str) -> bool:
    """Whether a node name lies in an edit's module scope."""
    return EDIT_SCOPE in re.split(r"[/.]", name)


def edit_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes an installed edit added (module scope ``debias_edit`` in the node name)."""
    return [n.name for n in model.graph.node if in_edit(n.name)]


def mask_outputs(model: onnx.ModelProto) -> list[str]:
    """Per edit, the boolean tensor that selects its active latents (the last Greater / And in its scope)."""
    last: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in _MASK_OPS and in_edit(node.name):
            last[node.name.rsplit("/", 1)[0]] = node.output[0]
    return list(last.values())
