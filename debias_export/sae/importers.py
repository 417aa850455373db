"""Import SAEs trained by other libraries into :class:`SparseAutoencoder` (exact same encode/decode).

Layouts (auto-detected by :func:`load_any`):

- **debias-export**: ``cfg.json`` + ``sae.safetensors`` holding ``W_enc [d,F]``, ``b_enc``, ``W_dec [F,d]``, ``b_dec``.
- **SAELens**: ``cfg.json`` + ``sae_weights.safetensors`` (``W_enc [d,F]``, ``b_enc``, ``W_dec [F,d]``, ``b_dec``,
  ``threshold [F]`` for jumprelu). ``standard`` -> relu; ``topk`` (``k``; old configs: ``activation_fn_str``
  ``topk`` + ``activation_fn_kwargs.k``) -> topk; ``jumprelu`` (SAELens saves BatchTopK/Matryoshka SAEs this
  way) -> per-latent threshold ``relu(threshold)``. Folded exactly: ``apply_b_dec_to_input=False``
  (``b_enc += b_dec @ W_enc``), ``rescale_acts_by_decoder_norm`` and ``finetuning_scaling_factor``.
  Refused: ``gated``, any ``normalize_activations`` other than ``none`` (its scale is not in the files),
  ``hook_z`` reshaping.
- **sparsify** (EleutherAI): ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight [F,d]``, ``encoder.bias``,
  ``W_dec [F,d]``, ``b_dec``; encode = top-k of ``relu(encoder(x - b_dec))``. A folder of hookpoint
  sub-folders is accepted (pick one with ``hookpoint``). Refused: transcoders, skip connections, groupmax.
- **dictionary_learning**: ``ae.pt`` (read with ``torch.load(weights_only=True)`` only) + ``config.json``.
  ``BatchTopKSAE`` (``encoder.weight [F,d]``, ``encoder.bias``, ``decoder.weight [d,F]``, ``b_dec``,
  ``threshold``, ``k``) and ``MatryoshkaBatchTopKSAE`` (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``)
  use the scalar inference threshold; ``AutoEncoderTopK`` -> topk; ``AutoEncoder`` (``bias``) -> relu.

Every weight's orientation is decided from its shape against ``b_dec`` (the width ``d``); ``d_in`` (the
site width) is checked when given. Non-finite values, missing keys or files, bad JSON and garbage bytes
raise :class:`DebiasError` naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DebiasError, IntegrityError, ShapeError
from .model import SAE_CONFIG, SAE_WEIGHTS, SAEConfig, SparseAutoencoder, read_safetensors

SAELENS_WEIGHTS = "sae_weights.safetensors"
DL_WEIGHTS, DL_CONFIG = "ae.pt", "config.json"
FORMATS = ("debias-export", "saelens", "sparsify", "dictionary_learning")


# ----- small checked readers ----------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DebiasError(f"file not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DebiasError(f"bad JSON in {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise DebiasError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def _tensor(tensors: dict[str, Any], name: str, file: Path) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise DebiasError(f"{file} has no tensor {name!r} (has: {', '.join(sorted(map(str, tensors))) or 'none'})")
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise DebiasError(f"{file}: {name!r} is not a float tensor")
    return t.detach().float()


def _pos_int(value: Any, what: str, file: Path) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{file}: {what} must be a positive integer, got {value!r}")
    return value


def _matrix(t: torch.Tensor, d: int, name: str, file: Path, rows_are_latents: bool) -> torch.Tensor:
    """Return ``t`` as ``[F, d]`` (rows_are_latents) or ``[d, F]``, deciding orientation from its shape."""
    if t.ndim != 2 or d not in t.shape:
        raise ShapeError(f"{file}: {name} has shape {tuple(t.shape)}, expected a matrix with one side {d} (= b_dec)")
    if t.shape[0] == d and t.shape[1] == d:  # square: keep the layout's documented orientation
        latents_first = rows_are_latents
    elif t.shape[0] == d:
        latents_first = False
    else:
        latents_first = True
    return t if latents_first == rows_are_latents else t.t().contiguous()


def _vector(t: torch.Tensor, n: int, name: str, file: Path) -> torch.Tensor:
    if t.ndim != 1 or t.shape[0] != n:
        raise ShapeError(f"{file}: {name} has shape {tuple(t.shape)}, expected ({n},)")
    return t


def _finish(tensors: dict[str, torch.Tensor], activation: str, k: int | None, file: Path, d_in: int | None,
            source: dict[str, Any], thr: torch.Tensor | None = None) -> SparseAutoencoder:
    """Check shapes against each other and the site width, then build the SAE (which checks finiteness)."""
    d = tensors["b_dec"].shape[0]
    F = tensors["W_enc"].shape[1]
    if d_in is not None and d != d_in:
        raise ShapeError(f"SAE {file} has width {d} but the site width is {d_in}")
    if tuple(tensors["W_dec"].shape) != (F, d):
        raise ShapeError(f"{file}: decoder has shape {tuple(tensors['W_dec'].shape)}, encoder implies ({F}, {d})")
    _vector(tensors["b_enc"], F, "encoder bias", file)
    if thr is not None:
        if tuple(thr.shape) not in ((), (1,), (F,)):
            raise ShapeError(f"{file}: threshold has shape {tuple(thr.shape)}, expected a scalar or ({F},)")
        tensors["threshold"] = thr.reshape(()) if thr.numel() == 1 else thr.reshape(F)
    if activation == "topk" and (k is None or k > F):
        raise ConfigError(f"{file}: top-k SAE needs 0 < k <= {F}, got k={k}")
    cfg = SAEConfig(d_in=d, num_latents=F, activation=activation, k=k, metadata={"imported_from": source})
    return SparseAutoencoder.from_tensors(cfg, tensors)


# ----- per-layout loaders ---------------------------------------------------------------------------
def load_native(path: str | Path, d_in: int | None = None) -> SparseAutoencoder:
    """A folder written by :meth:`SparseAutoencoder.save`."""
    sae = SparseAutoencoder.load(path)
    if d_in is not None and sae.d_in != d_in:
        raise ShapeError(f"SAE {path} has width {sae.d_in} but the site width is {d_in}")
    return sae


def load_saelens(path: str | Path, d_in: int | None = None) -> SparseAutoencoder:
    """A SAELens ``save_model`` folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    path = Path(path)
    cfg_file, w_file = path / SAE_CONFIG, path / SAELENS_WEIGHTS
    cfg = _read_json(cfg_file)
    raw = read_safetensors(w_file)
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise ConfigError(f"{cfg_file}: normalize_activations={norm!r} is not supported (fold the norm scaling "
                          "factor into the weights first; only 'none' imports exactly)")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ConfigError(f"{cfg_file}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    b_dec = _tensor(raw, "b_dec", w_file)
    if b_dec.ndim != 1:
        raise ShapeError(f"{w_file}: b_dec has shape {tuple(b_dec.shape)}, expected a vector")
    d = b_dec.shape[0]
    W_enc = _matrix(_tensor(raw, "W_enc", w_file), d, "W_enc", w_file, rows_are_latents=False)
    W_dec = _matrix(_tensor(raw, "W_dec", w_file), d, "W_dec", w_file, rows_are_latents=True)
    F = W_enc.shape[1]
    b_enc = _vector(_tensor(raw, "b_enc", w_file), F, "b_enc", w_file)
    for key, want in (("d_in", d), ("d_sae", F)):
        if key in cfg and cfg[key] != want:
            raise ShapeError(f"{cfg_file}: {key}={cfg[key]!r} but the weights imply {want}")
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # our encoder always subtracts b_dec: add it back through the bias
    thr, k = None, None
    if arch == "standard" and act_fn == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        activation, k = "topk", _pos_int(kwargs.get("k") if isinstance(kwargs, dict) else None, "activation_fn_kwargs.k", cfg_file)
    elif arch == "standard" and act_fn == "relu":
        activation = "relu"
    elif arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        if cfg.get("rescale_acts_by_decoder_norm", False):  # topk over pre * |W_dec|, decode f / |W_dec|
            norms = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None].clamp_min(1e-12)
        if arch == "topk":
            activation, k = "topk", _pos_int(cfg.get("k"), "k", cfg_file)
        else:
            activation = "threshold"
            thr = _tensor(raw, "topk_threshold" if "threshold" not in raw else "threshold", w_file)
    elif arch == "jumprelu":
        activation = "threshold"
        if "threshold" in raw:
            thr = _tensor(raw, "threshold", w_file)
        else:
            thr = torch.exp(_tensor(raw, "log_threshold", w_file))
        thr = torch.relu(thr)  # SAELens gates on pre > relu(threshold)
    else:
        raise ConfigError(f"{cfg_file}: SAELens architecture {arch!r} with activation {act_fn!r} is not supported "
                          "(supported: standard relu/topk, topk, jumprelu)")
    if cfg.get("finetuning_scaling_factor"):
        W_dec = W_dec * _vector(_tensor(raw, "scaling_factor", w_file), F, "scaling_factor", w_file)[:, None]
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    source = {"format": "saelens", "path": str(path), "architecture": arch,
              "hook_name": cfg.get("hook_name", meta.get("hook_name")), "model_name": cfg.get("model_name", meta.get("model_name"))}
    return _finish(tensors, activation, k, w_file, d_in, source, thr)


def _sparsify_dir(path: Path, hookpoint: str | None) -> Path:
    if hookpoint is not None:
        path = path / hookpoint
    if (path / SAE_CONFIG).is_file():
        return path
    subs = sorted(p.name for p in path.iterdir() if (p / SAE_CONFIG).is_file()) if path.is_dir() else []
    if len(subs) == 1:
        return path / subs[0]
    if not subs:
        raise DebiasError(f"{path} holds no sparsify SAE (no cfg.json here or in a hookpoint sub-folder)")
    raise DebiasError(f"{path} holds SAEs for several hookpoints ({', '.join(subs)}); choose one with hookpoint")


def load_sparsify(path: str | Path, d_in: int | None = None, hookpoint: str | None = None) -> SparseAutoencoder:
    """An EleutherAI sparsify folder (``cfg.json`` + ``sae.safetensors``), or one hookpoint of a run folder."""
    path = _sparsify_dir(Path(path), hookpoint)
    cfg_file, w_file = path / SAE_CONFIG, path / SAE_WEIGHTS
    cfg = _read_json(cfg_file)
    raw = read_safetensors(w_file)
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in raw:
        raise ConfigError(f"{cfg_file}: sparsify transcoders / skip connections are not SAEs over one site")
    if cfg.get("activation", "topk") != "topk":
        raise ConfigError(f"{cfg_file}: sparsify activation {cfg.get('activation')!r} is not supported (only topk)")
    b_dec = _tensor(raw, "b_dec", w_file)
    if b_dec.ndim != 1:
        raise ShapeError(f"{w_file}: b_dec has shape {tuple(b_dec.shape)}, expected a vector")
    d = b_dec.shape[0]
    enc = _matrix(_tensor(raw, "encoder.weight", w_file), d, "encoder.weight", w_file, rows_are_latents=True)
    W_dec = _matrix(_tensor(raw, "W_dec", w_file), d, "W_dec", w_file, rows_are_latents=True)
    b_enc = _vector(_tensor(raw, "encoder.bias", w_file), enc.shape[0], "encoder.bias", w_file)
    if "d_in" in cfg and cfg["d_in"] != d:
        raise ShapeError(f"{cfg_file}: d_in={cfg['d_in']!r} but the weights imply {d}")
    tensors = {"W_enc": enc.t().contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    source = {"format": "sparsify", "path": str(path), "hookpoint": path.name}
    return _finish(tensors, "topk", _pos_int(cfg.get("k"), "k", cfg_file), w_file, d_in, source)


def _load_pt(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise DebiasError(f"file not found: {file}")
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad/unsafe files
        raise IntegrityError(f"cannot read {file} as a weights-only state dict: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise DebiasError(f"{file} does not hold a state dict (got {type(obj).__name__})")
    return obj


def load_dictionary_learning(path: str | Path, d_in: int | None = None) -> SparseAutoencoder:
    """A dictionary_learning / sae-for-vlm folder (``ae.pt`` + ``config.json``)."""
    path = Path(path)
    w_file = path / DL_WEIGHTS
    sd = _load_pt(w_file)
    cfg = _read_json(path / DL_CONFIG) if (path / DL_CONFIG).is_file() else {}
    trainer = cfg.get("trainer", {}) if isinstance(cfg.get("trainer", {}), dict) else {}
    cls = trainer.get("dict_class")
    if cls is None:  # infer from the keys
        cls = ("MatryoshkaBatchTopKSAE" if "W_enc" in sd else "AutoEncoder" if "bias" in sd
               else "BatchTopKSAE" if "threshold" in sd else "AutoEncoderTopK")
    bias_name = "bias" if cls == "AutoEncoder" else "b_dec"
    b_dec = _tensor(sd, bias_name, w_file)
    if b_dec.ndim != 1:
        raise ShapeError(f"{w_file}: {bias_name} has shape {tuple(b_dec.shape)}, expected a vector")
    d = b_dec.shape[0]
    if cls == "MatryoshkaBatchTopKSAE":
        W_enc = _matrix(_tensor(sd, "W_enc", w_file), d, "W_enc", w_file, rows_are_latents=False)
        W_dec = _matrix(_tensor(sd, "W_dec", w_file), d, "W_dec", w_file, rows_are_latents=True)
        b_enc = _tensor(sd, "b_enc", w_file)
    elif cls in ("BatchTopKSAE", "AutoEncoderTopK", "AutoEncoder"):
        W_enc = _matrix(_tensor(sd, "encoder.weight", w_file), d, "encoder.weight", w_file, rows_are_latents=False)
        W_dec = _matrix(_tensor(sd, "decoder.weight", w_file), d, "decoder.weight", w_file, rows_are_latents=True)
        b_enc = _tensor(sd, "encoder.bias", w_file)
        if cls == "AutoEncoder" and "decoder.bias" in sd:
            raise ConfigError(f"{w_file}: AutoEncoder with a separate decoder bias is not supported")
    else:
        raise ConfigError(f"{path / DL_CONFIG}: dictionary_learning class {cls!r} is not supported "
                          "(supported: BatchTopKSAE, MatryoshkaBatchTopKSAE, AutoEncoderTopK, AutoEncoder)")
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    k = _pos_int(sd["k"] if "k" in sd else trainer.get("k"), "k", w_file) if cls != "AutoEncoder" else None
    thr, activation = None, {"AutoEncoder": "relu", "AutoEncoderTopK": "topk"}.get(cls, "threshold")
    if activation == "threshold":
        thr = _tensor(sd, "threshold", w_file)
        if thr.numel() != 1:
            raise ShapeError(f"{w_file}: {cls} threshold has {thr.numel()} values, expected a scalar")
    source = {"format": "dictionary_learning", "path": str(path), "dict_class": cls,
              "layer": trainer.get("layer"), "lm_name": trainer.get("lm_name")}
    return _finish(tensors, activation, k, w_file, d_in, source, thr)


# ----- detection ------------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """Name of the layout of an SAE folder (one of :data:`FORMATS`)."""
    path = Path(path)
    if path.is_file():
        raise DebiasError(f"{path} is a file; pass the SAE folder that contains it")
    if not path.is_dir():
        raise DebiasError(f"SAE folder not found: {path}")
    if (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / DL_WEIGHTS).is_file():
        return "dictionary_learning"
    if (path / SAE_WEIGHTS).is_file():
        keys = _safetensors_keys(path / SAE_WEIGHTS)
        return "debias-export" if "W_enc" in keys else "sparsify"
    if any((p / SAE_CONFIG).is_file() and (p / SAE_WEIGHTS).is_file() for p in path.iterdir()):
        return "sparsify"  # hookpoint sub-folders
    raise DebiasError(f"{path} is not a known SAE layout (expected sae.safetensors, sae_weights.safetensors or ae.pt)")


def _safetensors_keys(file: Path) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return set(f.keys())
    except Exception as exc:  # noqa: BLE001 - corrupt headers raise several types
        raise IntegrityError(f"corrupt or truncated safetensors file {file}: {str(exc).splitlines()[0][:200]}") from None


def load_any(path: str | Path, d_in: int | None = None, hookpoint: str | None = None) -> SparseAutoencoder:
    """Load an SAE folder in any supported layout; ``d_in`` (the site width) is checked when given."""
    fmt = detect_format(path)
    try:
        if fmt == "saelens":
            return load_saelens(path, d_in)
        if fmt == "dictionary_learning":
            return load_dictionary_learning(path, d_in)
        if fmt == "sparsify":
            return load_sparsify(path, d_in, hookpoint)
        return load_native(path, d_in)
    except DebiasError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        # Config values of the wrong type (e.g. k="3") end up here: still the user's file, not a bug.
        raise DebiasError(f"cannot import {fmt} SAE from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
