"""EleutherAI sparsify (``eai-sparsify`` 1.x) ``SparseCoder.save_to_disk`` folders: ``cfg.json`` + ``sae.safetensors``.

Tensors: ``encoder.weight [F, d]`` (an ``nn.Linear``, so ``[out, in]``), ``encoder.bias [F]``,
``W_dec [F, d]``, ``b_dec [d]``. Encoding: the ``k`` largest of ``relu(encoder(x - b_dec))``; decoding
``f @ W_dec + b_dec``. A ``Trainer.fit`` run folder holds one sub-folder per hookpoint (``h.0``), and with
several ``init_seeds`` one more level (``h.0/seed1``); :func:`debias_export.sae.importers.resolve_sae_dir`
picks one by ``hookpoint``. Refused before any tensor is read: transcoders, skip connections and the
``groupmax`` activation.
"""
from __future__ import annotations

from pathlib import Path

from ..core.errors import ShapeError
from .import_common import Tensors, finish, matrix, pos_int, read_json, unsupported, vector
from .model import SAE_CONFIG, SAE_WEIGHTS, SparseAutoencoder, read_safetensors


def load_sparsify(path: str | Path, d_in: int | None = None) -> SparseAutoencoder:
    """One sparsify SAE folder (``cfg.json`` + ``sae.safetensors``)."""
    path = Path(path)
    cfg_file, w_file = path / SAE_CONFIG, path / SAE_WEIGHTS
    cfg = read_json(cfg_file)
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise unsupported("sparsify coder", "transcoder" if cfg.get("transcode") else "skip_connection",
                          "plain top-k SAEs", cfg_file, "; it does not reconstruct its own input site")
    if cfg.get("activation", "topk") != "topk":
        raise unsupported("sparsify activation", cfg.get("activation"), "topk", cfg_file)
    k = pos_int(cfg.get("k"), "k", cfg_file)
    t = Tensors(read_safetensors(w_file), w_file)
    if "W_skip" in t:
        raise unsupported("sparsify coder", "skip_connection", "plain top-k SAEs", w_file)
    b_dec = t.get("b_dec", ndim=1)
    d = b_dec.shape[0]
    b_enc = t.get("encoder.bias", ndim=1)
    F = b_enc.shape[0]
    if "d_in" in cfg and cfg["d_in"] != d:
        raise ShapeError(f"{cfg_file}: d_in={cfg['d_in']!r} but the weights imply {d}")
    enc = matrix(t.get("encoder.weight"), (F, d), "encoder.weight (nn.Linear [num_latents, d_in])", w_file)
    W_dec = matrix(t.get("W_dec"), (F, d), "W_dec", w_file)
    t.warn_if_half()
    tensors = {"W_enc": enc.t().contiguous(), "b_enc": vector(b_enc, F, "encoder.bias", w_file), "W_dec": W_dec,
               "b_dec": b_dec}
    source = {"format": "sparsify", "path": str(path), "hookpoint": path.name}
    return finish(tensors, "topk", k, w_file, d_in, source)
