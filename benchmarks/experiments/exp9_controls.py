"""Exp 9: controls for the image.3 output-token SAE edit (reconstruct, a=1.0): is the skew drop due to the chosen
gender neurons, or to replacing the CLS by its SAE reconstruction / zeroing any latents?

Per SAE seed: (a) reconstruction only (zero one latent that never fires on UTKFace output tokens), (b) 4 random
sets of latents of the same size drawn from latents active on >= 10% of output tokens, (c) the probed neurons
(exclusive rule, tau 0.1, top_n 10). Writes results/exp9.json + exp9.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from study_common import HEADER, Evaluator, capture, lab, row, sae_for, save_json
from study_edits import latents, probe, sae_edit

OUT = Path(__file__).parent / "results"
SITE = "image.3"


def main() -> None:
    a = lab()
    ev = Evaluator(a)
    st_out = capture(a, SITE, "utk_images", tokens="output", k=1)
    st = capture(a, SITE, "utk_images")
    results, lines = {}, [HEADER]
    for seed in (0, 1, 2):
        sae = sae_for(st_out, f"utk_images-{SITE}-outputtok", seed=seed)
        neurons, _ = probe(sae, st, "output", tau=0.1, top_n=10)
        freq = (latents(sae, st.output_activations()) > 0).float().mean(0)
        dead = int((freq == 0).nonzero().flatten()[0])
        pool = [i for i in (freq >= 0.1).nonzero().flatten().tolist() if i not in neurons]
        g = torch.Generator().manual_seed(seed)
        sets = {"reconstruction only": [dead], "probed": neurons}
        for j in range(4):
            sets[f"random {j}"] = sorted(pool[i] for i in torch.randperm(len(pool), generator=g)[:len(neurons)].tolist())
        for sname, ns in sets.items():
            name = f"seed={seed} {sname} ({len(ns)} n) reconstruct a=1.0"
            r = ev.run(sae_edit(SITE, sae, ns, 1.0, "reconstruct"), "image")
            r["neurons"] = ns
            results[name] = r
            lines.append(row(name, r))
            print(lines[-1], flush=True)
        save_json(OUT / "exp9.json", results)
        (OUT / "exp9.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
