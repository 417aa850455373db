"""Tiny random models and synthetic data for tests, examples and offline smoke runs."""
from __future__ import annotations

import torch

from ..adapters.hf_clip import tiny_clip, tiny_clip_config  # noqa: F401  (re-exported: tests build models here)
from ..sae.model import SAEConfig, SparseAutoencoder


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
