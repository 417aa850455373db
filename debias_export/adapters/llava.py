"""LLaVA (``LlavaForConditionalGeneration``, LLaVA-1.5) and LLaVA-NeXT behind the adapter interface.

Only the vision tower is an editable tower (``"image"``); sites are blocks of
the vision tower's encoder layers (CLIP or SigLIP vision encoders): ``model.vision_tower.vision_model.encoder.layers``
on transformers 4.57, ``model.vision_tower.encoder.layers`` on 5.x (see ``runtime.HF_LAYOUTS``).

Which block the LM reads: HF takes ``vision_tower(..., output_hidden_states=True).hidden_states[k]``
with ``k = vision_feature_layer``. ``hidden_states`` has ``L + 1`` entries: index 0 is the embedding
output (after CLIP's ``pre_layrnorm``) and index ``i >= 1`` is the output of block ``i - 1``. So
``k = -2`` (LLaVA-1.5) is ``hidden_states[L - 1]`` = output of block ``L - 2``: :meth:`consumed_layer`
returns ``L - 2`` and the site ``image.-2`` names exactly the features the LM sees. Later blocks
(and ``post_layernorm``) never reach the LM. Every patch token is consumed (``"default"`` drops only
CLS), so there is no output-position pruning.

``embed("image", x)``: the projected image features the LM receives, ``[B, N, d_lm]`` for LLaVA-1.5
(``N = (image_size / patch)^2``, 576 for the 336px model) and for LLaVA-NeXT tiles given as
``[B, 3, H, W]``; with ``image_sizes`` (NeXT anyres input ``[B, tiles, 3, H, W]``) the per-image
packed features (unpadded, with newline tokens) concatenated into ``[sum_i N_i, d_lm]``.

Export (specs: :mod:`debias_export.export.families.llava`, built on :func:`save_base` / :func:`load_base`): ``save_pretrained`` of the
base model + patch files + remote code (``AutoModelForImageTextToText``), and one ONNX graph
``vision_features`` (pixel_values -> image_features: patched vision tower + projector).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..core.errors import DebiasError, IntegrityError
from ..core.sites import Site
from ..core.specs import hub_kwargs
from ..runtime import HF_LAYOUTS, SiteEdit, hf_blocks_path
from .anatomy import TowerParts, register_tower_parts, vit_root
from .base import ModelAdapter, OutputPositions, refuse_patched_export
from .hf_clip import clip_pixel_values
from .registry import register_adapter
from .transformers_compat import quiet_transformers, save_pretrained_portable, save_processor_portable, seeded_init_

_LAYOUT = HF_LAYOUTS["llava"]["image"]
MODEL_TYPES = ("llava", "llava_next")


def _llava_classes() -> dict[str, type]:
    return {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


@register_adapter
class LlavaAdapter(ModelAdapter):
    """Adapter for LLaVA-1.5 / LLaVA-NeXT: edits the vision tower the language model reads."""

    family = "llava"
    bias_metric = "vla_gender_bias"  # no text tower to retrieve with: yes/no questions about faces instead
    tiny_name = "tiny-llava"

    @classmethod
    def tiny(cls, seed: int = 0) -> "ModelAdapter":
        return tiny_llava(seed=seed)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, tuple(_llava_classes().values()))

    @classmethod
    def handles_config(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) in MODEL_TYPES

    @classmethod
    def load(cls, spec: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> "LlavaAdapter":
        """Load from a hub id or local dir, or ``tiny-llava[:seed]`` (an exported patched dir is refused: use
        ``debias_export.load_patched``)."""
        if (builtin := cls.builtin_spec(spec)) is not None:
            return builtin
        refuse_patched_export(spec)
        kwargs = {**hub_kwargs(), **kwargs}
        try:
            config = AutoConfig.from_pretrained(spec, **hub_kwargs())
            klass = _llava_classes()[config.model_type]
            with quiet_transformers():
                model = klass.from_pretrained(spec, dtype=dtype, **kwargs)
        except (OSError, KeyError, ValueError) as exc:
            raise DebiasError(f"cannot load LLaVA model from {spec!r}: {str(exc).splitlines()[0]}") from None
        processor = None
        try:
            processor = AutoProcessor.from_pretrained(spec, **hub_kwargs())
        except Exception:  # noqa: BLE001 - weights without processor files still load
            processor = None
        return cls(model.eval(), source=spec, processor=processor)

    @classmethod
    def from_config(cls, config: Any, seed: int = 0) -> "LlavaAdapter":
        """Random-weight model from a ``LlavaConfig`` / ``LlavaNextConfig`` (tests, export work)."""
        torch.manual_seed(seed)
        config._attn_implementation = "eager"
        model = _llava_classes()[config.model_type](config)
        # transformers majors initialise differently: re-draw the weights so a seed means one model everywhere
        return cls(seeded_init_(model, seed, _LAYOUT["inputs"]).eval(), source="config")

    # ----- structure ---------------------------------------------------------------------------
    @property
    def vision_config(self):
        return self.model.config.vision_config

    def towers(self) -> tuple[str, ...]:
        return ("image",)

    def vision_tower(self) -> nn.Module:
        for path in _LAYOUT["inputs"]:
            try:
                return self.model.get_submodule(path)
            except AttributeError:
                continue
        raise DebiasError(f"{type(self.model).__name__} has no vision tower")

    def blocks_path(self, tower: str) -> str:
        self.check_tower(tower)
        try:
            return hf_blocks_path(self.model, self.family, tower)
        except LookupError:
            raise DebiasError(f"LLaVA vision tower {type(self.vision_tower()).__name__} is not a CLIP/SigLIP vision model") from None

    def width(self, tower: str) -> int:
        self.check_tower(tower)
        return int(self.vision_config.hidden_size)

    def sub_module_path(self, site: Site) -> str | None:
        return _LAYOUT["subs"].get(site.kind)

    def feature_layers(self) -> list[int]:
        """``vision_feature_layer`` as a list of ``hidden_states`` indices (one or several)."""
        layer = self.model.config.vision_feature_layer
        return [int(x) for x in (layer if isinstance(layer, (list, tuple)) else [layer])]

    def consumed_layer(self, tower: str) -> int:
        """Block whose output is ``hidden_states[vision_feature_layer]`` (the deepest, for a list)."""
        n = self.num_layers(tower)
        blocks = []
        for k in self.feature_layers():
            index = k + n + 1 if k < 0 else k  # hidden_states has n + 1 entries
            if not 1 <= index <= n:
                raise DebiasError(f"vision_feature_layer {k} selects the embedding output or lies outside the {n}-block vision tower")
            blocks.append(index - 1)
        return max(blocks)

    def consumed_layer_reason(self, tower: str) -> str:
        return f"vision_feature_layer {self.model.config.vision_feature_layer}"

    def output_positions(self, tower: str) -> OutputPositions | None:
        self.check_tower(tower)
        return None  # the projector reads every patch token

    def output_token_index(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise DebiasError("LLaVA feeds every patch token of the vision tower to the LM; there is no single output token")

    def num_image_tokens(self) -> int:
        """Image tokens per 336px-style image for LLaVA-1.5 (what the processor expands ``<image>`` to)."""
        patches = (int(self.vision_config.image_size) // int(self.vision_config.patch_size)) ** 2
        return patches + (1 if self.model.config.vision_feature_select_strategy == "full" else 0)

    # ----- inputs ------------------------------------------------------------------------------
    def prepare_images(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        proc = getattr(self.processor, "image_processor", None)
        if proc is not None:
            out = proc(images=list(images), return_tensors="pt")
            return {k: out[k] for k in ("pixel_values", "image_sizes") if k in out}
        if self.model.config.model_type == "llava_next":
            raise DebiasError("LLaVA-NeXT images need the model's processor (anyres tiling); load a checkpoint with processor files")
        return {"pixel_values": clip_pixel_values(images, int(self.vision_config.image_size))}

    def prepare_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise DebiasError("the LLaVA adapter edits only the image tower; prompts go through debias_export.eval.llava_bias")

    # ----- forward -----------------------------------------------------------------------------
    def embed(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image features as fed to the LM (see the module docstring for the shape)."""
        self.check_tower(tower)
        if self.model.config.model_type == "llava_next" and "image_sizes" in inputs:
            feats = self.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns an output object
            return torch.cat(list(feats), dim=0)
        pixels = inputs["pixel_values"]
        if pixels.dim() != 4:
            raise DebiasError(f"pixel_values must be [B, 3, H, W] (LLaVA-NeXT tiles need image_sizes); got {tuple(pixels.shape)}")
        return LlavaImageFeatures(self.model)(pixels)["image_features"]

    def run_tower(self, tower: str, inputs: dict[str, torch.Tensor]) -> None:
        """Vision tower only (no projector, no LM): enough for every block hook to fire."""
        self.check_tower(tower)
        pixels = inputs["pixel_values"]
        if pixels.dim() == 5:  # LLaVA-NeXT anyres tiles [B, tiles, C, H, W]
            pixels = pixels.flatten(0, 1)
        self.vision_tower()(pixels)


# ----- tiny builders (tests) -------------------------------------------------------------------
def tiny_llava_config(next_style: bool = False, vocab_size: int = 160, image_token_index: int = 159,
                      vision_feature_layer: int | list[int] = -2, select_strategy: str = "default"):
    """LLaVA(-NeXT) config with a 3-block tiny CLIP vision tower (32px, patch 8: 16 patches) and a
    2-layer tiny Llama; the image token lies inside the vocabulary."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw = dict(vision_config=vision, text_config=text, image_token_index=image_token_index,
              vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=select_strategy,
              projector_hidden_act="gelu")
    if next_style:
        return LlavaNextConfig(image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]], **kw)
    return LlavaConfig(image_seq_length=16 + (select_strategy == "full"), **kw)


def tiny_llava(seed: int = 0, **kwargs: Any) -> LlavaAdapter:
    """Adapter around a tiny random LLaVA (``kwargs`` as in :func:`tiny_llava_config`), with the
    character-level :func:`tiny_llava_processor` attached when its vocabulary fits the config."""
    config = tiny_llava_config(**kwargs)
    adapter = LlavaAdapter.from_config(config, seed=seed)
    text = config.text_config
    if config.model_type == "llava" and text.vocab_size > config.image_token_index >= len(_TINY_CHARS) + len(_TINY_SPECIALS):
        adapter.processor = tiny_llava_processor(text.vocab_size, config.image_token_index)
    adapter.source = f"tiny-llava:{seed}"
    return adapter


_TINY_SPECIALS = ("[PAD]", "<s>", "</s>", "[UNK]")
_TINY_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII


def tiny_llava_processor(vocab_size: int = 160, image_token_index: int = 159, image_size: int = 32, patch_size: int = 8):
    """``LlavaProcessor`` for tiny LLaVA: one token per character (any English prompt tokenizes, offline,
    and the option letters "A"/"B" are single tokens), ``<image>`` at ``image_token_index``, 32px CLIP images."""
    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS + tuple(_TINY_CHARS))}
    # fill the gap up to the image token so ids are contiguous and match the model's embedding table
    vocab.update({f"[unused{i}]": i for i in range(len(vocab), image_token_index)})
    vocab["<image>"] = image_token_index
    vocab.update({f"[unused{i}]": i for i in range(image_token_index + 1, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                  eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


# ----- export: plug-ins for debias_export.export ---------------------------------------------------
def save_base(adapter: LlavaAdapter, out: Path) -> None:
    """``save_pretrained`` of the unpatched model (+ processor): loads for generation as-is."""
    if any(isinstance(m, SiteEdit) for m in adapter.model.modules()):
        raise DebiasError("save_base needs the unpatched model (call it inside export.unpatched(handle))")
    save_pretrained_portable(adapter.model, out, vision_prefixes=_LAYOUT["inputs"])
    if adapter.processor is not None and hasattr(adapter.processor, "save_pretrained"):
        save_processor_portable(adapter.processor, out)


def base_info(adapter: LlavaAdapter) -> dict[str, Any]:
    model = adapter.model
    return {"module": "transformers", "class": type(model).__name__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None), "dtype": str(model.dtype)}


def load_base(path: Path, info: dict[str, Any] | None = None) -> LlavaAdapter:
    """Stock ``from_pretrained`` of a :func:`save_base` directory (no patches), processor if saved."""
    path = Path(path)
    info = info or {}
    kwargs = {"attn_implementation": info["attn_implementation"]} if info.get("attn_implementation") else {}
    try:
        config = AutoConfig.from_pretrained(path)
        with quiet_transformers():
            model = _llava_classes()[config.model_type].from_pretrained(path, **kwargs)
    except (OSError, KeyError, ValueError) as exc:
        raise IntegrityError(f"cannot load LLaVA base model from {path}: {str(exc).splitlines()[0]}") from None
    processor = None
    if (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(path)
    return LlavaAdapter(model.eval(), source=str(path), processor=processor)


class LlavaImageFeatures(nn.Module):
    """ONNX graph ``pixel_values [B, 3, H, W] -> image_features [B, N, d_lm]`` (patched vision tower + projector).

    Vision tower -> ``hidden_states[vision_feature_layer]`` (concatenated for a list) -> drop CLS for
    ``"default"`` -> projector: exactly LLaVA-1.5's ``get_image_features``, and LLaVA-NeXT's per-tile
    features before anyres packing (packing depends on ``image_sizes`` and stays in Python).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        layer = cfg.vision_feature_layer
        self.layers = [int(x) for x in (layer if isinstance(layer, (list, tuple)) else [layer])]
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        self.vision_tower = LlavaAdapter(model).vision_tower()
        self.projector = model.model.multi_modal_projector if hasattr(model, "model") else model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        feats = torch.cat([hidden[k] for k in self.layers], dim=-1)
        if self.drop_cls:
            feats = feats[:, 1:]
        return {"image_features": self.projector(feats)}


# ----- anatomy for locate / folding (adapters.anatomy) ------------------------------------------------
def _llava_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    m = adapter.model
    if len(adapter.feature_layers()) != 1:
        raise DebiasError("locate reads one vision layer; this LLaVA concatenates several (vision_feature_layer is a list)")
    drop_cls = m.config.vision_feature_select_strategy == "default"
    projector = m.model.multi_modal_projector

    def pool(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        return (tokens[:, 1:] if drop_cls else tokens).mean(1)

    def readout(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        # the projector is non-linear (Linear-GELU-Linear): project every token, then average
        return projector(tokens[:, 1:] if drop_cls else tokens).mean(1)

    return TowerParts("self_attn.out_proj", "mlp.fc2", int(adapter.vision_config.num_attention_heads), readout, pool,
                      stream_start=f"{vit_root(adapter, tower)}.pre_layrnorm", retrieval=False)


register_tower_parts("llava", _llava_parts)
