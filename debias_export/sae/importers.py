"""Import SAEs trained by other libraries into :class:`SparseAutoencoder`, exactly or not at all.

Each layout has its own module (its docstring lists tensors, encoding rule and refusals); every rule was
checked against SAEs built, saved and run by the libraries themselves (``scripts/make_sae_fixtures.py``,
``tests/fixtures/sae``, ``tests/test_sae_import_libraries.py``): latents and reconstructions match the
library's own ``encode`` / forward to float32 rounding, with identical active sets (a latent within float
rounding of its firing boundary may land on either side, as it does between two CPUs).

================  =========================================================  ==================================
layout            files                                                      module
================  =========================================================  ==================================
debias-export     ``cfg.json`` + ``sae.safetensors`` (``W_enc``...)          :meth:`SparseAutoencoder.load`
SAELens 4/5/6     ``cfg.json`` + ``sae_weights.safetensors``                 :mod:`.import_saelens`
sparsify 1.x      ``cfg.json`` + ``sae.safetensors`` (``encoder.weight``)    :mod:`.import_sparsify`
dictionary_lrn.   ``ae.pt`` (+ ``config.json``); also sae-for-vlm           :mod:`.import_dictionary_learning`
Prisma            ``config.json`` + ``<name>.pt`` (vit-prisma)               :mod:`.import_prisma`
================  =========================================================  ==================================

Imported exactly: SAELens standard (relu / topk), topk (incl. ``rescale_acts_by_decoder_norm``), jumprelu,
gated, batchtopk / matryoshka_batchtopk (training and inference saves), ``apply_b_dec_to_input=false``,
``finetuning_scaling_factor``, ``normalize_activations`` none / expected_average_only_in /
covariance_whitening (identity at SAELens inference too); sparsify top-k SAEs; dictionary_learning
AutoEncoder (decoder normalised like its ``load_dictionary``), AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE,
MatryoshkaBatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder; Prisma standard (relu / topk) and gated.
Gated SAEs become a per-latent threshold (:func:`.import_common.gated_as_threshold`), so they compile into
the same fused edit as any threshold SAE.

Refused with one line naming the architecture and what is supported, before any tensor is read: per-input
normalisations (``layer_norm``, ``constant_norm_rescale``), iterative or signed encoders (matching_pursuit,
abstopk, temporal), transcoders and skip connections, sparsify ``groupmax``, hook_z reshaping, and
dictionary_learning ``ae.pt`` files whose keys fit two classes that encode differently (AutoEncoderTopK vs
BatchTopKSAE) without their ``config.json``. Weight orientation is the layout's own (``nn.Linear`` weights
are ``[out, in]``), never guessed from shapes. 16-bit weights are imported as float32 with a one-line
warning (the library's half-precision forward rounds differently). Non-finite values, missing keys or
files, bad JSON and garbage bytes raise :class:`DebiasError` naming the file.

A folder that is not itself an SAE but holds SAE folders (a sparsify run: ``run/h.0``, or with several seeds
``run/h.0/seed1``; a dictionary_learning ``save_dir/trainer_0``) is resolved by ``hookpoint``, the sub-folder
path relative to it; a Prisma folder with several checkpoints takes the ``.pt`` file name there.
"""
from __future__ import annotations

from pathlib import Path

from ..core.errors import ConfigError, DebiasError, ShapeError
from .import_common import read_json, safetensors_keys
from .import_dictionary_learning import DL_WEIGHTS, load_dictionary_learning
from .import_prisma import PRISMA_CONFIG, checkpoint_files, load_prisma
from .import_saelens import SAELENS_WEIGHTS, load_saelens
from .import_sparsify import load_sparsify
from .model import SAE_WEIGHTS, SparseAutoencoder

FORMATS = ("debias-export", "saelens", "sparsify", "dictionary_learning", "prisma")
MAX_DEPTH = 3  # run/h.0/seed1 is two levels below a run folder; best/h.0/seed1 three

__all__ = ["FORMATS", "detect_format", "load_any", "load_native", "load_saelens", "load_sparsify",
           "load_dictionary_learning", "load_prisma", "resolve_sae_dir"]


def load_native(path: str | Path, d_in: int | None = None) -> SparseAutoencoder:
    """A folder written by :meth:`SparseAutoencoder.save`."""
    sae = SparseAutoencoder.load(path)
    if d_in is not None and sae.d_in != d_in:
        raise ShapeError(f"SAE {path} has width {sae.d_in} but the site width is {d_in}")
    return sae


def _own_format(path: Path) -> str | None:
    """The layout of ``path`` itself, or None when it holds no SAE weights of a known layout."""
    if (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / DL_WEIGHTS).is_file():
        return "dictionary_learning"
    if (path / SAE_WEIGHTS).is_file():
        return "debias-export" if "W_enc" in safetensors_keys(path / SAE_WEIGHTS) else "sparsify"
    if (path / PRISMA_CONFIG).is_file() and checkpoint_files(path):
        cfg = read_json(path / PRISMA_CONFIG)
        if "expansion_factor" in cfg and "d_in" in cfg:  # VisionModelSAERunnerConfig, not e.g. a sparsify run config
            return "prisma"
    return None


def _sae_subdirs(root: Path, here: Path, depth: int) -> list[str]:
    found: list[str] = []
    for sub in sorted(p for p in here.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _own_format(sub) is not None:
            found.append(sub.relative_to(root).as_posix())
        elif depth > 1:
            found += _sae_subdirs(root, sub, depth - 1)
    return found


def resolve_sae_dir(path: str | Path, hookpoint: str | None = None) -> tuple[Path, str, str | None]:
    """``(folder, layout, checkpoint)`` of the SAE at ``path`` (or its sub-folder / Prisma file ``hookpoint``)."""
    path = Path(path)
    if path.is_file():
        raise DebiasError(f"{path} is a file; pass the SAE folder that contains it")
    if not path.is_dir():
        raise DebiasError(f"SAE folder not found: {path}")
    checkpoint = None
    if hookpoint is not None:
        target = path / hookpoint
        if target.is_file() and _own_format(target.parent) == "prisma":
            return target.parent, "prisma", target.name
        if not target.is_dir():
            subs = _sae_subdirs(path, path, MAX_DEPTH)
            raise DebiasError(f"no SAE {hookpoint!r} under {path} (found: {', '.join(subs[:12]) or 'none'})")
        path = target
    fmt = _own_format(path)
    if fmt is not None:
        return path, fmt, checkpoint
    subs = _sae_subdirs(path, path, MAX_DEPTH)
    if len(subs) == 1:
        return path / subs[0], _own_format(path / subs[0]) or "", None
    if not subs:
        raise DebiasError(f"{path} is not a known SAE layout (expected sae.safetensors, sae_weights.safetensors, "
                          "ae.pt or a Prisma config.json + .pt, here or in a sub-folder)")
    more = f", ... ({len(subs)} in all)" if len(subs) > 12 else ""
    raise DebiasError(f"{path} holds SAEs in several sub-folders ({', '.join(subs[:12])}{more}); "
                      "choose one with hookpoint (e.g. --hookpoint " + subs[0] + ")")


def detect_format(path: str | Path, hookpoint: str | None = None) -> str:
    """Name of the layout of an SAE folder (one of :data:`FORMATS`)."""
    return resolve_sae_dir(path, hookpoint)[1]


def load_any(path: str | Path, d_in: int | None = None, hookpoint: str | None = None) -> SparseAutoencoder:
    """Load an SAE folder in any supported layout; ``d_in`` (the site width) is checked when given.

    ``hookpoint`` picks one SAE out of a folder of several (a sub-folder path such as ``h.0/seed1``, or a
    Prisma checkpoint file name).
    """
    folder, fmt, checkpoint = resolve_sae_dir(path, hookpoint)
    try:
        if fmt == "saelens":
            return load_saelens(folder, d_in)
        if fmt == "dictionary_learning":
            return load_dictionary_learning(folder, d_in)
        if fmt == "sparsify":
            return load_sparsify(folder, d_in)
        if fmt == "prisma":
            return load_prisma(folder, d_in, checkpoint)
        return load_native(folder, d_in)
    except DebiasError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        # Config values of the wrong type (e.g. k="3") end up here: still the user's file, not a bug.
        raise ConfigError(f"cannot import {fmt} SAE from {folder}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}") from None
