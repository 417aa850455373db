"""Exp 6: why text-tower gender erasure raises skew. Linear erasers (LEACE vs orthogonal mean-difference) fitted on
UTKFace captions or on gendered-word prompts, on the text embedding and at text.5's output token, and the
per-prompt gender lean (mean cosine to female minus male FairFace faces) they leave. Writes results/exp6.json + .md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from study_common import HEADER, SETS, SOURCES, Evaluator, capture, embed_inputs, lab, row, save_json
from study_edits import OutputEraser, leace_site

OUT = Path(__file__).parent / "results"


def lean(ev: Evaluator, emb: dict) -> dict[str, float]:
    """Mean |lean| and mean signed lean (female-minus-male mean cosine) of each prompt set."""
    fem = torch.tensor([g == "Female" for g in ev.labels])
    out = {}
    for s in SETS:
        sc = emb[f"text:prompts/{s}"] @ emb["fairface"].T
        d = sc[:, fem].mean(1) - sc[:, ~fem].mean(1)
        out[s] = {"abs": float(d.abs().mean()), "signed": float(d.mean())}
    return out


def main() -> None:
    a = lab()
    ev = Evaluator(a)
    results, lines = {"lean/base": lean(ev, ev.base)}, [HEADER]
    print("lean base", results["lean/base"], flush=True)
    for src in ("utk_captions", "gender_words"):
        st = capture(a, "text.5", src)
        emb = embed_inputs(a, "text", SOURCES[src]())
        for method in ("leace", "mean_diff"):
            for b in (0.5, 1.0):
                for where in ("embedding", "text.5"):
                    from debias_export.edits import apply_edits

                    if where == "embedding":
                        hook = OutputEraser(a, "text", emb, st.labels("gender"), strength=b, method=method)
                        h = hook()
                    else:
                        h = apply_edits(a, leace_site("text.5", st, "output", strength=b, method=method))
                    try:
                        pe = dict(ev.base) | ev._embed("text")
                    finally:
                        h.remove()
                    r = ev.summarise(pe)
                    r["lean"] = lean(ev, pe)
                    name = f"{method} b={b} on {where}, fitted on {src}"
                    results[name] = r
                    lines.append(row(name, r))
                    print(lines[-1], "lean occ", {k: round(v, 4) for k, v in r["lean"]["occupations"].items()}, flush=True)
    save_json(OUT / "exp6.json", results)
    (OUT / "exp6.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
