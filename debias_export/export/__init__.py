"""Export patched models: HF safetensors directory (+ remote code), ONNX graphs, manifests, loading.

``export_bundle`` writes ``DIR/hf`` and ``DIR/onnx`` (both validated) plus ``DIR/export_report.json``
and a top-level ``DIR/manifest.json`` covering everything; ``validate_bundle`` re-checks one.

Machinery: ``hf_dir`` (format + per-family save/load spec), ``safetensors_export`` (writer), ``loading``
(reader + reload check), ``onnx_specs`` (graph specs) + ``onnx_export`` (exporters, validation), ``manifest``.
Each family's specs live in ``families/<family>.py``, imported by name on first use (``registry``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from ..adapters import ModelAdapter
from ..core.errors import DebiasError
from ..edits import current_patch
from .card import write_card
from .hf_dir import HFDirSpec, hf_spec, patch_handle, register_hf_spec, unpatched
from .loading import check_reload, load_patched, read_debias_config
from .manifest import (atomic_output_dir, find_artifacts, recipe_record, stable_report, verify_manifest,
                       write_manifest)
from .onnx_export import (DEFAULT_ATOL, DEFAULT_EXPORTER, DEFAULT_OPSET, DEFAULT_RTOL, EXPORTERS, VALIDATION_SHAPES,
                          check_exporter, check_graph, export_graph, export_onnx, exporter_info, validate_onnx_dir)
from .onnx_specs import GraphSpec, graph_specs, register_onnx_spec
from .quantize import PRECISIONS, parse_precisions
from .safetensors_export import export_folded, export_patched
from .transformers_js import applies as transformers_js_applies
from .transformers_js import write_transformers_js

BUNDLE_REPORT = "export_report.json"

__all__ = ["export_patched", "export_folded", "export_onnx", "load_patched", "export_bundle", "validate_bundle", "verify_manifest",
           "write_manifest", "find_artifacts", "atomic_output_dir", "register_onnx_spec", "register_hf_spec", "GraphSpec",
           "HFDirSpec", "graph_specs", "hf_spec", "patch_handle", "unpatched", "check_graph", "check_reload",
           "validate_onnx_dir", "read_debias_config", "VALIDATION_SHAPES", "export_graph", "EXPORTERS", "DEFAULT_EXPORTER",
           "DEFAULT_OPSET", "DEFAULT_ATOL", "DEFAULT_RTOL", "PRECISIONS", "update_card"]


def export_bundle(adapter: ModelAdapter, out_dir: str | Path, onnx: bool = True, opset: int = DEFAULT_OPSET,
                  atol: float = DEFAULT_ATOL, overwrite: bool = False, provenance: dict[str, Any] | None = None,
                  towers: Sequence[str] | None = None, folds: Sequence[dict[str, Any]] | None = None,
                  exporter: str = DEFAULT_EXPORTER, rtol: float = DEFAULT_RTOL,
                  precisions: Sequence[str] = ("fp32",), card_results: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``out_dir/hf`` (reload checked bit-identical) and ``out_dir/onnx`` (checked within ``atol + rtol * max|ref|``),
    atomically.

    ``folds``: records (:func:`edits.projection.fold_record`) of edits already folded into the weights.
    With no runtime patch left the ``hf`` directory is a stock checkpoint (:func:`export_folded`);
    otherwise the patched export records the folds in its provenance. With neither folds nor a patch the
    unmodified model is exported the same way as a baseline (``"edited": false`` in the manifests).
    ``exporter``: the ONNX exporter (:func:`export_graph`), recorded with opset and torch version in the provenance.
    ``precisions``: ONNX variants to add to fp32 (``fp16``, ``int8``; :mod:`.quantize`), each validated.
    For ``hf_clip`` the bundle root also gets the transformers.js files (:mod:`.transformers_js`: ``config.json``,
    ``preprocessor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``) so it loads as a transformers.js model.
    ``card_results``: extra ``model-index`` entries for the model card ``README.md`` (:mod:`.card`; keys
    ``task_type, dataset_type, dataset_name, metric_type, metric_value`` [, ``metric_name``]), e.g. a
    pipeline's fairness / utility / latency numbers; results known only later go in with :func:`update_card`.
    """
    out_dir = Path(out_dir)
    folds = list(folds or [])
    handle = current_patch(adapter.model)
    patched = bool(handle is not None and handle.records)
    baseline = not folds and not patched
    stock = not patched
    if folds and patched:
        provenance = {**(provenance or {}), "folds": folds}
    if baseline:
        provenance = {**(provenance or {}), "edit": None}
    bundle_provenance = {**(provenance or {}), **recipe_record(provenance)}  # the recipe itself, for `reproduce`
    if onnx:
        check_exporter(exporter, opset)  # before the HF export: a bad choice costs nothing
        precisions = parse_precisions(precisions)
        bundle_provenance = {**bundle_provenance, "onnx": exporter_info(exporter, opset)}
    report: dict[str, Any] = {"out": str(out_dir), "stock": stock, "folds": len(folds), "edited": not baseline}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        t0 = time.perf_counter()
        if stock:
            export_folded(adapter, tmp / "hf", folds, provenance=provenance, validate=True, baseline=baseline)
        else:
            export_patched(adapter, tmp / "hf", provenance=provenance, validate=True)
        report["hf"] = {"seconds": round(time.perf_counter() - t0, 2), "reload_identical": True,
                        "size_bytes": sum(p.stat().st_size for p in (tmp / "hf").iterdir() if p.is_file())}
        if onnx:
            t0 = time.perf_counter()
            report["onnx"] = export_onnx(adapter, tmp / "onnx", towers=towers, opset=opset, atol=atol, rtol=rtol,
                                         provenance=provenance, allow_unpatched=stock, exporter=exporter,
                                         precisions=precisions)
            report["onnx"]["seconds"] = round(time.perf_counter() - t0, 2)
            if transformers_js_applies(adapter) and report["onnx"].get("graphs"):
                # config.json / preprocessor / tokenizer beside onnx/: the bundle root is a transformers.js model folder
                report["transformers_js"] = {"files": write_transformers_js(adapter, tmp, tmp / "hf" / "config.json",
                                                                            report["onnx"]["graphs"])}
        (tmp / BUNDLE_REPORT).write_text(json.dumps(stable_report(report), indent=2, sort_keys=True, default=str) + "\n")
        write_card(tmp, report, bundle_provenance, card_results)
        write_manifest(tmp, kind="bundle", provenance=bundle_provenance, extra={"edited": not baseline})
    return report


def update_card(path: str | Path, results: Sequence[dict[str, Any]]) -> Path:
    """Re-write an export bundle's model card with ``results`` (e.g. eval run after the export) and its
    top-level manifest to match; the bundle is verified first. Returns the card's path."""
    path = Path(path)
    manifest = verify_manifest(path)
    if manifest.get("kind") != "bundle":
        raise DebiasError(f"{path} is not an export bundle (manifest kind {manifest.get('kind')!r})")
    report = json.loads((path / BUNDLE_REPORT).read_text())
    card = write_card(path, report, manifest.get("provenance"), results)
    extra = {k: v for k, v in manifest.items() if k not in ("format", "kind", "files", "versions", "provenance")}
    write_manifest(path, kind="bundle", provenance=manifest.get("provenance"), extra=extra)
    return card


def validate_bundle(path: str | Path, atol: float = DEFAULT_ATOL, seed: int = 0,
                    shapes: Sequence[tuple[int, int]] = ((1, 9), (4, 13)), rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    """Verify manifests, load ``hf`` with :func:`load_patched`, compare ``onnx`` graphs on fresh shapes/inputs.

    Default shapes differ from both the export trace (2, 7) and export-time validation (1, 5), (3, 11).
    """
    path = Path(path)
    for artifact in find_artifacts(path):
        verify_manifest(artifact)
    hf_dir = path if (path / "debias_config.json").is_file() else path / "hf"
    onnx_dir = path / "onnx"
    if not (hf_dir / "debias_config.json").is_file():
        raise DebiasError(f"{path} has no exported HF model (hf/debias_config.json) to validate against")
    adapter = load_patched(hf_dir, verify=False)  # manifests were verified above
    report: dict[str, Any] = {"hf": str(hf_dir), "seed": seed}
    if onnx_dir.is_dir():
        report["onnx"] = validate_onnx_dir(onnx_dir, adapter, atol=atol, shapes=shapes, seed=seed, rtol=rtol)
    return report
