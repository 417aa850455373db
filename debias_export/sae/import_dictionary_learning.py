"""dictionary_learning (saprmarks, PyPI ``dictionary-learning`` 0.1.0) and sae-for-vlm ``ae.pt`` folders.

``trainSAE`` writes ``ae.pt`` (a ``torch.save``d state dict, read here with ``weights_only=True`` only) and
``config.json`` (``{"trainer": {"dict_class": ..., "k": ...}, ...}``). sae-for-vlm (the CLIP / SigLIP SAEs
DeBiasLens uses) ships a fork whose Matryoshka class is spelled ``MatroyshkaBatchTopKSAE``; same tensors.
Orientation is the class's own: ``nn.Linear`` ``encoder.weight [F, d]`` and ``decoder.weight [d, F]``;
plain parameters ``W_enc [d, F]`` and ``W_dec [F, d]``. Per ``dict_class`` (what ``utils.load_dictionary``
builds, and its ``encode`` at inference):

- ``AutoEncoder`` (``bias``, ``encoder.*``, ``decoder.weight``): ``relu(encoder(x - bias))``. Like
  ``load_dictionary`` (``AutoEncoder.from_pretrained(normalize_decoder=True)``), decoder columns that are not
  unit norm (e.g. ``StandardTrainerAprilUpdate``) are normalised and the encoder rows and bias rescaled by
  the same norms: reconstructions are unchanged, latents come out on the library's loader's scale.
- ``AutoEncoderNew``: ``relu(encoder(x))``, decoder with its own bias.
- ``AutoEncoderTopK``: top-k of ``relu(encoder(x - b_dec))``.
- ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: inference threshold ``f = pre * (pre > threshold)``.
- ``JumpReluAutoEncoder``: ``pre = x @ W_enc + b_enc`` (no ``b_dec`` subtraction, the class default),
  ``relu(pre * (pre > threshold))``.
- ``GatedAutoEncoder``: the gated rule, rewritten exactly as a per-latent threshold.

Without ``config.json`` the class is read off the keys only where they are unambiguous: ``AutoEncoderTopK``
and ``BatchTopKSAE`` store the same tensors (``k`` and ``threshold`` included) but encode differently, so
such an ``ae.pt`` is refused until its ``config.json`` is put beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError, ShapeError
from .import_common import Tensors, finish, gated_as_threshold, load_pt, matrix, pos_int, read_json, unsupported, vector
from .model import SparseAutoencoder

DL_WEIGHTS, DL_CONFIG = "ae.pt", "config.json"
CLASSES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
           "JumpReluAutoEncoder", "GatedAutoEncoder")
ALIASES = {"MatroyshkaBatchTopKSAE": "MatryoshkaBatchTopKSAE"}  # sae-for-vlm's spelling


def _class_from_keys(sd: dict[str, Any], w_file: Path) -> str:
    keys = set(sd)
    if "group_sizes" in keys and "W_enc" in keys:
        return "MatryoshkaBatchTopKSAE"
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if {"r_mag", "gate_bias", "mag_bias"} <= keys:
        return "GatedAutoEncoder"
    if "bias" in keys and "encoder.weight" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys and "encoder.weight" in keys:
        return "AutoEncoderNew"
    if {"encoder.weight", "b_dec", "threshold", "k"} <= keys:
        raise ConfigError(f"{w_file}: these tensors fit both AutoEncoderTopK and BatchTopKSAE, which encode "
                          f"differently; put the {DL_CONFIG} that trainSAE wrote beside it")
    raise ConfigError(f"{w_file}: cannot tell the dictionary_learning class from its tensors "
                      f"({', '.join(sorted(map(str, keys)))}); put the {DL_CONFIG} that trainSAE wrote beside it")


def load_dictionary_learning(path: str | Path, d_in: int | None = None) -> SparseAutoencoder:
    """A dictionary_learning / sae-for-vlm folder (``ae.pt``, with ``config.json`` where keys are ambiguous)."""
    path = Path(path)
    w_file, c_file = path / DL_WEIGHTS, path / DL_CONFIG
    cfg = read_json(c_file) if c_file.is_file() else {}
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    cls = trainer.get("dict_class")
    cls = ALIASES.get(cls, cls) if isinstance(cls, str) else cls
    if cls is not None and cls not in CLASSES:  # decided before any tensor is read
        raise unsupported("dictionary_learning dict_class", cls, ", ".join(CLASSES), c_file)
    sd = load_pt(w_file)
    if cls is None:
        cls = _class_from_keys(sd, w_file)
    t = Tensors(sd, w_file)
    bias_name = {"AutoEncoder": "bias", "GatedAutoEncoder": "decoder_bias", "AutoEncoderNew": "decoder.bias"}.get(cls, "b_dec")
    b_dec = t.get(bias_name, ndim=1)
    d = b_dec.shape[0]
    thr, k, activation = None, None, "threshold"
    if cls in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        b_enc = t.get("b_enc", ndim=1)
        F = b_enc.shape[0]
        W_enc = matrix(t.get("W_enc"), (d, F), "W_enc", w_file)
        W_dec = matrix(t.get("W_dec"), (F, d), "W_dec", w_file)
    else:
        enc = t.get("encoder.weight", ndim=2)
        F = enc.shape[0]
        W_enc = matrix(enc, (F, d), "encoder.weight (nn.Linear [dict_size, activation_dim])", w_file).t()
        W_dec = matrix(t.get("decoder.weight"), (d, F), "decoder.weight (nn.Linear [activation_dim, dict_size])",
                       w_file).t()
        b_enc = None if cls == "GatedAutoEncoder" else vector(t.get("encoder.bias"), F, "encoder.bias", w_file)
    if cls == "AutoEncoder":
        activation = "relu"
        if "decoder.bias" in sd:
            raise ConfigError(f"{w_file}: an AutoEncoder has no decoder bias (is this an AutoEncoderNew?)")
        W_enc, b_enc, W_dec = _normalize_decoder(W_enc, b_enc, W_dec)
    elif cls == "AutoEncoderNew":
        activation = "relu"
        b_enc = b_enc + b_dec @ W_enc  # encodes x, not x - b_dec: add it back through the bias
    elif cls == "AutoEncoderTopK":
        activation = "topk"
        k = pos_int(sd["k"] if "k" in sd else trainer.get("k"), "k", w_file)
    elif cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        thr = t.get("threshold")
        if thr.numel() != 1:
            raise ShapeError(f"{w_file}: {cls} threshold has {thr.numel()} values, expected a scalar")
    elif cls == "JumpReluAutoEncoder":
        thr = torch.relu(vector(t.get("threshold"), F, "threshold", w_file))  # relu(pre * [pre > t]) == ours
        b_enc = b_enc + b_dec @ W_enc  # encodes x, not x - b_dec
    elif cls == "GatedAutoEncoder":
        W_enc, b_enc, thr = gated_as_threshold(W_enc, vector(t.get("gate_bias"), F, "gate_bias", w_file),
                                               vector(t.get("r_mag"), F, "r_mag", w_file),
                                               vector(t.get("mag_bias"), F, "mag_bias", w_file))
    t.warn_if_half()
    tensors = {"W_enc": W_enc.contiguous(), "b_enc": b_enc, "W_dec": W_dec.contiguous(), "b_dec": b_dec}
    source = {"format": "dictionary_learning", "path": str(path), "dict_class": cls,
              "layer": trainer.get("layer"), "lm_name": trainer.get("lm_name")}
    return finish(tensors, activation, k, w_file, d_in, source, thr)


def _normalize_decoder(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor):
    """``AutoEncoder.normalize_decoder`` as ``load_dictionary`` runs it (skipped when norms are all ~1)."""
    norms = W_dec.norm(dim=1)  # one per latent (columns of the nn.Linear decoder weight)
    if torch.allclose(norms, torch.ones_like(norms)):
        return W_enc, b_enc, W_dec
    if not bool((norms > 0).all()):
        raise ShapeError("AutoEncoder has an all-zero decoder column; the library's loader would divide by zero")
    return W_enc * norms, b_enc * norms, W_dec / norms[:, None]
