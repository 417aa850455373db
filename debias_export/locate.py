"""Where does bias enter an encoder? Layer-wise logit-lens curves and component attribution.

Layer curves: the residual stream after every block, at the tower's output position, is read out
through the tower's own final norm and projection (a logit lens for encoders). Per layer we report
the held-out linear-probe accuracy of each attribute on those lens embeddings and the bias metric
of the embeddings (MaxSkew@k of neutral-prompt retrieval over the labelled images).

Component attribution: each block's update is split into its attention write -- per head, since
the attention output projection's input is the concatenation of the heads -- and its MLP write.
A component is scored by ablating the part of its write that lies in the attribute subspace (the
span of the group-mean differences of the stream after that block) at every token and re-running
the tower: how much MaxSkew@k and held-out decodability of the final embeddings change. Ablation
that lowers the bias metric marks the component bias-amplifying; one that raises it, fairness-
reinforcing.

Family-specific pieces live in one table, :data:`FAMILY_PARTS` (``register_tower_parts``). What each
family needs (only ``hf_clip`` is implemented here):

- ``hf_clip``: image ``vision_model.post_layernorm`` + ``visual_projection`` on CLS; text
  ``text_model.final_layer_norm`` + ``text_projection`` at EOS; writers ``self_attn.out_proj``
  (input = concatenated heads) and ``mlp.fc2``; text embedding writers ``token_embedding`` /
  ``position_embedding``; the vision stream starts at ``pre_layrnorm`` (not foldable).
- ``open_clip``: ``visual.ln_post`` + the ``visual.proj`` *Parameter* (``x @ proj``, not a Linear,
  so ``lens`` must matmul and folding must edit the parameter), pooling per ``pool_type``; text
  ``ln_final`` + ``text_projection`` parameter at the argmax/EOS token; writers ``attn.out_proj``
  (used functionally by ``nn.MultiheadAttention`` -- its weight can still be folded) and
  ``mlp.c_proj``; ``ls_1``/``ls_2`` layer scales, when present, sit after the writers and must be
  folded into M (M diag(gamma) != diag(gamma) M). Embedding writers ``token_embedding`` and the
  ``positional_embedding`` parameter; the vision stream starts at ``ln_pre``.
- ``llava``: the vision tower is read at layer -2 *without* a final norm; the lens is the
  ``multi_modal_projector`` (Linear-GELU-Linear) into the LM's input space, over all patch
  tokens (CLS dropped); a bias metric needs the LM, so curves would report decodability only.
- BERT dual encoders (e.g. all-MiniLM-L6-v2): post-LN blocks (``LayerNorm(x + write)``), so the
  stream is not a plain sum of writes and "ablate the write" must be done before each block's
  ``output.LayerNorm``; pooling is a masked mean over tokens, no projection (lens = identity +
  mean pool + optional normalisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .adapters import ModelAdapter
from .errors import ConfigError, DebiasError
from .leace import encode_labels, group_mean_differences, orthonormal_basis, probe_accuracy, split_indices


@dataclass(frozen=True)
class TowerParts:
    """Module paths of one tower that locate and folding need (see the module docstring)."""

    final_norm: str  # applied to the pooled token before the projection
    projection: str  # Linear into the embedding space
    attn_out: str  # attention write, relative to a block; a Linear whose input is the concatenated heads
    mlp_out: str  # MLP write, relative to a block
    num_heads: int
    embedding_writers: tuple[str, ...] = ()  # Embedding modules whose outputs sum into the initial stream
    stream_start: str | None = None  # non-linear module producing the initial stream (cannot absorb a fold)


def _hf_clip_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    cfg = adapter.model.config
    if hasattr(cfg, "vision_config"):
        cfg = cfg.vision_config if tower == "image" else cfg.text_config
    if tower == "image":
        return TowerParts("vision_model.post_layernorm", "visual_projection", "self_attn.out_proj", "mlp.fc2",
                          int(cfg.num_attention_heads), (), "vision_model.pre_layrnorm")
    emb = "text_model.embeddings"
    return TowerParts("text_model.final_layer_norm", "text_projection", "self_attn.out_proj", "mlp.fc2",
                      int(cfg.num_attention_heads), (f"{emb}.token_embedding", f"{emb}.position_embedding"), None)


FAMILY_PARTS: dict[str, Callable[[ModelAdapter, str], TowerParts]] = {"hf_clip": _hf_clip_parts}


def register_tower_parts(family: str, fn: Callable[[ModelAdapter, str], TowerParts]) -> None:
    """Teach locate / folding about another family."""
    FAMILY_PARTS[family] = fn


def tower_parts(adapter: ModelAdapter, tower: str) -> TowerParts:
    adapter.check_tower(tower)
    fn = FAMILY_PARTS.get(adapter.family)
    if fn is None:
        raise DebiasError(f"locate/fold has no final-norm/projection table for model family {adapter.family!r}; "
                          f"supported: {', '.join(sorted(FAMILY_PARTS))}")
    return fn(adapter, tower)


def lens(adapter: ModelAdapter, tower: str, hidden: torch.Tensor) -> torch.Tensor:
    """Read pooled hidden states ``[n, d]`` out through the tower's final norm and projection."""
    parts = tower_parts(adapter, tower)
    m = adapter.model
    ref = next(m.parameters())
    out = m.get_submodule(parts.projection)(m.get_submodule(parts.final_norm)(hidden.to(ref.device, ref.dtype)))
    return out.float().cpu()


# ----- bias metric ----------------------------------------------------------------------------
def max_skew_at_k(queries: torch.Tensor, items: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of MaxSkew@k for cosine retrieval of ``items`` (groups = class ids per item).

    Uses the project's metric (:func:`debias_export.eval.metrics.retrieval_skew`: target = uniform over
    classes, an absent class counts as 1/k, as in DeBiasLens); :func:`local_max_skew_at_k` is the same
    formula, used only if that module is missing. 0 means every top-k list is balanced.
    """
    k = min(int(k), items.shape[0])
    try:
        from .eval.metrics import cosine_scores, retrieval_skew
    except ImportError:  # pragma: no cover - the eval package ships with the project
        return local_max_skew_at_k(queries, items, groups, k)
    return float(retrieval_skew(cosine_scores(queries, items), [str(int(g)) for g in groups], k)["max_skew"])


def local_max_skew_at_k(queries: torch.Tensor, items: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """Self-contained MaxSkew@k: ``max_c ln(p_c * |C|)`` per query with ``p_c = count_c / k`` (0 -> 1/k)."""
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
def _batches(inputs: dict[str, torch.Tensor], batch_size: int, adapter: ModelAdapter | None = None):
    """Slices of the inputs, moved to the model's device (floating inputs also to its dtype)."""
    n = next(iter(inputs.values())).shape[0]
    ref = next(adapter.model.parameters()) if adapter is not None else None
    for lo in range(0, n, batch_size):
        batch = {k: v[lo:lo + batch_size] for k, v in inputs.items()}
        if ref is not None:
            batch = {k: v.to(ref.device, ref.dtype) if v.is_floating_point() else v.to(ref.device) for k, v in batch.items()}
        yield batch


@torch.no_grad()
def run_with_stream(adapter: ModelAdapter, tower: str, inputs: dict[str, torch.Tensor], batch_size: int = 64,
                    ablate: Callable[[ModelAdapter], list] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream after every block at the output position ``[L, n, d]`` and final embeddings ``[n, p]``.

    ``ablate(adapter)`` may install forward hooks (returning their handles) for the duration.
    """
    blocks = adapter.blocks(tower)
    streams: list[list[torch.Tensor]] = [[] for _ in blocks]
    embeds = []
    handles = list(ablate(adapter)) if ablate is not None else []
    try:
        for batch in _batches(inputs, batch_size, adapter):
            pos = adapter.output_token_index(tower, batch).to(adapter.device)
            rows = torch.arange(len(pos), device=pos.device)

            def grab(i):
                def hook(mod, args, out):
                    h = out[0] if isinstance(out, tuple) else out
                    streams[i].append(h[rows, pos].float().cpu())
                return hook

            hs = [b.register_forward_hook(grab(i)) for i, b in enumerate(blocks)]
            try:
                embeds.append(adapter.embed(tower, batch).float().cpu())
            finally:
                for h in hs:
                    h.remove()
    finally:
        for h in handles:
            h.remove()
    return torch.stack([torch.cat(s) for s in streams]), torch.cat(embeds)


def _project_off(x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    return x - (x @ U) @ U.T


def ablation_hooks(tower: str, layer: int, component: str, U: torch.Tensor) -> Callable[[ModelAdapter], list]:
    """Hooks removing the ``U`` (orthonormal ``[d, r]``) component of one write: ``attn``, ``mlp`` or ``head<h>``."""

    def install(adapter: ModelAdapter) -> list:
        parts = tower_parts(adapter, tower)
        block = adapter.blocks(tower)[layer]
        ref = next(block.parameters())
        Uc = U.to(device=ref.device, dtype=ref.dtype)
        if component == "mlp":
            mod = block.get_submodule(parts.mlp_out)
            return [mod.register_forward_hook(lambda m, a, out: _project_off(out, Uc))]
        mod = block.get_submodule(parts.attn_out)
        if component == "attn":
            return [mod.register_forward_hook(lambda m, a, out: _project_off(out, Uc))]
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


def locate_bias(adapter: ModelAdapter, tower: str, image_inputs: dict[str, torch.Tensor],
                labels: dict[str, Sequence], prompts: Sequence[str], column: str | None = None, k: int = 10,
                heads: bool = True, attribution: bool = True, test_fraction: float = 0.3, seed: int = 0,
                batch_size: int = 64, direction: str = "write", progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Layer curves (+ component attribution for image towers) as a JSON-ready dict.

    ``image_inputs``: prepared inputs of the labelled images; ``labels``: attribute column -> one
    value per image; ``prompts``: neutral prompts for MaxSkew@k; ``column``: the attribute whose
    subspace is ablated in the attribution (default: the first one).
    """
    if tower not in ("image", "text"):
        raise ConfigError(f"locate supports towers 'image' and 'text', got {tower!r}")
    if not labels:
        raise ConfigError("locate needs at least one attribute column")
    column = column or next(iter(labels))
    if column not in labels:
        raise ConfigError(f"attribute column {column!r} not among {', '.join(labels)}")
    n = next(iter(image_inputs.values())).shape[0]
    for name, vals in labels.items():
        if len(vals) != n:
            raise ConfigError(f"column {name!r} has {len(vals)} labels for {n} images")
    if not prompts:
        raise ConfigError("locate needs neutral prompts for the bias metric")
    say = progress or (lambda msg: None)
    ids = {c: encode_labels(v) for c, v in labels.items()}
    splits = {c: split_indices(n, test_fraction, seed=seed, labels=y) for c, (y, _) in ids.items()}
    text_inputs = adapter.prepare_texts(list(prompts))

    say("capturing the residual stream")
    img_stream, img_emb = run_with_stream(adapter, "image", image_inputs, batch_size)
    txt_stream, txt_emb = run_with_stream(adapter, "text", text_inputs, batch_size)
    stream = img_stream if tower == "image" else txt_stream
    with torch.no_grad():
        lens_emb = torch.stack([lens(adapter, tower, s) for s in stream]).float()

    layers = []
    for layer, e in enumerate(lens_emb):
        row: dict[str, Any] = {"layer": layer, "probe_accuracy": {}, "between_group_ratio": {}, "max_skew": {}}
        for c, (y, _) in ids.items():
            if tower == "image":
                row["probe_accuracy"][c] = _probe(e, y, splits[c])
                row["between_group_ratio"][c] = between_group_ratio(e, y)
                row["max_skew"][c] = max_skew_at_k(txt_emb, e, y, k)
            else:  # prompts read out at this layer, retrieving the final image embeddings
                row["probe_accuracy"][c] = row["between_group_ratio"][c] = None
                row["max_skew"][c] = max_skew_at_k(e, img_emb, y, k)
        layers.append(row)
    final = {c: {"probe_accuracy": _probe(img_emb, y, splits[c]), "max_skew": max_skew_at_k(txt_emb, img_emb, y, k),
                 "between_group_ratio": between_group_ratio(img_emb, y)} for c, (y, _) in ids.items()}
    try:  # noise floor of the bias metric: the same retrieval with the labels shuffled
        from .eval.metrics import cosine_scores, shuffled_skew

        for c, (y, _) in ids.items():
            floor = shuffled_skew(cosine_scores(txt_emb, img_emb), [str(int(v)) for v in y], min(k, n), shuffles=10, seed=seed)
            final[c]["max_skew_shuffled"] = {"mean": floor["max_skew"], "sd": floor["max_skew_sd"]}
    except ImportError:  # pragma: no cover
        pass
    report: dict[str, Any] = {
        "tower": tower, "column": column, "k": k, "num_images": n, "num_prompts": len(prompts),
        "group_sizes": {c: dict(zip(names, torch.bincount(y, minlength=len(names)).tolist())) for c, (y, names) in ids.items()},
        "chance": {c: float(torch.bincount(y).max()) / n for c, (y, _) in ids.items()},
        "layers": layers, "final": final,
        # sanity check of the lens: at the last block it must reproduce the tower's real output
        "lens_matches_output": bool(torch.allclose(lens_emb[-1], img_emb if tower == "image" else txt_emb, atol=1e-4)),
        "metric_impl": "debias_export.eval.metrics.retrieval_skew (MaxSkew@k, uniform target)",
    }
    if attribution and tower == "image":
        report["components"] = attribute_components(adapter, image_inputs, ids[column][0], splits[column], img_stream,
                                                    txt_emb, final[column], k, heads, batch_size, say, direction)
        report["ablation_direction"] = direction
    elif attribution:
        report["components"] = None
        report["components_note"] = "component attribution needs labelled inputs of the edited tower (images only)"
    return report


@torch.no_grad()
def component_write_means(adapter: ModelAdapter, inputs: dict[str, torch.Tensor], y: torch.Tensor,
                          heads: bool, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per-group mean of every write (``L<l>.attn``, ``L<l>.head<h>``, ``L<l>.mlp``) at the output position.

    Accumulated as per-group sums, so memory is ``groups x d`` per component, not ``n x d``.
    """
    parts = tower_parts(adapter, "image")
    num = int(y.max()) + 1
    sums: dict[str, torch.Tensor] = {}
    counts = torch.bincount(y, minlength=num).double()
    state: dict[str, Any] = {}

    def add(name: str, w: torch.Tensor) -> None:
        w = w[state["rows"], state["pos"]].double().cpu()
        acc = sums.setdefault(name, torch.zeros(num, w.shape[-1], dtype=torch.float64))
        acc.index_add_(0, state["y"], w)

    def attn_hook(layer):
        def hook(m, args, out):
            add(f"L{layer}.attn", out)
            if heads:
                dh = m.in_features // parts.num_heads
                for h in range(parts.num_heads):
                    sl = slice(h * dh, (h + 1) * dh)
                    add(f"L{layer}.head{h}", args[0][..., sl] @ m.weight[:, sl].T)
        return hook

    handles = []
    for layer in range(adapter.consumed_layer("image") + 1):
        block = adapter.blocks("image")[layer]
        handles.append(block.get_submodule(parts.attn_out).register_forward_hook(attn_hook(layer)))
        handles.append(block.get_submodule(parts.mlp_out).register_forward_hook(
            lambda m, a, out, layer=layer: add(f"L{layer}.mlp", out)))
    try:
        lo = 0
        for batch in _batches(inputs, batch_size, adapter):
            pos = adapter.output_token_index("image", batch).to(adapter.device)
            state.update(rows=torch.arange(len(pos), device=pos.device), pos=pos, y=y[lo:lo + len(pos)])
            lo += len(pos)
            adapter.embed("image", batch)
    finally:
        for h in handles:
            h.remove()
    return {name: acc / counts.clamp_min(1)[:, None] for name, acc in sums.items()}


def attribute_components(adapter: ModelAdapter, image_inputs: dict[str, torch.Tensor], y: torch.Tensor,
                         split: tuple[torch.Tensor, torch.Tensor], img_stream: torch.Tensor, txt_emb: torch.Tensor,
                         baseline: dict[str, float], k: int, heads: bool, batch_size: int,
                         say: Callable[[str], None], direction: str = "write") -> list[dict[str, Any]]:
    """Ablate each write's attribute-subspace component; rank by the drop in MaxSkew@k.

    ``direction="write"``: the subspace is spanned by the group-mean differences of that write itself
    (removes exactly the component's group-dependent mean at the output position); ``"stream"``: by
    those of the residual stream after its block (one subspace shared by the block's components).
    """
    if direction not in ("write", "stream"):
        raise ConfigError(f"unknown ablation direction {direction!r}; expected 'write' or 'stream'")
    parts = tower_parts(adapter, "image")
    names = ["attn", "mlp"] + ([f"head{h}" for h in range(parts.num_heads)] if heads else [])
    means = component_write_means(adapter, image_inputs, y, heads, batch_size) if direction == "write" else {}
    p = torch.bincount(y).double() / len(y)
    rows = []
    for layer in range(adapter.consumed_layer("image") + 1):
        U_stream = orthonormal_basis(group_mean_differences(img_stream[layer], y)).float()
        for comp in names:
            if direction == "write":
                m = means[f"L{layer}.{comp}"]
                U = orthonormal_basis((m - p @ m).T).float()
            else:
                U = U_stream
            say(f"ablating layer {layer} {comp}")
            _, emb = run_with_stream(adapter, "image", image_inputs, batch_size, ablate=ablation_hooks("image", layer, comp, U))
            skew = max_skew_at_k(txt_emb, emb, y, k)
            acc, ratio = _probe(emb, y, split), between_group_ratio(emb, y)
            rows.append({"component": f"L{layer}.{comp}", "layer": layer, "kind": comp,
                         "max_skew": skew, "probe_accuracy": acc, "between_group_ratio": ratio,
                         "bias_effect": baseline["max_skew"] - skew,  # > 0: the write adds skew
                         "decodability_effect": baseline["probe_accuracy"] - acc,
                         "separation_effect": baseline["between_group_ratio"] - ratio})
    for r in rows:
        e = r["bias_effect"]
        r["role"] = "bias-amplifying" if e > 1e-3 else "fairness-reinforcing" if e < -1e-3 else "neutral"
    # decodability rank: probe accuracy drop, ties (it moves in 1/n_test steps) broken by the separation drop
    for key, name in ((("decodability_effect", "separation_effect"), "rank_decodability"), (("bias_effect",), "rank")):
        rows.sort(key=lambda r: tuple(-r[f] for f in key))
        for rank, r in enumerate(rows, 1):
            r[name] = rank
    return rows
