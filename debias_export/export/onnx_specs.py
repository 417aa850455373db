"""Per-family ONNX export specs: which graphs, their inputs/outputs/dynamic axes, example inputs.

The export machinery (:mod:`.onnx_export`) is family-agnostic; a family plugs in by registering a
function ``adapter -> list[GraphSpec]`` with :func:`register_onnx_spec`. Each graph is a module
whose forward takes the named inputs as keywords and returns a mapping (or ``ModelOutput``) holding
the named outputs. ``optimum_config`` (optional) builds an optimum ``OnnxConfig`` for the module,
used only when the ``optimum`` exporter is requested: nothing here imports optimum (it is an
optional extra that cannot install next to transformers 5).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..core.errors import DebiasError
from .registry import exportable_families, load_family_specs

Axes = dict[str, dict[int, str]]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of a model family (e.g. the image tower)."""

    name: str  # file stem: <name>.onnx
    tower: str
    inputs: Axes  # input name -> dynamic axes
    outputs: Axes  # output name -> dynamic axes
    build: Callable[[ModelAdapter], nn.Module]  # module sharing the adapter's (patched) submodules
    example_inputs: Callable[[ModelAdapter, int, int, torch.Generator], dict[str, torch.Tensor]]  # (batch, seq)
    optimum_config: Callable[[nn.Module], Any] | None = None
    export_shape: tuple[int, int] = (2, 7)  # (batch, seq) traced at export; validation uses others


_SPECS: dict[str, Callable[[ModelAdapter], list[GraphSpec]]] = {}


def register_onnx_spec(family: str):
    """Decorator: ``fn(adapter) -> list[GraphSpec]`` describes the ONNX graphs of ``family``."""

    def deco(fn):
        _SPECS[family] = fn
        return fn

    return deco


def graph_specs(adapter: ModelAdapter, towers: list[str] | None = None) -> list[GraphSpec]:
    """The graphs to export for ``adapter`` (all towers it has, or the ones named)."""
    load_family_specs(adapter.family)
    fn = _SPECS.get(adapter.family)
    if fn is None:
        raise DebiasError(f"ONNX export does not support model family {adapter.family!r}; supported: {', '.join(exportable_families())}")
    specs = fn(adapter)
    if towers:
        have = {s.tower for s in specs}
        missing = [t for t in towers if t not in have]
        if missing:
            raise DebiasError(f"cannot export tower(s) {', '.join(missing)}: model has {', '.join(sorted(have))}")
        specs = [s for s in specs if s.tower in towers]
    return specs


def optimum_config_class(base: type, inputs: Axes, outputs: Axes) -> type:
    """Subclass an optimum ``OnnxConfig`` with our own input/output names and dynamic axes."""
    return type(f"Debias{base.__name__}", (base,), {
        "inputs": property(lambda self: copy.deepcopy(inputs)),
        "outputs": property(lambda self: copy.deepcopy(outputs)),
    })


# ----- helpers for family specs ----------------------------------------------------------------------
def tower_shell(klass: type, config: Any, parts: dict[str, nn.Module]) -> nn.Module:
    """A stock one-tower class (e.g. ``CLIPVisionModelWithProjection``) over the full model's modules.

    Built on the meta device (no weight allocation), then the real -- possibly patched -- modules
    are attached, so the shell runs exactly the adapter's graph, edits and position hooks included.
    A deep-copied config keeps the shell from touching the shared modules' config objects.
    """
    with torch.device("meta"):
        shell = klass(copy.deepcopy(config))
    for name, module in parts.items():
        setattr(shell, name, module)
    return shell.eval()


def example_inputs(adapter: ModelAdapter, tower: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid inputs for one tower (used to check exported artifacts against the live model)."""
    spec = next(s for s in graph_specs(adapter, [tower]))
    return spec.example_inputs(adapter, batch, seq, torch.Generator().manual_seed(seed))
