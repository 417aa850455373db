"""Per-family anatomy of a tower: where its residual writes are, and how its output reads the stream.

``locate`` (layer curves, component attribution) and projection folding need more than the adapter
interface: the modules that write the residual stream, and a *readout* that turns a block's output
tokens into the tower's output the way the tower's own tail does (a logit lens for encoders). Each
family registers a builder in :data:`FAMILY_PARTS`:

- ``hf_clip``: pre-LN blocks; writes ``self_attn.out_proj`` (input = concatenated heads) and ``mlp.fc2``;
  readout = final norm + projection at CLS (image) / EOS (text). Text embedding writers
  ``token_embedding`` / ``position_embedding``; the vision stream starts at ``pre_layrnorm`` (a
  LayerNorm output, which cannot absorb a fold).
- ``hf_dual_encoder`` (VisionTextDualEncoderModel): the image tower is a CLIP ViT (as above, under
  ``vision_model.vision_model`` on transformers 4.57, ``vision_model`` on 5.x). The text tower is BERT: **post-LN** blocks
  (``LayerNorm(x + dense(...))``), so the stream is not a sum of writes: the writes are the
  ``attention.output.dense`` / ``output.dense`` outputs *before* each block's LayerNorm, ablation
  acts there, and every-writer folding does not apply. Readout = ``pooler`` (tanh dense on CLS) +
  ``text_projection``.
- ``open_clip``: pre-LN ``ResidualAttentionBlock``; ``nn.MultiheadAttention`` calls ``out_proj``
  functionally (its forward hooks never fire) and layer scales ``ls_1``/``ls_2`` sit after the writes,
  so the write hook points are ``ls_1`` / ``ls_2`` (``nn.Identity`` without layer scale) and a per-head
  split is unavailable. Readout = open_clip's own tail (``visual._pool`` + ``proj``; ``ln_final`` +
  ``text_global_pool`` + ``text_projection``), so ``tok``/``avg`` pooling and attentional pooling
  all read out correctly. The projections are Parameters, not Linears: no output fold.
- ``llava``: the CLIP vision tower, read at ``vision_feature_layer`` by the multi-modal projector over
  every patch token (CLS dropped for the "default" strategy). Readout = projector over those tokens,
  mean-pooled into one vector per image; there is no text tower, so no retrieval bias metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core.errors import ConfigError, DebiasError
from . import ModelAdapter

Readout = Callable[[torch.Tensor, dict], torch.Tensor]  # (block-output tokens [B, T, d], batch inputs) -> [B, p]


@dataclass(frozen=True)
class TowerParts:
    """Module paths (relative to a block unless stated) and readouts of one tower."""

    attn_out: str  # the Linear producing the attention write (fold target; its input = concatenated heads when num_heads)
    mlp_out: str  # the Linear producing the MLP write
    num_heads: int  # heads in attn_out's input; 0 = no per-head split for this architecture
    readout: Readout  # the tower's tail applied to any block's output tokens (the lens)
    pool: Readout  # the residual-space vector(s) the output reads, one per input [B, d]
    attn_write: str | None = None  # module whose output is exactly what is added to the stream (default attn_out)
    mlp_write: str | None = None
    final_norm: str | None = None  # model-level paths used by output folding (None: not a plain Linear tail)
    projection: str | None = None
    embedding_writers: tuple[str, ...] = ()  # Embedding modules whose outputs sum into the initial stream
    stream_start: str | None = None  # initial-stream writer a fold does not absorb (reported as skipped)
    sum_of_writes: bool = True  # pre-LN: the stream is the sum of all writes (every-writer folding is exact)
    retrieval: bool = True  # the model has a text tower to score neutral prompts against (MaxSkew@k)

    @property
    def attn_hook(self) -> str:
        return self.attn_write or self.attn_out

    @property
    def mlp_hook(self) -> str:
        return self.mlp_write or self.mlp_out


def _gather(index_fn: Callable[[dict], torch.Tensor]) -> Readout:
    def pool(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        pos = index_fn(batch).to(tokens.device)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), pos]
    return pool


def _linear_tail(adapter: ModelAdapter, tower: str, norm: str, proj: str) -> tuple[Readout, Readout]:
    m = adapter.model
    pool = _gather(lambda batch: adapter.output_token_index(tower, batch))
    return (lambda tokens, batch: m.get_submodule(proj)(m.get_submodule(norm)(pool(tokens, batch)))), pool


def _vit_root(adapter: ModelAdapter, tower: str) -> str:
    """Path of the CLIP vision transformer (holder of ``encoder``), on either transformers major."""
    return adapter.blocks_path(tower).removesuffix(".encoder.layers")


def _clip_vit_parts(adapter: ModelAdapter, tower: str, num_heads: int) -> TowerParts:
    root = _vit_root(adapter, tower)
    norm, proj = f"{root}.post_layernorm", "visual_projection"
    readout, pool = _linear_tail(adapter, tower, norm, proj)
    return TowerParts("self_attn.out_proj", "mlp.fc2", num_heads, readout, pool, final_norm=norm, projection=proj,
                      stream_start=f"{root}.pre_layrnorm")


def _hf_clip_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    cfg = adapter.model.config
    if hasattr(cfg, "vision_config"):
        cfg = cfg.vision_config if tower == "image" else cfg.text_config
    if tower == "image":
        return _clip_vit_parts(adapter, tower, int(cfg.num_attention_heads))
    norm, proj, emb = "text_model.final_layer_norm", "text_projection", "text_model.embeddings"
    readout, pool = _linear_tail(adapter, tower, norm, proj)
    return TowerParts("self_attn.out_proj", "mlp.fc2", int(cfg.num_attention_heads), readout, pool, final_norm=norm,
                      projection=proj, embedding_writers=(f"{emb}.token_embedding", f"{emb}.position_embedding"))


def _dual_encoder_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    cfg = adapter.model.config
    if tower == "image":
        return _clip_vit_parts(adapter, tower, int(cfg.vision_config.num_attention_heads))
    m = adapter.model
    pool = _gather(lambda batch: adapter.output_token_index(tower, batch))
    pooler = m.text_model.pooler
    if pooler is None:
        raise DebiasError("this dual encoder's BERT text tower has no pooler; VisionTextDualEncoderModel reads pooler_output")

    def readout(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        return m.text_projection(pooler.activation(pooler.dense(pool(tokens, batch))))

    return TowerParts("attention.output.dense", "output.dense", int(cfg.text_config.num_attention_heads), readout, pool,
                      projection="text_projection", sum_of_writes=False)


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
    return TowerParts("attn.out_proj", "mlp.c_proj", 0, text_readout, _gather(lambda b: adapter.output_token_index("text", b)),
                      attn_write="ls_1", mlp_write="ls_2", embedding_writers=(f"{root}token_embedding",),
                      stream_start=f"{root}positional_embedding")  # a Parameter, not an Embedding: not folded


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
                      stream_start=f"{_vit_root(adapter, tower)}.pre_layrnorm", retrieval=False)


FAMILY_PARTS: dict[str, Callable[[ModelAdapter, str], TowerParts]] = {
    "hf_clip": _hf_clip_parts, "hf_dual_encoder": _dual_encoder_parts, "open_clip": _open_clip_parts, "llava": _llava_parts}


def register_tower_parts(family: str, fn: Callable[[ModelAdapter, str], TowerParts]) -> None:
    """Teach locate / folding about another family."""
    FAMILY_PARTS[family] = fn


def tower_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    """The :class:`TowerParts` of ``adapter``'s ``tower`` (clear error for unknown families / towers)."""
    adapter.check_tower(tower)
    fn = FAMILY_PARTS.get(adapter.family)
    if fn is None:
        raise DebiasError(f"locate/fold has no tower anatomy for model family {adapter.family!r}; "
                          f"supported: {', '.join(sorted(FAMILY_PARTS))}")
    return fn(adapter, tower)


def final_output(adapter: ModelAdapter, tower: str, batch: dict) -> torch.Tensor:
    """The tower's real output, one vector per input (LLaVA's per-token image features are averaged,
    matching its readout)."""
    out = adapter.embed(tower, batch)
    return out.mean(1) if out.dim() == 3 else out


def check_output_fold(parts: TowerParts, tower: str) -> str:
    if parts.projection is None:
        raise ConfigError(f"the {tower} tower's output projection is not a Linear; fold at a site or every writer instead")
    return parts.projection
