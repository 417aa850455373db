"""What a benchmark runs: deterministic tower inputs, the real-size LLaVA vision path, one tower as a module, and
its ONNX export per variant through the package's exporter (:func:`~debias_export.export.onnx_export.export_graph`)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from ..adapters import ModelAdapter
from ..adapters.llava import LlavaAdapter
from ..adapters.real_configs import LLAVA_15_7B
from ..core.errors import DebiasError
from ..export.onnx_export import DEFAULT_EXPORTER, export_graph
from ..export.onnx_specs import GraphSpec
from ..export.quantize import convert
from .patchsets import VariantSwitch

# Input / trace dtype per benchmark dtype; int8 graphs are dynamically quantized from the fp32 trace
# (:func:`debias_export.export.quantize.convert`, the edit kept in fp32), so they take float32 inputs.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}


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


def tower_graph_spec(name: str, tower: str, inputs: dict[str, torch.Tensor]) -> GraphSpec:
    """The :class:`~debias_export.export.onnx_specs.GraphSpec` of one tower's ``embed`` for :func:`export_graph`:
    batch (and text sequence) axes dynamic; position-pruning pre-hooks run while tracing, so they are in the graph."""
    axes = {0: "batch"} if tower == "image" else {0: "batch", 1: "sequence"}
    return GraphSpec(name, tower, {n: dict(axes) for n in input_names(tower)}, {"embeds": {0: "batch"}},
                     build=lambda a: TowerModule(a, tower), example_inputs=lambda a, b, s, g: dict(inputs))


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
        path = out_dir / f"{tower}_{name}_{dtype}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        export_graph(tower_graph_spec(path.stem, tower, example), TowerModule(adapter, tower).eval(), example, path,
                     exporter=exporter)  # the package's one ONNX exporter (export.onnx_export)
        paths[name] = path
    switch.reset()
    return paths


def quantize_variants(fp32_paths: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """int8 graphs (``quantize_dynamic``, the edit's nodes excluded, as ``export --precision int8`` writes them)
    from each variant's fp32 graph."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, src in fp32_paths.items():
        paths[name] = out_dir / src.name.replace("_fp32.onnx", "_int8.onnx")
        convert(src, paths[name], "int8")
    return paths
