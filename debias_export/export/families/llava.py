"""Export specs of family ``llava`` (LLaVA 1.5 / NeXT): HF directory with remote code for
``AutoModelForImageTextToText``, and one ONNX graph, ``vision_features``, the image features the LM receives."""
from __future__ import annotations

import torch

from ...adapters.llava import LlavaAdapter, LlavaImageFeatures, base_info, load_base, save_base
from ..hf_dir import HFDirSpec, register_hf_spec
from ..onnx_specs import GraphSpec, register_onnx_spec


def example_inputs(adapter: LlavaAdapter, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    vc = adapter.vision_config
    size = int(vc.image_size)
    return {"pixel_values": torch.randn(batch, int(getattr(vc, "num_channels", 3)), size, size, generator=g)}


def onnx_graphs(adapter: LlavaAdapter) -> list:
    """One graph, ``vision_features`` (dynamic batch): what the LM receives per image (per tile for NeXT)."""
    return [GraphSpec("vision_features", "image", {"pixel_values": {0: "batch_size"}},
                      {"image_features": {0: "batch_size"}}, lambda a: LlavaImageFeatures(a.model),
                      example_inputs)]


register_hf_spec(HFDirSpec(LlavaAdapter.family, save_base, load_base, base_info, auto_class="AutoModelForImageTextToText"))
register_onnx_spec(LlavaAdapter.family)(onnx_graphs)
