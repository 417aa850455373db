"""Diagnosis after protocol v6 (issue #15): can a gender eraser stay inside the age-accuracy limit that binds the
plain LEACE edits, by keeping age's linear information?

Protocol v6 showed that the edits which move skew most (LEACE at the output, in every writer) exceed the 2% utility
limit through *age* zero-shot accuracy (-6..-7% at b = 0.25). LEACE erases the whitened cross-covariance direction
``u = W Sigma_xg`` of gender; if ``u`` leans on the directions that carry age (``A = W Sigma_xa``, age-bin one-hot),
erasing it also erases age. The age-keeping eraser removes only ``u`` minus its projection on ``A``: then
``Cov(r(x), age)`` is unchanged exactly, and gender's cross-covariance keeps only its part inside age's directions.

Selection split only (the 964 UTKFace validation faces, the ``select`` half of every prompt set's concepts), the
protocol's own score (``selection_score``: mean relative MaxSkew change, utility loss = worst relative drop of age /
race zero-shot accuracy and gender-free caption recall@10). FairFace and PAIRS are not read. Edits act on the lab's
image embedding before normalisation (what ``image-leace-output`` folds into ``visual_projection``), fitted on the
UTKFace faces outside the selection split (the lab's training split, as the demo recipe's fit data).

    .venv/bin/python benchmarks/experiments/keep_age_eraser.py   # ~3 min on 2 cores; writes results/keep_age_eraser.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from debias_export.analysis.leace import ErasureSubspace, fit_leace  # noqa: E402
from debias_export.data.captions import age_bin  # noqa: E402
from debias_export.eval.protocol import selection_score  # noqa: E402
from debias_export.eval.retrieval import SELECT_HALF, EvalData, embed, evaluate, image_pixels, load_prompt_sets  # noqa: E402
from debias_export.workflow.biaslab.data import load_utkface, split_utkface  # noqa: E402
from debias_export.workflow.biaslab.lab import lab_adapter, read_recipe, validation_split  # noqa: E402

DATA = (ROOT / ".." / "shared" / "data").resolve()
UTILITY = ["age_zero_shot_acc", "race_zero_shot_acc", "caption_recall_no_gender@10"]
STRENGTHS = (0.25, 0.5, 1.0)


def keep_age_leace(x: torch.Tensor, gender: list[str], age: list[str]) -> ErasureSubspace:
    """LEACE of gender restricted to the whitened directions orthogonal to age's cross-covariance
    (``fit_leace(keep=...)``), with how much of gender's direction lies outside age's span."""
    plain, kept = fit_leace(x, gender), fit_leace(x, gender, keep=[age])
    # both rank 1: in_dirs = W q, out_dirs = W^+ q, so plain.in_dirs^T kept.out_dirs = cos(q_plain, q_kept), and
    # cos^2 is the share of gender's whitened cross-covariance outside age's span
    share = float((plain.in_dirs.T @ kept.out_dirs).squeeze()) ** 2
    print(f"gender direction outside age's span: {share:.3f} of its squared norm; rank {kept.rank}")
    return kept


@torch.no_grad()
def image_embeddings(adapter, paths: list[str]) -> torch.Tensor:
    px = image_pixels(adapter, paths)
    return torch.cat([adapter.embed("image", {"pixel_values": px[i:i + 256]}) for i in range(0, len(px), 256)]).double()


def main() -> None:
    torch.manual_seed(0)
    adapter = lab_adapter()
    recipe = read_recipe()
    val = [dict(r) for r in validation_split(DATA)]
    val_files = {r["file"] for r in val}
    train, _ = split_utkface(load_utkface(DATA), recipe["settings"]["val_mod"])
    fit = [r for r in train if r["file"] not in val_files]
    x_fit = image_embeddings(adapter, [r["path"] for r in fit])
    genders, ages = [r["gender"] for r in fit], [age_bin(r["age"]) for r in fit]

    paths = [r.pop("path") for r in val]
    data = EvalData.from_images(adapter, val, paths, load_prompt_sets(DATA, half=SELECT_HALF))
    base_img = image_embeddings(adapter, paths)
    norm = torch.nn.functional.normalize
    texts = {k: v for k, v in embed(adapter, data).items() if k.startswith("text:")}
    base = evaluate(adapter, k=50, data=data, embeddings={**texts, "fairface": norm(base_img.float(), dim=-1)})

    erasers = {"leace (plain)": fit_leace(x_fit, genders), "leace keeping age": keep_age_leace(x_fit, genders, ages)}
    rows = []
    for name, eraser in erasers.items():
        for b in STRENGTHS:
            after_img = eraser.erase(base_img, b)
            after = evaluate(adapter, k=50, data=data, embeddings={**texts, "fairface": norm(after_img.float(), dim=-1)})
            score = selection_score(base, after, "gender", UTILITY)
            rows.append({"eraser": name, "strength": b, **score,
                         "gender_zero_shot_acc_change": (after["utility"]["gender_zero_shot_acc"]
                                                         / base["utility"]["gender_zero_shot_acc"] - 1)})
            u = score["utility_change"]
            print(f"{name:18s} b={b:<4} skew {100 * score['skew_change']:+6.1f}%  loss {100 * score['utility_loss']:4.1f}%  "
                  + "  ".join(f"{k.split('_zero')[0].replace('caption_recall_no_gender@10', 'R@10 no-gender')} {100 * v:+.1f}%"
                              for k, v in u.items())
                  + f"  gender acc {100 * rows[-1]['gender_zero_shot_acc_change']:+.1f}%")
    out = Path(__file__).with_name("results") / "keep_age_eraser.json"
    out.write_text(json.dumps({"split": f"UTKFace validation, {len(val)} faces; select half of concepts",
                               "fit": f"{len(fit)} UTKFace faces outside the selection split", "utility": UTILITY,
                               "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
