"""Exp 5b: the relaxed 'contrast' probing rule (frequent in g, ranked by standardised mean difference, no
exclusivity) on the image.3 output-token SAEs of three seeds, top_n 3 / 10, reconstruct a=0.6 / 0.8 / 1.0.
Writes results/exp5b.json + exp5b.md.
"""
from __future__ import annotations

from pathlib import Path

from study_common import HEADER, Evaluator, capture, lab, row, sae_for, save_json
from study_edits import diagnose, probe_contrast, sae_edit

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
            neurons = probe_contrast(sae, st, "output", tau=0.05, top_n=top_n)
            diag = diagnose(sae, st, neurons)
            print("seed", seed, "top_n", top_n, neurons, {k: round(v, 3) for k, v in diag.items()}, flush=True)
            for alpha in (0.6, 0.8, 1.0):
                name = f"seed={seed} contrast top_n={top_n} reconstruct a={alpha} ({len(neurons)} n)"
                r = ev.run(sae_edit(SITE, sae, neurons, alpha, "reconstruct"), "image")
                r["neurons"], r["diag"] = neurons, diag
                results[name] = r
                lines.append(row(name, r))
                print(lines[-1], flush=True)
        save_json(OUT / "exp5b.json", results)
        (OUT / "exp5b.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
