"""Fit a :class:`ProjectionEdit` (LEACE / mean-difference eraser) from a capture's labelled activations."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ...adapters import ModelAdapter
from ...adapters.anatomy import check_output_fold, tower_parts
from ...core.choices import EXPORT_FOLDS
from ...core.errors import ConfigError
from ...core.model_match import FINGERPRINT_KEY
from ...core.sites import Site
from ...data.captions import age_bin
from ...data.datasets import labelled_indices
from ...sae.model import read_safetensors
from .config import ProjectionEdit


def capture_fit_activations(store, which: str = "auto") -> tuple[torch.Tensor, str]:
    """Per-input activations of a capture: ``auto``: the pooled output token when the family has one, else the
    token mean; ``mean`` / ``output``: that one (an eraser of every token is fitted on token means)."""
    if which == "mean":
        return store.mean_activations(), "mean"
    if which == "output":
        return store.output_activations(), "output"
    has_output = bool(store.shards) and "output_token_index" in store.load_shard(0)
    return (store.output_activations(), "output") if has_output else (store.mean_activations(), "mean")


def kept_labels(store, columns: Sequence[str]) -> list[list[str]]:
    """The capture's labels of each column whose information an erasure keeps; integer ages become FairFace's 9
    age bins (one class per year would give the kept subspace ~100 dimensions and leave little to erase)."""
    out = []
    for col in columns:
        values = store.labels(col)
        out.append([age_bin(v) if col == "age" and str(v).isdigit() else v for v in values])
    return out


def fit_from_capture(store, column: str, method: str = "leace", fold: str = "none",
                     adapter: ModelAdapter | None = None, fair: torch.Tensor | None = None,
                     activations: str = "auto", keep: Sequence[str] = (), **kwargs: Any) -> ProjectionEdit:
    """Fit a :class:`ProjectionEdit` on an :class:`~debias_export.capture.store.ActivationStore` labelled by ``column``.

    ``fold="output"`` fits in the embedding space instead: the capture must be the output token at the
    tower's consumed block, mapped through the tower's final norm and projection (needs ``adapter``).
    ``keep``: label columns whose linear information the erasure leaves intact (e.g. ``["age"]``; LEACE only).
    """
    if fold not in EXPORT_FOLDS:
        raise ConfigError(f"unknown fold mode {fold!r}; expected one of {', '.join(EXPORT_FOLDS)}")
    if column in keep:
        raise ConfigError(f"cannot erase {column!r} and keep it: drop it from the kept labels")
    site = Site.parse(store.site)
    if fold == "site" and site.kind == "resid_post":
        raise ConfigError(f"fold=site needs an attn_out/mlp_out capture (a Linear's output); {store.path} is at {store.site}")
    labels = store.labels(column)
    kept = kept_labels(store, keep)
    acts, which = capture_fit_activations(store, activations)
    # rows without a label (erased or kept) are skipped, as probing does (a blank is not a third group) and counted
    rows, n_rows = labelled_indices(labels), len(labels)
    for other in kept:
        present = set(labelled_indices(other))
        rows = [i for i in rows if i in present]
    if len(rows) < n_rows:
        acts, labels, kept = acts[rows], [labels[i] for i in rows], [[k[i] for i in rows] for k in kept]
    if fold == "output":
        if adapter is None:
            raise ConfigError("fold=output fits in the embedding space and needs the model (--model)")
        site = adapter.resolve_site(site)
        consumed = adapter.consumed_layer(site.tower)
        if which != "output" or site.kind != "resid_post" or site.layer != consumed:
            raise ConfigError(f"fold=output needs a capture of the output token at {site.tower}.{consumed}.resid_post "
                              f"(what the projection reads); {store.path} is at {store.site} ({which} activations)")
        parts = tower_parts(adapter, site.tower)
        proj = check_output_fold(parts, site.tower)
        if kwargs.get("center", True) and getattr(adapter.model.get_submodule(proj), "bias", None) is None:
            # checked before fitting: a centered edit has a mean term b*A*mu that a bias-free Linear cannot hold
            raise ConfigError(f"fold=output: {proj} has no bias, so a centered edit's mean term cannot fold into it; "
                              f"fit it with center off (--no-center / edit.center: false)")
        if parts.final_norm is None:
            raise ConfigError(f"the {site.tower} tower has no plain final norm before its projection; fold=output cannot be fitted")
        m, ref = adapter.model, next(adapter.model.parameters())
        with torch.no_grad():  # the tower's own tail: final norm, then the projection the fold targets
            acts = m.get_submodule(proj)(m.get_submodule(parts.final_norm)(acts.to(ref.device, ref.dtype))).float().cpu()
        which = "embedding"
    edit = ProjectionEdit.fit(site.name, acts, labels, method=method, fair=fair, fold=fold, keep=kept, **kwargs)
    edit.provenance = {"capture": str(store.path), "column": column, "activations": which,
                       "inputs": int(acts.shape[0]), "unlabelled_skipped": n_rows - len(rows),
                       **({"kept_labels": list(keep)} if keep else {}),
                       FINGERPRINT_KEY: store.model_record.get(FINGERPRINT_KEY), **edit.provenance}
    return edit


def read_fair_directions(path: Path):
    """``[d, m]`` raw fair directions from a safetensors file holding one tensor (or one named ``directions``, or
    ``fair`` as ``locate`` writes it); a ``[d]`` vector is one direction."""
    tensors = read_safetensors(path)
    if "directions" in tensors:
        t = tensors["directions"]
    elif "fair" in tensors:  # `debias-export locate`'s directions.safetensors
        t = tensors["fair"]
    elif len(tensors) == 1:
        (t,) = tensors.values()
    else:
        raise ConfigError(f"--fair-from {path} holds {len(tensors)} tensors; name the one to use 'directions'")
    if t.dim() == 1:  # one direction
        t = t[:, None]
    if t.dim() != 2:
        raise ConfigError(f"--fair-from {path}: directions must be [d, m], got shape {tuple(t.shape)}")
    return t.float()
