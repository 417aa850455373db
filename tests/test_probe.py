"""Social-neuron probing: planted group neurons are found exactly; tau; errors; CLI on a real capture dir."""
import json

import pytest
import torch

from debias_export.core.errors import DebiasError, ShapeError
from debias_export.analysis.probe import neurons_from_report, probe_social_neurons


def _planted(n_per=40, F=30, seed=0):
    """Groups A, B, C. Latent 3 fires on 80% of A (strong), 4 on 60% of A (weaker), 7 on 90% of B,
    11 on 50% of C (nowhere else); latents 0-1 fire on everyone; every other latent fires on 2 random samples of each
    group (5% < tau=0.1, so never frequent)."""
    g = torch.Generator().manual_seed(seed)
    labels = ["A"] * n_per + ["B"] * n_per + ["C"] * n_per
    lat = torch.zeros(3 * n_per, F)
    for j in sorted(set(range(2, F)) - {3, 4, 7, 11}):
        for grp in range(3):
            rows = grp * n_per + torch.randperm(n_per, generator=g)[:2]
            lat[rows, j] = torch.rand(2, generator=g) + 0.1
    lat[:, :2] = 1.0 + torch.rand(3 * n_per, 2, generator=g)

    def plant(neuron, group, frac, value):
        rows = [i for i, lab in enumerate(labels) if lab == group][: int(frac * n_per)]
        lat[rows, neuron] = value

    plant(3, "A", 0.8, 2.0)
    plant(4, "A", 0.6, 1.0)
    plant(7, "B", 0.9, 1.5)
    plant(11, "C", 0.5, 3.0)
    return lat, labels


def test_planted_neurons_are_found_exactly():
    lat, labels = _planted()
    rep = probe_social_neurons(lat, labels, tau=0.1, top_n=1)
    assert {g: [n["index"] for n in v["neurons"]] for g, v in rep["groups"].items()} == {"A": [3], "B": [7], "C": [11]}
    assert rep["neurons"] == [3, 7, 11]
    a = rep["groups"]["A"]
    assert a["n"] == 40 and a["num_specific"] == 2  # 3 and 4; shared 0-1 and 3%-noise latents excluded
    assert a["num_frequent"] == 4  # 0, 1, 3, 4
    top = a["neurons"][0]
    assert top["mean_activation"] == pytest.approx(0.8 * 2.0)
    assert top["frequency"] == pytest.approx(0.8)
    assert top["selectivity"] is None and top["other_mean_activation"] == 0  # never fires outside A: infinite
    rep2 = probe_social_neurons(lat, labels, tau=0.1, top_n=3)
    assert [n["index"] for n in rep2["groups"]["A"]["neurons"]] == [3, 4]  # ranked by mean activation in A
    assert neurons_from_report(rep2, ["A"]) == [3, 4]
    json.dumps(rep2, allow_nan=False)  # strict JSON: no inf/nan


def test_tau_controls_membership():
    lat, labels = _planted()
    # tau above 0.6 drops latent 4 (60% of A); above 0.8 drops latent 3 as well
    assert [n["index"] for n in probe_social_neurons(lat, labels, tau=0.7, top_n=5)["groups"]["A"]["neurons"]] == [3]
    assert probe_social_neurons(lat, labels, tau=0.85, top_n=5)["groups"]["A"]["neurons"] == []
    # exactly at the boundary: 24 of 40 = 0.6 counts as frequent (>=), no float rounding surprise
    assert 4 in [n["index"] for n in probe_social_neurons(lat, labels, tau=0.6, top_n=5)["groups"]["A"]["neurons"]]
    # a tiny tau makes the noise latents frequent everywhere, so they are never specific
    rep = probe_social_neurons(lat, labels, tau=0.01, top_n=30)
    for v in rep["groups"].values():
        assert all(n["index"] in (3, 4, 7, 11) for n in v["neurons"])


def test_latent_frequent_in_two_groups_is_not_specific():
    lat, labels = _planted()
    lat[40:60, 3] = 2.0  # latent 3 now also fires on half of B
    rep = probe_social_neurons(lat, labels, tau=0.1, top_n=1)
    assert [n["index"] for n in rep["groups"]["A"]["neurons"]] == [4]
    assert 3 not in rep["neurons"]


def test_selectivity_finite_when_other_groups_fire():
    lat, labels = _planted()
    lat[45, 3] = 1.0  # one B sample fires latent 3: still below tau in B
    n = probe_social_neurons(lat, labels)["groups"]["A"]["neurons"][0]
    assert n["index"] == 3 and n["other_mean_activation"] > 0
    assert n["selectivity"] == pytest.approx(n["mean_activation"] / n["other_mean_activation"])


def test_missing_labels_are_left_out_and_counted():
    lat, labels = _planted()
    labels = list(labels)
    labels[0], labels[1] = None, ""
    rep = probe_social_neurons(lat, labels)
    assert rep["num_unlabelled"] == 2 and rep["groups"]["A"]["n"] == 38


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(groups=["A", "Z"]), DebiasError, "group 'Z' has no samples"),
    (dict(groups=["A"]), DebiasError, "at least two groups"),
    (dict(min_group_size=41), DebiasError, "fewer than min_group_size"),
    (dict(tau=1.5), DebiasError, "tau"),
    (dict(top_n=0), DebiasError, "top_n"),
])
def test_errors(kwargs, err, match):
    lat, labels = _planted()
    with pytest.raises(err, match=match):
        probe_social_neurons(lat, labels, **kwargs)


def test_shape_errors():
    lat, labels = _planted()
    with pytest.raises(ShapeError, match="labels for"):
        probe_social_neurons(lat, labels[:-1])
    with pytest.raises(ShapeError):
        probe_social_neurons(lat[0], labels)
    with pytest.raises(DebiasError, match="NaN"):
        probe_social_neurons(lat * float("nan"), labels)


def test_cli_probe_on_capture(tmp_path, clip):
    """End to end: capture a tiny CLIP's image tower over labelled images, then probe a random SAE."""
    import numpy as np
    from PIL import Image

    from debias_export.capture import capture_activations
    from debias_export.cli.main import main
    from debias_export.data.datasets import LabelledImages
    from debias_export.workflow.testing import random_sae

    rng = np.random.default_rng(0)
    lines = ["file,gender"]
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        lines.append(f"im{i}.png,{'m' if i % 2 else 'f'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    cap = tmp_path / "cap"
    capture_activations(clip, "image.1", LabelledImages(tmp_path / "labels.csv", image_dir=tmp_path), cap,
                        tokens="all", progress=False)
    random_sae(32, 64, threshold=0.0).save(tmp_path / "sae")
    out = tmp_path / "report.json"
    args = ["probe", "--capture", str(cap), "--sae", str(tmp_path / "sae"), "--column", "gender", "--tau", "0.3",
            "--top-n", "2", "--out", str(out)]
    assert main(args) == 0
    rep = json.loads(out.read_text())
    assert set(rep["groups"]) == {"f", "m"} and rep["groups"]["m"]["n"] == 6
    assert rep["num_latents"] == 64 and rep["sources"]["site"].startswith("image.1")
    assert main(args) == 2  # refuses to overwrite
    # labels from a separate CSV, joined on the file column
    (tmp_path / "other.csv").write_text("file,mood\n" + "".join(f"im{i}.png,{'x' if i < 6 else 'y'}\n" for i in range(12)))
    assert main(args[:-1] + [str(tmp_path / "r1.json"), "--labels", str(tmp_path / "other.csv"), "--column", "mood"]) == 0
    assert json.loads((tmp_path / "r1.json").read_text())["groups"]["x"]["n"] == 6
    assert main(args[:-1] + [str(tmp_path / "r2.json"), "--column", "nope"]) == 2
    random_sae(16, 64).save(tmp_path / "sae16")
    assert main(["probe", "--capture", str(cap), "--sae", str(tmp_path / "sae16"), "--column", "gender",
                 "--out", str(tmp_path / "r3.json")]) == 2
    assert not (tmp_path / "r3.json").exists()
