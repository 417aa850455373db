"""Exp 4: last-block edits done consistently: an SAE trained on the output token (the only position the edit
touches), probed on output-token latents, DeBiasLens' exclusive rule vs a relaxed contrast rule, and for the
text tower captions vs gendered-word probing prompts. Writes results/exp4-<tower>.json + .md.

Usage: exp4_output_token_sae.py image|text
"""
from __future__ import annotations

import sys
from pathlib import Path

from study_common import HEADER, Evaluator, capture, lab, row, sae_for, save_json
from study_edits import diagnose, fvu, probe, probe_contrast, sae_edit

OUT = Path(__file__).parent / "results"
PLAN = {"image": ("image.3", ["utk_images"]), "text": ("text.5", ["utk_captions", "gender_words"])}


def main(tower: str) -> None:
    a = lab()
    ev = Evaluator(a)
    site, sources = PLAN[tower]
    train_src = sources[0]
    results, lines = {}, [HEADER]
    st_tok = capture(a, site, train_src)
    st_out = capture(a, site, train_src, tokens="output", k=1)
    saes = {"tokens": sae_for(st_tok, f"{train_src}-{site}"),
            "output": sae_for(st_out, f"{train_src}-{site}-outputtok")}
    for name, sae in saes.items():
        results[f"fvu/{name}"] = {"tokens": fvu(sae, st_tok.activations()), "output_token": fvu(sae, st_out.output_activations())}
        print("FVU", name, results[f"fvu/{name}"], flush=True)
    for sae_name, sae in saes.items():
        for src in sources:
            st = capture(a, site, src)
            for rule in ("exclusive", "contrast"):
                for top_n in ((1, 3, 10, 30) if tower == "image" else (1, 3, 10)):
                    if rule == "exclusive":
                        try:
                            neurons, _ = probe(sae, st, "output", tau=0.1, top_n=top_n)
                        except Exception as exc:  # noqa: BLE001
                            print("no neurons", sae_name, src, top_n, exc, flush=True)
                            continue
                    else:
                        neurons = probe_contrast(sae, st, "output", tau=0.05, top_n=top_n)
                    if not neurons:
                        continue
                    diag = diagnose(sae, st_tok, neurons)
                    for mode, alpha in (("reconstruct", 0.6), ("reconstruct", 1.0), ("residual", 1.0)):
                        name = f"SAE({sae_name}) probe={src}/{rule} top_n={top_n} {mode} a={alpha} ({len(neurons)} n)"
                        r = ev.run(sae_edit(site, sae, neurons, alpha, mode), tower)
                        r["neurons"], r["diag"] = neurons, diag
                        results[name] = r
                        lines.append(row(name, r))
                        print(lines[-1], flush=True)
                    print("diag", {k: round(v, 3) for k, v in diag.items()}, flush=True)
        save_json(OUT / f"exp4-{tower}.json", results)
        (OUT / f"exp4-{tower}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
