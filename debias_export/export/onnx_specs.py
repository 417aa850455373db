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
    fn = _SPECS.get(adapter.family)
    if fn is None:
        raise DebiasError(f"ONNX export does not support model family {adapter.family!r}; supported: {', '.join(sorted(_SPECS))}")
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


def _clip_optimum_config(tower: str, inputs: Axes, outputs: Axes) -> Callable[[nn.Module], Any]:
    """``GraphSpec.optimum_config`` for a CLIP tower; imports optimum only when called."""

    def build(module: nn.Module) -> Any:
        # optional dependency, imported on request (--exporter optimum) only
        from optimum.exporters.onnx.model_configs import CLIPTextWithProjectionOnnxConfig, CLIPVisionModelOnnxConfig

        base = CLIPVisionModelOnnxConfig if tower == "image" else CLIPTextWithProjectionOnnxConfig
        return optimum_config_class(base, inputs, outputs)(module.config, task="feature-extraction")

    return build


# ----- Hugging Face CLIP -----------------------------------------------------------------------------
def _tower_shell(klass: type, config: Any, parts: dict[str, nn.Module]) -> nn.Module:
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


def _clip_tower(adapter: ModelAdapter, tower: str) -> nn.Module:
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    model = adapter.model
    if not isinstance(model, CLIPModel):
        return model  # already a one-tower-with-projection model
    if tower == "image":
        return _tower_shell(CLIPVisionModelWithProjection, model.config.vision_config,
                            {"vision_model": model.vision_model, "visual_projection": model.visual_projection})
    return _tower_shell(CLIPTextModelWithProjection, model.config.text_config,
                        {"text_model": model.text_model, "text_projection": model.text_projection})


def clip_image_inputs(adapter: ModelAdapter, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    size = adapter.image_size()
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def clip_text_inputs(adapter: ModelAdapter, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random CLIP-like token rows: BOS, words, EOS at a random per-row position, then padding.

    Per-row EOS positions exercise the dynamic output-position pruning; ids stay below BOS/EOS so
    first-EOS and argmax pooling agree (as with real CLIP tokenizers).
    """
    cfg = adapter._tower_config("text")
    eos = int(cfg.eos_token_id)
    bos = int(getattr(cfg, "bos_token_id", None) or max(0, eos - 1))
    seq = min(seq, int(cfg.max_position_embeddings))
    high = max(3, min(bos, eos, int(cfg.vocab_size)))
    ids = torch.randint(1, high, (batch, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g) if seq >= 2 else torch.ones(batch, dtype=torch.long)
    lengths[0] = seq  # at least one full row so the padded width is really ``seq``
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    if seq > 1:
        ids[:, 0] = bos
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, int(cfg.pad_token_id or 0)))
    ids[torch.arange(batch), lengths - 1] = eos
    return {"input_ids": ids.long(), "attention_mask": mask}


@register_onnx_spec("hf_clip")
def hf_clip_graphs(adapter: ModelAdapter) -> list[GraphSpec]:
    specs = []
    if "image" in adapter.towers():
        ins = {"pixel_values": {0: "batch_size"}}  # CLIP position embeddings fix the image size
        outs = {"image_embeds": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"}}
        specs.append(GraphSpec("vision_model", "image", ins, outs, lambda a: _clip_tower(a, "image"), clip_image_inputs,
                               _clip_optimum_config("image", ins, outs)))
    if "text" in adapter.towers():
        ins = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "attention_mask": {0: "batch_size", 1: "sequence_length"}}
        outs = {"text_embeds": {0: "batch_size"}, "last_hidden_state": {0: "batch_size", 1: "sequence_length"}}
        specs.append(GraphSpec("text_model", "text", ins, outs, lambda a: _clip_tower(a, "text"), clip_text_inputs,
                               _clip_optimum_config("text", ins, outs)))
    return specs


def example_inputs(adapter: ModelAdapter, tower: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid inputs for one tower (used to check exported artifacts against the live model)."""
    spec = next(s for s in graph_specs(adapter, [tower]))
    return spec.example_inputs(adapter, batch, seq, torch.Generator().manual_seed(seed))
