"""Sparse autoencoders: model, Matryoshka BatchTopK training, importers."""
from .importers import (detect_format, load_any, load_dictionary_learning, load_native, load_prisma, load_saelens,
                        load_sparsify, resolve_sae_dir)
from .model import SAEConfig, SparseAutoencoder, read_safetensors
from .train import TrainConfig, train_sae

__all__ = ["SAEConfig", "SparseAutoencoder", "read_safetensors", "TrainConfig", "train_sae", "load_any",
           "detect_format", "resolve_sae_dir", "load_native", "load_saelens", "load_sparsify",
           "load_dictionary_learning", "load_prisma"]
