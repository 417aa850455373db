"""Text-tower selection sweep (issue #15 part 3), selection split only (UTKFace validation faces, selection concepts).

Grid: site (text.2 = locate's skew peak, every token edited; text.5 = last block, CLS only) x probing
(``labels``: DeBiasLens exclusive rule on the lab's gendered label captions; ``pairs-mean`` / ``pairs-cls``: paired
contrast of gendered minimal pairs on mean-over-tokens / CLS latents) x top_n x mode x a x value (0 or the neurons'
mean on the neutral corpus = mean ablation); plus linear erasers (LEACE / mean-difference, fitted on the minimal
pairs) centred on the pairs' own mean (the old behaviour) or on the neutral corpus' mean. SAE: corpus of gendered
+ neutral sentences, every token. Usage: ``text_tower_select.py [seed]``; writes results/text_tower/select-seed*.json/.md.
"""
from __future__ import annotations

import sys
import time

import torch

from debias_export.analysis.leace import fit_eraser
from debias_export.analysis.probe import neurons_from_report, probe_pair_contrast, probe_social_neurons
from debias_export.edits import ProjectionEdit, SAEEdit, apply_edits
from text_tower_common import (HEADER, OUT, SelectionScorer, capture, corpus, encode, fmt, label_captions, lab,
                               neutral_corpus, pair_prompts, sae_for, save_json)

SITES = ("text.2",)  # text.5 (CLS-only) SAE edits: exp4/exp8/exp11 of demo_edit_study.md; linear erasers there: text_tower_lean.py
# (mode, a, value) cells; the first is the clean test of the neurons (residual keeps the SAE error)
CELLS = (("residual", 1.0, "0"), ("residual", 0.5, "0"), ("residual", 1.0, "neutral"), ("reconstruct", 1.0, "0"))
PROBES = ("labels/mean n=3", "pairs-mean n=1", "pairs-mean n=3", "pairs-mean n=8", "pairs-cls n=3")


def per_input(store, which: str) -> torch.Tensor:
    return (store.mean_activations() if which == "mean" else store.output_activations()).float()


def probes(site: str, sae) -> dict[str, list[int]]:
    """Neuron lists per probing rule and top_n."""
    fem, male = pair_prompts()
    pf, pm = capture(site, "pairs_f", fem), capture(site, "pairs_m", male)
    lc = capture(site, "labelcap", label_captions())
    which_default = "output" if site.endswith(".5") else "mean"  # the positions the edit reaches
    out = {}
    for top_n in (1, 3, 8):
        rep = probe_social_neurons(encode(sae, per_input(lc, which_default)), lc.labels("gender"), tau=0.1, top_n=top_n)
        out[f"labels/{which_default} n={top_n}"] = neurons_from_report(rep)
        for which in ("mean", "output"):
            rep = probe_pair_contrast(encode(sae, per_input(pf, which)), encode(sae, per_input(pm, which)), top_n=top_n,
                                      min_frequency=0.05)
            out[f"pairs-{'cls' if which == 'output' else 'mean'} n={top_n}"] = neurons_from_report(rep)
    return out


def neutral_value(site: str, sae, neurons: list[int]) -> float:
    """Mean activation of the chosen latents on the neutral corpus, at the positions the edit reaches."""
    st = capture(site, "neutral", neutral_corpus())
    x = st.output_activations() if site.endswith(".5") else st.activations()
    return float(encode(sae, x.float())[:, neurons].mean())


def erasers(site: str) -> dict[str, ProjectionEdit]:
    fem, male = pair_prompts()
    which = "output" if site.endswith(".5") else "mean"
    pf, pm = capture(site, "pairs_f", fem), capture(site, "pairs_m", male)
    x = torch.cat([per_input(pf, which), per_input(pm, which)]).double()
    y = ["Female"] * pf.num_inputs + ["Male"] * pm.num_inputs
    st = capture(site, "neutral", neutral_corpus())
    mu_neutral = per_input(st, which).double().mean(0)
    out = {}
    for method in ("leace", "mean_diff"):
        sub = fit_eraser(x, y, method=method)
        for b in (0.5, 1.0):
            out[f"{method} b={b} centre=pairs"] = ProjectionEdit.from_subspace(site, sub, strength=b)
            e = ProjectionEdit.from_subspace(site, sub, strength=b)
            e.mu = mu_neutral.to(e.mu.dtype) if e.mu is not None else mu_neutral
            out[f"{method} b={b} centre=neutral"] = e
    return out


ERASERS = False  # covered by text_tower_lean.py (same fits, more strengths and a second direction)


def main(seed: int = 0) -> None:
    sc = SelectionScorer()
    results = {"base": sc.base_res | {"utility": sc.base_res["utility"]}}
    lines = [HEADER]
    t0 = time.time()
    for site in SITES:
        sae = sae_for(site, seed=seed)
        for name, neurons in probes(site, sae).items():
            if not neurons or name not in PROBES:
                continue
            v_neutral = neutral_value(site, sae, neurons)
            for mode, a, vname in CELLS:
                v = v_neutral if vname == "neutral" else 0.0
                edit = SAEEdit(site=site, sae=sae, neurons=neurons, alpha=a, mode=mode, value=v)
                key = f"{site} sae {name} {mode} a={a} v={vname} ({len(neurons)}n)"
                r = sc.run(lambda: apply_edits(lab(), [edit]))
                r["neurons"], r["value"] = neurons, v
                results[key] = r
                lines.append(fmt(key, r))
                print(lines[-1], f"{time.time() - t0:.0f}s", flush=True)
                save_json(OUT / f"select-seed{seed}.json", results)
                (OUT / f"select-seed{seed}.md").write_text("\n".join(lines) + "\n")
        if seed == 0 and ERASERS:
            for name, e in erasers(site).items():
                key = f"{site} {name}"
                r = sc.run(lambda: apply_edits(lab(), [e]))
                results[key] = r
                lines.append(fmt(key, r))
                print(lines[-1], flush=True)
        save_json(OUT / f"select-seed{seed}.json", results)
        (OUT / f"select-seed{seed}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
