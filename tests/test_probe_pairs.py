"""Minimal-pair probing: the pair builder (data.captions) and the paired-contrast latent rule (analysis.probe)."""
from __future__ import annotations

import pytest
import torch

from debias_export.analysis.probe import neurons_from_report, probe_pair_contrast
from debias_export.core.errors import DebiasError, ShapeError
from debias_export.data.captions import PAIR_TEMPLATES, PAIR_WORDS, gendered_minimal_pairs


def test_pairs_differ_only_in_the_gender_word():
    pairs = gendered_minimal_pairs(["engineer", "baker"])
    assert len(pairs) == 2 * len(PAIR_TEMPLATES) * len(PAIR_WORDS)
    assert pairs[0] == ("a photo of a woman who is an engineer", "a photo of a man who is an engineer", "engineer")
    for f, m, _c in pairs:
        fw, mw = f.split(), m.split()
        assert len(fw) == len(mw)
        diff = [(x, y) for x, y in zip(fw, mw) if x != y]
        # exactly one word differs, and it is the gender word pair (possibly with the template's comma)
        assert len(diff) == 1 and (diff[0][0].rstrip(","), diff[0][1].rstrip(",")) in PAIR_WORDS


def test_pairs_article_fix_applies_per_side():
    (f, m, _), = gendered_minimal_pairs(["nurse"], templates=("a {g} is {c}",), words=(("elderly woman", "man"),))
    assert f == "an elderly woman is nurse" and m == "a man is nurse"


@pytest.mark.parametrize("kwargs", [{"templates": ("a {g}",)}, {"templates": ("{c} only",)},
                                    {"words": (("man", "man"),)}, {"words": (("", "man"),)}])
def test_pairs_bad_input(kwargs):
    with pytest.raises(DebiasError):
        gendered_minimal_pairs(["engineer"], **kwargs)
    with pytest.raises(DebiasError):
        gendered_minimal_pairs([" "])


def _pairs(n=40, f=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, f, generator=g).relu()
    a, b = base.clone(), base.clone()
    b = b + 0.05 * torch.randn(n, f, generator=g)  # noise on every latent: no exact ties
    return a, b, g


def test_contrast_finds_the_latents_that_move_with_the_word():
    a, b, g = _pairs()
    a[:, 4] += 1.0 + 0.1 * torch.rand(40, generator=g)  # higher on the female side in every pair
    b[:, 7] += 0.8 + 0.1 * torch.rand(40, generator=g)  # higher on the male side
    rep = probe_pair_contrast(a, b, top_n=1)
    assert rep["groups"]["Female"]["neurons"][0]["index"] == 4
    assert rep["groups"]["Male"]["neurons"][0]["index"] == 7
    assert neurons_from_report(rep) == [4, 7]
    assert neurons_from_report(rep, ["Male"]) == [7]


def test_contrast_ignores_latents_that_fire_on_both_sides():
    # latent 2 is large on every sentence (a "this is about a person" latent) but equal within each pair:
    # the label rule would rank it first for one group, the paired rule must not pick it at all
    a, b, g = _pairs()
    a[:, 2] += 5.0
    b[:, 2] = a[:, 2]
    a[:, 9] += 0.3 + 0.05 * torch.rand(40, generator=g)
    rep = probe_pair_contrast(a, b, top_n=3)
    assert 2 not in neurons_from_report(rep)
    assert rep["groups"]["Female"]["neurons"][0]["index"] == 9


def test_contrast_frequency_floor():
    a, b, g = _pairs()
    a[:, 5] = 0.0
    a[:3, 5] = 10.0  # large mean difference carried by 3 of 40 pairs
    b[:, 5] = 0.0
    picked = neurons_from_report(probe_pair_contrast(a, b, top_n=12, min_frequency=0.0), ["Female"])
    assert 5 in picked
    picked = neurons_from_report(probe_pair_contrast(a, b, top_n=12, min_frequency=0.2), ["Female"])
    assert 5 not in picked


def test_contrast_bad_input():
    a = torch.rand(5, 4)
    with pytest.raises(ShapeError):
        probe_pair_contrast(a, torch.rand(6, 4))
    with pytest.raises(ShapeError):
        probe_pair_contrast(a[0], a[0])
    with pytest.raises(DebiasError):
        probe_pair_contrast(a[:1], a[:1])
    with pytest.raises(DebiasError):
        probe_pair_contrast(a, a, top_n=0)
    with pytest.raises(DebiasError):
        probe_pair_contrast(a, a, min_frequency=1.5)
    with pytest.raises(DebiasError):
        probe_pair_contrast(a, a, groups=("F", "F"))
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DebiasError):
        probe_pair_contrast(bad, a)


def test_contrast_identical_pairs_select_nothing():
    a = torch.rand(10, 6)
    rep = probe_pair_contrast(a, a.clone(), top_n=3)
    assert rep["neurons"] == []
