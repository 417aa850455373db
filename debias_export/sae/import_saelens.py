"""SAELens ``save_model`` / ``save_inference_model`` folders (``cfg.json`` + ``sae_weights.safetensors``).

Checked against SAELens 4.4.5, 5.11.0 and 6.54.12 (``tests/fixtures/sae``). Tensors are plain parameters in
SAELens' own orientation: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``/``b_gate``/``b_mag``/
``r_mag``/``threshold [d_sae]``, ``b_dec [d_in]``. Encoding ``u = x - b_dec`` (``x`` when
``apply_b_dec_to_input`` is false, folded as ``b_enc += b_dec @ W_enc``), then per architecture:

- ``standard``: ``relu(u @ W_enc + b_enc)``; with ``activation_fn[_str] = "topk"`` (4.x/5.x configs, ``k`` in
  ``activation_fn_kwargs``) the top-k below.
- ``topk``: the ``k`` largest of ``u @ W_enc + b_enc``, then relu; ``k`` from ``k`` or
  ``activation_fn_kwargs.k``. ``rescale_acts_by_decoder_norm`` (select on ``pre * |W_dec|``, decode
  ``f / |W_dec|``) is folded into the weights exactly.
- ``jumprelu``: ``relu(pre) * [pre > threshold]`` (``threshold`` or ``exp(log_threshold)``) = our
  threshold encoding with ``relu(threshold)``. SAELens 6 writes BatchTopK / Matryoshka inference saves this way.
- ``batchtopk`` / ``matryoshka_batchtopk`` training saves: the inference rule SAELens' own
  ``save_inference_model`` writes, a jumprelu whose threshold is the scalar ``topk_threshold``.
- ``gated``: rewritten exactly as a per-latent threshold (:func:`gated_as_threshold`).

``finetuning_scaling_factor`` (tensor ``finetuning_scaling_factor``, older saves ``scaling_factor``) multiplies
the latents before decoding: folded into ``W_dec``. ``normalize_activations``: ``none``,
``expected_average_only_in`` (and its old spelling ``true``) and ``covariance_whitening`` import as identity,
exactly as SAELens' own inference does (their scale / whitening is only applied once folded into the weights).

Refused, before any tensor is read: ``layer_norm`` / ``constant_norm_rescale`` (a per-input normalisation
no fixed weights reproduce), ``hook_z`` reshaping, and the architectures ``matching_pursuit`` (iterative
encoder), ``abstopk`` (signed latents), ``temporal``, transcoders and any other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError, ShapeError
from .import_common import Tensors, finish, gated_as_threshold, matrix, pos_int, read_json, unsupported, vector
from .model import SAE_CONFIG, SparseAutoencoder, read_safetensors

SAELENS_WEIGHTS = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk")
SUPPORTED = "standard (relu or topk), topk, jumprelu, gated, batchtopk, matryoshka_batchtopk"
NORM_IDENTITY = ("none", None, False, True, "expected_average_only_in", "covariance_whitening")


def _activation_kind(cfg: dict[str, Any], arch: str, file: Path) -> tuple[str, int | None]:
    """(our activation, k) for ``arch``, from the config alone (4.x/5.x configs also name an activation fn)."""
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    kwargs_k = kwargs.get("k") if isinstance(kwargs, dict) else None
    if arch == "standard":
        if act_fn == "topk":
            return "topk", pos_int(kwargs_k, "activation_fn_kwargs.k", file)
        if act_fn not in ("relu", None):
            raise unsupported("SAELens standard SAE with activation", act_fn, "relu, topk", file)
        return "relu", None
    if arch == "topk":
        if act_fn not in ("topk", None):  # 5.x would run this activation, 6.x a top-k: no single meaning
            raise unsupported("SAELens topk SAE with activation", act_fn, "topk", file)
        k = cfg.get("k") if cfg.get("k") is not None else kwargs_k
        return "topk", pos_int(k, "k", file)
    if act_fn not in ("relu", None):
        raise unsupported(f"SAELens {arch} SAE with activation", act_fn, "relu", file)
    return "threshold", None


def load_saelens(path: str | Path, d_in: int | None = None) -> SparseAutoencoder:
    """A SAELens ``save_model`` folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    path = Path(path)
    cfg_file, w_file = path / SAE_CONFIG, path / SAELENS_WEIGHTS
    cfg = read_json(cfg_file)
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise unsupported("SAELens architecture", arch, SUPPORTED, cfg_file)
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORM_IDENTITY:
        raise unsupported("SAELens normalize_activations", norm, "none, expected_average_only_in, covariance_whitening",
                          cfg_file, "; it normalises each input at run time, which fixed weights cannot reproduce")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = cfg.get("hook_name", cfg.get("hook_point", meta.get("hook_name")))
    reshape = cfg.get("reshape_activations", "hook_z" if isinstance(hook, str) and hook.endswith("hook_z") else "none")
    if reshape not in ("none", None):
        raise unsupported("SAELens reshape_activations", reshape, "none", cfg_file)
    activation, k = _activation_kind(cfg, arch, cfg_file)

    t = Tensors(read_safetensors(w_file), w_file)
    b_dec = t.get("b_dec", ndim=1)
    d = b_dec.shape[0]
    first_bias = "b_mag" if arch == "gated" else "b_enc"
    bias0 = t.get(first_bias, ndim=1)
    F = bias0.shape[0]
    for key, want in (("d_in", d), ("d_sae", F)):
        if key in cfg and cfg[key] != want:
            raise ShapeError(f"{cfg_file}: {key}={cfg[key]!r} but the weights imply {want}")
    W_enc = matrix(t.get("W_enc"), (d, F), "W_enc", w_file)
    W_dec = matrix(t.get("W_dec"), (F, d), "W_dec", w_file)
    thr = None
    if arch == "gated":
        W_enc, b_enc, thr = gated_as_threshold(W_enc, vector(t.get("b_gate"), F, "b_gate", w_file),
                                               vector(t.get("r_mag"), F, "r_mag", w_file),
                                               vector(t.get("b_mag"), F, "b_mag", w_file))
    else:
        b_enc = vector(t.get("b_enc"), F, "b_enc", w_file)
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # our encoder always subtracts b_dec: add it back through the bias
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1)  # select/threshold on pre * |W_dec|, decode f / |W_dec|: fold both
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None].clamp_min(1e-12)
    if arch == "jumprelu":
        thr = torch.exp(t.get("log_threshold")) if "threshold" not in t and "log_threshold" in t else t.get("threshold")
        thr = torch.relu(vector(thr, F, "threshold", w_file))
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        thr = t.get("topk_threshold" if "topk_threshold" in t else "threshold")
        thr = torch.relu(thr)  # the library's jumprelu compares pre > threshold after relu
    W_dec = _finetuning_scale(cfg, t, W_dec, F, cfg_file, w_file)
    t.warn_if_half()
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    source = {"format": "saelens", "path": str(path), "architecture": arch,
              "hook_name": hook if isinstance(hook, str) else None,
              "model_name": cfg.get("model_name", meta.get("model_name")),
              "normalize_activations": norm if isinstance(norm, str) else None}
    return finish(tensors, activation, k, w_file, d_in, source, thr)


def _finetuning_scale(cfg: dict[str, Any], t: Tensors, W_dec: torch.Tensor, F: int, cfg_file: Path,
                      w_file: Path) -> torch.Tensor:
    """Fold SAELens' ``finetuning_scaling_factor`` (latents are scaled before decoding) into ``W_dec``."""
    names = [n for n in ("finetuning_scaling_factor", "scaling_factor") if n in t]
    if not names:
        if cfg.get("finetuning_scaling_factor"):
            raise ConfigError(f"{cfg_file}: finetuning_scaling_factor is set but {w_file.name} holds no "
                              "'finetuning_scaling_factor' (or 'scaling_factor') tensor")
        return W_dec
    scale = vector(t.get(names[0]), F, names[0], w_file)
    if not cfg.get("finetuning_scaling_factor") and not torch.all(scale == 1):
        raise ConfigError(f"{w_file}: holds a {names[0]} that is not all ones but {cfg_file.name} has "
                          "finetuning_scaling_factor false")
    return W_dec * scale[:, None]
