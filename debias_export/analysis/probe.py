"""Social-neuron probing (DeBiasLens, section 3.2).

For each group ``g`` of a label column (e.g. gender): ``E_g`` are the SAE latents that are non-zero on at
least ``tau * n_g`` of ``g``'s samples; ``S_g = E_g \\ U_{h != g} E_h`` are the latents frequent in ``g`` and
in no other group; ``S_g`` is ranked by mean activation within ``g`` and the top ``top_n`` are kept.
Per-image latents are ``SAE.encode`` of the per-image mean activation over tokens, as in DeBiasLens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..capture.store import ActivationStore
from ..core.errors import DebiasError, ShapeError
from ..data.datasets import labelled_indices, read_csv_table

METHOD = "debiaslens-social-neurons"


def probe_social_neurons(latents: torch.Tensor, labels: Sequence[Any], tau: float = 0.1, top_n: int = 1,
                         min_group_size: int = 1, groups: Sequence[str] | None = None,
                         sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Find group-specific SAE latents; returns a JSON-ready report (see the module docstring).

    ``labels`` holds one label per row of ``latents [N, F]``; rows with a missing label are left out
    (and counted). ``groups`` restricts/orders the groups (each must have samples); every group needs
    at least ``min_group_size`` samples and there must be two or more. ``selectivity`` is the group's
    mean activation over the mean of the other groups' means; ``null`` when the latent never fires
    outside the group (infinite selectivity; JSON has no infinity).
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim != 2:
        raise ShapeError(f"latents must be a [N, F] tensor, got {getattr(latents, 'shape', type(latents).__name__)}")
    if len(labels) != latents.shape[0]:
        raise ShapeError(f"{len(labels)} labels for {latents.shape[0]} rows of latents")
    if not 0.0 <= tau <= 1.0:
        raise DebiasError(f"tau={tau} must be within [0, 1]")
    if top_n < 1 or min_group_size < 1:
        raise DebiasError(f"top_n and min_group_size must be >= 1 (got {top_n}, {min_group_size})")
    if not bool(torch.isfinite(latents).all()):
        raise DebiasError("latents contain NaN or Inf values")
    keep = labelled_indices(labels)
    names = [str(labels[i]) for i in keep]
    lat = latents[keep].float()
    present = sorted(set(names))
    order = [str(g) for g in groups] if groups is not None else present
    for g in order:
        n_g = names.count(g)
        if n_g == 0:
            raise DebiasError(f"group {g!r} has no samples (groups present: {', '.join(present) or 'none'})")
        if n_g < min_group_size:
            raise DebiasError(f"group {g!r} has {n_g} samples, fewer than min_group_size={min_group_size}")
    if len(order) < 2:
        raise DebiasError(f"probing needs at least two groups, found {len(order)} ({', '.join(order) or 'none'})")
    masks = {g: torch.tensor([n == g for n in names]) for g in order}
    active = lat != 0
    freq = {g: active[m].float().mean(0) for g, m in masks.items()}
    # count >= tau * n_g; the epsilon keeps e.g. 0.1 * 30 = 3.0000000000000004 from rejecting a count of 3
    frequent = {g: (active[m].sum(0).double() >= tau * int(m.sum()) - 1e-9) for g, m in masks.items()}
    means = {g: lat[m].mean(0) for g, m in masks.items()}
    balanced = _mean_of_group_means(means)
    report_groups: dict[str, Any] = {}
    selected: set[int] = set()
    for g in order:
        others = [h for h in order if h != g]
        union_others = torch.stack([frequent[h] for h in others]).any(0)
        specific = frequent[g] & ~union_others
        idx = specific.nonzero().flatten()
        ranked = idx[means[g][idx].argsort(descending=True, stable=True)][:top_n].tolist()
        other_mean = torch.stack([means[h] for h in others]).mean(0)
        neurons = []
        for i in ranked:
            om = float(other_mean[i])
            neurons.append({"index": int(i), "mean_activation": float(means[g][i]), "frequency": float(freq[g][i]),
                            "other_mean_activation": om, "balanced_mean_activation": float(balanced[i]),
                            "selectivity": float(means[g][i]) / om if om > 0 else None})
        selected.update(ranked)
        report_groups[g] = {"n": int(masks[g].sum()), "num_frequent": int(frequent[g].sum()),
                            "num_specific": int(specific.sum()), "neurons": neurons}
    return {"method": METHOD, "tau": tau, "top_n": top_n, "min_group_size": min_group_size,
            "num_samples": len(keep), "num_unlabelled": latents.shape[0] - len(keep),
            "num_latents": int(latents.shape[1]), "groups": report_groups, "neurons": sorted(selected),
            "sources": dict(sources or {})}


def balanced_means(latents: torch.Tensor, labels: Sequence[Any], neurons: Sequence[int]) -> list[float]:
    """Each latent's mean activation averaged over the label groups (every group weighs the same; rows with
    no label are left out): the value a mean-ablation edit sets a social neuron to, so every input looks like
    the average of the groups rather than like the group the neuron is silent for (what zeroing does)."""
    keep = labelled_indices(labels)
    if not keep:
        raise DebiasError("no labelled rows to average the neurons' activations over")
    names = [str(labels[i]) for i in keep]
    lat = latents[keep].double()
    means = _mean_of_group_means({g: lat[torch.tensor([n == g for n in names])].mean(0) for g in sorted(set(names))})
    return [float(means[int(i)]) for i in neurons]


def _mean_of_group_means(means: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per latent, the unweighted mean over groups of each group's mean activation (every group weighs the same)."""
    return torch.stack(list(means.values())).mean(0)


def matched_random_neurons(latents: torch.Tensor, neurons: Sequence[int], seed: int, nearest: int = 8) -> list[int]:
    """A random control set for ``neurons``: for each chosen neuron, one latent drawn (seeded) among the ``nearest``
    unchosen latents closest to it in firing frequency over ``latents`` (``[N, F]``, one row per input), none twice.

    Why frequency-matched rather than uniform: most latents of a sparse SAE rarely fire, and zeroing a silent latent
    changes nothing, so a uniform draw would make any edit look specific. Matching how often each latent fires gives
    the control an intervention of the same reach as the edit's, on latents picked with no regard to the label."""
    if latents.dim() != 2:
        raise ShapeError(f"latents must be [inputs, latents], got shape {tuple(latents.shape)}")
    freq = (latents > 0).double().mean(0)
    chosen = [int(n) for n in neurons]
    taken = set(chosen)
    if freq.numel() - len(taken) < len(chosen):
        raise DebiasError(f"a random control needs {len(chosen)} latents besides the chosen ones; the SAE has {freq.numel()}")
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for n in chosen:
        free = torch.tensor([i for i in range(freq.numel()) if i not in taken])
        gap = (freq[free] - freq[n]).abs()
        order = sorted(range(len(free)), key=lambda j: (float(gap[j]), int(free[j])))  # index breaks ties: deterministic
        pool = [int(free[j]) for j in order[:nearest]]
        pick = pool[int(torch.randint(len(pool), (1,), generator=g))]
        picked.append(pick)
        taken.add(pick)
    return picked


def values_from_report(report: dict[str, Any], neurons: Sequence[int]) -> list[float]:
    """``balanced_mean_activation`` of each of ``neurons`` as recorded in a probe report (refused when missing)."""
    found: dict[int, float] = {}
    for g in (report.get("groups") or {}).values():
        for n in g.get("neurons", []) if isinstance(g, dict) else []:
            if isinstance(n, dict) and "balanced_mean_activation" in n:
                found[int(n["index"])] = float(n["balanced_mean_activation"])
    missing = [i for i in neurons if i not in found]
    if missing:
        raise DebiasError(f"the probe report records no balanced_mean_activation for neuron(s) {missing[:8]} "
                          "(probe again with this version, or give a number as the value)")
    return [found[i] for i in neurons]


def neurons_from_report(report: dict[str, Any], groups: Sequence[str] | None = None) -> list[int]:
    """The latent indices selected by a probe report (all groups, or only ``groups``)."""
    try:
        chosen = report["groups"] if groups is None else {g: report["groups"][g] for g in groups}
        return sorted({int(n["index"]) for g in chosen.values() for n in g["neurons"]})
    except (KeyError, TypeError) as exc:
        raise DebiasError(f"not a probe report (missing {exc})") from None


def read_label_csv(path: str | Path, column: str) -> tuple[list[str | None], list[str | None]]:
    """``(file names or None, labels)`` from a CSV with a ``column`` (and optionally ``file``) header."""
    fields, rows = read_csv_table(path, "label file")
    if column not in fields:
        raise DebiasError(f"label CSV {path} has no column {column!r}; columns: {', '.join(fields)}")
    files = [r.get("file") for r in rows] if "file" in fields else [None] * len(rows)
    return files, [r[column] for r in rows]


@torch.no_grad()
def latents_from_capture(capture_dir: str | Path, sae, column: str, which: str = "mean_activations",
                         labels_csv: str | Path | None = None, batch_size: int = 4096
                         ) -> tuple[torch.Tensor, list[Any], dict[str, Any]]:
    """Per-input SAE latents of a capture directory and the ``column`` label of each input.

    ``which``: ``mean_activations`` (mean over tokens, DeBiasLens) or ``output_activations`` (pooled
    token). Labels come from the capture's row metadata, or from ``labels_csv`` (joined on ``file``
    when both have it, else by row order).
    """
    if which not in ("mean_activations", "output_activations"):
        raise DebiasError(f"unknown activations {which!r}; expected mean_activations or output_activations")
    store = ActivationStore(capture_dir)
    if store.width != sae.d_in:
        raise ShapeError(f"SAE width {sae.d_in} does not match the capture's site width {store.width} ({store.site})")
    x = store.mean_activations() if which == "mean_activations" else store.output_activations()
    latents = torch.cat([sae.encode(x[i:i + batch_size].float()) for i in range(0, x.shape[0], batch_size)])
    if labels_csv is None:
        labels = store.labels(column)
    else:
        files, csv_labels = read_label_csv(labels_csv, column)
        rows = store.rows
        if all(f is not None for f in files) and rows and "file" in rows[0]:
            by_file = dict(zip(files, csv_labels))
            missing = [r["file"] for r in rows if r["file"] not in by_file]
            if missing:
                raise DebiasError(f"{len(missing)} captured files are not in {labels_csv} (e.g. {missing[0]!r})")
            labels = [by_file[r["file"]] for r in rows]
        elif len(csv_labels) == len(rows):
            labels = csv_labels
        else:
            raise DebiasError(f"{labels_csv} has {len(csv_labels)} rows but the capture has {len(rows)} inputs "
                              "(and no 'file' column to join on)")
    sources = {"capture": str(capture_dir), "site": store.site, "activations": which, "column": column,
               "labels": str(labels_csv) if labels_csv else "capture rows", "model": store.settings.get("model"),
               "data": store.settings.get("source")}
    return latents, labels, sources


PAIR_METHOD = "minimal-pair-contrast"


def probe_pair_contrast(latents_a: torch.Tensor, latents_b: torch.Tensor, top_n: int = 3,
                        min_frequency: float = 0.0, groups: Sequence[str] = ("Female", "Male"),
                        sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Latents that move with the gender word in minimal pairs (row ``i`` of ``a`` and ``b``: one sentence, two words).

    Per latent, ``d_i = a_i - b_i`` over the pairs; the score is the paired t statistic
    ``mean(d) / (sd(d) / sqrt(n))`` (0 where the latent never differs). The ``top_n`` most positive latents
    go to ``groups[0]`` and the ``top_n`` most negative to ``groups[1]``; a latent must be non-zero on at least
    ``min_frequency`` of its own group's sentences. Unlike the label rule (:func:`probe_social_neurons`), a
    latent that fires on every text about a person but does not change with the gender word scores 0.
    Returns a report in the same shape (``groups`` -> ``neurons``, ``neurons``), so
    :func:`neurons_from_report` reads it.
    """
    for name, t in (("latents_a", latents_a), ("latents_b", latents_b)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ShapeError(f"{name} must be a [N, F] tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if latents_a.shape != latents_b.shape:
        raise ShapeError(f"minimal pairs need equal shapes, got {tuple(latents_a.shape)} and {tuple(latents_b.shape)}")
    if latents_a.shape[0] < 2:
        raise DebiasError(f"pair contrast needs at least 2 pairs, got {latents_a.shape[0]}")
    if top_n < 1:
        raise DebiasError(f"top_n must be >= 1 (got {top_n})")
    if not 0.0 <= min_frequency <= 1.0:
        raise DebiasError(f"min_frequency={min_frequency} must be within [0, 1]")
    if len(groups) != 2 or groups[0] == groups[1]:
        raise DebiasError(f"pair contrast needs two distinct group names, got {list(groups)}")
    if not (bool(torch.isfinite(latents_a).all()) and bool(torch.isfinite(latents_b).all())):
        raise DebiasError("latents contain NaN or Inf values")
    a, b = latents_a.double(), latents_b.double()
    n = a.shape[0]
    d = a - b
    sd = d.std(0)
    # a latent with zero spread of differences is either constant (score 0) or shifts identically in every pair
    # (a perfect gender latent): give the latter a finite, very large score instead of dividing by zero
    t = torch.where(sd > 0, d.mean(0) / sd.clamp_min(1e-300) * n ** 0.5, d.mean(0).sign() * 1e12)
    report_groups: dict[str, Any] = {}
    selected: set[int] = set()
    for g, own, sign in ((groups[0], a, 1.0), (groups[1], b, -1.0)):
        freq = (own != 0).double().mean(0)
        score = sign * t
        ok = (score > 0) & (freq >= min_frequency - 1e-12)
        idx = ok.nonzero().flatten()
        ranked = idx[score[idx].argsort(descending=True, stable=True)][:top_n].tolist()
        selected.update(ranked)
        report_groups[str(g)] = {"n": n, "num_specific": int(ok.sum()), "neurons": [
            {"index": int(i), "t": float(score[i]), "mean_difference": float(sign * d[:, i].mean()),
             "frequency": float(freq[i]), "mean_activation": float(own[:, i].mean())} for i in ranked]}
    return {"method": PAIR_METHOD, "top_n": top_n, "min_frequency": min_frequency, "num_pairs": n,
            "num_latents": int(a.shape[1]), "groups": report_groups, "neurons": sorted(selected),
            "sources": dict(sources or {})}
