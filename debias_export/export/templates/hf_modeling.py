"""Modeling code of a debias-export patched model (generated; loaded with ``trust_remote_code=True``).

The weights in ``model.safetensors`` are the untouched original model. Loading builds the stock
transformers class from them, then rebuilds the debiasing edits from ``debias_config.json`` +
``debias_patches.safetensors`` with ``debias_runtime.install_patches`` (torch only). Needs
torch, transformers and safetensors; never imports debias_export.

A model built directly from a config (``Class(config)``) is NOT patched: only ``from_pretrained``
knows where the patch files are.
"""
import json
import os

from safetensors.torch import load_file

# @@STOCK_IMPORTS@@
from .debias_runtime import install_patches

DEBIAS_CONFIG = "debias_config.json"
DEBIAS_PATCHES = "debias_patches.safetensors"
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _resolve(path, name, kwargs):
    """Local file in the model dir, or the hub file next to the weights."""
    if os.path.isdir(path):
        return os.path.join(path, kwargs.get("subfolder") or "", name)
    from transformers.utils import cached_file

    return cached_file(path, name, **{k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None})


class DebiasPatchedMixin:
    """``from_pretrained`` = stock load + ``install_patches``; the model stays an instance of the stock class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        path = str(pretrained_model_name_or_path)
        with open(_resolve(path, DEBIAS_CONFIG, kwargs), encoding="utf-8") as fh:
            debias = json.load(fh)
        # Same attention kernel as the model the edits were validated on, unless the caller picks one.
        attn = debias.get("base", {}).get("attn_implementation")
        if attn and "attn_implementation" not in kwargs:
            kwargs["attn_implementation"] = attn
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        tensors = load_file(_resolve(path, DEBIAS_PATCHES, kwargs))
        wrappers = install_patches(model, debias["patches"], tensors)
        ref = next(model.parameters())
        for wrapper in wrappers:
            wrapper.edits.to(device=ref.device, dtype=ref.dtype)
            wrapper.train(model.training)
        model.debias_config = debias
        return loaded


# @@CLASSES@@
