"""Exp 5: is the image-tower result robust? Output-token SAEs at image.3 with three training seeds, exclusive
(DeBiasLens) probing on output-token latents, top_n 3 / 10, reconstruct mode, a in 0.6 / 0.8 / 1.0.
Writes results/exp5.json + exp5.md.
"""
from __future__ import annotations

from pathlib import Path

from study_common import HEADER, Evaluator, capture, lab, row, sae_for, save_json
from study_edits import diagnose, fvu, probe, sae_edit

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
        for top_n in (3, 10):
            neurons, _ = probe(sae, st, "output", tau=0.1, top_n=top_n)
            diag = diagnose(sae, st, neurons) | {"fvu_output_token": fvu(sae, st_out.output_activations())}
            print("seed", seed, "top_n", top_n, neurons, {k: round(v, 3) for k, v in diag.items()}, flush=True)
            for alpha in (0.6, 0.8, 1.0):
                name = f"seed={seed} exclusive top_n={top_n} reconstruct a={alpha} ({len(neurons)} n)"
                r = ev.run(sae_edit(SITE, sae, neurons, alpha, "reconstruct"), "image")
                r["neurons"], r["diag"] = neurons, diag
                results[name] = r
                lines.append(row(name, r))
                print(lines[-1], flush=True)
        save_json(OUT / "exp5.json", results)
        (OUT / "exp5.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
