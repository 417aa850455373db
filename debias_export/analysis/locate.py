"""Where does bias enter an encoder? Layer-wise logit-lens curves and component attribution.

Layer curves: the residual stream after every block (up to the block the output consumes) is read
out through the tower's own tail -- final norm, pooling and projection, as
:mod:`debias_export.adapters.anatomy` describes per family (a logit lens for encoders). Per layer we
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

from ..adapters import ModelAdapter
from ..adapters.anatomy import FAMILY_PARTS, TowerParts, register_tower_parts, tower_parts
from ..core.errors import ConfigError
from .attribution import _Target, ablation_hooks, attribute_components, component_write_means, fair_direction
from .leace import encode_labels, split_indices
from .lens import between_group_ratio, local_max_skew_at_k, max_skew_at_k, run_with_stream
from .lens import probe_split as _probe
from .metrics import cosine_scores, shuffled_skew

__all__ = ["FAMILY_PARTS", "TowerParts", "register_tower_parts", "tower_parts", "locate_bias", "run_with_stream",
           "ablation_hooks", "max_skew_at_k", "local_max_skew_at_k", "between_group_ratio", "attribute_components",
           "component_write_means", "fair_direction"]


# ----- the analysis ---------------------------------------------------------------------------
def _check_labels(labels: dict[str, Sequence], n: int, what: str) -> None:
    for name, vals in labels.items():
        if len(vals) != n:
            raise ConfigError(f"column {name!r} has {len(vals)} labels for {n} {what}")


def locate_bias(adapter: ModelAdapter, tower: str, image_inputs: dict[str, torch.Tensor],
                labels: dict[str, Sequence], prompts: Sequence[str] = (), column: str | None = None, k: int = 10,
                heads: bool = True, attribution: bool = True, test_fraction: float = 0.3, seed: int = 0,
                batch_size: int = 64, direction: str = "write", progress: Callable[[str], None] | None = None,
                captions: tuple[Sequence[str], dict[str, Sequence]] | None = None, pairs: Any = None) -> dict[str, Any]:
    """Layer curves and component attribution of ``tower`` as a dict, JSON-ready except ``directions``
    (the fair direction tensor and its components, see :func:`fair_direction`; the CLI saves it as safetensors).

    ``image_inputs``: prepared inputs of the labelled images; ``labels``: attribute column -> one
    value per image; ``prompts``: neutral prompts for MaxSkew@k (unused for models without a text
    tower); ``column``: the attribute whose subspace is ablated (default: the first one);
    ``captions``: ``(texts, labels)`` labelled texts for text-tower decodability and attribution;
    ``pairs``: an :class:`~debias_export.eval.retrieval.EvalData` (anything with its ``layer_pairs_gaps``) whose
    PAIRS images and labels give the per-layer counterfactual confidence gap (RES-FAIR's "fair label, skewed confidence").
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
        prompt_inputs = adapter.prepare_texts(list(prompts))
        _, txt_emb, txt_lens = run_with_stream(adapter, "text", prompt_inputs, batch_size,
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
    if pairs is not None and retrieval:
        say("PAIRS confidence gaps per layer")
        for row, gaps in zip(layers, pairs.layer_pairs_gaps(adapter, tower, batch_size)):
            row["pairs_gender_gap"] = gaps
    final = {}
    for c, (y, _) in ids.items():
        if tower == "image" or cap is None or c not in cap["ids"]:
            dec = {"probe_accuracy": _probe(img_emb, y, split[c]), "between_group_ratio": between_group_ratio(img_emb, y)}
        else:
            dec = {"probe_accuracy": _probe(cap["final"], cap["ids"][c][0], cap["split"][c]),
                   "between_group_ratio": between_group_ratio(cap["final"], cap["ids"][c][0])}
        final[c] = {**dec, "max_skew": skew(txt_emb, img_emb, c) if retrieval else None}
        if retrieval:  # noise floor of the bias metric: the same retrieval with the labels shuffled
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
        "metric_impl": "debias_export.analysis.metrics.retrieval_skew (MaxSkew@k, uniform target)",
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
                         prompt_inputs, ids[column][0])
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
