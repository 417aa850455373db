"""Held-out measurement of the chosen text-tower settings (run ONCE, after the choice is frozen).

FairFace 540 + PAIRS with the evaluation prompts only (the other half of each CSV's concepts plus the stereotype
set; no selection concept), through the library's ``eval.retrieval.compare``; one row per SAE seed with the 95%
concept-bootstrap CI of the MaxSkew change, and the mean over seeds. The chosen settings are read from
``results/text_tower/choice.json`` (written by hand from the selection tables). Writes results/text_tower/eval-seeds<seeds>.json/.md.
Usage: ``text_tower_eval.py [--only=NAME] [seeds...]`` (default 0 1 2).
"""
from __future__ import annotations

import json
import sys

import torch

from debias_export.analysis.leace import fit_eraser
from debias_export.analysis.probe import neurons_from_report, probe_pair_contrast, probe_social_neurons
from debias_export.edits import ProjectionEdit, SAEEdit
from debias_export.eval.retrieval import EvalData, compare
from text_tower_common import (DATA, OUT, capture, encode, lab, label_captions, neutral_corpus, pair_prompts,
                               prompt_split, sae_for, save_json)
from text_tower_lean import lean_labels
from text_tower_leanprobe import lean_neurons

SETS = ("occupations", "adjectives", "activities", "stereotypes")


def per_input(store, which: str) -> torch.Tensor:
    return (store.mean_activations() if which == "mean" else store.output_activations()).float()


def build(choice: dict, seed: int):
    """The edit a choice describes, for one SAE seed (linear erasers have no seed)."""
    site = choice["site"]
    if choice["kind"] == "leace":
        which = "output" if site.endswith(".5") else "mean"
        fem, male = pair_prompts()
        xp = torch.cat([per_input(capture(site, "pairs_f", fem), which), per_input(capture(site, "pairs_m", male), which)]).double()
        xn = per_input(capture(site, "neutral", neutral_corpus()), which).double()
        if choice.get("direction", "pairs") == "lean":
            sub = fit_eraser(xn, lean_labels([r["text"] for r in neutral_corpus().rows]))
        else:
            sub = fit_eraser(xp, ["Female"] * (len(xp) // 2) + ["Male"] * (len(xp) // 2))
        e = ProjectionEdit.from_subspace(site, sub, strength=choice["b"])
        e.mu = (xn if choice["centre"] == "neutral" else xp).mean(0)
        return e, {}
    sae = sae_for(site, seed=seed)
    probe, which = choice["probe"], choice["which"]
    if probe == "lean":
        neurons = lean_neurons(sae, choice["top_n"])
        rep = None
    elif probe == "labels":
        lc = capture(site, "labelcap", label_captions())
        rep = probe_social_neurons(encode(sae, per_input(lc, which)), lc.labels("gender"), tau=0.1, top_n=choice["top_n"])
    else:
        fem, male = pair_prompts()
        rep = probe_pair_contrast(encode(sae, per_input(capture(site, "pairs_f", fem), which)),
                                  encode(sae, per_input(capture(site, "pairs_m", male), which)),
                                  top_n=choice["top_n"], min_frequency=0.05)
    if rep is not None:
        neurons = neurons_from_report(rep)
    v = 0.0
    if choice.get("value") == "neutral":
        st = capture(site, "neutral", neutral_corpus())
        x = st.output_activations() if site.endswith(".5") else st.activations()
        v = float(encode(sae, x.float())[:, neurons].mean())
    return SAEEdit(site=site, sae=sae, neurons=neurons, alpha=choice["a"], mode=choice["mode"], value=v), {"neurons": neurons, "value": v}


def main(seeds: list[int], only: str | None = None) -> None:
    choices = json.loads((OUT / "choice.json").read_text())
    if only:
        choices = {only: choices[only]}
    adapter = lab()
    data = EvalData.load(adapter, DATA)
    data.prompt_sets = prompt_split()["evaluation"]
    results, lines = {}, ["| variant | seed | " + " | ".join(f"{s} MaxSkew change [95% CI]" for s in SETS) +
                          " | PAIRS occ. gender gap | R@10 | R@50 | gender acc | age acc | prompt cos |", "|" + "---|" * 11]
    for name, choice in choices.items():
        for seed in (seeds if choice["kind"] == "sae" else [0]):
            edit, info = build(choice, seed)
            r = compare(adapter, [edit], data=data)
            bc = r["bias_change"]
            u0, u1 = r["base"]["utility"], r["patched"]["utility"]
            p0, p1 = r["base"]["pairs"]["occupations"]["gender_gap"], r["patched"]["pairs"]["occupations"]["gender_gap"]
            row = {"choice": choice, "seed": seed, "info": info, "bias_change": bc,
                   "max_skew": {s: (r["base"]["retrieval"][s]["gender"]["max_skew"], r["patched"]["retrieval"][s]["gender"]["max_skew"]) for s in SETS},
                   "pairs": {"base": r["base"]["pairs"], "patched": r["patched"]["pairs"]},
                   "utility": {"base": u0, "patched": u1}, "fidelity": r["fidelity"]}
            results[f"{name} seed={seed}"] = row
            cells = [name, str(seed)]
            for s in SETS:
                g = bc[s]["gender"]
                b, a = row["max_skew"][s]
                cells.append(f"{b:.3f}->{a:.3f} {100 * g['change']:+.1f}% [{100 * g['ci_low']:+.0f},{100 * g['ci_high']:+.0f}]")
            cells += [f"{p0:.4f}->{p1:.4f}"]
            cells += [f"{u0[k]:.3f}->{u1[k]:.3f}" for k in ("caption_recall@10", "caption_recall@50", "gender_zero_shot_acc", "age_zero_shot_acc")]
            cells += [f"{r['fidelity']['prompt_cosine']['mean']:.3f}" if isinstance(r['fidelity']['prompt_cosine'], dict) else str(r['fidelity']['prompt_cosine'])]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            tag = "-".join(map(str, seeds))
            save_json(OUT / f"eval-seeds{tag}.json", results)
            (OUT / f"eval-seeds{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    only = args.pop(0)[len("--only="):] if args and args[0].startswith("--only=") else None
    main([int(s) for s in args] or [0, 1, 2], only)
