"""LEACE / difference-of-means erasers on synthetic data with a planted attribute."""
import pytest
import torch

from debias_export.core.errors import DebiasError
from debias_export.analysis.leace import (fair_directions, fit_eraser, fit_leace, fit_mean_diff, one_hot,
                                          probe_accuracy, split_indices)


def planted(n=3000, d=16, classes=3, seed=0, shift=3.0):
    """Correlated Gaussian activations whose class shifts the mean along two planted directions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + mix)  # anisotropic: LEACE != orthogonal projection
    dirs = torch.randn(classes, d, generator=g)
    x = x + shift * dirs[y] + 0.5
    return x.float(), y


def cross_cov(x, y):
    z = one_hot(y)
    return (x.double() - x.double().mean(0)).T @ (z - z.mean(0)) / len(x)


def rel_cross_cov(erased, x, y):
    """||Cov(erased, z)||_F / ||Cov(x, z)||_F: 0 means no linear trace of the labels is left."""
    return float(cross_cov(erased, y).norm() / cross_cov(x, y).norm())


@pytest.mark.parametrize("method", ["leace", "mean_diff"])
def test_erasure_zeroes_cross_covariance_on_training_set(method):
    x, y = planted()
    eraser = fit_eraser(x, y, method=method)
    assert eraser.rank == 2  # 3 one-hot classes -> rank 2
    assert cross_cov(x, y).abs().max() > 0.5  # the planted attribute is there before
    assert rel_cross_cov(eraser.erase(x.double()), x, y) < 1e-6


def test_leace_is_a_projection_and_minimal_change():
    x, y = planted()
    lea, md = fit_leace(x, y), fit_mean_diff(x, y)
    A = lea.matrix()
    assert torch.allclose(A @ A, A, atol=1e-8)  # oblique projection
    xd = x.double()
    change = lambda e: ((e.erase(xd) - xd) ** 2).sum(1).mean()
    # LEACE is the least-squares eraser: it never moves points more than the orthogonal mean-diff eraser
    assert change(lea) < change(md) * 0.999


@pytest.mark.parametrize("method", ["leace", "mean_diff"])
def test_held_out_probe_drops_to_chance(method):
    x, y = planted(classes=3)
    tr, te = split_indices(len(y), 0.3, seed=0, labels=y)
    before = probe_accuracy(x[tr], y[tr], x[te], y[te])
    eraser = fit_eraser(x[tr], y[tr], method=method)
    after = probe_accuracy(eraser.erase(x[tr]), y[tr], eraser.erase(x[te]), y[te])
    assert before > 0.9
    assert abs(after - 1 / 3) < 0.06


def test_string_labels_and_binary_rank_one():
    x, y = planted(classes=2)
    names = ["Female" if int(v) else "Male" for v in y]
    e = fit_leace(x, names)
    assert e.rank == 1
    assert rel_cross_cov(e.erase(x.double()), x, y) < 1e-6


def test_fair_directions_are_orthonormal_and_orthogonal_to_bias():
    x, y = planted()
    e = fit_leace(x, y)
    raw = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    F = fair_directions(raw, e)
    assert F.shape == (16, 3)
    assert torch.allclose(F.T @ F, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert (F.T @ e.out_dirs).abs().max() < 1e-10
    # and therefore orthogonal to the cross-covariance: amplifying F leaks nothing about y
    z = one_hot(y)
    sxz = (x.double() - x.double().mean(0)).T @ (z - z.mean(0))
    assert (F.T @ sxz).abs().max() / sxz.abs().max() < 1e-8


def test_degenerate_covariance_after_layernorm():
    """LayerNorm outputs have a null direction (all-ones); the eraser must not blow up on it."""
    x, y = planted(n=1000)
    x = torch.nn.functional.layer_norm(x, (16,))
    e = fit_leace(x, y)
    assert torch.isfinite(e.in_dirs).all() and torch.isfinite(e.out_dirs).all()
    assert rel_cross_cov(e.erase(x.double()), x, y) < 1e-6


def test_errors():
    x, y = planted(n=50)
    with pytest.raises(DebiasError, match="50 activations but 49 labels"):
        fit_leace(x, y[:49])
    with pytest.raises(DebiasError, match="unknown erasure method"):
        fit_eraser(x, y, method="pca")
    with pytest.raises(DebiasError, match="at least 2 groups"):
        fit_mean_diff(x, torch.zeros(50, dtype=torch.long))
    with pytest.raises(DebiasError, match="no linear information"):
        fit_leace(x, torch.zeros(50, dtype=torch.long))
