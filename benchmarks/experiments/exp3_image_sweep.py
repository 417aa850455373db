"""Exp 3: image-tower sweep of the SAE edit: layer x probing activations x top_n x tau x mode x alpha.

Neurons are chosen on UTKFace only; every configuration is scored on FairFace 540 (so picking the best row
here is hyperparameter tuning on the evaluation set, reported as such). Writes results/exp3.json + exp3.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

from study_common import HEADER, Evaluator, capture, lab, row, sae_for, save_json
from study_edits import probe, sae_edit

OUT = Path(__file__).parent / "results"
# image.3 got the full grid; the earlier layers (run later, CPU-bound) a reduced one
TAUS = {3: (0.05, 0.1, 0.2), 1: (0.1, 0.2), 2: (0.1, 0.2)}
TOP_NS = {3: (1, 3, 10, 30), 1: (3, 10, 30), 2: (3, 10, 30)}


def main(argv: list[str]) -> None:
    a = lab()
    ev = Evaluator(a)
    results, lines = {}, [HEADER]
    layers = [int(x) for x in argv] if argv else [1, 2, 3]
    for layer in layers:
        site = f"image.{layer}"
        st = capture(a, site, "utk_images")
        sae = sae_for(st, f"utk_images-{site}")
        for which in ("mean", "output"):
            for tau in TAUS[layer]:
                for top_n in TOP_NS[layer]:
                    try:
                        neurons, _ = probe(sae, st, which, tau=tau, top_n=top_n)
                    except Exception as exc:  # noqa: BLE001 - e.g. no specific latents at this tau
                        print(site, which, tau, top_n, "no neurons:", exc, flush=True)
                        continue
                    if not neurons:
                        continue
                    for mode, alpha in (("reconstruct", 0.6), ("reconstruct", 1.0), ("residual", 1.0)):
                        name = f"{site} {which} tau={tau} top_n={top_n} {mode} a={alpha} ({len(neurons)} n)"
                        r = ev.run(sae_edit(site, sae, neurons, alpha, mode), "image")
                        r["neurons"] = neurons
                        results[name] = r
                        lines.append(row(name, r))
                        print(lines[-1], flush=True)
        save_json(OUT / f"exp3-{'-'.join(map(str, layers))}.json", results)
        (OUT / f"exp3-{'-'.join(map(str, layers))}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
