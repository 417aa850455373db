"""Erase one label and keep another (``fit_leace(keep=...)``, ``project --keep``, recipe ``edit.keep``).

Oracles: LEACE's own algebra (the kept labels' cross-covariance is unchanged, the erased one's shrinks to its part
along the kept directions) and a coordinate construction where the answer is known without any fit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from debias_export import load_edit
from debias_export.analysis.leace import fit_eraser, fit_leace, one_hot
from debias_export.core.errors import ConfigError
from debias_export.cli.main import main


def xcov(x: torch.Tensor, labels) -> torch.Tensor:
    z = one_hot(labels)
    return (x.double() - x.double().mean(0)).T @ (z - z.mean(0)) / x.shape[0]


def entangled(n: int = 3000, d: int = 12, seed: int = 0):
    """Gender and 4 age groups, each written into its own directions, plus a gender direction shared with age:
    group 0 (children) is written with the same vector as 'female'."""
    g = torch.Generator().manual_seed(seed)
    gender = torch.randint(0, 2, (n,), generator=g)
    age = torch.randint(0, 4, (n,), generator=g)
    dirs = torch.randn(6, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x += gender[:, None] * dirs[0] + one_hot(age.tolist()) @ dirs[1:5] + 0.8 * ((age == 0) | (gender == 1))[:, None] * dirs[5]
    return x, [["F", "M"][i] for i in gender.tolist()], [str(i) for i in age.tolist()]


def test_kept_labels_cross_covariance_is_unchanged_and_the_rest_of_gender_is_erased():
    x, gender, age = entangled()
    plain, kept = fit_leace(x, gender), fit_leace(x, gender, keep=[age])
    assert kept.rank == 1 and plain.rank == 1
    # plain LEACE takes some of age with it; the age-keeping eraser leaves age's cross-covariance exactly as it was
    assert float((xcov(plain.erase(x), age) - xcov(x, age)).norm()) > 1e-3 * float(xcov(x, age).norm())
    assert torch.allclose(xcov(kept.erase(x), age), xcov(x, age), atol=1e-12, rtol=1e-9)
    # gender's cross-covariance goes to 0 under plain LEACE, and shrinks (only its age-aligned part stays) when kept
    assert float(xcov(plain.erase(x), gender).norm()) < 1e-10
    left = float(xcov(kept.erase(x), gender).norm())
    assert 1e-6 < left < 0.5 * float(xcov(x, gender).norm())
    # what stays lies along the kept directions: erasing gender *and* age afterwards removes all of it
    both = fit_leace(kept.erase(x), [f"{a}{b}" for a, b in zip(gender, age)])
    assert float(xcov(both.erase(kept.erase(x)), gender).norm()) < 1e-10


def test_independent_coordinates_give_plain_leace_back():
    """Gender in coordinate 0, age in coordinates 1-2, identity noise: the kept span is orthogonal to gender's,
    so keeping age changes nothing and the erased direction is coordinate 0."""
    g = torch.Generator().manual_seed(1)
    n = 4000
    gender = torch.randint(0, 2, (n,), generator=g)
    age = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    x[:, 0] += 2.0 * gender
    x[:, 1:3] += 2.0 * one_hot(age.tolist())[:, :2]
    plain, kept = fit_leace(x, gender.tolist()), fit_leace(x, gender.tolist(), keep=[age.tolist()])
    assert torch.allclose(plain.matrix(), kept.matrix(), atol=0.05)  # sample cross-covariances are not exactly 0
    assert abs(float(kept.in_dirs[:, 0].abs().argmax())) == 0


def test_a_label_that_is_all_age_cannot_be_erased_while_keeping_age():
    x, _, age = entangled()
    label = ["young" if a in ("0", "1") else "old" for a in age]  # a function of age: nothing of it outside age
    with pytest.raises(ConfigError, match="nothing is left to erase"):
        fit_leace(x, label, keep=[age])
    with pytest.raises(ConfigError, match="needs method leace"):
        fit_eraser(x, label, method="mean_diff", keep=[age])


@pytest.fixture(scope="module")
def aged_capture(tmp_path_factory):
    """48 noise images with gender and integer ages (one red-shifted group), captured at tiny-clip's image.-1."""
    from PIL import Image

    d = tmp_path_factory.mktemp("keep")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        arr = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
        if i % 2:
            arr[..., 0] = np.clip(arr[..., 0].astype(int) + 60, 0, 255)
        if i % 3 == 0:
            arr[..., 2] = np.clip(arr[..., 2].astype(int) + 60, 0, 255)
        rows.append(f"{i}.png,{'Female' if i % 2 else 'Male'},{5 + 2 * i}")  # 48 distinct ages
        Image.fromarray(arr).save(d / f"{i}.png")
    (d / "labels.csv").write_text("file,gender,age\n" + "\n".join(rows) + "\n")
    assert main(["capture", "--model", "tiny-clip", "--site", "image.-1", "--images", str(d / "labels.csv"),
                 "--out", str(d / "cap"), "--no-progress"]) == 0
    return d


def test_project_keep_age_bins_integer_ages_and_records_it(aged_capture, tmp_path):
    from debias_export.capture.store import ActivationStore
    from debias_export.data.captions import age_bin

    out = tmp_path / "e"
    assert main(["project", "--capture", str(aged_capture / "cap"), "--column", "gender", "--keep", "age",
                 "--out", str(out)]) == 0
    edit = load_edit(out)
    assert edit.provenance["kept_labels"] == ["age"] and edit.in_dirs.shape[1] == 1
    store = ActivationStore(aged_capture / "cap")
    x = store.output_activations()
    bins = [age_bin(a) for a in store.labels("age")]
    assert len(set(bins)) == 8  # 48 distinct ages (5-99) in 8 of FairFace's bins: what the eraser kept
    assert main(["project", "--capture", str(aged_capture / "cap"), "--column", "gender", "--out", str(tmp_path / "p")]) == 0

    def age_moved(e) -> float:  # relative change of age's cross-covariance (the edit's tensors are stored as fp32)
        after = x.double() - ((x.double() - e.mu.double()) @ e.in_dirs.double()) @ e.out_dirs.double().T
        return float((xcov(after, bins) - xcov(x, bins)).norm() / xcov(x, bins).norm())

    assert age_moved(edit) < 1e-4 and age_moved(load_edit(tmp_path / "p")) > 1e-2
    # the exported model's card says what was kept
    assert main(["export", "--model", "tiny-clip", "--edit", str(out), "--out", str(tmp_path / "b"), "--no-onnx"]) == 0
    cards = list((tmp_path / "b").rglob("README.md"))
    assert cards and any("erases gender keeping the linear information of age" in c.read_text() for c in cards)


@pytest.mark.parametrize("argv,words", [
    (["--keep", "gender"], "cannot erase 'gender' and keep it"),
    (["--keep", "age", "--method", "mean-diff"], "needs method leace"),
    (["--keep", "mood"], "no label column 'mood'"),
])
def test_project_keep_bad_inputs_are_one_line(aged_capture, tmp_path, capsys, argv, words):
    out = tmp_path / "e"
    assert main(["project", "--capture", str(aged_capture / "cap"), "--column", "gender", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not out.exists()


def _recipe(tmp_path: Path, shared_data: str, **edit) -> Path:
    # every 120th UTKFace face: ages and genders mixed (the file's first rows are 61 ten-year-old boys, where
    # gender is a function of the age bin and nothing could be erased while keeping age)
    rows = (Path(shared_data) / "utkface" / "labels.csv").read_text().splitlines()
    (tmp_path / "spread.csv").write_text("\n".join([rows[0], *rows[1::120]]) + "\n")
    raw = {"name": "keep", "model": {"spec": "tiny-clip"}, "site": "image.-1",
           "data": {"dir": shared_data, "images": str(tmp_path / "spread.csv"),
                    "image_dir": str(Path(shared_data) / "utkface" / "images")},
           "capture": {"tokens": "output", "batch_size": 64}, "probe": {"column": "gender"},
           "edit": {"kind": "projection", "strength": 1.0, **edit}, "export": {"onnx": False},
           "select": {"limit": 40, "k": 5, "grid": {"edit.keep": [[], ["age"]]}},
           "eval": {"alphas": [0.0, 1.0], "k": 5}, "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_recipe_grid_chooses_between_keeping_age_or_not(tmp_path, shared_data):
    assert main(["run", str(_recipe(tmp_path, shared_data)), "--no-progress"]) == 0
    out = tmp_path / "out"
    cells = json.loads((out / "selection.json").read_text())["cells"]
    assert [c["cell"]["edit.keep"] for c in cells] == [[], ["age"]]
    assert cells[0]["skew_change"] != cells[1]["skew_change"]  # two different erasers were scored
    summary = json.loads((out / "summary.json").read_text())[0]
    edit = load_edit(out / "edit")
    assert edit.provenance.get("kept_labels", []) == summary["chosen"]["edit.keep"]


def test_recipe_keep_needs_leace(tmp_path, shared_data, capsys):
    assert main(["run", str(_recipe(tmp_path, shared_data, method="mean_diff")), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "edit.keep" in err[0]
