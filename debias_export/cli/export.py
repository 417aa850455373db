"""``debias-export export``: patch a model with saved edits and export it (HF safetensors dir + ONNX), validated."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.choices import ONNX_EXPORTERS
from ..core.errors import DebiasError
from ..core.model_match import allow_mismatch as mismatch_allowed
from .common import allow_mismatch_option, load_model_spec, model_option


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@click.command("export")
@model_option
@click.option("--edit", "edit_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Edit folder (repeatable; edits are applied together). None: export the unmodified baseline.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output dir (gets hf/ and onnx/).")
@click.option("--onnx/--no-onnx", default=True, show_default=True, help="Also export and validate ONNX graphs.")
@click.option("--tower", "towers", multiple=True, help="Only these towers in ONNX (default: all).")
@click.option("--exporter", default="dynamo", show_default=True, type=click.Choice(ONNX_EXPORTERS),
              help="ONNX exporter: torch.export-based (dynamo), the legacy TorchScript tracer, or optimum-onnx (if installed).")
@click.option("--opset", default=20, show_default=True, type=int)
@click.option("--atol", default=1e-4, show_default=True, type=float,
              help="ONNX vs PyTorch tolerance: an output passes within atol + rtol * max|PyTorch output|.")
@click.option("--rtol", default=1e-5, show_default=True, type=float, help="Relative part of the ONNX tolerance (see --atol).")
@click.option("--precision", "precision", default="fp32", show_default=True,
              help="ONNX precisions, comma-separated: fp32,fp16,int8 -> onnx/<graph>.onnx, <graph>_fp16.onnx, "
                   "<graph>_quantized.onnx (transformers.js names); each variant is validated on the edit.")
@click.option("--provenance", "provenance_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON file merged into the recorded provenance (recipe, seed, ...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only once the new export is complete).")
@allow_mismatch_option
def export(model_spec, edit_dirs, out_dir, onnx, towers, exporter, opset, atol, rtol, precision, provenance_file,
           overwrite, allow_mismatch):
    """Write OUT/hf (original weights + fused edits + remote code) and OUT/onnx, both validated.

    Projection edits saved with a fold mode (`debias-export project --fold ...`) are folded into the
    weights instead; when every edit folds, OUT/hf is a plain checkpoint (stock `from_pretrained`).
    Without --edit the unmodified model is exported the same way (the manifests say "edited": false).
    """
    from ..edits import load_edit
    from ..edits.install import install_edits
    from ..export import check_exporter, export_bundle
    from ..export.quantize import parse_precisions
    from .common import refuse_existing

    refuse_existing(Path(out_dir), overwrite)  # before the (slow) model load
    precisions = parse_precisions(precision)
    if onnx:
        check_exporter(exporter, opset)
    provenance = {"model": model_spec, "edit_dirs": [str(Path(d).resolve()) for d in edit_dirs]}
    if provenance_file:
        try:
            extra = json.loads(Path(provenance_file).read_text())
        except ValueError as exc:
            raise DebiasError(f"--provenance {provenance_file} is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise DebiasError(f"--provenance {provenance_file} must hold a JSON object, got {type(extra).__name__}")
        provenance.update(extra)
    adapter = load_model_spec(model_spec)
    edits = [load_edit(d) for d in edit_dirs]
    # projection edits that record a fold mode go into the weights first (folding refuses patched
    # modules); the rest are patched as fused modules. All folded -> a stock checkpoint.
    folds = []
    if edits:  # none: the unmodified baseline
        with mismatch_allowed(allow_mismatch):  # each edit's recorded model / site against this model
            folds = install_edits(adapter, edits).fold_records()
    report = export_bundle(adapter, out_dir, onnx=onnx, opset=opset, atol=atol, rtol=rtol, overwrite=overwrite,
                           provenance=provenance, towers=list(towers) or None, folds=folds, exporter=exporter,
                           precisions=precisions)
    kind = ("unmodified baseline, no edit" if not report["edited"] else
            "stock checkpoint, edits folded into the weights" if report["stock"] else "reload bit-identical")
    parts = [f"hf {_mb(report['hf']['size_bytes'])} ({kind})"]
    for name, g in report.get("onnx", {}).get("graphs", {}).items():
        diff = max(g["validation"]["max_abs_diff"].values())
        flips = sum(f["flipped_latents"] for f in g["validation"].get("boundary_flips", []))
        flipped = f" ({flips} SAE latents flipped at their threshold, explained)" if flips else ""  # never hidden
        parts.append(f"{name}.onnx {_mb(sum(g['size_bytes'].values()))} max|diff| {diff:.2g}{flipped}")
        for prec, v in g.get("variants", {}).items():
            edit = f", edit cosine {v['edit_cosine_min']:.4f}" if "edit_cosine_min" in v else ""
            parts.append(f"{v['file']} {_mb(v['size_bytes'])} cosine {v['fidelity_cosine_min']:.4f}{edit}")
    if report.get("transformers_js"):
        parts.append("transformers.js layout (" + ", ".join(report["transformers_js"]["files"]) + ")")
    click.echo(f"exported {out_dir}: " + ", ".join(parts) + (f" ({exporter} exporter, opset {opset}, atol {atol:g}, rtol {rtol:g})" if onnx else ""))
    click.echo(f"next: debias-export validate {out_dir} --seed 0   (then: debias-export verify {out_dir})")
