"""Per-family anatomy of a tower: where its residual writes are, and how its output reads the stream.

``locate`` (layer curves, component attribution) and projection folding need more than the adapter
interface: the modules that write the residual stream, and a *readout* that turns a block's output
tokens into the tower's output the way the tower's own tail does (a logit lens for encoders). Each
family's module registers a builder with :func:`register_tower_parts`; what each one reads:

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
from .base import ModelAdapter

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


def gather(index_fn: Callable[[dict], torch.Tensor]) -> Readout:
    def pool(tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        pos = index_fn(batch).to(tokens.device)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), pos]
    return pool


def linear_tail(adapter: ModelAdapter, tower: str, norm: str, proj: str) -> tuple[Readout, Readout]:
    m = adapter.model
    pool = gather(lambda batch: adapter.output_token_index(tower, batch))
    return (lambda tokens, batch: m.get_submodule(proj)(m.get_submodule(norm)(pool(tokens, batch)))), pool


def vit_root(adapter: ModelAdapter, tower: str) -> str:
    """Path of the CLIP vision transformer (holder of ``encoder``), on either transformers major."""
    return adapter.blocks_path(tower).removesuffix(".encoder.layers")


def clip_vit_parts(adapter: ModelAdapter, tower: str, num_heads: int) -> TowerParts:
    root = vit_root(adapter, tower)
    norm, proj = f"{root}.post_layernorm", "visual_projection"
    readout, pool = linear_tail(adapter, tower, norm, proj)
    return TowerParts("self_attn.out_proj", "mlp.fc2", num_heads, readout, pool, final_norm=norm, projection=proj,
                      stream_start=f"{root}.pre_layrnorm")


# family -> builder; each family's module registers its own (register_tower_parts) when it is imported, which
# it is before any adapter of the family exists.
FAMILY_PARTS: dict[str, Callable[[ModelAdapter, str], TowerParts]] = {}


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
