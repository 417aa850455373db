"""Exp 6b: does the text tower's gender concept explain which neutral prompts lean female/male on FairFace?

Per prompt: lean = mean cosine to female minus male FairFace faces; text gender score = cosine to "a photo of a
woman" minus to "a photo of a man". Pearson r over prompts, per set; plus the image-side analogue (how well the
text gender axis separates FairFace faces). Writes results/exp6b.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from study_common import SETS, Evaluator, lab, save_json

OUT = Path(__file__).parent / "results"


def main() -> None:
    ev = Evaluator(lab(), boot=10)
    e = ev.base
    fem = torch.tensor([g == "Female" for g in ev.labels])
    w, m = e["text:gender"][0], e["text:gender"][1]
    res = {}
    for s in SETS:
        t = e[f"text:prompts/{s}"]
        sc = t @ e["fairface"].T
        lean = sc[:, fem].mean(1) - sc[:, ~fem].mean(1)
        g = t @ w - t @ m
        r = float(torch.corrcoef(torch.stack([lean, g]))[0, 1])
        res[s] = {"pearson_lean_vs_text_gender": r, "lean_abs_mean": float(lean.abs().mean()),
                  "lean_sd": float(lean.std()), "text_gender_sd": float(g.std())}
        print(s, res[s], flush=True)
    d = e["fairface"] @ (w - m)
    res["image_axis"] = {"female_minus_male_projection": float(d[fem].mean() - d[~fem].mean()),
                         "projection_sd": float(d.std())}
    print(res["image_axis"])
    save_json(OUT / "exp6b.json", res)


if __name__ == "__main__":
    main()
