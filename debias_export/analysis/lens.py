"""The logit lens for encoders: forward passes that read every block's stream through the tower's tail,
and the retrieval-bias / separation metrics that ``locate`` and attribution score them with."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..adapters import ModelAdapter
from ..adapters.anatomy import final_output, tower_parts
from .leace import probe_accuracy
from .metrics import cosine_scores, retrieval_skew


# ----- bias metric ----------------------------------------------------------------------------
def max_skew_at_k(queries: torch.Tensor, items: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of MaxSkew@k for cosine retrieval of ``items`` (groups = class ids per item).

    The project's metric (:func:`debias_export.analysis.metrics.retrieval_skew`: target = uniform over
    classes, an absent class counts as 1/k, as in DeBiasLens). 0 means every top-k list is balanced.
    """
    k = min(int(k), items.shape[0])
    return float(retrieval_skew(cosine_scores(queries, items), [str(int(g)) for g in groups], k)["max_skew"])


def local_max_skew_at_k(queries: torch.Tensor, items: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """Self-contained MaxSkew@k: ``max_c ln(p_c * |C|)`` per query with ``p_c = count_c / k`` (0 -> 1/k).

    An independent implementation the tests hold the shared metric against."""
    q = torch.nn.functional.normalize(queries.double(), dim=-1)
    it = torch.nn.functional.normalize(items.double(), dim=-1)
    k = min(int(k), it.shape[0])
    top = (q @ it.T).topk(k, dim=-1).indices  # [Q, k]
    present = torch.bincount(groups) > 0
    counts = torch.nn.functional.one_hot(groups[top], len(present)).sum(1).double()[:, present] / k
    counts = torch.where(counts == 0, torch.full_like(counts, 1.0 / k), counts)
    return float(torch.log(counts * int(present.sum())).max(dim=-1).values.mean())


def between_group_ratio(x: torch.Tensor, groups: torch.Tensor) -> float:
    """Share of the (unit-normalised) embeddings' variance explained by group means, in [0, 1].

    A continuous decodability measure next to the probe accuracy, which moves in steps of 1/n_test.
    """
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    total = ((xn - xn.mean(0)) ** 2).sum()
    between = sum(int((groups == g).sum()) * ((xn[groups == g].mean(0) - xn.mean(0)) ** 2).sum() for g in groups.unique())
    return float(between / total.clamp_min(1e-300))


# ----- forward passes --------------------------------------------------------------------------
def _batches(inputs: dict[str, torch.Tensor], batch_size: int, adapter: ModelAdapter):
    """Slices of the inputs, moved to the model's device (floating inputs also to its dtype)."""
    n = next(iter(inputs.values())).shape[0]
    ref = next(adapter.model.parameters())
    for lo in range(0, n, batch_size):
        batch = {k: v[lo:lo + batch_size] for k, v in inputs.items()}
        yield {k: v.to(ref.device, ref.dtype) if v.is_floating_point() else v.to(ref.device) for k, v in batch.items()}


def _layers(adapter: ModelAdapter, tower: str) -> range:
    return range(adapter.consumed_layer(tower) + 1)


@torch.no_grad()
def run_with_stream(adapter: ModelAdapter, tower: str, inputs: dict[str, torch.Tensor], batch_size: int = 64,
                    ablate: Callable[[ModelAdapter], list] | None = None, with_lens: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pooled stream after every consumed block ``[L, n, d]``, final outputs ``[n, p]`` and, with
    ``with_lens``, the lens read-out of every block ``[L, n, p]``.

    ``ablate(adapter)`` may install forward hooks (returning their handles) for the duration.
    """
    parts = tower_parts(adapter, tower)
    blocks = adapter.blocks(tower)
    layers = _layers(adapter, tower)
    streams: list[list[torch.Tensor]] = [[] for _ in layers]
    lenses: list[list[torch.Tensor]] = [[] for _ in layers]
    finals = []
    state: dict[str, Any] = {}

    def grab(i: int):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            streams[i].append(parts.pool(h, state["batch"]).float().cpu())
            if with_lens:
                lenses[i].append(parts.readout(h, state["batch"]).float().cpu())
        return hook

    handles = list(ablate(adapter)) if ablate is not None else []
    hs = [blocks[i].register_forward_hook(grab(i)) for i in layers]
    try:
        for batch in _batches(inputs, batch_size, adapter):
            state["batch"] = batch
            finals.append(final_output(adapter, tower, batch).float().cpu())
    finally:
        for h in hs + handles:
            h.remove()
    lens = torch.stack([torch.cat(x) for x in lenses]) if with_lens else None
    return torch.stack([torch.cat(s) for s in streams]), torch.cat(finals), lens


def probe_split(x: torch.Tensor, y: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Held-out accuracy of a linear probe trained on ``split[0]`` rows, tested on ``split[1]``."""
    tr, te = split
    return probe_accuracy(x[tr], y[tr], x[te], y[te])
