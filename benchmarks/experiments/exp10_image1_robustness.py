"""Exp 10: the best sweep cell (image.1, exclusive probing on output-token latents, tau 0.2, residual mode) across
three SAE seeds, with random-latent controls of the same size (residual a=1.0). The cell was picked by looking at
FairFace numbers (exp3), so this run is the check that it is not a lucky draw. Writes results/exp10.json + .md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from study_common import HEADER, Evaluator, capture, lab, row, sae_for, save_json
from study_edits import diagnose, latents, probe, sae_edit

OUT = Path(__file__).parent / "results"
SITE = "image.1"


def main() -> None:
    a = lab()
    ev = Evaluator(a)
    st = capture(a, SITE, "utk_images")
    results, lines = {}, [HEADER]
    for seed in (0, 1, 2):
        sae = sae_for(st, f"utk_images-{SITE}", seed=seed)
        freq = (latents(sae, st.output_activations()) > 0).float().mean(0)
        for top_n in (3, 10):
            neurons, _ = probe(sae, st, "output", tau=0.2, top_n=top_n)
            diag = diagnose(sae, st, neurons)
            print("seed", seed, "top_n", top_n, neurons, {k: round(v, 3) for k, v in diag.items()}, flush=True)
            for mode, alpha in (("residual", 0.6), ("residual", 1.0), ("reconstruct", 0.6)):
                name = f"seed={seed} tau=0.2 top_n={top_n} {mode} a={alpha} ({len(neurons)} n)"
                r = ev.run(sae_edit(SITE, sae, neurons, alpha, mode), "image")
                r["neurons"], r["diag"] = neurons, diag
                results[name] = r
                lines.append(row(name, r))
                print(lines[-1], flush=True)
            if top_n == 10:
                pool = [i for i in (freq >= 0.2).nonzero().flatten().tolist() if i not in neurons]
                g = torch.Generator().manual_seed(100 + seed)
                for j in range(3):
                    ns = sorted(pool[i] for i in torch.randperm(len(pool), generator=g)[:len(neurons)].tolist())
                    name = f"seed={seed} CONTROL random {j} ({len(ns)} n) residual a=1.0"
                    r = ev.run(sae_edit(SITE, sae, ns, 1.0, "residual"), "image")
                    r["neurons"] = ns
                    results[name] = r
                    lines.append(row(name, r))
                    print(lines[-1], flush=True)
        save_json(OUT / "exp10.json", results)
        (OUT / "exp10.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
