"""What differs between the supported transformers majors (4.57 and 5.x), in one place.

- ``get_image_features`` / ``get_text_features`` return a tensor in 4.x and an output object whose
  tensor is ``pooler_output`` in 5.x: :func:`pooled`.
- 5.x flattened ``CLIPVisionModel`` / ``SiglipVisionModel`` (no inner ``.vision_model``); 4.x cannot
  load such checkpoints, 5.x converts the 4.x layout on load. Exports are therefore saved in the
  4.x layout (:func:`portable_state_dict`), which both majors load.
- 5.x prints "Loading weights" / "Writing model shards" progress bars: :func:`quiet_transformers`.
"""
from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from torch import nn
from transformers.utils import logging as hf_logging

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def pooled(output: Any) -> torch.Tensor:
    """The embedding tensor of a ``get_*_features`` call on either major."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def vision_transformer(vision_model: nn.Module) -> nn.Module:
    """The module holding ``embeddings``/``encoder``/``post_layernorm`` of a CLIP-style vision model."""
    inner = getattr(vision_model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) else vision_model


def portable_state_dict(model: nn.Module, vision_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The state dict in the 4.x layout when some vision tower at ``vision_prefixes`` is flattened (5.x).

    ``None`` when nothing needs renaming (``save_pretrained`` writes the portable layout itself).
    """
    flat = _flattened_prefixes(model, vision_prefixes)
    if not flat:
        return None
    return {_name_4x(key, flat): value for key, value in model.state_dict().items()}


def _flattened_prefixes(model: nn.Module, vision_prefixes: tuple[str, ...]) -> list[str]:
    """The ``vision_prefixes`` (with a trailing dot) whose CLIP vision tower has no inner ``vision_model`` (5.x)."""
    flat = []
    for prefix in vision_prefixes:
        try:
            tower = model.get_submodule(prefix)
        except AttributeError:
            continue
        if not isinstance(getattr(tower, "vision_model", None), nn.Module):
            flat.append(prefix + ".")
    return flat


def _name_4x(name: str, flat: list[str]) -> str:
    """``name`` in the 4.x layout: ``vision_model.`` re-inserted after the first flattened prefix it starts with."""
    for prefix in flat:
        if name.startswith(prefix):
            return prefix + "vision_model." + name[len(prefix):]
    return name


def save_pretrained_portable(model: nn.Module, out: Any, vision_prefixes: tuple[str, ...] = ()) -> None:
    """``save_pretrained`` (safetensors) in a layout transformers 4.57 and 5.x both load, without progress bars."""
    state = portable_state_dict(model, vision_prefixes)
    with quiet_transformers():
        if state is None:
            model.save_pretrained(out, safe_serialization=True)
        else:
            model.save_pretrained(out, safe_serialization=True, state_dict=state)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars inside the block (they break one-line CLI output)."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _canonical_names(model: nn.Module, vision_prefixes: tuple[str, ...]) -> dict[str, str]:
    """Parameter name -> its name in the 4.x layout (5.x flattens CLIP vision towers at ``vision_prefixes``)."""
    flat = _flattened_prefixes(model, vision_prefixes)
    return {name: _name_4x(name, flat) for name, _ in model.named_parameters()}


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int, vision_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Re-initialise every weight from ``seed`` and its 4.x-layout name, so a random model built from one
    config has the same weights on every transformers major (their own init order and schemes differ).

    Norm weights 1 and biases 0; matrices, convolutions and embeddings ~ N(0, fan_in^-1/2) (embeddings:
    N(0, 0.02)); other vectors ~ N(0, d^-1/2); scalars (e.g. ``logit_scale``) keep their config value.
    """
    names = _canonical_names(model, vision_prefixes)
    owners = {f"{mod_name}.{p}" if mod_name else p: mod for mod_name, mod in model.named_modules()
              for p, _ in mod.named_parameters(recurse=False)}
    for name, param in model.named_parameters():
        if param.dim() == 0:
            continue
        owner = owners.get(name)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = owner is not None and "norm" in type(owner).__name__.lower()
        if is_norm or (leaf == "bias" and param.dim() == 1):
            param.fill_(1.0 if is_norm and leaf == "weight" else 0.0)
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(names[name].encode()))
        if isinstance(owner, nn.Embedding):
            std = 0.02
        elif param.dim() >= 2:
            std = param[0].numel() ** -0.5
        else:
            std = param.numel() ** -0.5
        param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float32).to(param.dtype) * std)
        if isinstance(owner, nn.Embedding) and owner.padding_idx is not None:
            param[owner.padding_idx].zero_()
    return model


def save_processor_portable(processor: Any, out: Any) -> None:
    """``processor.save_pretrained`` in a layout transformers 4.57 and 5.x both load.

    5.x nests the image processor inside ``processor_config.json`` and names generic fast tokenizers
    ``TokenizersBackend`` with a list of ``extra_special_tokens``; 4.57 reads ``preprocessor_config.json``,
    ``PreTrainedTokenizerFast`` and ``additional_special_tokens``. 5.x reads the 4.57 layout too.
    """
    out = Path(out)
    with quiet_transformers():
        processor.save_pretrained(out)
    if TRANSFORMERS_MAJOR < 5:
        return
    proc_file, pre_file, tok_file = out / "processor_config.json", out / "preprocessor_config.json", out / "tokenizer_config.json"
    if proc_file.is_file():
        cfg = json.loads(proc_file.read_text())
        image_cfg = cfg.pop("image_processor", None)
        if isinstance(image_cfg, dict) and not pre_file.exists():
            pre_file.write_text(json.dumps({**image_cfg, "processor_class": cfg.get("processor_class")}, indent=2,
                                           sort_keys=True) + "\n")
            proc_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tok_file.is_file():
        cfg = json.loads(tok_file.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        extra = cfg.get("extra_special_tokens")
        if isinstance(extra, list):
            cfg.pop("extra_special_tokens")
            cfg["additional_special_tokens"] = list(dict.fromkeys(cfg.get("additional_special_tokens", []) + extra))
        tok_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
