"""SAE neurons probed on *implicit* gender: neutral corpus sentences labelled by the sign of their retrieval lean
over the UTKFace validation faces (the SAE analogue of the ``lean`` eraser in text_tower_lean.py), selection
split only. Rule: DeBiasLens social neurons (exclusive, tau 0.1) on mean-over-token latents at text.2.
Usage: ``text_tower_leanprobe.py [seed]``; writes results/text_tower/leanprobe-seed*.json/.md.
"""
from __future__ import annotations

import sys

from debias_export.analysis.probe import neurons_from_report, probe_social_neurons
from debias_export.edits import SAEEdit, apply_edits
from text_tower_common import HEADER, OUT, SelectionScorer, capture, encode, fmt, lab, neutral_corpus, sae_for, save_json
from text_tower_lean import lean_labels

SITE = "text.2"


def lean_neurons(sae, top_n: int, tau: float = 0.1) -> list[int]:
    neu = neutral_corpus()
    st = capture(SITE, "neutral", neu)
    y = lean_labels([r["text"] for r in neu.rows])
    return neurons_from_report(probe_social_neurons(encode(sae, st.mean_activations().float()), y, tau=tau, top_n=top_n))


def main(seed: int = 0) -> None:
    sc = SelectionScorer()
    sae = sae_for(SITE, seed=seed)
    st = capture(SITE, "neutral", neutral_corpus())
    results, lines = {}, [HEADER]
    for top_n in (3, 8):
        neurons = lean_neurons(sae, top_n)
        v_neutral = float(encode(sae, st.activations().float())[:, neurons].mean()) if neurons else 0.0
        for mode, a, vname in (("residual", 1.0, "0"), ("residual", 1.0, "neutral"), ("residual", 0.5, "neutral")):
            if not neurons:
                continue
            v = v_neutral if vname == "neutral" else 0.0
            edit = SAEEdit(site=SITE, sae=sae, neurons=neurons, alpha=a, mode=mode, value=v)
            key = f"{SITE} sae lean-probe n={top_n} {mode} a={a} v={vname} ({len(neurons)}n)"
            r = sc.run(lambda: apply_edits(lab(), [edit]))
            r["neurons"], r["value"] = neurons, v
            results[key] = r
            lines.append(fmt(key, r))
            print(lines[-1], flush=True)
            save_json(OUT / f"leanprobe-seed{seed}.json", results)
            (OUT / f"leanprobe-seed{seed}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
