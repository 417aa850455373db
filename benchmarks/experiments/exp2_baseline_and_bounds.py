"""Exp 2: the demo's edits as configured (last block, mean-activation probing) with diagnostics, and LEACE bounds.

For each tower: the demo SAE (k=16, x8, 600 steps on random-k=2 tokens), probed on per-input mean latents
(the pipeline) and on output-token latents; how much gender the chosen neurons carry at the output token;
FairFace MaxSkew at a=0.6 / 1.0 in both modes; LEACE gender erasure at the site (output token, the only
position a last-block edit reaches) and on the embedding. Writes results/exp2.json and results/exp2.md.
"""
from __future__ import annotations

from pathlib import Path

from study_common import HEADER, SOURCES, Evaluator, capture, embed_inputs, lab, row, sae_for, save_json
from study_edits import OutputEraser, diagnose, leace_site, probe, sae_edit

OUT = Path(__file__).parent / "results"
TOWERS = {"image": ("image.3", "utk_images"), "text": ("text.5", "utk_captions")}


def main() -> None:
    a = lab()
    ev = Evaluator(a)
    results, lines = {}, []
    for tower, (site, source) in TOWERS.items():
        st = capture(a, site, source)
        sae = sae_for(st, f"{source}-{site}")
        lines += [f"\n### {tower} tower, {site} (SAE k=16 x8 600 steps)\n", HEADER]
        for which in ("mean", "output"):
            neurons, report = probe(sae, st, which, tau=0.1, top_n=3)
            diag = diagnose(sae, st, neurons)
            results[f"{tower}/{which}/diag"] = {"neurons": neurons, **diag}
            print(tower, which, neurons, diag, flush=True)
            for mode in ("reconstruct", "residual"):
                for alpha in (0.6, 1.0):
                    r = ev.run(sae_edit(site, sae, neurons, alpha, mode), tower)
                    name = f"{tower} probe={which} {mode} a={alpha} ({len(neurons)} n)"
                    results[name] = r
                    lines.append(row(name, r))
                    print(lines[-1], flush=True)
        for strength in (1.0,):
            r = ev.run(leace_site(site, st, "output", strength), tower)
            name = f"{tower} LEACE at {site} (output token) b={strength}"
            results[name] = r
            lines.append(row(name, r))
            print(lines[-1], flush=True)
        emb = embed_inputs(a, tower, SOURCES[source]())
        r = ev.run(tower=tower, fold=OutputEraser(a, tower, emb, st.labels("gender")))
        name = f"{tower} LEACE on the embedding"
        results[name] = r
        lines.append(row(name, r))
        print(lines[-1], flush=True)
    base = {s: {"max_skew": ev.base_res[s]["max_skew"], "floor": ev.floor[s]} for s in ev.base_res if s != "utility"}
    results["base"] = base | {"utility": ev.base_res["utility"]}
    save_json(OUT / "exp2.json", results)
    (OUT / "exp2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
