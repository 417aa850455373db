"""Architecture configs of real checkpoints, written out so they can be built offline with random weights.

Latency, FLOPs and export behaviour do not depend on weight values, so benchmarks and export checks
build these with random weights here; users load the real weights from the hub id named in ``HUB_IDS``.
"""
from __future__ import annotations

from typing import Any

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from ..core.errors import DebiasError
from .hf_clip import HFCLIPAdapter

# openai/clip-vit-base-patch16 (config.json of the hub checkpoint)
CLIP_VIT_B16: dict[str, Any] = {
    "projection_dim": 512,
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 512},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu", "projection_dim": 512},
}

# openai/clip-vit-large-patch14-336
CLIP_VIT_L14_336: dict[str, Any] = {
    "projection_dim": 768,
    "text_config": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 768},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768},
}

# llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 vision tower read at layer -2, CLS dropped, Llama-2-7B LM.
LLAVA_15_7B: dict[str, Any] = {
    "model_type": "llava",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
    "image_token_index": 32000,
    "vision_config": dict(CLIP_VIT_L14_336["vision_config"], model_type="clip_vision_model"),
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
}

HUB_IDS = {
    "clip-vit-base-patch16": "openai/clip-vit-base-patch16",
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
}

CONFIGS = {"clip-vit-base-patch16": CLIP_VIT_B16, "clip-vit-large-patch14-336": CLIP_VIT_L14_336,
           "llava-1.5-7b": LLAVA_15_7B}


def clip_config(name: str):
    """``CLIPConfig`` for a named real CLIP architecture."""
    if name not in CONFIGS or name.startswith("llava"):
        raise DebiasError(f"unknown CLIP architecture {name!r}; known: clip-vit-base-patch16, clip-vit-large-patch14-336")
    cfg = CONFIGS[name]
    return CLIPConfig(text_config=cfg["text_config"], vision_config=cfg["vision_config"], projection_dim=cfg["projection_dim"])


def random_clip(name: str, tower: str | None = None, seed: int = 0):
    """Adapter around a random-weight real-size CLIP (``tower`` = "image"/"text" builds only that tower)."""
    cfg = clip_config(name)
    if tower == "image":
        cfg = CLIPVisionConfig(**cfg.vision_config.to_dict())
    elif tower == "text":
        cfg = CLIPTextConfig(**cfg.text_config.to_dict())
    adapter = HFCLIPAdapter.from_config(cfg, seed=seed)
    adapter.source = f"config:{name}"
    return adapter
