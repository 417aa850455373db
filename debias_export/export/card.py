"""The model card (``README.md`` with YAML front matter) every export bundle carries.

Metadata (Hugging Face model-card spec, validated offline with ``huggingface_hub``'s own parser in tests):

- ``base_model``: the source model when it is a Hub id (a tiny test model or a local path is named in the text).
- ``base_model_relation``: the Hub knows four values, ``adapter`` / ``merge`` / ``quantized`` / ``finetune``.
  An edited export is a ``finetune``: it is one base model whose function was changed (SAE neurons zeroed or
  a projection folded into its weights) and the repository holds the full model -- not an ``adapter``
  (a separate weight set loaded on top of a base that is not in the repository), not a ``merge`` (several
  parents). Its fp16 / int8 files are secondary variants of that edited model and do not change the relation.
  An unedited (baseline) export with an int8 variant is ``quantized``; one with only fp32 / fp16 graphs is a
  format conversion, for which the Hub has no relation, so the key is left out.
- ``library_name``: ``transformers`` (``hf/`` loads with ``from_pretrained``); the ``onnx`` / ``transformers.js``
  tags name the other runtimes.
- ``model-index``: the numbers the export computed itself (ONNX parity, each variant's fidelity and edit
  cosine) plus any results the caller passes (``results``: fairness / utility / latency of the run that made
  it, e.g. the recipe pipeline's eval and bench).

The card cannot hold the hash of the manifest that lists it, so it records the SHA-256 of the nested
``hf/manifest.json`` and ``onnx/manifest.json``, which cover every weight and graph file; the top-level
``manifest.json`` covers the card.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import EvalResult, ModelCardData

from ..core.errors import ConfigError
from .manifest import MANIFEST, sha256_file
from .transformers_js import PAD_CONVENTION

CARD = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RESULT_KEYS = ("task_type", "dataset_type", "dataset_name", "metric_type", "metric_value")


def base_relation(edited: bool, precisions: Sequence[str]) -> str | None:
    """``base_model_relation`` of an export (see the module docstring for why)."""
    if edited:
        return "finetune"
    return "quantized" if "int8" in precisions else None


def _hub_id(source: str | None) -> str | None:
    if not source or not _HUB_ID.match(source) or Path(source).exists():
        return None
    return source


def _describe_edit(edit: dict[str, Any], fold: dict[str, Any] | None = None) -> str:
    kind = edit.get("kind", "?")
    parts = [f"`{edit.get('site', '?')}`: {kind}"]
    if kind == "sae":
        neurons = list(edit.get("neurons") or [])
        shown = ", ".join(map(str, neurons[:16])) + (" ..." if len(neurons) > 16 else "")
        value = edit.get("value")
        value = ("[" + ", ".join(f"{float(x):.4g}" for x in value[:16]) + (" ..." if len(value) > 16 else "") + "] (per neuron)"
                 if isinstance(value, list) else value)
        parts.append(f"{len(neurons)} neuron(s) [{shown}] set to v = {value} with strength "
                     f"a = {edit.get('alpha')}, mode {edit.get('mode')}")
        sae = edit.get("sae_config") or {}
        parts.append(f"SAE {sae.get('activation')} with {sae.get('num_latents')} latents over d = {sae.get('d_in')}"
                     + (f", provenance {json.dumps(sae.get('metadata'), sort_keys=True, default=str)}"
                        if sae.get("metadata") else ""))
    else:
        keys = ("method", "strength", "amplify", "center", "fold")
        parts.append(", ".join(f"{k} {edit[k]}" for k in keys if k in edit))
        if edit.get("rank") is not None or edit.get("P") is not None:
            parts.append(f"rank {edit.get('rank')}")
        kept = (edit.get("provenance") or {}).get("kept_labels")
        if kept:
            parts.append(f"erases {(edit.get('provenance') or {}).get('column', 'its label')} keeping the linear "
                         f"information of {', '.join(kept)}")
    if fold:
        parts.append(f"folded into the weights ({fold.get('mode')})")
    return "; ".join(p for p in parts if p)


def _check_results(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(results):
        missing = [k for k in RESULT_KEYS if k not in r]
        if missing:
            raise ConfigError(f"card result {i} lacks {', '.join(missing)} (needs {', '.join(RESULT_KEYS)})")
        out.append(dict(r))
    return out


def _own_results(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Numbers the export computed: ONNX parity and each precision variant's fidelity and edit cosine."""
    out = []
    for graph, g in (report.get("onnx") or {}).get("graphs", {}).items():
        val = g.get("validation") or {}
        if val.get("max_abs_diff"):
            out.append({"task_type": "feature-extraction", "dataset_type": "synthetic",
                        "dataset_name": "debias-export validation inputs", "metric_type": "max_abs_diff",
                        "metric_name": f"{graph}.onnx vs PyTorch max |diff|",
                        "metric_value": max(val["max_abs_diff"].values())})
        for prec, v in (g.get("variants") or {}).items():
            out.append({"task_type": "feature-extraction", "dataset_type": "synthetic",
                        "dataset_name": "debias-export validation inputs", "metric_type": "cosine",
                        "metric_name": f"{v['file']} embedding cosine vs fp32 (min)",
                        "metric_value": round(v["fidelity_cosine_min"], 6)})
            if "edit_cosine_min" in v:
                out.append({"task_type": "feature-extraction", "dataset_type": "synthetic",
                            "dataset_name": "debias-export validation inputs", "metric_type": "cosine",
                            "metric_name": f"{v['file']} edit effect cosine vs fp32 (min)",
                            "metric_value": round(v["edit_cosine_min"], 6)})
    return out


def render_card(root: Path, report: dict[str, Any], provenance: dict[str, Any] | None,
                results: Sequence[dict[str, Any]] = ()) -> str:
    """The card text for the bundle being written at ``root`` (its ``hf/`` and ``onnx/`` already complete)."""
    provenance = provenance or {}
    cfg = json.loads((root / "hf" / "debias_config.json").read_text())
    edited = bool(report.get("edited", True))
    precisions = (report.get("onnx") or {}).get("precisions") or ([] if not report.get("onnx") else ["fp32"])
    source = provenance.get("source_model") or provenance.get("model") or cfg.get("provenance", {}).get("source_model")
    family = cfg.get("family", "?")
    evals = [EvalResult(**{k: r[k] for k in (*RESULT_KEYS, "metric_name") if k in r})
             for r in [*_own_results(report), *_check_results(results)]]
    tags = ["debias-export", "fairness", "onnx", "safetensors", family.replace("_", "-")]
    if (root / "onnx").is_dir():
        tags.append("transformers.js")
    if edited:
        tags.append("sae-edit" if any(e.get("kind") == "sae" for e in cfg.get("edits", [])) else "projection-edit")
    data = ModelCardData(base_model=_hub_id(source), base_model_relation=base_relation(edited, precisions),
                         library_name="transformers", tags=tags, model_name=f"{source} (debiased)" if edited else source,
                         eval_results=evals or None)
    folds = {json.dumps(f.get("edit"), sort_keys=True): f for f in cfg.get("folds", [])}
    lines = [f"# {source}: {'debiased export' if edited else 'unmodified baseline export'}", "",
             f"Made by debias-export from `{source}` (family `{family}`)."]
    if edited:
        lines += ["", "## What was edited", ""]
        lines += [f"- {_describe_edit(e, folds.get(json.dumps(e, sort_keys=True)))}" for e in cfg.get("edits", [])]
        if cfg.get("patches"):
            lines.append(f"- {len(cfg['patches'])} patched site(s) run as extra ops "
                         "(`debias_runtime.py`, shipped as remote code); folded edits add no ops.")
    else:
        lines += ["", "No edit: this is the unmodified model exported the same way, for side-by-side comparison."]
    for key in ("recipe", "recipe_name", "seed", "probe_column"):
        if key in provenance:
            lines.append(f"- {key}: `{provenance[key]}`")
    lines += ["", "## Results", ""]
    lines += [f"- {e.metric_name or e.metric_type} ({e.dataset_name}): {e.metric_value}" for e in evals] or \
        ["- (no results recorded)"]
    lines += ["", "## How to load it", "",
              "1. PyTorch / transformers: `debias_export.load_patched(\"hf\")`, or "
              "`AutoModel.from_pretrained(\"hf\", trust_remote_code=True)` (a fully folded or baseline export "
              "is a stock checkpoint: plain `CLIPModel.from_pretrained(\"hf\")`).",
              "2. onnxruntime: `onnxruntime.InferenceSession(\"onnx/vision_model.onnx\")` (also `text_model`; "
              "`_fp16` / `_quantized` variants where exported).",
              "3. transformers.js: `CLIPVisionModelWithProjection.from_pretrained(<this directory>, "
              "{dtype: 'fp32' | 'fp16' | 'q8'})` reads `config.json` and `onnx/` here (`AutoProcessor` / "
              "`AutoTokenizer`: `preprocessor_config.json`, `tokenizer.json`)."
              + (f" The tokenizer {PAD_CONVENTION}; int8 graphs quantize activations with one dynamic scale per "
                 "tensor, padded positions included, so feed them this tokenizer's ids."
                 if (root / "tokenizer.json").is_file() else "")
              if (root / "config.json").is_file() else
              "3. transformers.js: not laid out for it (no `config.json` beside `onnx/` for this family).",
              "", "## Limitations", "",
              "- An edit removes what the probe found on the data it was fitted on; it is not a guarantee of "
              "fairness on other data, and the bias numbers above (if any) are from that run only.",
              "- fp16 / int8 variants keep the edit's own nodes in float32; they were checked against the fp32 "
              "graph on synthetic inputs (embedding and edit-effect cosine), not on real data.",
              "- Random-weight or tiny source models give mechanics, not meaningful fairness results.",
              "", "## Integrity", ""]
    for part in ("hf", "onnx"):
        if (root / part / MANIFEST).is_file():
            lines.append(f"- `{part}/{MANIFEST}` SHA-256 `{sha256_file(root / part / MANIFEST)}`")
    lines.append(f"- `{MANIFEST}` (top level) lists this card; `debias-export verify .` re-hashes everything.")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_card(root: Path, report: dict[str, Any], provenance: dict[str, Any] | None,
               results: Sequence[dict[str, Any]] = ()) -> Path:
    """Write ``root/README.md`` (see :func:`render_card`); returns its path."""
    path = root / CARD
    path.write_text(render_card(root, report, provenance, results), encoding="utf-8")
    return path
