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

from ..core.errors import DebiasError
from ..runtime import HF_LAYOUTS, hf_blocks_path
from ..core.sites import Site
from .base import ModelAdapter, OutputPositions, register_adapter
from .hf_clip import clip_pixel_values
from .transformers_compat import pooled, quiet_transformers, save_pretrained_portable, save_processor_portable, seeded_init_

_LAYOUT = HF_LAYOUTS["hf_dual_encoder"]


def _dual_class():
    from transformers import VisionTextDualEncoderModel

    return VisionTextDualEncoderModel


def _check_towers(model: nn.Module) -> None:
    """Only CLIP vision + BERT text towers have the layouts described above."""
    from transformers import BertModel, CLIPVisionModel

    if not isinstance(model.vision_model, CLIPVisionModel):
        raise DebiasError(f"dual-encoder vision tower is {type(model.vision_model).__name__}; family 'hf_dual_encoder' supports CLIPVisionModel")
    if not isinstance(model.text_model, BertModel):
        raise DebiasError(f"dual-encoder text tower is {type(model.text_model).__name__}; family 'hf_dual_encoder' supports BertModel")
    if getattr(model.text_model, "pooler", None) is None:
        raise DebiasError("dual-encoder BERT text tower has no pooler; VisionTextDualEncoderModel needs pooler_output")


def _load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is not None:
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001 - checkpoints without tokenizer files fall back to MiniLM's
            pass
    from ..workflow.biaslab import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


@register_adapter
class DualEncoderAdapter(ModelAdapter):
    """Adapter for ``VisionTextDualEncoderModel`` (CLIP vision tower + BERT text tower)."""

    family = "hf_dual_encoder"

    def __init__(self, model: nn.Module, source: str | None = None, processor: Any = None):
        _check_towers(model)
        super().__init__(model, source=source, processor=processor)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _dual_class())

    @classmethod
    def handles_config(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == "vision-text-dual-encoder"

    @classmethod
    def load(cls, spec: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> "DualEncoderAdapter":
        """Load a saved ``VisionTextDualEncoderModel`` directory (plus its tokenizer when present)."""
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
    from transformers import BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig

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


class DualTower(nn.Module):
    """One tower of the dual encoder as an ONNX-exportable module (shares the live, possibly patched, model)."""

    def __init__(self, model: nn.Module, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.tower == "image":
            return {"image_embeds": pooled(self.model.get_image_features(pixel_values=pixel_values))}
        # Explicit token_type_ids: BERT otherwise slices a buffer by a Python int, frozen at trace time.
        return {"text_embeds": pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                                                   token_type_ids=torch.zeros_like(input_ids)))}


def _image_inputs(adapter, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    size = adapter.image_size()
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def _text_inputs(adapter, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """[CLS] words [SEP] then padding, with per-row lengths (BERT vocab: ids 1000+ are word pieces)."""
    cfg = adapter._tower_config("text")
    seq = max(3, min(seq, int(cfg.max_position_embeddings)))
    vocab = int(cfg.vocab_size)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids[:, 0] = min(101, vocab - 1)
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    ids[torch.arange(batch), lengths - 1] = min(102, vocab - 1)
    return {"input_ids": ids, "attention_mask": mask}


def onnx_graphs(adapter: "DualEncoderAdapter") -> list:
    from ..export.onnx_specs import GraphSpec

    text_axes = {0: "batch_size", 1: "sequence_length"}
    return [GraphSpec("vision_model", "image", {"pixel_values": {0: "batch_size"}}, {"image_embeds": {0: "batch_size"}},
                      lambda a: DualTower(a.model, "image"), _image_inputs),
            GraphSpec("text_model", "text", {"input_ids": dict(text_axes), "attention_mask": dict(text_axes)},
                      {"text_embeds": {0: "batch_size"}}, lambda a: DualTower(a.model, "text"), _text_inputs)]


def register_export() -> None:
    """Plug the dual encoder into the export machinery (HF dir with remote code for AutoModel + ONNX)."""
    from ..export.onnx_specs import register_onnx_spec
    from ..export.safetensors_export import HFDirSpec, register_hf_spec

    register_hf_spec(HFDirSpec(DualEncoderAdapter.family, save_base, load_base, base_info, auto_class="AutoModel"))
    register_onnx_spec(DualEncoderAdapter.family)(onnx_graphs)
