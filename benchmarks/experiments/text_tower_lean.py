"""Text-tower linear erasers, selection split only: which direction and which centre.

``pairs``: LEACE fitted on the gendered minimal pairs (explicit gender word). ``lean``: LEACE fitted on the
*neutral* corpus sentences labelled by the sign of their retrieval lean over the UTKFace validation faces (mean
cosine to female minus male faces, base model): the implicit gender that makes neutral prompts skew. Centre: the
neutral corpus mean (``neutral``) or the pairs' mean (``pairs``, the old behaviour). Sites: text.2 (per-sentence
mean, every token edited) and text.5 (CLS). Strength b sweeps the skew/utility trade-off.
Writes results/text_tower/lean.json/.md.
"""
from __future__ import annotations

import torch

from debias_export.analysis.leace import fit_eraser
from debias_export.edits import ProjectionEdit, apply_edits
from text_tower_common import (HEADER, OUT, SelectionScorer, capture, embed_texts, fmt, lab, neutral_corpus,
                               pair_prompts, save_json, val_image_embeddings, val_rows)


def lean_labels(texts: list[str]) -> list[str]:
    img, rows = val_image_embeddings(), val_rows()
    fem = torch.tensor([r["gender"] == "Female" for r in rows])
    sc = embed_texts(texts) @ img.T
    lean = sc[:, fem].mean(1) - sc[:, ~fem].mean(1)
    med = lean.median()
    return ["Female" if v > med else "Male" for v in lean.tolist()]


def main() -> None:
    sc = SelectionScorer()
    results, lines = {}, [HEADER]
    fem, male = pair_prompts()
    neu = neutral_corpus()
    lean_y = lean_labels([r["text"] for r in neu.rows])
    for site in ("text.2", "text.5"):
        which = "output" if site.endswith(".5") else "mean"

        def acts(st):
            return (st.output_activations() if which == "output" else st.mean_activations()).double()

        xn = acts(capture(site, "neutral", neu))
        xp = torch.cat([acts(capture(site, "pairs_f", fem)), acts(capture(site, "pairs_m", male))])
        yp = ["Female"] * (len(xp) // 2) + ["Male"] * (len(xp) // 2)
        subs = {"pairs": fit_eraser(xp, yp), "lean": fit_eraser(xn, lean_y)}
        for dname, sub in subs.items():
            for centre in ("neutral", "pairs"):
                mu = xn.mean(0) if centre == "neutral" else xp.mean(0)
                for b in (0.25, 0.5, 0.75, 1.0):
                    e = ProjectionEdit.from_subspace(site, sub, strength=b)
                    e.mu = mu.to(torch.float64)
                    key = f"{site} leace dir={dname} centre={centre} b={b}"
                    r = sc.run(lambda: apply_edits(lab(), [e]))
                    results[key] = r
                    lines.append(fmt(key, r))
                    print(lines[-1], flush=True)
        save_json(OUT / "lean.json", results)
        (OUT / "lean.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
