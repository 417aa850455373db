"""The transformers.js layout of an export bundle: the files ``@huggingface/transformers`` reads beside ``onnx/``.

transformers.js (v3) loads a model from a folder ``<root>/`` (``env.localModelPath`` + model id, or the Hub) by
reading ``config.json``, ``onnx/<vision_model|text_model><suffix>.onnx`` (suffix ``''`` fp32, ``_fp16`` fp16,
``_quantized`` q8 -- the names :mod:`.quantize` already writes), and for ``AutoProcessor`` /
``AutoTokenizer`` ``preprocessor_config.json`` (``image_processor_type``) and ``tokenizer.json`` +
``tokenizer_config.json``. This module writes those four JSON files at the bundle root for the ``hf_clip``
family, so an export is drop-in (``CLIPVisionModelWithProjection.from_pretrained(root)``).

Pad convention: the exported tokenizer pads with ``<|endoftext|>`` (id 49407), CLIP's Hugging Face convention,
which transformers.js also falls back to. open_clip (and debias-export's built-in BPE for checkpoints without a
tokenizer) pads with 0. The text graph pools at the first EOS token under a causal mask, so the id written after
EOS never reaches ``text_embeds``: both conventions give the same embedding; only ``last_hidden_state`` at
padded positions differs (tests/test_transformers_js.py checks both).

The tokenizer is the model's own (its processor's fast tokenizer) where it has one; otherwise CLIP's BPE
vocabulary that ships inside open_clip, written as a ``tokenizers`` JSON document directly (the same model /
normalizer / pre-tokenizer / post-processor transformers' CLIP converter produces), so the bytes do not depend on
the installed transformers or tokenizers version (``reproduce`` compares hashes).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterable

from ..adapters import ModelAdapter
from ..adapters.hf_clip import CLIP_MEAN, CLIP_STD

FAMILIES = ("hf_clip",)  # transformers.js has CLIP classes; VisionTextDualEncoder / open_clip / LLaVA it cannot load
FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_CONVENTION = ("pads with `<|endoftext|>` (49407, CLIP's Hugging Face convention); the text graph pools at the "
                  "first EOS under a causal mask, so any id after EOS (open_clip pads with 0) gives the same `text_embeds`")
# CLIP's pre-tokenizer split (transformers' CLIPConverter; the regex the original CLIP tokenizer uses)
_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_BPE_VOCAB = 49408  # 256 bytes x 2 + 48894 merges + 2 special tokens


def applies(adapter: ModelAdapter) -> bool:
    """Whether transformers.js can load this family's ONNX graphs (see :data:`FAMILIES`)."""
    return adapter.family in FAMILIES


def write_transformers_js(adapter: ModelAdapter, root: Path, hf_config: Path,
                          graphs: Iterable[str] = ("vision_model", "text_model")) -> list[str]:
    """Write the transformers.js files at ``root`` (beside ``root/onnx``); returns the names written.

    ``hf_config``: the exported ``hf/config.json``, copied without ``auto_map`` (the remote code lives in
    ``hf/``, not at the root) and with ``transformers.js_config.dtype = "fp32"`` (otherwise the wasm backend
    defaults to ``q8``, which exists only when int8 was exported). ``graphs``: the ONNX graphs exported; the
    image processor goes with ``vision_model``, the tokenizer with ``text_model`` where one fits (:func:`tokenizer_files`).
    """
    config = json.loads(hf_config.read_text())
    config.pop("auto_map", None)
    config["transformers.js_config"] = {"dtype": "fp32"}
    written = {"config.json": config}
    graphs = set(graphs)
    if "vision_model" in graphs:
        written["preprocessor_config.json"] = image_processor_config(adapter)
    if "text_model" in graphs:
        files = tokenizer_files(adapter)
        if files is not None:
            written["tokenizer.json"], written["tokenizer_config.json"] = files
    for name, data in written.items():
        (root / name).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return list(written)


def image_processor_config(adapter: ModelAdapter) -> dict[str, Any]:
    """``preprocessor_config.json`` fields both transformers' and transformers.js' ``CLIPImageProcessor`` read.

    From the model's own image processor where it has one, else CLIP's preprocessing at the tower's size
    (shortest edge, bicubic, centre crop, CLIP mean / std: what :func:`~debias_export.adapters.hf_clip.clip_pixel_values`
    does for checkpoints without a processor).
    """
    size = adapter.image_size()
    proc = getattr(getattr(adapter, "processor", None), "image_processor", None)
    cfg: dict[str, Any] = {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
                           "do_resize": True, "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
                           "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
                           "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                           "do_convert_rgb": True}
    if proc is not None:
        for key in ("do_resize", "resample", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                    "do_convert_rgb"):
            if getattr(proc, key, None) is not None:
                cfg[key] = _plain(getattr(proc, key))
        for key in ("size", "crop_size"):
            value = getattr(proc, key, None)
            if isinstance(value, int):  # legacy configs: one number
                cfg[key] = value
            elif value is not None:  # a dict (4.x) or a SizeDict (5.x)
                items = value.items() if hasattr(value, "items") else vars(value).items()
                cfg[key] = {k: int(v) for k, v in items if v is not None}
        for key in ("image_mean", "image_std"):
            if getattr(proc, key, None) is not None:
                cfg[key] = [float(x) for x in getattr(proc, key)]
    return cfg


def _plain(value: Any) -> Any:
    """JSON value of a processor attribute (``PILImageResampling.BICUBIC`` -> 3)."""
    return int(value) if hasattr(value, "value") and not isinstance(value, bool) else value


def tokenizer_files(adapter: ModelAdapter) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(``tokenizer.json``, ``tokenizer_config.json``) with the pad convention of :data:`PAD_CONVENTION`;
    None for a model with neither a tokenizer nor room for CLIP's BPE vocabulary (a small random test vocab)."""
    cfg = adapter._tower_config("text")
    max_length = int(cfg.max_position_embeddings)
    tok = getattr(getattr(adapter, "processor", None), "tokenizer", None)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # the model's own fast tokenizer: its vocabulary and specials, CLIP's pad
        document = json.loads(backend.to_str())
        document["padding"] = document["truncation"] = None  # padding / truncation come from tokenizer_config
        specials = {"bos_token": str(tok.bos_token or BOS), "eos_token": str(tok.eos_token or EOS),
                    "unk_token": str(tok.unk_token or EOS), "pad_token": str(tok.pad_token or tok.eos_token or EOS)}
        max_length = min(max_length, int(tok.model_max_length)) if tok.model_max_length else max_length
    else:
        if int(cfg.vocab_size) < _BPE_VOCAB:  # no tokenizer fits: ids are the caller's business
            return None
        document = clip_bpe_document()
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    tok_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "padding_side": "right",
                  "clean_up_tokenization_spaces": False, "do_lower_case": True, **specials}
    return document, tok_config


def clip_bpe_document() -> dict[str, Any]:
    """CLIP's byte-level BPE as a ``tokenizers`` JSON document, from the vocabulary file open_clip ships."""
    # open_clip is a core dependency but slow to import; only this path (models without a tokenizer) needs it
    from open_clip.tokenizer import bytes_to_unicode, default_bpe  # noqa: PLC0415

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [line.split() for line in lines[1:49152 - 256 - 2 + 1]]  # the slice CLIP's own tokenizer uses
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    special = [{"id": len(tokens) - 2 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": True, "special": True} for i, t in enumerate((BOS, EOS))]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _SPLIT}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, len(tokens) - 1], "cls": [BOS, len(tokens) - 2],
                           "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": EOS, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
