"""Prisma (vit-prisma) SAEs: ``config.json`` (``VisionModelSAERunnerConfig.save_config``) + one ``.pt`` checkpoint.

Prisma's trainer writes ``config.json`` and ``n_images_<N>.pt`` with ``SparseAutoencoder.save_model``:
``torch.save({"cfg": <VisionModelSAERunnerConfig object>, "state_dict": ...})``; a plain state dict next to
``config.json`` is accepted too. We never unpickle the config object: the file is read with
``weights_only=True``, and when its only non-tensor globals are vit-prisma classes they are rebuilt as
inert placeholders (their contents are ignored; ``config.json`` is the config). Any other pickled global is
refused.

Tensors (plain parameters): ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``; gated
adds ``b_gate``, ``r_mag``, ``b_mag``. Encoding always subtracts ``b_dec``; ``standard`` + ``relu`` ->
relu, ``standard`` + ``topk`` (``activation_fn_kwargs.k``; top-k of the pre-activation, then relu) -> topk,
``gated`` -> the gated rule as a per-latent threshold. Refused before tensors are read: transcoders,
``jumprelu`` (not implemented by Prisma's own loader), other activations, and ``normalize_activations`` other
than ``none`` (Prisma's default ``layer_norm`` normalises each input at run time).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.errors import DebiasError, IntegrityError, ShapeError
from .import_common import Tensors, finish, gated_as_threshold, load_pt, matrix, pos_int, read_json, unsupported, vector
from .model import SparseAutoencoder

PRISMA_CONFIG = "config.json"
SIDE_FILES = ("_log_feature_sparsity.pt",)  # written beside each checkpoint by Prisma's trainer


class _Placeholder:
    """Stands in for a pickled vit-prisma object: accepts any construction/state, keeps nothing, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Placeholder":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def checkpoint_files(path: Path) -> list[Path]:
    """The ``.pt`` checkpoints of a Prisma folder (side files such as feature sparsity logs left out)."""
    return sorted(p for p in path.glob("*.pt") if p.name != "ae.pt" and not p.name.endswith(SIDE_FILES))


def _load_prisma_pt(file: Path) -> dict[str, Any]:
    try:
        return load_pt(file)
    except IntegrityError:
        pass  # maybe the legacy {"cfg": object, "state_dict": ...} file: look at its globals without unpickling
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise IntegrityError(f"cannot read {file} as a weights-only checkpoint: {str(exc).splitlines()[0][:200]}") from None
    foreign = [n for n in names if not n.startswith("vit_prisma.")]
    if foreign or not names:
        raise IntegrityError(f"{file} holds pickled objects other than tensors ({', '.join(foreign or names)}); "
                             "refusing to unpickle it: re-save its state_dict with torch.save")
    with torch.serialization.safe_globals([(_Placeholder, n) for n in names]):
        return load_pt(file)


def load_prisma(path: str | Path, d_in: int | None = None, checkpoint: str | None = None) -> SparseAutoencoder:
    """A Prisma SAE folder; ``checkpoint`` names the ``.pt`` file when the folder holds several."""
    path = Path(path)
    c_file = path / PRISMA_CONFIG
    cfg = read_json(c_file)
    if cfg.get("is_transcoder"):
        raise unsupported("Prisma coder", "transcoder", "standard, gated SAEs", c_file,
                          "; it does not reconstruct its own input site")
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "gated"):
        raise unsupported("Prisma architecture", arch, "standard, gated", c_file)
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise unsupported("Prisma normalize_activations", norm, "none", c_file,
                          "; it normalises each input at run time, which fixed weights cannot reproduce")
    act = cfg.get("activation_fn_str", "relu")
    kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
    if act not in ("relu", "topk") or (arch == "gated" and act != "relu"):
        raise unsupported(f"Prisma {arch} SAE with activation_fn_str", act,
                          "relu, topk (standard only)", c_file)
    k = pos_int(kwargs.get("k"), "activation_fn_kwargs.k", c_file) if act == "topk" else None
    files = [path / checkpoint] if checkpoint else checkpoint_files(path)
    if len(files) != 1:
        names = ", ".join(p.name for p in files) or "none"
        raise DebiasError(f"{path} holds {len(files)} Prisma checkpoints ({names}); choose one with hookpoint=<file name>")
    w_file = files[0]
    obj = _load_prisma_pt(w_file)
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    t = Tensors(sd, w_file)
    b_dec = t.get("b_dec", ndim=1)
    d = b_dec.shape[0]
    W_enc = t.get("W_enc", ndim=2)
    F = W_enc.shape[1]
    W_enc = matrix(W_enc, (d, F), "W_enc", w_file)
    if "d_in" in cfg and cfg["d_in"] != d:
        raise ShapeError(f"{c_file}: d_in={cfg['d_in']!r} but the weights imply {d}")
    if isinstance(cfg.get("expansion_factor"), int) and cfg["expansion_factor"] * d != F:
        raise ShapeError(f"{c_file}: expansion_factor={cfg['expansion_factor']} but the weights have {F} latents")
    W_dec = matrix(t.get("W_dec"), (F, d), "W_dec", w_file)
    thr = None
    if arch == "gated":
        W_enc, b_enc, thr = gated_as_threshold(W_enc, vector(t.get("b_gate"), F, "b_gate", w_file),
                                               vector(t.get("r_mag"), F, "r_mag", w_file),
                                               vector(t.get("b_mag"), F, "b_mag", w_file))
    else:
        b_enc = vector(t.get("b_enc"), F, "b_enc", w_file)
    t.warn_if_half()
    source = {"format": "prisma", "path": str(path), "checkpoint": w_file.name, "architecture": arch,
              "hook_point": cfg.get("hook_point"), "model_name": cfg.get("model_name")}
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return finish(tensors, "topk" if act == "topk" else ("threshold" if arch == "gated" else "relu"), k, w_file,
                  d_in, source, thr)
