"""Export specs of family ``hf_clip`` (transformers CLIP): stock HF directory save/load and one ONNX graph per tower.

Each tower graph is the stock ``CLIP{Vision,Text}ModelWithProjection`` built on the meta device around the
live (possibly patched) modules, so optimum's CLIP OnnxConfigs apply to it unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import nn
from transformers import CLIPModel, CLIPProcessor, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from ...adapters import ModelAdapter
from ...adapters.hf_clip import HFCLIPAdapter
from ...adapters.transformers_compat import quiet_transformers, save_pretrained_portable, save_processor_portable
from ...core.errors import DebiasError
from ..hf_dir import DEBIAS_CONFIG, HFDirSpec, register_hf_spec
from ..onnx_specs import Axes, GraphSpec, optimum_config_class, register_onnx_spec, tower_shell


def hf_save_base(adapter: ModelAdapter, out: Path) -> None:
    save_pretrained_portable(adapter.model, out)
    if adapter.processor is not None:
        save_processor_portable(adapter.processor, out)


def hf_base_info(adapter: ModelAdapter) -> dict[str, Any]:
    model = adapter.model
    return {"module": "transformers", "class": type(model).__name__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None), "dtype": str(model.dtype)}


def hf_load_base(path: Path, info: dict[str, Any]) -> ModelAdapter:
    klass = getattr(transformers, info["class"], None)
    if klass is None:
        raise DebiasError(f"transformers has no class {info['class']!r} named in {path / DEBIAS_CONFIG}")
    kwargs = {"attn_implementation": info["attn_implementation"]} if info.get("attn_implementation") else {}
    with quiet_transformers():
        model = klass.from_pretrained(path, **kwargs)
    processor = None
    if (path / "preprocessor_config.json").is_file():
        processor = CLIPProcessor.from_pretrained(path)
    return HFCLIPAdapter(model.eval(), source=str(path), processor=processor)


register_hf_spec(HFDirSpec("hf_clip", hf_save_base, hf_load_base, hf_base_info))


def _clip_optimum_config(tower: str, inputs: Axes, outputs: Axes) -> Callable[[nn.Module], Any]:
    """``GraphSpec.optimum_config`` for a CLIP tower; imports optimum only when called."""

    def build(module: nn.Module) -> Any:
        # optional dependency, imported on request (--exporter optimum) only
        from optimum.exporters.onnx.model_configs import CLIPTextWithProjectionOnnxConfig, CLIPVisionModelOnnxConfig

        base = CLIPVisionModelOnnxConfig if tower == "image" else CLIPTextWithProjectionOnnxConfig
        return optimum_config_class(base, inputs, outputs)(module.config, task="feature-extraction")

    return build


def _clip_tower(adapter: ModelAdapter, tower: str) -> nn.Module:
    model = adapter.model
    if not isinstance(model, CLIPModel):
        return model  # already a one-tower-with-projection model
    if tower == "image":
        return tower_shell(CLIPVisionModelWithProjection, model.config.vision_config,
                            {"vision_model": model.vision_model, "visual_projection": model.visual_projection})
    return tower_shell(CLIPTextModelWithProjection, model.config.text_config,
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
    eos, vocab = int(cfg.eos_token_id), int(cfg.vocab_size)
    if not 0 <= eos < vocab:
        # CLIP pools at the EOS token; a tower whose EOS id has no embedding row cannot run on real text
        raise DebiasError(f"text config eos_token_id {eos} is outside the vocabulary (vocab_size {vocab}); "
                          "fix the model's text config")
    bos = int(getattr(cfg, "bos_token_id", None) or max(0, eos - 1))
    if not 0 <= bos < vocab:  # small configs often keep CLIP's default BOS 49406: start rows with word ids
        bos = None
    seq = min(seq, int(cfg.max_position_embeddings))
    high = max(3, min(x for x in (bos, eos, vocab) if x is not None))
    ids = torch.randint(1, high, (batch, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g) if seq >= 2 else torch.ones(batch, dtype=torch.long)
    lengths[0] = seq  # at least one full row so the padded width is really ``seq``
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    if seq > 1 and bos is not None:
        ids[:, 0] = bos
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, int(cfg.pad_token_id or 0)))
    ids[torch.arange(batch), lengths - 1] = eos
    return {"input_ids": ids.long(), "attention_mask": mask}


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


register_onnx_spec("hf_clip")(hf_clip_graphs)
