"""Tiny random models and synthetic data for tests, examples and offline smoke runs."""
from __future__ import annotations

import torch

from ..adapters.hf_clip import HFCLIPAdapter
from ..sae.model import SAEConfig, SparseAutoencoder


def tiny_clip_config(hidden: int = 32, layers: int = 3, heads: int = 4, image_size: int = 32, patch: int = 8,
                     projection: int = 16):
    """A ``CLIPConfig`` small enough for unit tests; the text tower uses the real CLIP BPE vocabulary."""
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=32, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=0, projection_dim=projection)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=patch, projection_dim=projection)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def tiny_clip(seed: int = 0, **kwargs):
    """Adapter around a tiny random ``CLIPModel``."""
    return HFCLIPAdapter.from_config(tiny_clip_config(**kwargs), seed=seed)


def random_sae(d_in: int, num_latents: int, seed: int = 0, activation: str = "threshold", k: int | None = 4,
               threshold: float = 0.05):
    """An SAE with random weights that fires a few latents on typical residual activations."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, num_latents=num_latents, activation=activation, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, num_latents, generator=g) / d_in ** 0.5)
        sae.b_enc.copy_(torch.randn(num_latents, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(num_latents, d_in, generator=g) / num_latents ** 0.5)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.threshold = torch.tensor(float(threshold))
    return sae.eval()
