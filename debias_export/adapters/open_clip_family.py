"""open_clip models (``open_clip.CLIP`` / ``CustomTextCLIP``) behind the adapter interface.

Sites: ``image.L.*`` are blocks of ``visual.transformer.resblocks``; ``text.L.*`` of
``transformer.resblocks`` (``CLIP``) or ``text.transformer.resblocks`` (``CustomTextCLIP``).
``attn_out`` wraps the block's ``attn`` module itself (``nn.MultiheadAttention`` calls its
``out_proj`` functionally, so the MHA output tuple's first element is the site; ``ls_1`` layer
scale, when present, comes after it); ``mlp_out`` is ``mlp.c_proj``.

Output positions (pruning at the last block): image ``pool_type='tok'`` without attentional
pooling reads only CLS (static 0); ``avg`` / ``none`` / attentional pooling read every token (no
pruning). Text ``argmax`` pooling -> ``ids_argmax`` rule, ``eos`` -> ``eos_first`` rule, ``first`` ->
static 0; ``last`` and CoCa-style appended CLS -> every token. Rules run on ``token_embedding``'s
input (the token ids), the first module the text tower calls. open_clip 3.x blocks run
batch-first ``[B, L, D]``; a seq-first stack disables pruning (the runtime indexes dim 1).

Export (specs: :mod:`debias_export.export.families.open_clip`, built on :func:`save_base` / :func:`load_base`):
the HF-style directory holds open_clip's own ``local-dir`` layout (``open_clip_config.json`` + ``open_clip_model.safetensors``,
base weights only, so ``open_clip.create_model("local-dir:DIR")`` loads the unpatched model) next to
the machinery's ``debias_config.json`` / ``debias_patches.safetensors``; ONNX graphs are
``image_encoder`` (pixel_values -> image_embeds) and ``text_encoder`` (input_ids -> text_embeds).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.errors import ConfigError, DebiasError, IntegrityError
from ..core.sites import Site
from ..core.specs import UnknownModelSpec, hub_allowed, in_hub_cache, unknown_spec_message
from ..runtime import SiteEdit, ids_argmax
from .anatomy import TowerParts, gather, register_tower_parts
from .base import ModelAdapter, OutputPositions, refuse_patched_export
from .registry import register_adapter

_SUB_MODULES = {"attn_out": "attn", "mlp_out": "mlp.c_proj"}
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def _open_clip():
    import open_clip  # heavy; loaded when the open_clip family is used

    return open_clip


def _apply_force_kwargs(cfg: dict, kwargs: dict) -> dict:
    """Record ``create_model``'s architecture overrides in the saved config so a reload rebuilds the same model."""
    if kwargs.get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    if kwargs.get("force_image_size") is not None:
        cfg["vision_cfg"]["image_size"] = kwargs["force_image_size"]
    if kwargs.get("force_context_length") is not None:
        cfg["text_cfg"]["context_length"] = kwargs["force_context_length"]
    if kwargs.get("force_custom_text"):
        cfg["custom_text"] = True
    return cfg


@register_adapter
class OpenCLIPAdapter(ModelAdapter):
    """Adapter for open_clip ``CLIP`` / ``CustomTextCLIP`` with ViT image and transformer text towers."""

    family = "open_clip"
    tiny_name = "tiny-open-clip"

    def __init__(self, model: nn.Module, source: str | None = None, processor: Any = None,
                 model_cfg: dict | None = None, tokenizer: Any = None):
        super().__init__(model, source=source, processor=processor)
        # The architecture dict is needed to re-create the model on load; keep it on the model
        # too so adapter_for(model) after apply_edits/remove still finds it.
        if model_cfg is not None:
            model._debias_open_clip_cfg = copy.deepcopy(model_cfg)
        self.tokenizer = tokenizer

    @property
    def model_cfg(self) -> dict | None:
        return getattr(self.model, "_debias_open_clip_cfg", None)

    @classmethod
    def tiny(cls, seed: int = 0) -> "ModelAdapter":
        return tiny_open_clip(seed=seed)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("open_clip"):
            return False  # cheap check first: adapter_for asks every family, open_clip imports slowly
        from open_clip.model import CLIP, CustomTextCLIP  # heavy; loaded when the open_clip family is used

        return isinstance(model, (CLIP, CustomTextCLIP))

    @classmethod
    def load(cls, spec: str, pretrained: str | None = None, random_init: bool = False, **kwargs: Any) -> "OpenCLIPAdapter":
        """Load ``open_clip:NAME[@PRETRAINED]``, ``NAME``, ``hf-hub:ORG/REPO``, ``local-dir:DIR`` or a dir
        holding ``open_clip_config.json``. ``pretrained`` is a tag or checkpoint file; a bare name without
        weights is refused unless ``random_init=True`` (random CLIPs must never be evaluated by accident).
        Also ``tiny-open-clip[:seed]``; ``hf-hub:`` repos download only when hub access is on (``adapters.specs``)."""
        name = spec[len("open_clip:"):] if spec.startswith("open_clip:") else spec
        if not name.startswith(("hf-hub:", "local-dir:")) and (builtin := cls.builtin_spec(spec, check=False)) is not None:
            return builtin
        if name.startswith("hf-hub:") and not hub_allowed() and not in_hub_cache(name[len("hf-hub:"):].split("@")[0]):
            raise UnknownModelSpec(unknown_spec_message(spec, []))
        oc = _open_clip()
        if "@" in name and not name.startswith(("hf-hub:", "local-dir:")):
            name, pretrained = name.split("@", 1)
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, OPEN_CLIP_CONFIG)):
            name = "local-dir:" + name
        if name.startswith("local-dir:"):
            refuse_patched_export(name[len("local-dir:"):])
        cfg = oc.get_model_config(name) if not name.startswith("hf-hub:") else None
        if cfg is None and not name.startswith("hf-hub:"):
            raise DebiasError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
        if not name.startswith(("hf-hub:", "local-dir:")) and pretrained is None and not random_init:
            raise DebiasError(f"open_clip model {name!r} needs weights: use 'open_clip:{name}@<tag-or-checkpoint>' "
                              f"(or random_init=True for a random-weight model)")
        try:
            model, _, preprocess = oc.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
            tokenizer = oc.get_tokenizer(name)
        except (RuntimeError, ValueError, OSError) as exc:
            raise DebiasError(f"cannot load open_clip model {spec!r}: {str(exc).splitlines()[0]}") from None
        if cfg is None:  # hf-hub: the config came with the download
            cfg = oc.get_model_config(name)
        cfg = _apply_force_kwargs(copy.deepcopy(cfg), kwargs)
        return cls(model.eval(), source=spec, processor=preprocess, model_cfg=cfg, tokenizer=tokenizer)

    @classmethod
    def from_config(cls, model_cfg: dict, seed: int = 0) -> "OpenCLIPAdapter":
        """Random-weight model from an open_clip ``model_cfg`` dict (tests, latency work)."""
        from open_clip.model import CLIP, CustomTextCLIP  # heavy; loaded when the open_clip family is used

        torch.manual_seed(seed)
        cfg = copy.deepcopy(model_cfg)
        klass = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
        model = klass(**cfg).eval()
        return cls(model, source="config", model_cfg=model_cfg)

    # ----- structure ---------------------------------------------------------------------------
    def _text_root(self) -> str | None:
        """Prefix of the text tower's modules ('' for CLIP, 'text.' for CustomTextCLIP), None if unsupported."""
        from open_clip.transformer import TextTransformer  # heavy; loaded when the open_clip family is used

        if hasattr(self.model, "transformer") and hasattr(self.model, "token_embedding"):
            return ""
        if isinstance(getattr(self.model, "text", None), TextTransformer):
            return "text."
        return None

    def _text_module(self) -> nn.Module:
        root = self._text_root()
        return self.model.text if root == "text." else self.model

    def towers(self) -> tuple[str, ...]:
        from open_clip.transformer import VisionTransformer  # heavy; loaded when the open_clip family is used

        out = []
        if isinstance(getattr(self.model, "visual", None), VisionTransformer):
            out.append("image")
        if self._text_root() is not None:
            out.append("text")
        return tuple(out)

    def blocks_path(self, tower: str) -> str:
        if tower == "image":
            return "visual.transformer.resblocks"
        return f"{self._text_root()}transformer.resblocks"

    def _transformer(self, tower: str) -> nn.Module:
        self.check_tower(tower)
        return self.model.get_submodule(self.blocks_path(tower).rsplit(".", 1)[0])

    def width(self, tower: str) -> int:
        return int(self._transformer(tower).width)

    def sub_module_path(self, site: Site) -> str | None:
        return _SUB_MODULES.get(site.kind)

    def output_positions(self, tower: str) -> OutputPositions | None:
        if not getattr(self._transformer(tower), "batch_first", True):
            return None  # runtime pruning indexes dim 1; a [L, B, D] stack would be pruned on batch
        if tower == "image":
            v = self.model.visual
            if v.attn_pool is None and v.pool_type == "tok":
                return OutputPositions(static_index=0)
            return None
        text = self._text_module()
        if getattr(text, "cls_emb", None) is not None:
            return None
        pool = text.text_pool_type if text is self.model else text.pool_type
        if pool == "argmax":
            return OutputPositions(rule={"rule": "ids_argmax", "input": "input_ids"}, hook_path=f"{self._text_root()}token_embedding")
        if pool == "eos":
            eos = self._eos_id()
            if eos == 2:  # runtime.eos_first treats id 2 as the legacy argmax case: not the same rule
                return None
            return OutputPositions(rule={"rule": "eos_first", "input": "input_ids", "eos_token_id": eos},
                                   hook_path=f"{self._text_root()}token_embedding")
        if pool == "first":
            return OutputPositions(static_index=0)
        return None  # 'last' (static -1 is not supported by the runtime) and 'none'

    def _eos_id(self) -> int:
        text = self._text_module()
        return int(text.text_eos_id if text is self.model else text.eos_id)

    def output_token_index(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pos = self.output_positions(tower)
        if tower == "image":
            if pos is None:
                raise DebiasError("this open_clip image tower pools over all tokens; it has no single output token")
            return torch.zeros(inputs["pixel_values"].shape[0], dtype=torch.long)
        text = self._text_module()
        pool = text.text_pool_type if text is self.model else text.pool_type
        ids = inputs["input_ids"]
        if getattr(text, "cls_emb", None) is None and pool == "argmax":
            return ids_argmax(ids).long()
        if getattr(text, "cls_emb", None) is None and pool == "eos":
            return (ids == self._eos_id()).int().argmax(dim=-1).long()
        if pool == "first":
            return torch.zeros(ids.shape[0], dtype=torch.long)
        raise DebiasError(f"open_clip text pooling {pool!r} has no single output token among the input positions")

    # ----- inputs ------------------------------------------------------------------------------
    def _preprocess(self):
        if self.processor is None:
            from open_clip.model import get_model_preprocess_cfg  # heavy; loaded when the open_clip family is used
            from open_clip.transform import PreprocessCfg, image_transform_v2

            cfg = {k: v for k, v in get_model_preprocess_cfg(self.model).items()
                   if k in PreprocessCfg.__dataclass_fields__}
            self.processor = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        return self.processor

    def image_size(self) -> int:
        """Side of the square images the vision tower takes (benchmark and export inputs are built at it)."""
        size = getattr(self.model.visual, "image_size", None)
        if size is None:
            raise DebiasError(f"open_clip vision tower {type(self.model.visual).__name__} records no image_size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if h != w:
            raise DebiasError(f"open_clip vision tower takes non-square {h}x{w} images; only square sizes are supported here")
        return int(h)

    def prepare_images(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        tf = self._preprocess()
        return {"pixel_values": torch.stack([tf(img.convert("RGB")) for img in images])}

    def prepare_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids padded to the model's context length (open_clip adds a fixed-size positional table).

        ``attention_mask`` marks tokens up to the pooled one; the model itself takes no mask
        (causal attention keeps padding from reaching the EOT token)."""
        if self.tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer  # heavy; loaded when the open_clip family is used

            self.tokenizer = SimpleTokenizer(context_length=self.model.context_length)
        ids = self.tokenizer(list(texts)).long()
        last = (ids != 0).long().cumsum(1).argmax(1)  # last non-pad token (EOT for open_clip tokenizers)
        mask = (torch.arange(ids.shape[1])[None, :] <= last[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}

    # ----- forward -----------------------------------------------------------------------------
    def embed(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``encode_image`` / ``encode_text`` without normalisation, as open_clip defines them.

        Under an ONNX/TorchScript trace (e.g. the benchmark's tower export) ``nn.MultiheadAttention``
        runs its standard path: the inference fast path is one fused op with no ONNX export."""
        self.check_tower(tower)
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        fast = torch.backends.mha.get_fastpath_enabled()
        if tracing:
            torch.backends.mha.set_fastpath_enabled(False)
        try:
            if tower == "image":
                return self.model.encode_image(inputs["pixel_values"])
            return self.model.encode_text(inputs["input_ids"])
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)


# ----- tiny builders (tests) -------------------------------------------------------------------
def tiny_open_clip_config(width: int = 32, layers: int = 3, image_size: int = 32, patch: int = 8, embed_dim: int = 16,
                          context_length: int = 16, **overrides: Any) -> dict:
    """open_clip ``model_cfg`` small enough for unit tests (real CLIP BPE vocabulary for the text tower).

    ``overrides``: ``vision_cfg`` / ``text_cfg`` dicts merged into the defaults, other keys set as-is
    (e.g. ``custom_text=True``, ``quick_gelu=True``)."""
    vision = dict(image_size=image_size, patch_size=patch, width=width, layers=layers, head_width=8, mlp_ratio=2.0)
    text = dict(context_length=context_length, vocab_size=49408, width=width, heads=4, layers=layers, mlp_ratio=2.0)
    vision.update(overrides.pop("vision_cfg", {}))
    text.update(overrides.pop("text_cfg", {}))
    return dict(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, **overrides)


def tiny_open_clip(seed: int = 0, **overrides: Any) -> OpenCLIPAdapter:
    """Adapter around a tiny random open_clip model (``overrides`` as in :func:`tiny_open_clip_config`)."""
    adapter = OpenCLIPAdapter.from_config(tiny_open_clip_config(**overrides), seed=seed)
    adapter.source = f"tiny-open-clip:{seed}"
    return adapter


# ----- export: plug-ins for debias_export.export ---------------------------------------------------
def save_base(adapter: OpenCLIPAdapter, out: Path) -> None:
    """Write the (unpatched) model in open_clip's ``local-dir`` layout: ``open_clip_config.json`` +
    ``open_clip_model.safetensors``, so ``open_clip.create_model("local-dir:OUT")`` loads the base model.
    (open_clip prefers ``open_clip_model.safetensors`` over other ``*.safetensors`` in the dir.)"""
    from open_clip.model import get_model_preprocess_cfg  # heavy; loaded when the open_clip family is used

    cfg = adapter.model_cfg
    if cfg is None:
        raise ConfigError("open_clip model has no recorded model_cfg; load it with OpenCLIPAdapter.load/from_config")
    if any(isinstance(m, SiteEdit) for m in adapter.model.modules()):
        raise DebiasError("save_base needs the unpatched model (call it inside export.unpatched(handle))")
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.model.state_dict().items()}
    save_file(state, str(Path(out) / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_preprocess_cfg(adapter.model).items()
          if k in ("size", "mean", "std", "interpolation", "resize_mode")}
    (Path(out) / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}, indent=2) + "\n")


def base_info(adapter: OpenCLIPAdapter) -> dict[str, Any]:
    """Recorded in ``debias_config.json``: how to rebuild the base model without debias-export."""
    return {"module": "open_clip", "class": type(adapter.model).__name__, "config_file": OPEN_CLIP_CONFIG,
            "weights_file": OPEN_CLIP_WEIGHTS, "load": "open_clip.create_model('local-dir:<dir>')",
            "dtype": str(next(adapter.model.parameters()).dtype)}


def load_base(path: Path, info: dict[str, Any] | None = None) -> OpenCLIPAdapter:
    """Stock open_clip load of a :func:`save_base` directory (no patches)."""
    path = Path(path)
    try:
        cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    except (OSError, ValueError, KeyError) as exc:
        raise IntegrityError(f"bad open_clip config in {path}: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _, preprocess = _open_clip().create_model_and_transforms(f"local-dir:{path}")
    except (RuntimeError, ValueError, OSError) as exc:
        raise IntegrityError(f"cannot load open_clip weights from {path}: {str(exc).splitlines()[0]}") from None
    return OpenCLIPAdapter(model.eval(), source=str(path), processor=preprocess, model_cfg=cfg)


# ----- anatomy for locate / folding (adapters.anatomy) ------------------------------------------------
def _open_clip_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    from open_clip.transformer import text_global_pool  # heavy; loaded when the open_clip family is used

    m = adapter.model
    if tower == "image":
        v = m.visual

        def readout(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
            pooled, _ = v._pool(tokens)
            return pooled @ v.proj if v.proj is not None else pooled

        def pool(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
            if v.attn_pool is None and v.pool_type == "tok":
                return tokens[:, 0]
            return tokens[:, 1:].mean(1) if v.pool_type == "avg" else tokens.mean(1)

        return TowerParts("attn.out_proj", "mlp.c_proj", 0, readout, pool, attn_write="ls_1", mlp_write="ls_2",
                          stream_start="visual.ln_pre")
    text = m.text if adapter._text_root() == "text." else m
    if getattr(text, "cls_emb", None) is not None:
        raise DebiasError("open_clip text towers with an appended CLS (CoCa) are not supported by locate")
    pool_type = text.text_pool_type if text is m else text.pool_type
    eos = getattr(text, "text_eos_id" if text is m else "eos_id", None)

    def text_readout(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        x = text_global_pool(text.ln_final(tokens), batch["input_ids"].to(tokens.device), pool_type=pool_type, eos_token_id=eos)
        proj = text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

    root = adapter._text_root()
    return TowerParts("attn.out_proj", "mlp.c_proj", 0, text_readout, gather(lambda b: adapter.output_token_index("text", b)),
                      attn_write="ls_1", mlp_write="ls_2", embedding_writers=(f"{root}token_embedding",),
                      stream_start=f"{root}positional_embedding")  # a Parameter, not an Embedding: not folded


register_tower_parts("open_clip", _open_clip_parts)
