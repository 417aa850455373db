"""Exp 11: text tower at an earlier layer (text.3: every token is edited, so mean-activation probing matches the
edit), SAE on random-k caption tokens, neurons from UTKFace captions or gendered words. Writes results/exp11.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

from study_common import HEADER, Evaluator, capture, lab, row, sae_for, save_json
from study_edits import probe, sae_edit

OUT = Path(__file__).parent / "results"


def main(layers: list[str]) -> None:
    a = lab()
    ev = Evaluator(a)
    results, lines = {}, [HEADER]
    for layer in layers:
        site = f"text.{layer}"
        sae = sae_for(capture(a, site, "utk_captions"), f"utk_captions-{site}")
        for src in ("utk_captions", "gender_words"):
            st = capture(a, site, src)
            for top_n in (3, 10):
                neurons, _ = probe(sae, st, "mean", tau=0.1, top_n=top_n)
                if not neurons:
                    continue
                for mode, alpha in (("residual", 0.6), ("residual", 1.0), ("reconstruct", 0.6)):
                    name = f"{site} probe={src}/mean top_n={top_n} {mode} a={alpha} ({len(neurons)} n)"
                    r = ev.run(sae_edit(site, sae, neurons, alpha, mode), "text")
                    r["neurons"] = neurons
                    results[name] = r
                    lines.append(row(name, r))
                    print(lines[-1], flush=True)
        save_json(OUT / "exp11.json", results)
        (OUT / "exp11.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["3"])
