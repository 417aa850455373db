"""Exp 7: SAE size / sparsity / training length for the image.3 output-token SAE (seed 0), with exclusive
probing (tau 0.1, top_n 10) on output-token latents, reconstruct mode a=0.6 / 1.0. Writes results/exp7.json + .md.
"""
from __future__ import annotations

from pathlib import Path

from study_common import HEADER, Evaluator, capture, lab, row, sae_for, save_json
from study_edits import diagnose, fvu, probe, sae_edit

OUT = Path(__file__).parent / "results"
SITE = "image.3"
GRID = [(16, 8, 600), (8, 8, 600), (32, 8, 600), (16, 4, 600), (16, 16, 600), (16, 8, 2000)]


def main() -> None:
    a = lab()
    ev = Evaluator(a)
    st_out = capture(a, SITE, "utk_images", tokens="output", k=1)
    st = capture(a, SITE, "utk_images")
    results, lines = {}, [HEADER]
    for k, x, steps in GRID:
        sae = sae_for(st_out, f"utk_images-{SITE}-outputtok", k=k, expansion=x, steps=steps)
        neurons, _ = probe(sae, st, "output", tau=0.1, top_n=10)
        diag = diagnose(sae, st, neurons) | {"fvu_output_token": fvu(sae, st_out.output_activations())}
        print(k, x, steps, neurons, {n: round(v, 3) for n, v in diag.items()}, flush=True)
        for alpha in (0.6, 1.0):
            name = f"k={k} x{x} steps={steps} reconstruct a={alpha} ({len(neurons)} n)"
            r = ev.run(sae_edit(SITE, sae, neurons, alpha, "reconstruct"), "image")
            r["neurons"], r["diag"] = neurons, diag
            results[name] = r
            lines.append(row(name, r))
            print(lines[-1], flush=True)
        save_json(OUT / "exp7.json", results)
        (OUT / "exp7.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
