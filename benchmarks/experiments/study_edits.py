"""Edit builders and diagnostics for the demo-edit study: SAE probing variants, neuron diagnostics, LEACE bounds."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from debias_export.edits import ProjectionEdit, SAEEdit
from debias_export.edits.sae.edit import reference_formula
from debias_export.analysis.leace import fit_eraser, probe_accuracy, split_indices
from debias_export.analysis.probe import neurons_from_report, probe_social_neurons
from study_common import gender_ids


@torch.no_grad()
def latents(sae, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([sae.encode(x[i:i + 4096].float()) for i in range(0, len(x), 4096)])


def per_input(store, which: str) -> torch.Tensor:
    return store.mean_activations() if which == "mean" else store.output_activations()


def probe(sae, store, which: str = "mean", tau: float = 0.1, top_n: int = 3, labels: Sequence[str] | None = None
          ) -> tuple[list[int], dict[str, Any]]:
    """DeBiasLens social neurons from per-input ``mean`` or ``output``-token latents of a probing capture."""
    lab = list(labels) if labels is not None else store.labels("gender")
    report = probe_social_neurons(latents(sae, per_input(store, which)), lab, tau=tau, top_n=top_n)
    return neurons_from_report(report), report


def sae_edit(site: str, sae, neurons, alpha: float, mode: str) -> SAEEdit:
    return SAEEdit(site=site, sae=sae, neurons=list(neurons), alpha=alpha, mode=mode)


@torch.no_grad()
def fvu(sae, x: torch.Tensor) -> float:
    x = x.float()
    return float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@torch.no_grad()
def diagnose(sae, store, neurons: Sequence[int], mode: str = "residual") -> dict[str, float]:
    """How much of the output token's gender signal the chosen neurons carry (UTKFace, held-out probe).

    ``mean_diff_share``: share of ``|mu_F - mu_M|^2`` of the output-token activations lying in the span of the
    chosen decoder rows. ``fire_rate``: fraction of inputs whose output token activates any chosen neuron.
    ``acc_after``: probe accuracy (retrained) after the edit at a=1; ``mean_diff_left``: remaining norm fraction.
    """
    x = store.output_activations().float()
    y = gender_ids(store.labels("gender"))
    f = latents(sae, x)
    S = torch.tensor(list(neurons))
    d = x[y == 0].mean(0) - x[y == 1].mean(0)
    Q, _ = torch.linalg.qr(sae.W_dec[S].T.double())
    share = float((Q.T @ d.double()).pow(2).sum() / d.double().pow(2).sum())
    edited = reference_formula(SAEEdit(site="image.0", sae=sae, neurons=list(neurons), alpha=1.0, mode=mode), x)
    d2 = edited[y == 0].mean(0) - edited[y == 1].mean(0)
    tr, te = split_indices(len(y), 0.3, seed=0, labels=y)
    return {"fvu_output_token": fvu(sae, x), "fire_rate": float((f[:, S] > 0).any(1).float().mean()),
            "acc_before": probe_accuracy(x[tr], y[tr], x[te], y[te]),
            "acc_latents_chosen": probe_accuracy(f[tr][:, S], y[tr], f[te][:, S], y[te]),
            "acc_after": probe_accuracy(edited[tr], y[tr], edited[te], y[te]),
            "mean_diff_share": share, "mean_diff_left": float(d2.norm() / d.norm())}


def leace_site(site: str, store, which: str = "output", strength: float = 1.0, method: str = "leace") -> ProjectionEdit:
    """LEACE (or mean-difference) gender eraser fitted on the probing capture's per-input activations at ``site``."""
    return ProjectionEdit.fit(site, per_input(store, which).float(), store.labels("gender"), method=method, strength=strength)


class OutputEraser:
    """LEACE on the tower embedding (before normalisation), as a forward hook on the projection Linear."""

    def __init__(self, adapter, tower: str, emb: torch.Tensor, labels: Sequence[str], strength: float = 1.0,
                 method: str = "leace"):
        self.sub = fit_eraser(emb.double(), list(labels), method=method)
        self.module = adapter.model.visual_projection if tower == "image" else adapter.model.text_projection
        self.strength = strength

    def __call__(self):
        sub, b = self.sub, self.strength
        return self.module.register_forward_hook(lambda _m, _i, out: sub.erase(out, b))


def probe_contrast(sae, store, which: str = "output", tau: float = 0.05, top_n: int = 3,
                   labels: Sequence[str] | None = None) -> list[int]:
    """Prototype of a relaxed probing rule: latents frequent (>= tau) in group g, ranked by the standardised
    difference of mean activation between g and the other inputs (no exclusivity requirement)."""
    lab = list(labels) if labels is not None else store.labels("gender")
    f = latents(sae, per_input(store, which)).double()
    chosen: set[int] = set()
    for g in sorted(set(lab)):
        m = torch.tensor([x == g for x in lab])
        a, b = f[m], f[~m]
        score = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / 2).sqrt().clamp_min(1e-12)
        ok = ((a > 0).double().mean(0) >= tau) & (score > 0)
        idx = ok.nonzero().flatten()
        chosen.update(idx[score[idx].argsort(descending=True)][:top_n].tolist())
    return sorted(chosen)
