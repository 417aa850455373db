"""Component attribution: ablate the attribute component of each residual write and score the change.

Each block's update is split into its attention write (per head where the out-projection's input is the
concatenation of the heads) and its MLP write; ablating the write's component in the attribute subspace
at every token and re-running the tower shows how much bias (MaxSkew@k) and decodability it carries.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..adapters import ModelAdapter
from ..adapters.anatomy import tower_parts
from ..core.errors import ConfigError
from .leace import group_mean_differences, orthonormal_basis
from .lens import _batches, _layers, between_group_ratio, max_skew_at_k, probe_split, run_with_stream


def _project_off(x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    return x - (x @ U) @ U.T


def ablation_hooks(tower: str, layer: int, component: str, U: torch.Tensor) -> Callable[[ModelAdapter], list]:
    """Hooks removing the ``U`` (orthonormal ``[d, r]``) component of one write: ``attn``, ``mlp`` or ``head<h>``."""

    def install(adapter: ModelAdapter) -> list:
        parts = tower_parts(adapter, tower)
        block = adapter.blocks(tower)[layer]
        ref = next(block.parameters())
        Uc = U.to(device=ref.device, dtype=ref.dtype)
        if component in ("attn", "mlp"):
            mod = block.get_submodule(parts.attn_hook if component == "attn" else parts.mlp_hook)
            return [mod.register_forward_hook(lambda m, a, out: _project_off(out, Uc), prepend=True)]
        if not parts.num_heads:
            raise ConfigError(f"family {adapter.family!r} {tower} tower has no per-head split of its attention write")
        mod = block.get_submodule(parts.attn_out)
        h = int(component[4:])
        dh = mod.in_features // parts.num_heads
        sl = slice(h * dh, (h + 1) * dh)

        def head_hook(m, args, out):
            # out_proj is linear in the concatenated heads: head h's write is x_h @ W[:, h]^T
            write = args[0][..., sl] @ m.weight[:, sl].T
            return out - (write @ Uc) @ Uc.T

        return [mod.register_forward_hook(head_hook, prepend=True)]  # edit before any reader hook

    return install


def fair_direction(components: list[dict[str, Any]]) -> dict[str, Any] | None:
    """RES-FAIR's "fair components": the mean write of the fairness-reinforcing components minus that of the
    bias-amplifying ones (whole-layer writes, not heads, so no write is counted twice), a ``[d]`` tensor.

    Pops each row's private ``_mean_write``. ``None`` when either role is empty. :func:`~debias_export.analysis.leace.
    fair_directions` orthogonalises it against a bias subspace before a projection edit amplifies it.
    """
    whole = [r for r in components if r["kind"] in ("attn", "mlp")]
    writes = {r["component"]: r.pop("_mean_write") for r in components}
    fair = [r["component"] for r in whole if r["role"] == "fairness-reinforcing"]
    bias = [r["component"] for r in whole if r["role"] == "bias-amplifying"]
    if not fair or not bias:
        return None
    vec = torch.stack([writes[c] for c in fair]).mean(0) - torch.stack([writes[c] for c in bias]).mean(0)
    return {"fair": vec.float(), "fair_components": fair, "bias_components": bias}


class _Target:
    """What attribution ablates and measures: the labelled inputs of the edited tower (``inputs``,
    ``y``, probe ``split``, their pooled ``stream``), the other tower's final embeddings
    (``other``), and for the text tower the neutral prompts (``prompts``) plus the image groups."""

    def __init__(self, inputs, y, split, stream, other, prompts, image_y):
        self.inputs, self.y, self.split, self.stream = inputs, y, split, stream
        self.other, self.prompts, self.image_y = other, prompts, image_y


@torch.no_grad()
def component_write_means(adapter: ModelAdapter, tower: str, inputs: dict[str, torch.Tensor], y: torch.Tensor,
                          heads: bool, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per-group mean of every write (``L<l>.attn``, ``L<l>.head<h>``, ``L<l>.mlp``) at the pooled position(s).

    Accumulated as per-group sums, so memory is ``groups x d`` per component, not ``n x d``.
    """
    parts = tower_parts(adapter, tower)
    num = int(y.max()) + 1
    sums: dict[str, torch.Tensor] = {}
    counts = torch.bincount(y, minlength=num).double()
    state: dict[str, Any] = {}

    def add(name: str, w: torch.Tensor) -> None:
        w = parts.pool(w, state["batch"]).double().cpu()
        sums.setdefault(name, torch.zeros(num, w.shape[-1], dtype=torch.float64)).index_add_(0, state["y"], w)

    def head_hook(layer):
        def hook(m, args, out):
            dh = m.in_features // parts.num_heads
            for h in range(parts.num_heads):
                sl = slice(h * dh, (h + 1) * dh)
                add(f"L{layer}.head{h}", args[0][..., sl] @ m.weight[:, sl].T)
        return hook

    handles = []
    for layer in _layers(adapter, tower):
        block = adapter.blocks(tower)[layer]
        handles.append(block.get_submodule(parts.attn_hook).register_forward_hook(
            lambda m, a, out, layer=layer: add(f"L{layer}.attn", out)))
        handles.append(block.get_submodule(parts.mlp_hook).register_forward_hook(
            lambda m, a, out, layer=layer: add(f"L{layer}.mlp", out)))
        if heads:
            handles.append(block.get_submodule(parts.attn_out).register_forward_hook(head_hook(layer)))
    try:
        lo = 0
        for batch in _batches(inputs, batch_size, adapter):
            rows = next(iter(batch.values())).shape[0]
            state.update(batch=batch, y=y[lo:lo + rows])
            lo += rows
            adapter.embed(tower, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: acc / counts.clamp_min(1)[:, None] for name, acc in sums.items()}


def attribute_components(adapter: ModelAdapter, tower: str, target: _Target, baseline: dict[str, float], k: int,
                         heads: bool, batch_size: int, say: Callable[[str], None], direction: str = "write"
                         ) -> list[dict[str, Any]]:
    """Ablate each write's attribute-subspace component; rank by the drop in the bias metric.

    ``direction="write"``: the subspace is spanned by the group-mean differences of that write itself
    (removes exactly the component's group-dependent mean at the pooled position); ``"stream"``: by
    those of the residual stream after its block (one subspace shared by the block's components).
    """
    if direction not in ("write", "stream"):
        raise ConfigError(f"unknown ablation direction {direction!r}; expected 'write' or 'stream'")
    parts = tower_parts(adapter, tower)
    names = ["attn", "mlp"] + ([f"head{h}" for h in range(parts.num_heads)] if heads else [])
    y = target.y
    means = component_write_means(adapter, tower, target.inputs, y, heads, batch_size)
    p = torch.bincount(y).double() / len(y)
    retrieval = parts.retrieval
    rows = []
    for layer in _layers(adapter, tower):
        U_stream = orthonormal_basis(group_mean_differences(target.stream[layer], y)).float()
        for comp in names:
            if direction == "write":
                m = means[f"L{layer}.{comp}"]
                U = orthonormal_basis((m - p @ m).T).float()
            else:
                U = U_stream
            say(f"ablating {tower} layer {layer} {comp}")
            hooks = ablation_hooks(tower, layer, comp, U)
            _, emb, _ = run_with_stream(adapter, tower, target.inputs, batch_size, ablate=hooks)
            skew = None
            if retrieval and tower == "image":
                skew = max_skew_at_k(target.other, emb, y, k)
            elif retrieval:
                _, prompt_emb, _ = run_with_stream(adapter, tower, target.prompts, batch_size, ablate=hooks)
                skew = max_skew_at_k(prompt_emb, target.other, target.image_y, k)
            acc, ratio = probe_split(emb, y, target.split), between_group_ratio(emb, y)
            rows.append({"component": f"L{layer}.{comp}", "layer": layer, "kind": comp,
                         "max_skew": skew, "probe_accuracy": acc, "between_group_ratio": ratio,
                         "bias_effect": None if skew is None else baseline["max_skew"] - skew,  # > 0: the write adds skew
                         "decodability_effect": baseline["probe_accuracy"] - acc,
                         "separation_effect": baseline["between_group_ratio"] - ratio})
    for r in rows:
        e, tol = (r["bias_effect"], 1e-3) if retrieval else (r["separation_effect"], 1e-4)
        r["role"] = "bias-amplifying" if e > tol else "fairness-reinforcing" if e < -tol else "neutral"
    # every component's mean write over all inputs (group means weighted by group size): the fair direction's parts
    for r in rows:
        r["_mean_write"] = p @ means[r["component"]]
    # decodability rank: probe accuracy drop, ties (it moves in 1/n_test steps) broken by the separation drop
    ranks = [(("decodability_effect", "separation_effect"), "rank_decodability")]
    ranks.append(((("bias_effect",) if retrieval else ("separation_effect", "decodability_effect")), "rank"))
    for key, name in ranks:
        rows.sort(key=lambda r: tuple(-r[f] for f in key))
        for rank, r in enumerate(rows, 1):
            r[name] = rank
    return rows
