"""Precision variants of an exported graph (fp16, int8) that keep the edit, and their two-way validation.

Names follow the transformers.js / optimum convention, so ``onnx/`` loads with ``dtype``: ``fp32`` ->
``vision_model.onnx``, ``fp16`` -> ``vision_model_fp16.onnx``, ``int8`` (transformers.js ``q8``) ->
``vision_model_quantized.onnx``.

- fp16: onnxruntime's own float16 converter (``onnxruntime.transformers.float16``, shipped with onnxruntime:
  no extra dependency), inputs/outputs kept float32 so callers feed the same arrays; the edit's nodes are
  blocked (they stay float32 behind casts), so its threshold compare runs at full precision.
- int8: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, per-row dynamic uint8 activations) with
  every node of the edit excluded: quantizing an SAE encoder moves its threshold compare and flips latents
  (issue #18 measured an effect cosine of 0.52-0.95), while the edit's matrices are small next to the tower's.

The edit's nodes are found by name: the exporter names them after their module (``.../debias_edit/...``,
see :func:`.onnx_export._strip_trace_metadata`). Each variant is then checked twice
(:func:`compare_variant`): its embeddings against its own fp32 export (cosine per input), and the edit itself
-- the edit's effect (patched minus unmodified output) against the fp32 effect (cosine per input, >= 0.99)
and the share of inputs whose active edit latents (the SAE's threshold / top-k mask) agree exactly.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from ..core.errors import ConfigError, ValidationError
from .onnx_names import edit_nodes, mask_outputs

PRECISIONS = ("fp32", "fp16", "int8")
SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_quantized"}
# Variants fail the export below these. Embedding fidelity (per-input cosine vs the variant's own fp32 export):
# fp16 keeps ~3 decimal digits per op; int8 weights cost more and random-weight towers are its worst case
# (no outlier structure for the per-tensor scales to exploit), hence the lower floor. The edit's effect
# must keep its direction (cosine >= 0.99, the bar issue #18 sets) in every variant.
MIN_FIDELITY = {"fp16": 0.999, "int8": 0.95}
MIN_EDIT_COSINE = 0.99
# Inputs whose fp32 edit effect is below this fraction of the output's norm carry no edit to compare.
_EFFECT_FLOOR = 1e-4
# Inputs the variants are compared on: more rows than parity validation, since the edit's latents flip input
# by input (the share of inputs whose latents agree is a reported number).
VARIANT_SHAPES: tuple[tuple[int, int], ...] = ((8, 9), (8, 16))


def parse_precisions(value: str | Sequence[str]) -> list[str]:
    """``"fp32,fp16,int8"`` -> ordered, de-duplicated list with fp32 first (the reference every variant needs)."""
    items = [p.strip() for p in (value.split(",") if isinstance(value, str) else value) if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if bad:
        raise ConfigError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p == "fp32" or p in items]


def variant_file(graph: str, precision: str) -> str:
    """File name of a graph's variant: ``vision_model_fp16.onnx``."""
    return f"{graph}{SUFFIX[precision]}.onnx"


def _quiet():
    for name in ("onnxruntime", "onnxruntime.quantization", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def convert(src: Path, dst: Path, precision: str) -> dict[str, Any]:
    """Write the ``precision`` variant of the fp32 graph ``src`` to ``dst``; returns what was kept in fp32."""
    model = onnx.load(str(src))
    keep = edit_nodes(model)
    _quiet()
    if precision == "fp16":
        # shipped with onnxruntime (no extra dependency); imported here because it pulls in onnxruntime's
        # transformer tooling, which only this conversion needs
        from onnxruntime.transformers.float16 import convert_float_to_float16

        out = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
        onnx.save(out, str(dst))
    elif precision == "int8":
        # onnxruntime's quantizer, imported on use (it loads sympy and its calibration machinery)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # the quantizer re-runs onnx shape inference, which trips over the exporter's own intermediate
        # value_info (dynamo records shapes from its symbolic trace); drop it and let inference redo it
        del model.graph.value_info[:]
        pre = dst.with_name(dst.name + ".pre")
        onnx.save(model, str(pre))
        try:
            # MatMul / Gemm only: onnxruntime's CPU provider has no ConvInteger kernel (the patch embedding)
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                             op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            pre.unlink(missing_ok=True)
    else:
        raise ConfigError(f"no conversion to {precision!r}; variants are {', '.join(PRECISIONS[1:])}")
    return {"kept_fp32_nodes": len(keep)}


def _with_masks(path: Path, scratch: Path) -> tuple[Path, int]:
    """A copy of ``path`` that also outputs the edit's latent masks (for :func:`compare_variant`)."""
    model = onnx.load(str(path))
    masks = mask_outputs(model)
    for name in masks:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
    out = scratch / f"masks_{path.name}"
    onnx.save(model, str(out))
    return out, len(masks)


def _run(path: Path, feeds: list[dict[str, np.ndarray]], n_masks: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    import onnxruntime as ort  # optional extra ([cpu] / [gpu]): only to run graphs

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    embed = next(n for n in names if n.endswith("_embeds"))
    wanted = [embed] + names[len(names) - n_masks:] if n_masks else [embed]
    fed = {i.name for i in sess.get_inputs()}
    out = []
    for feed in feeds:
        res = sess.run(wanted, {k: v for k, v in feed.items() if k in fed})
        out.append((res[0].astype(np.float64), [m.reshape(m.shape[0], -1) for m in res[1:]]))
    return out


def _row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def compare_variant(precision: str, fp32: Path, variant: Path, feeds: list[dict[str, np.ndarray]], scratch: Path,
                    base_fp32: Path | None = None, base_variant: Path | None = None,
                    min_fidelity: float | None = None, min_edit_cosine: float = MIN_EDIT_COSINE) -> dict[str, Any]:
    """Check a variant against its fp32 export on ``feeds``; ValidationError when it loses fidelity or the edit.

    ``base_fp32`` / ``base_variant``: the same graph without the edit, in fp32 and converted the same way;
    with them the edit's effect (patched - unmodified embedding) is compared per input, else (an unedited
    export, or edits folded into the weights) only fidelity and the latent masks are checked.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    ref_path, n_masks = _with_masks(fp32, scratch)
    var_path, n_var = _with_masks(variant, scratch)
    if n_var != n_masks:
        raise ValidationError(f"{variant.name} lost the edit's latent masks ({n_var} of {n_masks})")
    ref, got = _run(ref_path, feeds, n_masks), _run(var_path, feeds, n_masks)
    cos = np.concatenate([_row_cos(r[0], g[0]) for r, g in zip(ref, got)])
    floor = MIN_FIDELITY.get(precision, 0.999) if min_fidelity is None else min_fidelity
    report: dict[str, Any] = {"precision": precision, "file": variant.name, "inputs": int(cos.size),
                              "fidelity_cosine_min": float(cos.min()), "fidelity_cosine_mean": float(cos.mean()),
                              "min_fidelity": floor}
    if n_masks:
        agree = np.concatenate([_rows_agree(r[1], g[1]) for r, g in zip(ref, got)])
        entries = np.mean([float(np.mean(np.concatenate([(a == b).ravel() for a, b in zip(r[1], g[1])])))
                           for r, g in zip(ref, got)])
        report["latents_agree_share"] = float(agree.mean())
        report["latent_entries_agree"] = float(entries)
    if not cos.min() >= floor:  # NaN fails too
        raise ValidationError(f"{variant.name}: embedding cosine vs its fp32 export is {cos.min():.4f} < {floor} "
                              f"on at least one input; the {precision} variant is not faithful")
    if base_fp32 is not None and base_variant is not None:
        b32, bv = _run(base_fp32, feeds, 0), _run(base_variant, feeds, 0)
        effect_cos = []
        for r, g, b, v in zip(ref, got, b32, bv):
            e32, ev = r[0] - b[0], g[0] - v[0]
            norm = np.linalg.norm(e32.reshape(len(e32), -1), axis=1)
            keep = norm > _EFFECT_FLOOR * np.linalg.norm(r[0].reshape(len(r[0]), -1), axis=1)
            if keep.any():  # an edit whose latents stay inactive on every input has no effect to compare
                effect_cos.extend(_row_cos(ev[keep], e32[keep]).tolist())
        report["edit_inputs"] = len(effect_cos)
        if effect_cos:
            report["edit_cosine_min"] = float(min(effect_cos))
            report["edit_cosine_mean"] = float(np.mean(effect_cos))
            report["min_edit_cosine"] = min_edit_cosine
            if not min(effect_cos) >= min_edit_cosine:
                raise ValidationError(f"{variant.name}: the edit's effect (patched - unmodified) has cosine "
                                      f"{min(effect_cos):.4f} < {min_edit_cosine} vs fp32 on at least one input; "
                                      f"the {precision} variant does not keep the edit")
    return report


def _rows_agree(ref: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray:
    """Per input row: every edit's latent mask identical."""
    rows = np.ones(ref[0].shape[0], dtype=bool)
    for a, b in zip(ref, got):
        rows &= (a == b).all(axis=1)
    return rows


def write_variants(fp32: Path, out: Path, precisions: Sequence[str], feeds: list[dict[str, np.ndarray]],
                   export_unmodified: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write ``out/<graph>{_fp16,_quantized}.onnx`` from the validated fp32 graph and check each on ``feeds``.

    ``export_unmodified(path)``: writes the same graph without the edit (a live patch only); it goes to a
    scratch dir (removed after), is converted the same way, and lets each variant's edit effect be compared
    with the fp32 one. Raises :class:`ValidationError` (see :func:`compare_variant`); the caller's atomic
    output dir then leaves nothing behind.
    """
    scratch = out / ".variants"
    scratch.mkdir()
    graph = fp32.name.removesuffix(".onnx")
    try:
        base32 = None
        if export_unmodified is not None:
            base32 = scratch / f"{graph}_base.onnx"
            export_unmodified(base32)
        result = {}
        for precision in precisions:
            dst = out / variant_file(graph, precision)
            entry = convert(fp32, dst, precision)
            base_v = None
            if base32 is not None:
                base_v = scratch / variant_file(f"{graph}_base", precision)
                convert(base32, base_v, precision)
            entry.update(compare_variant(precision, fp32, dst, feeds, scratch, base32, base_v))
            entry["size_bytes"] = dst.stat().st_size
            result[precision] = entry
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
