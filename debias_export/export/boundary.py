"""Threshold flips: tell a graph that is right but crossed an SAE threshold by float rounding from a broken one.

An SAE edit is discontinuous: latent ``s`` contributes ``z_s * W_dec[s]`` when ``z_s > threshold`` and nothing
otherwise. onnxruntime and PyTorch compute ``z`` with different kernels (1-ulp differences), so a latent whose
pre-activation sits at its threshold can be active in one and inactive in the other, and the output moves by
that latent's decoder row -- far past any float tolerance (seen: 0.0119 on ViT-B/16's ``last_hidden_state``,
6144 latents). That is a property of the edit, not an export bug, but it must neither pass a broken graph nor
fail a right one, and it must be reported, never hidden.

:func:`explain_flips` runs on a parity miss. It reads the graph's own latent masks (the last ``Greater`` /
``And`` of each edit, :func:`.onnx_names.mask_outputs`) and the reference's masks and pre-activations (forward
hooks on each :class:`~debias_export.runtime.FusedSAEEdit`), then accepts the miss only when both hold:

1. every latent decision that differs is a *boundary* decision: the reference's pre-activation lies within
   :data:`FLIP_MARGIN` x max|z| of the cut (the threshold; for top-k the k-th value or 0);
2. the reference recomputed with the graph's decisions (the same hooks force the graph's mask) matches the
   graph within the ordinary tolerance ``atol + rtol * max|ref|`` on every output.

A graph with a shifted threshold fails 1 (its flips are not at the boundary); any other damage (weights,
ops, a dropped edit) fails 2, or finds no masks to compare. The result (flip count, share of latent
decisions, rows touched, the raw max |diff|) goes into the validation report.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from ..runtime import FusedSAEEdit
from .onnx_names import mask_outputs

# A flipped decision counts as a boundary flip when the reference's pre-activation is within this fraction of
# the largest |pre-activation| of that edit call from the cut. float32 GEMMs over d <= 4096 differ by ~1e-6 of
# that scale between kernels; 1e-4 leaves 100x margin, while a damaged threshold or encoder moves decisions
# that are a sizeable fraction of the scale away from the cut.
FLIP_MARGIN = 1e-4


@contextlib.contextmanager
def sae_hooks(module: nn.Module, hook: Callable[[int, FusedSAEEdit, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Forward hooks on every FusedSAEEdit in ``module``: ``hook(call index, edit, input)`` may return a new output."""
    calls = [0]

    def run(edit: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        i = calls[0]
        calls[0] += 1
        return hook(i, edit, args[0])

    handles = [m.register_forward_hook(run) for m in module.modules() if isinstance(m, FusedSAEEdit)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _boundary_distance(edit: FusedSAEEdit, z: torch.Tensor) -> torch.Tensor:
    """Distance of each pre-activation from the cut that decides it."""
    if edit.topk:
        kth = torch.topk(z, edit.topk, dim=-1).values[..., -1:]
        return torch.minimum((z - kth).abs(), z.abs())
    return (z - edit.threshold).abs()


def _graph_with_masks(path: Path) -> tuple[bytes, list[str]]:
    """The graph serialized with each edit's latent mask added as an output."""
    model = onnx.load(str(path))
    masks = mask_outputs(model)
    for name in masks:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
    return model.SerializeToString(), masks


def explain_flips(module: nn.Module, path: Path, provider: str, inputs: Mapping[str, torch.Tensor],
                  outputs: Sequence[str], atol: float, rtol: float) -> tuple[dict[str, Any] | None, str]:
    """Whether a parity miss of graph ``path`` vs ``module`` on ``inputs`` is explained by boundary flips alone.

    Returns ``(report, "")`` when it is, ``(None, reason)`` when it is not (see the module docstring).
    """
    import onnxruntime as ort  # optional extra ([cpu] / [gpu]): only to run graphs

    try:
        blob, masks = _graph_with_masks(path)
    except (ValueError, OSError) as exc:  # e.g. a graph over protobuf's 2 GB cannot be re-serialized
        return None, f"its latent masks could not be read ({type(exc).__name__})"
    if not masks:
        return None, "the graph has no SAE threshold to have flipped"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(blob, sess_options=opts, providers=[provider])
    fed = {i.name for i in sess.get_inputs()}
    got = sess.run(list(outputs) + masks, {k: v.numpy() for k, v in inputs.items() if k in fed})
    graph_out, graph_masks = got[:len(outputs)], [torch.from_numpy(m) for m in got[len(outputs):]]

    seen: list[tuple[FusedSAEEdit, torch.Tensor, torch.Tensor]] = []

    def record(i: int, edit: FusedSAEEdit, h: torch.Tensor) -> None:
        z = edit.encode(h)
        seen.append((edit, z, edit.active(z)))

    with torch.no_grad(), sae_hooks(module, record):
        module(**inputs)
    if len(seen) != len(graph_masks) or any(m.shape != g.shape for (_, _, m), g in zip(seen, graph_masks)):
        return None, (f"the graph's {len(graph_masks)} latent masks do not match the model's {len(seen)} SAE edits")
    flipped = total = rows = 0
    worst = 0.0
    for (edit, z, mask), gmask in zip(seen, graph_masks):
        diff = mask != gmask
        n = int(diff.sum())
        total += mask.numel()
        if not n:
            continue
        dist = _boundary_distance(edit, z)[diff]
        margin = FLIP_MARGIN * float(z.abs().max())
        worst = max(worst, float(dist.max()) / max(float(z.abs().max()), 1e-30))
        if not float(dist.max()) <= margin:
            far = int((dist > margin).sum())
            return None, (f"{far} of {n} differing latent decisions are not at the threshold (up to "
                          f"{float(dist.max()):.3g} from it, margin {margin:.3g})")
        flipped += n
        rows += int(diff.reshape(-1, diff.shape[-1]).any(dim=-1).sum())
    if not flipped:
        return None, "no latent decision differs, so no threshold flip explains it"

    def force(i: int, edit: FusedSAEEdit, h: torch.Tensor) -> torch.Tensor:
        return edit.combine(h, edit.encode(h), graph_masks[i].to(h.device))

    with torch.no_grad(), sae_hooks(module, force):
        forced = module(**inputs)
    residual = {}
    for name, arr in zip(outputs, graph_out):
        want = forced[name].float()
        d = float((torch.from_numpy(np.asarray(arr)).float() - want).abs().max())
        tol = atol + rtol * float(want.abs().max())
        if not d <= tol:
            return None, (f"with the graph's own latent decisions PyTorch still differs on {name} by {d:.3g} > {tol:.3g}")
        residual[name] = d
    return {"flipped_latents": flipped, "latent_decisions": total, "flipped_share": flipped / total,
            "rows_with_flips": rows, "max_boundary_distance_rel": worst, "margin_rel": FLIP_MARGIN,
            "max_abs_diff_with_graph_decisions": residual}, ""
