"""Hugging Face CLIP: ``CLIPModel``, ``CLIPVisionModelWithProjection``, ``CLIPTextModelWithProjection``.

Sites: ``image.L.*`` are blocks of ``vision_model.encoder.layers``, ``text.L.*`` of
``text_model.encoder.layers``. The image tower pools CLS (position 0) through ``post_layernorm``;
the text tower pools the EOS token (first ``eos_token_id``, or argmax of ids for legacy configs
with ``eos_token_id == 2``) after ``final_layer_norm``. Both layernorms act per token, so an edit
at the last block only matters at that one position.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchvision.transforms import v2 as T
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)

from ..core.errors import DebiasError
from ..core.sites import Site
from ..core.specs import hub_kwargs
from ..runtime import HF_LAYOUTS, hf_blocks_path
from ..runtime import eos_first as eos_positions
from .anatomy import TowerParts, clip_vit_parts, linear_tail, register_tower_parts
from .base import ModelAdapter, OutputPositions
from .registry import register_adapter
from .transformers_compat import pooled, quiet_transformers, seeded_init_

_LAYOUT = HF_LAYOUTS["hf_clip"]


def _clip_classes():
    return CLIPModel, CLIPVisionModelWithProjection, CLIPTextModelWithProjection


@register_adapter
class HFCLIPAdapter(ModelAdapter):
    """Adapter for transformers' CLIP classes (full model or single tower with projection)."""

    family = "hf_clip"
    tiny_name = "tiny-clip"

    @classmethod
    def tiny(cls, seed: int = 0) -> "ModelAdapter":
        return tiny_clip(seed=seed)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _clip_classes())

    @classmethod
    def handles_config(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) in ("clip", "clip_vision_model", "clip_text_model")

    @classmethod
    def load(cls, spec: str, tower: str | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any) -> "HFCLIPAdapter":
        """Load ``CLIPModel`` (or one tower with projection when ``tower`` is given) from a hub id or dir, or
        ``tiny-clip[:seed]``. Hub ids download only when hub access is on (:mod:`~debias_export.adapters.specs`)."""
        if (builtin := cls.builtin_spec(spec)) is not None:
            return builtin
        CLIPModel, Vision, Text = _clip_classes()
        kwargs = {**hub_kwargs(), **kwargs}
        klass = {None: CLIPModel, "image": Vision, "text": Text}[tower]
        try:
            with quiet_transformers():
                model = klass.from_pretrained(spec, dtype=dtype, attn_implementation="eager", **kwargs)
        except OSError as exc:
            raise DebiasError(f"cannot load CLIP model from {spec!r}: {str(exc).splitlines()[0]}") from None
        processor = None
        try:
            processor = CLIPProcessor.from_pretrained(spec, **hub_kwargs())
        except Exception:  # noqa: BLE001 - checkpoints without processor files fall back below
            processor = None
        return cls(model.eval(), source=spec, processor=processor)

    @classmethod
    def from_config(cls, config: Any, seed: int = 0) -> "HFCLIPAdapter":
        """Random-weight model from a ``CLIPConfig`` (tests, latency/FLOPs work)."""
        CLIPModel, Vision, Text = _clip_classes()
        klass = {"clip": CLIPModel, "clip_vision_model": Vision, "clip_text_model": Text}[config.model_type]
        torch.manual_seed(seed)
        config._attn_implementation = "eager"
        # transformers majors initialise differently: re-draw the weights so a seed means one model everywhere
        return cls(seeded_init_(klass(config), seed).eval(), source="config")

    # ----- structure ---------------------------------------------------------------------------
    def _has(self, tower: str) -> bool:
        return hasattr(self.model, "vision_model" if tower == "image" else "text_model")

    def towers(self) -> tuple[str, ...]:
        return tuple(t for t in ("image", "text") if self._has(t))

    def blocks_path(self, tower: str) -> str:
        self.check_tower(tower)
        return hf_blocks_path(self.model, self.family, tower)

    def _tower_config(self, tower: str):
        cfg = self.model.config
        if hasattr(cfg, "vision_config"):
            return cfg.vision_config if tower == "image" else cfg.text_config
        return cfg

    def width(self, tower: str) -> int:
        self.check_tower(tower)
        return int(self._tower_config(tower).hidden_size)

    def sub_module_path(self, site: Site) -> str | None:
        return _LAYOUT[site.tower]["subs"].get(site.kind)

    def eos_token_id(self) -> int:
        return int(self._tower_config("text").eos_token_id)

    def output_positions(self, tower: str) -> OutputPositions:
        self.check_tower(tower)
        if tower == "image":
            return OutputPositions(static_index=0)
        return OutputPositions(rule={"rule": "eos_first", "input": "input_ids", "eos_token_id": self.eos_token_id()},
                               hook_path="text_model")

    def output_token_index(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if tower == "image":
            return torch.zeros(inputs["pixel_values"].shape[0], dtype=torch.long)
        return eos_positions(inputs["input_ids"], self.eos_token_id()).long()

    # ----- inputs ------------------------------------------------------------------------------
    def image_size(self) -> int:
        return int(self._tower_config("image").image_size)

    def prepare_images(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        if self.processor is not None and getattr(self.processor, "image_processor", None) is not None:
            return {"pixel_values": self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]}
        return {"pixel_values": clip_pixel_values(images, self.image_size())}

    def prepare_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.processor is not None and getattr(self.processor, "tokenizer", None) is not None:
            tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
        cfg = self._tower_config("text")
        return clip_bpe_tokenize(texts, cfg.max_position_embeddings, cfg.vocab_size)

    # ----- forward -----------------------------------------------------------------------------
    def embed(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_tower(tower)
        m = self.model
        if tower == "image":
            if hasattr(m, "get_image_features"):
                return pooled(m.get_image_features(pixel_values=inputs["pixel_values"]))
            return m(pixel_values=inputs["pixel_values"]).image_embeds
        kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        if hasattr(m, "get_text_features"):
            return pooled(m.get_text_features(**kw))
        return m(**kw).text_embeds


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixel_values(images: Sequence[Any], size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP preprocessing (bicubic resize of the short side, centre crop, normalise) without a processor."""
    tf = T.Compose([T.ToImage(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    return torch.stack([tf(img.convert("RGB")) for img in images])


def clip_bpe_tokenize(texts: Sequence[str], context_length: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """Real CLIP BPE (the vocabulary ships inside open_clip) for checkpoints without tokenizer files.

    Pads with 0 after EOS like OpenAI CLIP, so HF's first-EOS pooling and argmax pooling agree.
    """
    from open_clip.tokenizer import SimpleTokenizer  # heavy; loaded when the open_clip family is used

    tok = SimpleTokenizer()
    if vocab_size < len(tok.encoder):
        raise DebiasError(f"text tower vocab_size {vocab_size} is smaller than the CLIP BPE vocabulary ({len(tok.encoder)}); save a tokenizer with the model")
    ids = tok(list(texts), context_length=context_length)
    lengths = (ids != 0).sum(dim=1)
    width = int(lengths.max())
    ids = ids[:, :width]
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.long(), "attention_mask": mask}


# ----- tiny builder (tests, offline smoke runs: model spec ``tiny-clip[:seed]``) -----------------------
def tiny_clip_config(hidden: int = 32, layers: int = 3, heads: int = 4, image_size: int = 32, patch: int = 8,
                     projection: int = 16):
    """A ``CLIPConfig`` small enough for unit tests; the text tower uses the real CLIP BPE vocabulary."""
    text = dict(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=32, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=0, projection_dim=projection)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=patch, projection_dim=projection)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def tiny_clip(seed: int = 0, **kwargs):
    """Adapter around a tiny random ``CLIPModel``."""
    return HFCLIPAdapter.from_config(tiny_clip_config(**kwargs), seed=seed)


# ----- anatomy for locate / folding (adapters.anatomy) ------------------------------------------------
def _hf_clip_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    cfg = adapter.model.config
    if hasattr(cfg, "vision_config"):
        cfg = cfg.vision_config if tower == "image" else cfg.text_config
    if tower == "image":
        return clip_vit_parts(adapter, tower, int(cfg.num_attention_heads))
    norm, proj, emb = "text_model.final_layer_norm", "text_projection", "text_model.embeddings"
    readout, pool = linear_tail(adapter, tower, norm, proj)
    return TowerParts("self_attn.out_proj", "mlp.fc2", int(cfg.num_attention_heads), readout, pool, final_norm=norm,
                      projection=proj, embedding_writers=(f"{emb}.token_embedding", f"{emb}.position_embedding"))


register_tower_parts("hf_clip", _hf_clip_parts)
