"""Modeling code of a debias-export patched model (generated; loaded with ``trust_remote_code=True``).

The weights in ``model.safetensors`` are the untouched original model. Loading builds the stock
transformers class from them, then rebuilds the debiasing edits from ``debias_config.json`` +
``debias_patches.safetensors`` with ``debias_runtime.install_patches`` (torch only), resolving each
saved site (``tower.layer.kind``) with ``debias_runtime.HF_LAYOUTS``, so the same directory loads on
transformers 4.57 and 5.x. Needs torch, transformers and safetensors; never imports debias_export.

A model built directly from a config (``Class(config)``) is NOT patched: only ``from_pretrained``
knows where the patch files are.
"""
import json
import os

from safetensors.torch import load_file

# @@STOCK_IMPORTS@@
from .debias_runtime import hf_resolver, install_patches

DEBIAS_CONFIG = "debias_config.json"
DEBIAS_PATCHES = "debias_patches.safetensors"
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _resolve(path, name, kwargs):
    """Local file in the model dir, or the hub file next to the weights."""
    if os.path.isdir(path):
        return os.path.join(path, kwargs.get("subfolder") or "", name)
    from transformers.utils import cached_file

    return cached_file(path, name, **{k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None})


def share_stock_conversions(stock_cls, debias_cls):
    """Give ``debias_cls`` the checkpoint key conversions of the stock class it extends.

    transformers 5 renames legacy checkpoint keys on load (e.g. LLaVA's ``language_model.lm_head``) but
    skips that for remote-code classes unless their name is registered; without this ``lm_head.weight``
    would load as MISSING (random). transformers 4.x converts through class attributes the subclass inherits.
    """
    try:
        from transformers import conversion_mapping
    except ImportError:
        return
    mapping = conversion_mapping.get_checkpoint_conversion_mapping(stock_cls.__name__)
    model_type = getattr(getattr(stock_cls, "config_class", None), "model_type", None)
    if mapping is None and model_type:
        mapping = conversion_mapping.get_checkpoint_conversion_mapping(model_type)
    if mapping is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(debias_cls.__name__, mapping, overwrite=True)


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
        installed = install_patches(model, debias["patches"], tensors, hf_resolver(model, debias["family"]))
        ref = next(model.parameters())
        for item in installed:
            item.site_edit.to(device=ref.device, dtype=ref.dtype)
            item.site_edit.train(model.training)
        model.debias_config = debias
        return loaded


# @@CLASSES@@
