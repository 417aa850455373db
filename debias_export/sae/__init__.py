"""Sparse autoencoders: model, Matryoshka BatchTopK training, importers."""
from .model import SAEConfig, SparseAutoencoder, read_safetensors

__all__ = ["SAEConfig", "SparseAutoencoder", "read_safetensors"]
