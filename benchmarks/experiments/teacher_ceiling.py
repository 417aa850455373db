"""How far can a lab trained on UTKFace get on FairFace 540 gender? A ceiling from a real face model (issue #15).

Diagnosis only (no lab setting is chosen from it). The strongest face model installable offline here is dlib's
face-recognition ResNet (PyPI ``dlib-bin`` + ``face_recognition_models``; trained by its author on ~3M faces of
~7.5k identities, in-the-wild photos). Each face: dlib's HOG detector (largest face; the whole image when none is
found), 5-point alignment, 150 px chip, 128-d descriptor. A logistic-regression gender probe is fitted on UTKFace
*training* faces (never the validation split, never FairFace) and read on the UTKFace validation split, its
shifted view (``workflow/biaslab/shifted.py``) and FairFace 540, overall and by age bin. If this teacher, with a
probe trained on the lab's own labels, stays far from 0.85 on FairFace, so will a lab distilled from it.

    pip install dlib-bin face_recognition_models scikit-learn   # not project dependencies
    PYTHONPATH=$PWD python benchmarks/experiments/teacher_ceiling.py [N_TRAIN] > out.json

Descriptors are cached in ``$TMPDIR/teacher_ceiling_*.npy`` (HOG detection is the slow part: ~16 min on one core).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import dlib
import numpy as np
from sklearn.linear_model import LogisticRegression

from debias_export.data.datasets import load_rgb
from debias_export.workflow.biaslab.shifted import degrade

DATA = Path(os.environ.get("DEBIAS_EXPORT_DATA", "/work/shared/data"))
ROOT = Path(__file__).resolve().parents[2]
MODELS = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
UTK_AGE_BINS = ((0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 200))  # FairFace's bins


class Teacher:
    def __init__(self) -> None:
        self.net = dlib.face_recognition_model_v1(str(MODELS / "dlib_face_recognition_resnet_model_v1.dat"))
        self.shape = dlib.shape_predictor(str(MODELS / "shape_predictor_5_face_landmarks.dat"))
        self.detect = dlib.get_frontal_face_detector()

    def __call__(self, img) -> tuple[np.ndarray, bool]:
        a = np.asarray(img.convert("RGB"))
        found = self.detect(a, 1)
        box = max(found, key=lambda d: d.width() * d.height()) if len(found) else dlib.rectangle(0, 0, a.shape[1] - 1, a.shape[0] - 1)
        chip = dlib.get_face_chip(a, self.shape(a, box), size=150, padding=0.25)
        return np.array(self.net.compute_face_descriptor(chip)), bool(len(found))


def describe(teacher: Teacher, name: str, images) -> tuple[np.ndarray, float]:
    cache = Path(tempfile.gettempdir()) / f"teacher_ceiling_{name}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["x"], float(z["detected"])
    out = [teacher(img) for img in images]
    x, detected = np.stack([o[0] for o in out]), float(np.mean([o[1] for o in out]))
    np.savez(cache, x=x, detected=detected)
    return x, detected


def utk_bin(age: int) -> str:
    lo, hi = next(b for b in UTK_AGE_BINS if b[0] <= age <= b[1])
    return f"{lo}-{hi}" if hi < 200 else "70+"


def scores(clf, x: np.ndarray, genders: list[str], bins: list[str]) -> dict:
    right = clf.predict(x) == np.array(genders)
    out = {"all": {"n": len(genders), "acc": round(float(right.mean()), 4)}}
    for b in dict.fromkeys(sorted(bins, key=lambda s: int(s.split("-")[0].rstrip("+")))):
        m = np.array([v == b for v in bins])
        out[b] = {"n": int(m.sum()), "acc": round(float(right[m].mean()), 4)}
    out["pred_male_frac"] = round(float(np.mean(clf.predict(x) == "Male")), 4)
    return out


def main(n_train: int) -> dict:
    t0 = time.time()
    utk = [r for r in csv.DictReader(open(DATA / "utkface" / "labels.csv")) if r["race"]]
    val_files = set((ROOT / "benchmarks/results/biaslab/utkface_val_files.txt").read_text().split())
    val = [r for r in utk if r["file"] in val_files]
    train = [r for r in utk if r["file"] not in val_files]
    random.Random(0).shuffle(train)
    train = train[:n_train]
    ff = list(csv.DictReader(open(DATA / "fairface540" / "labels.csv")))
    teacher = Teacher()
    path = lambda r: DATA / "utkface" / "images" / r["file"]  # noqa: E731
    xt, dt = describe(teacher, f"train{n_train}", (load_rgb(path(r)) for r in train))
    xv, dv = describe(teacher, "val", (load_rgb(path(r)) for r in val))
    xs, ds = describe(teacher, "shifted", (degrade(load_rgb(path(r)), r["file"]) for r in val))
    xf, df = describe(teacher, "fairface540", (load_rgb(DATA / "fairface540" / "images" / r["file"]) for r in ff))
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(xt, [r["gender"] for r in train])
    vb = [utk_bin(int(r["age"])) for r in val]
    return {"teacher": "dlib_face_recognition_resnet_model_v1 (face_recognition_models 0.3.0, dlib-bin)",
            "probe": f"logistic regression on {len(train)} UTKFace training faces (seed 0 sample)",
            "faces_detected": {"train": dt, "utkface_val": dv, "utkface_shifted": ds, "fairface540": df},
            "gender": {"utkface_val": scores(clf, xv, [r["gender"] for r in val], vb),
                       "utkface_shifted": scores(clf, xs, [r["gender"] for r in val], vb),
                       "fairface540": scores(clf, xf, [r["gender"] for r in ff], [r["age"] for r in ff])},
            "seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000), indent=1))
