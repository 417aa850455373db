"""Zero-shot gender accuracy of a bias lab by age: UTKFace validation split (by age group) and FairFace 540
(by age bin). Reporting only (run after the recipe was fixed): it explains the gender target, since a third of
FairFace 540 are children aged 0-19, whose gender is hard to see at 48 px.

    PYTHONPATH=$PWD nice python benchmarks/experiments/lab_gender_by_age.py [LAB_FOLDER] > out.json

Both image sets go through the evaluation's own preprocessing (``DualEncoderAdapter.prepare_images``).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from debias_export.adapters.dual_encoder import DualEncoderAdapter
from debias_export.workflow.biaslab import lab as lab_mod
from debias_export.data.captions import AGE_GROUPS, age_group

DATA = Path(os.environ.get("DEBIAS_EXPORT_DATA", "/work/shared/data"))


@torch.no_grad()
def accuracy_by(adapter, paths: list[str], genders: list[str], groups: list[str]) -> dict:
    emb = []
    for i in range(0, len(paths), 64):
        px = adapter.prepare_images([Image.open(p).convert("RGB") for p in paths[i:i + 64]])
        emb.append(adapter.embed("image", px))
    emb = torch.nn.functional.normalize(torch.cat(emb), dim=-1)
    txt = torch.nn.functional.normalize(adapter.embed("text", adapter.prepare_texts(["a photo of a woman", "a photo of a man"])), dim=-1)
    pred = (emb @ txt.T).argmax(1)
    right = pred == torch.tensor([0 if g == "Female" else 1 for g in genders])
    out = {"all": {"n": len(paths), "acc": round(float(right.float().mean()), 4)}}
    for g in dict.fromkeys(groups):
        m = torch.tensor([x == g for x in groups])
        out[g] = {"n": int(m.sum()), "acc": round(float(right[m].float().mean()), 4)}
    return out


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else lab_mod.ASSETS
    model, tok, recipe = lab_mod.load_lab(folder)
    adapter = DualEncoderAdapter(model, source=str(folder), processor=tok)
    val = lab_mod.validation_split(DATA, recipe=recipe)
    val = sorted(val, key=lambda r: age_group(r["age"]))
    with open(DATA / "fairface540" / "labels.csv", newline="") as fh:
        ff = list(csv.DictReader(fh))
    bins = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
    ff = sorted(ff, key=lambda r: bins.index(r["age"]))
    res = {"utkface_validation": accuracy_by(adapter, [r["path"] for r in val], [r["gender"] for r in val],
                                             [AGE_GROUPS[age_group(r["age"])][1] for r in val]),
           "fairface540": accuracy_by(adapter, [str(DATA / "fairface540" / "images" / r["file"]) for r in ff],
                                      [r["gender"] for r in ff], [r["age"] for r in ff])}
    for name in res:
        adults = [v for k, v in res[name].items() if k not in ("all", "baby", "little", "teenage", "0-2", "3-9", "10-19")]
        res[name]["adults (20+)"] = {"n": sum(v["n"] for v in adults),
                                     "acc": round(sum(v["acc"] * v["n"] for v in adults) / sum(v["n"] for v in adults), 4)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
