"""Exp 12: how precisely can caption recall@k resolve a utility cost? Paired bootstrap over caption queries of the
R@10 / R@50 change for the proposed image.1 edits (SAE seed 0). Writes results/exp12.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from debias_export.edits import apply_edits
from debias_export.analysis.metrics import cosine_scores
from debias_export.eval.retrieval import fairface_caption
from study_common import Evaluator, capture, lab, sae_for, save_json
from study_edits import probe, sae_edit

OUT = Path(__file__).parent / "results"


def per_query_recall(ev: Evaluator, emb: dict, k: int) -> torch.Tensor:
    captions = ev.text_groups["captions"]
    truth = [fairface_caption(r) for r in ev.data.fairface]
    rel = torch.tensor([[t == c for t in truth] for c in captions])
    top = cosine_scores(emb["text:captions"], emb["fairface"]).topk(k, dim=1).indices
    hits = rel.gather(1, top).float().sum(1)
    return hits / rel.float().sum(1).clamp(max=k)


def main() -> None:
    a = lab()
    ev = Evaluator(a, boot=10)
    st = capture(a, "image.1", "utk_images")
    sae = sae_for(st, "utk_images-image.1", seed=0)
    neurons, _ = probe(sae, st, "output", tau=0.2, top_n=3)
    res = {}
    for mode, alpha in (("residual", 1.0), ("reconstruct", 0.6)):
        h = apply_edits(a, sae_edit("image.1", sae, neurons, alpha, mode))
        try:
            emb = dict(ev.base) | ev._embed("image")
        finally:
            h.remove()
        for k in (10, 50):
            b, p = per_query_recall(ev, ev.base, k), per_query_recall(ev, emb, k)
            g = torch.Generator().manual_seed(0)
            rel = []
            for _ in range(2000):
                i = torch.randint(0, len(b), (len(b),), generator=g)
                rel.append(float(p[i].mean() / b[i].mean() - 1))
            rel_t = torch.tensor(rel)
            key = f"{mode} a={alpha} R@{k}"
            res[key] = {"before": float(b.mean()), "after": float(p.mean()), "rel": float(p.mean() / b.mean() - 1),
                        "ci95": [float(rel_t.quantile(0.025)), float(rel_t.quantile(0.975))], "queries": len(b)}
            print(key, res[key], flush=True)
    save_json(OUT / "exp12.json", res)


if __name__ == "__main__":
    main()
