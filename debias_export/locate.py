"""Where does bias enter an encoder? Layer-wise logit-lens curves and component attribution.

Layer curves: the residual stream after every block (up to the block the output consumes) is read
out through the tower's own tail -- final norm, pooling and projection, as
:mod:`debias_export.tower_parts` describes per family (a logit lens for encoders). Per layer we
report the held-out linear-probe accuracy of each attribute on those lens embeddings, the share of
their variance explained by the groups, and the bias metric: MaxSkew@k of neutral-prompt retrieval
over the labelled images (image tower: lens image embeddings vs final prompt embeddings; text tower:
lens prompt embeddings vs final image embeddings). Text-tower decodability is measured on labelled
captions ("a photo of a young Black woman", built from the image labels).

Component attribution: each block's update is split into its attention write -- per head where the
attention output projection's input is the concatenation of the heads -- and its MLP write. A
component is scored by ablating the part of its write that lies in the attribute subspace (the span
of the group-mean differences of that write, or of the stream after its block) at every token and
re-running the tower: how much MaxSkew@k and the decodability of the final embeddings change.
Ablation that lowers the bias metric marks the component bias-amplifying; one that raises it,
fairness-reinforcing. Models without a text tower (LLaVA's vision tower feeds a language model)
have no retrieval metric here: their curves report decodability, and components are ranked by it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .adapters import ModelAdapter
from .errors import ConfigError
from .leace import encode_labels, group_mean_differences, orthonormal_basis, probe_accuracy, split_indices
from .tower_parts import FAMILY_PARTS, TowerParts, final_output, register_tower_parts, tower_parts

__all__ = ["FAMILY_PARTS", "TowerParts", "register_tower_parts", "tower_parts", "locate_bias", "run_with_stream",
           "ablation_hooks", "max_skew_at_k", "local_max_skew_at_k", "between_group_ratio", "attribute_components"]


# ----- bias metric ----------------------------------------------------------------------------
def max_skew_at_k(queries: torch.Tensor, items: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of MaxSkew@k for cosine retrieval of ``items`` (groups = class ids per item).

    The project's metric (:func:`debias_export.eval.metrics.retrieval_skew`: target = uniform over
    classes, an absent class counts as 1/k, as in DeBiasLens). 0 means every top-k list is balanced.
    """
    from .eval.metrics import cosine_scores, retrieval_skew

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
            return [mod.register_forward_hook(lambda m, a, out: _project_off(out, Uc))]
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

        return [mod.register_forward_hook(head_hook)]

    return install


# ----- the analysis ---------------------------------------------------------------------------
def _probe(x: torch.Tensor, y: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    tr, te = split
    return probe_accuracy(x[tr], y[tr], x[te], y[te])


def _check_labels(labels: dict[str, Sequence], n: int, what: str) -> None:
    for name, vals in labels.items():
        if len(vals) != n:
            raise ConfigError(f"column {name!r} has {len(vals)} labels for {n} {what}")


def locate_bias(adapter: ModelAdapter, tower: str, image_inputs: dict[str, torch.Tensor],
                labels: dict[str, Sequence], prompts: Sequence[str] = (), column: str | None = None, k: int = 10,
                heads: bool = True, attribution: bool = True, test_fraction: float = 0.3, seed: int = 0,
                batch_size: int = 64, direction: str = "write", progress: Callable[[str], None] | None = None,
                captions: tuple[Sequence[str], dict[str, Sequence]] | None = None) -> dict[str, Any]:
    """Layer curves and component attribution of ``tower`` as a dict, JSON-ready except ``directions``
    (the fair direction tensor and its components, see :func:`fair_direction`; the CLI saves it as safetensors).

    ``image_inputs``: prepared inputs of the labelled images; ``labels``: attribute column -> one
    value per image; ``prompts``: neutral prompts for MaxSkew@k (unused for models without a text
    tower); ``column``: the attribute whose subspace is ablated (default: the first one);
    ``captions``: ``(texts, labels)`` labelled texts for text-tower decodability and attribution.
    """
    if tower not in adapter.towers():
        raise ConfigError(f"model family {adapter.family!r} has no {tower!r} tower (towers: {', '.join(adapter.towers())})")
    if not labels:
        raise ConfigError("locate needs at least one attribute column")
    column = column or next(iter(labels))
    if column not in labels:
        raise ConfigError(f"attribute column {column!r} not among {', '.join(labels)}")
    n = next(iter(image_inputs.values())).shape[0]
    _check_labels(labels, n, "images")
    parts = tower_parts(adapter, tower)
    retrieval = parts.retrieval
    if retrieval and not prompts:
        raise ConfigError("locate needs neutral prompts for the bias metric")
    say = progress or (lambda msg: None)
    ids = {c: encode_labels(v) for c, v in labels.items()}
    split = {c: split_indices(n, test_fraction, seed=seed, labels=y) for c, (y, _) in ids.items()}

    say("capturing the residual stream")
    img_stream, img_emb, img_lens = run_with_stream(adapter, "image", image_inputs, batch_size, with_lens=tower == "image")
    txt_emb = txt_lens = None
    if retrieval:
        _, txt_emb, txt_lens = run_with_stream(adapter, "text", adapter.prepare_texts(list(prompts)), batch_size,
                                               with_lens=tower == "text")
    cap = _caption_set(adapter, captions, labels, test_fraction, seed, batch_size) if tower == "text" and captions else None

    def skew(queries: torch.Tensor, items: torch.Tensor, c: str) -> float | None:
        return max_skew_at_k(queries, items, ids[c][0], k) if retrieval else None

    layers = []
    lens_all = img_lens if tower == "image" else txt_lens
    for layer in range(lens_all.shape[0]):
        row: dict[str, Any] = {"layer": layer, "probe_accuracy": {}, "between_group_ratio": {}, "max_skew": {}}
        for c, (y, _) in ids.items():
            if tower == "image":
                e = img_lens[layer]
                row["probe_accuracy"][c], row["between_group_ratio"][c] = _probe(e, y, split[c]), between_group_ratio(e, y)
                row["max_skew"][c] = skew(txt_emb, e, c)
            else:  # prompts read out at this layer retrieve the final image embeddings
                dec = cap is not None and c in cap["ids"]
                row["probe_accuracy"][c] = _probe(cap["lens"][layer], cap["ids"][c][0], cap["split"][c]) if dec else None
                row["between_group_ratio"][c] = between_group_ratio(cap["lens"][layer], cap["ids"][c][0]) if dec else None
                row["max_skew"][c] = skew(txt_lens[layer], img_emb, c)
        layers.append(row)
    final = {}
    for c, (y, _) in ids.items():
        if tower == "image" or cap is None or c not in cap["ids"]:
            dec = {"probe_accuracy": _probe(img_emb, y, split[c]), "between_group_ratio": between_group_ratio(img_emb, y)}
        else:
            dec = {"probe_accuracy": _probe(cap["final"], cap["ids"][c][0], cap["split"][c]),
                   "between_group_ratio": between_group_ratio(cap["final"], cap["ids"][c][0])}
        final[c] = {**dec, "max_skew": skew(txt_emb, img_emb, c) if retrieval else None}
        if retrieval:  # noise floor of the bias metric: the same retrieval with the labels shuffled
            from .eval.metrics import cosine_scores, shuffled_skew

            floor = shuffled_skew(cosine_scores(txt_emb, img_emb), [str(int(v)) for v in y], min(k, n), shuffles=10, seed=seed)
            final[c]["max_skew_shuffled"] = {"mean": floor["max_skew"], "sd": floor["max_skew_sd"]}
    last = lens_all[-1]
    report: dict[str, Any] = {
        "tower": tower, "family": adapter.family, "column": column, "k": k, "num_images": n,
        "num_prompts": len(prompts) if retrieval else 0, "num_captions": len(cap["texts"]) if cap else 0,
        "bias_metric": "max_skew" if retrieval else "decodability (no text tower: retrieval bias needs the language model)",
        "group_sizes": {c: dict(zip(names, torch.bincount(y, minlength=len(names)).tolist())) for c, (y, names) in ids.items()},
        "chance": {c: float(torch.bincount(y).max()) / n for c, (y, _) in ids.items()},
        "layers": layers, "final": final, "consumed_layer": adapter.consumed_layer(tower),
        # sanity check of the lens: at the consumed block it must reproduce the tower's real output
        "lens_matches_output": bool(torch.allclose(last, img_emb if tower == "image" else txt_emb, atol=1e-4, rtol=1e-4)),
        "metric_impl": "debias_export.eval.metrics.retrieval_skew (MaxSkew@k, uniform target)",
    }
    if not attribution:
        return report
    if tower == "text" and cap is None:
        report["components"] = None
        report["components_note"] = "text-tower attribution needs labelled captions (captions=...)"
        return report
    if tower == "image":
        target = _Target(image_inputs, ids[column][0], split[column], img_stream, txt_emb, None, None)
    else:
        if column not in cap["ids"]:
            raise ConfigError(f"the labelled captions carry no {column!r} labels for text-tower attribution")
        target = _Target(cap["inputs"], cap["ids"][column][0], cap["split"][column], cap["stream"], img_emb,
                         adapter.prepare_texts(list(prompts)), ids[column][0])
    # final[column] holds the edited tower's decodability (images, or captions for the text tower) and the skew
    report["components"] = attribute_components(adapter, tower, target, final[column], k, heads and parts.num_heads > 0,
                                                batch_size, say, direction)
    report["ablation_direction"] = direction
    report["directions"] = fair_direction(report["components"])
    if heads and not parts.num_heads:
        report["components_note"] = f"no per-head split for family {adapter.family!r} (attention output not a Linear over the heads)"
    return report


def _caption_set(adapter: ModelAdapter, captions, image_labels: dict[str, Sequence], test_fraction: float, seed: int,
                 batch_size: int) -> dict[str, Any]:
    texts, cap_labels = list(captions[0]), {c: list(v) for c, v in captions[1].items() if c in image_labels}
    if len(texts) < 4:
        raise ConfigError(f"text-tower locate needs at least 4 labelled captions, got {len(texts)}")
    _check_labels(cap_labels, len(texts), "captions")
    cap_ids = {c: encode_labels(v) for c, v in cap_labels.items()}
    inputs = adapter.prepare_texts(texts)
    stream, final, lens = run_with_stream(adapter, "text", inputs, batch_size, with_lens=True)
    return {"texts": texts, "ids": cap_ids, "inputs": inputs, "stream": stream, "final": final, "lens": lens,
            "split": {c: split_indices(len(texts), test_fraction, seed=seed, labels=y) for c, (y, _) in cap_ids.items()}}


def fair_direction(components: list[dict[str, Any]]) -> dict[str, Any] | None:
    """RES-FAIR's "fair components": the mean write of the fairness-reinforcing components minus that of the
    bias-amplifying ones (whole-layer writes, not heads, so no write is counted twice), a ``[d]`` tensor.

    Pops each row's private ``_mean_write``. ``None`` when either role is empty. :func:`~debias_export.leace.
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
            acc, ratio = _probe(emb, y, target.split), between_group_ratio(emb, y)
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
