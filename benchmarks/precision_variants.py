"""Per-precision table for issue #18: ViT-B/16 image tower (random weights), SAE edits and a folded LEACE edit
exported as fp32 / fp16 / int8 ONNX variants (``export_onnx(precisions=...)``): fidelity vs fp32, edit-effect
cosine, latent agreement (all computed by the export's own validation; for the fold, which has no runtime patch,
by the same :func:`compare_variant` against the unmodified export's variants), the fp32 parity's threshold flips
(:mod:`debias_export.export.boundary`) and the patched / unmodified latency ratio per precision (onnxruntime CPU,
1 thread, batch 1, interleaved paired reps alternating order, median of per-rep ratios).

Run: ``PYTHONPATH=. nice python benchmarks/precision_variants.py [--reps 15]`` -> benchmarks/results/precision-vit-b16/
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from debias_export import DebiasError, SAEEdit, apply_edits
from debias_export.adapters.real_configs import random_clip
from debias_export.edits import current_patch
from debias_export.edits.projection import ProjectionEdit, fold_projection
from debias_export.export import export_onnx
from debias_export.export.onnx_specs import graph_specs
from debias_export.export.quantize import VARIANT_SHAPES, compare_variant, variant_file
from debias_export.workflow.testing import random_sae

PRECISIONS = ["fp32", "fp16", "int8"]
EDITS = {  # name -> site, mode; 96 of 6144 latents zeroed (as tests/test_export_onnx.py's ViT-B/16 bundle)
    "block11-reconstruct": ("image.11", "reconstruct"),
    "block5-reconstruct": ("image.5", "reconstruct"),
    "block5-residual": ("image.5", "residual"),
}
LEACE = "leace-every_writer"  # a rank-1 LEACE eraser at image.11, folded into every writer of the stream


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def paired_ratio(a: ort.InferenceSession, b: ort.InferenceSession, feed: dict, reps: int) -> float:
    for _ in range(2):
        a.run(None, feed), b.run(None, feed)
    ratios = []
    for i in range(reps):  # alternate who goes first, so drift hits both
        order = [(a, "a"), (b, "b")] if i % 2 == 0 else [(b, "b"), (a, "a")]
        t = {}
        for sess, key in order:
            t0 = time.perf_counter()
            sess.run(None, feed)
            t[key] = time.perf_counter() - t0
        ratios.append(t["a"] / t["b"])
    return statistics.median(ratios)


def leace_edit(d: int = 768, n: int = 512) -> ProjectionEdit:
    """A LEACE eraser fitted on synthetic two-class activations (its cost does not depend on what it erases)."""
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 2.0 * torch.randn(2, d, generator=g)[y]
    return ProjectionEdit.fit("image.11", x, y, method="leace")


def fold_checks(adapter, work: Path) -> dict[str, dict]:
    """Variant checks of the folded export vs the unmodified export's variants (what export does for patches)."""
    g = torch.Generator().manual_seed(1)
    spec = graph_specs(adapter, ["image"])[0]
    feeds = [{k: v.numpy() for k, v in spec.example_inputs(adapter, b, s, g).items()} for b, s in VARIANT_SHAPES]
    out = {}
    for prec in PRECISIONS[1:]:
        f = variant_file("vision_model", prec)
        out[prec] = compare_variant(prec, work / LEACE / "vision_model.onnx", work / LEACE / f, feeds, work / "scratch",
                                    work / "base" / "vision_model.onnx", work / "base" / f)
    return out


def row(name: str, prec: str, v: dict, fp32_val: dict, ratio: float, seconds: float) -> dict:
    flips = fp32_val.get("boundary_flips", [])
    return {"edit": name, "precision": prec, "file": variant_file("vision_model", prec),
            "fidelity_cosine_min": v.get("fidelity_cosine_min", 1.0), "edit_cosine_min": v.get("edit_cosine_min"),
            "latents_agree_share": v.get("latents_agree_share"),
            "fp32_parity_max_abs_diff": max(fp32_val.get("max_abs_diff", {"-": 0.0}).values()),
            "fp32_boundary_flips": sum(f["flipped_latents"] for f in flips),
            "fp32_flipped_share_max": max((f["flipped_share"] for f in flips), default=0.0),
            "latency_ratio_b1": round(ratio, 3), "export_seconds": round(seconds, 1)}


def write_results(rows: list[dict], out: Path, reps: int, note: str = "") -> None:
    """``precision.json`` + ``precision.md`` (the table) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps({"model": "arch:clip-vit-base-patch16 (random weights)",
                                                    "sae": "random_sae(768, 6144, seed=1, threshold=0.2), 96 neurons, a=1",
                                                    "ort": ort.__version__, "torch": torch.__version__, "threads": 1,
                                                    "batch": 1, "reps": reps, "note": note, "rows": rows}, indent=2) + "\n")
    fmt = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = ["| edit | precision | fidelity cos (min) | edit cos (min) | latents agree | fp32 parity: flips | "
             "latency ratio (b1) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['edit']} | export refused: {r['error']} | | | | | |" for r in rows if "error" in r]
    lines += [f"| {r['edit']} | {r['precision']} | {fmt(r['fidelity_cosine_min'], 5)} | {fmt(r['edit_cosine_min'], 5)} | "
              f"{fmt(r['latents_agree_share'], 3)} | {r['fp32_boundary_flips']} | {r['latency_ratio_b1']:.3f} |" for r in rows
              if "error" not in r]
    (out / "precision.md").write_text("\n".join(lines) + "\n" + (f"\n{note}\n" if note else ""))
    print("\n".join(lines))


def from_log(log: Path, out: Path, reps: int, note: str) -> None:
    """Re-render the table from the JSON rows a (possibly stopped) run printed, one per line."""
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith('{"edit"')]
    write_results(rows, out, reps, note)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/precision-vit-b16")
    ap.add_argument("--edits", default=",".join([*EDITS, LEACE]), help="Comma-separated subset of the cases.")
    ap.add_argument("--from-log", default=None, help="Only render the rows an earlier run printed to this log.")
    ap.add_argument("--note", default="", help="A line written under the table (e.g. which cases did not run).")
    args = ap.parse_args()
    if args.from_log:
        return from_log(Path(args.from_log), Path(args.out), args.reps, args.note)
    cases = args.edits.split(",")
    torch.set_num_threads(1)
    adapter = random_clip("clip-vit-base-patch16")
    work = Path(tempfile.mkdtemp(prefix="precision-"))
    t0 = time.perf_counter()
    export_onnx(adapter, work / "base", towers=["image"], precisions=PRECISIONS, allow_unpatched=True)
    print(f"base export {time.perf_counter() - t0:.0f}s", flush=True)
    feed = {"pixel_values": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).numpy()}
    rows = []
    for name in cases:
        t0 = time.perf_counter()
        if name == LEACE:
            fold = fold_projection(adapter, leace_edit(), mode="every_writer")
            rep = export_onnx(adapter, work / name, towers=["image"], precisions=PRECISIONS, allow_unpatched=True)
            variants = fold_checks(adapter, work)
            fold.remove()
        else:
            site, mode = EDITS[name]
            handle = apply_edits(adapter, SAEEdit(site=site, sae=random_sae(768, 6144, seed=1, threshold=0.2),
                                                  neurons=list(range(0, 6144, 64)), alpha=1.0, mode=mode))
            try:
                rep = export_onnx(adapter, work / name, towers=["image"], precisions=PRECISIONS)
            except DebiasError as exc:  # a refused export is a result too: record why, go on with the next case
                rows.append({"edit": name, "error": str(exc)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            finally:
                handle.remove()
            assert current_patch(adapter.model) is None or not current_patch(adapter.model).records
            variants = rep["graphs"]["vision_model"].get("variants", {})
        seconds = time.perf_counter() - t0
        val = rep["graphs"]["vision_model"]["validation"]
        for prec in PRECISIONS:
            f = variant_file("vision_model", prec)
            ratio = paired_ratio(session(work / name / f), session(work / "base" / f), feed, args.reps)
            rows.append(row(name, prec, variants.get(prec, {}), val, ratio, seconds))
            print(json.dumps(rows[-1]), flush=True)
    write_results(rows, Path(args.out), args.reps)


if __name__ == "__main__":
    main()
