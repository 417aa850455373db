"""Linear concept erasure: LEACE in closed form, difference of group means, and a torch linear probe.

LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form"): with
``Sigma_xx`` the covariance of the activations, ``Sigma_xz`` their cross-covariance with the
(one-hot) labels, ``W = (Sigma_xx^{1/2})^+`` the whitening map and ``P`` the orthogonal projection
onto the column space of ``W Sigma_xz``, the eraser is

    r(x) = x - W^+ P W (x - mu).

``A = W^+ P W`` is an oblique projection of rank ``r <= classes - 1``. We keep it factored as
``A = out_dirs @ in_dirs.T`` with ``out_dirs = W^+ Q``, ``in_dirs = W Q`` (``Q`` an orthonormal basis
of ``P``'s range), so applying it costs O(d * r). Everything is fitted in float64: the guarantee
``Cov(r(x), z) = 0`` is algebraic and holds to rounding on the training set.

Difference of means erases the span of the group-mean differences orthogonally (``A = D D^T``).
For one-hot labels that span equals the column space of ``Sigma_xz``, so it also zeroes the
cross-covariance; LEACE does so with the least mean squared change (it accounts for ``Sigma_xx``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.errors import ConfigError, ShapeError

METHODS = ("leace", "mean_diff")


@dataclass
class ErasureSubspace:
    """A rank-``r`` projection ``A = out_dirs @ in_dirs.T`` and the mean it erases towards."""

    in_dirs: torch.Tensor  # [d, r]
    out_dirs: torch.Tensor  # [d, r]
    mu: torch.Tensor  # [d]
    method: str = "leace"

    @property
    def rank(self) -> int:
        return int(self.in_dirs.shape[1])

    @property
    def dim(self) -> int:
        return int(self.in_dirs.shape[0])

    def matrix(self) -> torch.Tensor:
        """Dense ``A`` (``[d, d]``, float64; acts on column vectors)."""
        return self.out_dirs.double() @ self.in_dirs.double().T

    def erase(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``x - strength * A (x - mu)`` for row vectors ``x`` (computed in float64)."""
        xd = x.double()
        out = xd - strength * ((xd - self.mu.double()) @ self.in_dirs.double()) @ self.out_dirs.double().T
        return out.to(x.dtype)


def encode_labels(labels: "Sequence | torch.Tensor") -> tuple[torch.Tensor, list]:
    """Class ids (``LongTensor[n]``) and the sorted class names of ``labels`` (strings or ints)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    classes = sorted(set(labels), key=str)
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[v] for v in labels], dtype=torch.long), classes


def one_hot(labels: "Sequence | torch.Tensor") -> torch.Tensor:
    """One-hot float64 matrix ``[n, classes]``; a 2-D float tensor is taken as ``z`` as-is."""
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        return labels.double()
    ids, classes = encode_labels(labels)
    return torch.nn.functional.one_hot(ids, len(classes)).double()


def _check(x: torch.Tensor, n_labels: int) -> torch.Tensor:
    if x.dim() != 2:
        raise ShapeError(f"activations must be [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] != n_labels:
        raise ShapeError(f"{x.shape[0]} activations but {n_labels} labels")
    if x.shape[0] < 2:
        raise ConfigError("need at least 2 labelled activations to fit an eraser")
    return x.double()


def _range_basis(m: torch.Tensor, tol: float) -> torch.Tensor:
    """Orthonormal basis of ``m``'s column space (singular values below ``tol * max`` dropped; ``[d, 0]`` if none)."""
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return u[:, :0]
    return u[:, s > tol * s.max()]


def fit_leace(x: torch.Tensor, labels: "Sequence | torch.Tensor", eig_tol: float = 1e-9,
              svd_tol: float = 1e-6, keep: "Sequence[Sequence | torch.Tensor]" = ()) -> ErasureSubspace:
    """Closed-form LEACE eraser for activations ``x [n, d]`` and labels (class list or ``z [n, k]``).

    ``eig_tol``/``svd_tol`` are relative cut-offs: eigen-directions of ``Sigma_xx`` below
    ``eig_tol * max`` are treated as null (e.g. the mean direction after a LayerNorm), singular
    values of ``W Sigma_xz`` below ``svd_tol * max`` as zero (one-hot labels always give one).

    ``keep``: other labelings of the same inputs (e.g. age bins) whose linear information must survive.
    The erased subspace is then the part of ``W Sigma_xz`` orthogonal (in whitened space) to every
    ``W Sigma_xk``, so ``Cov(r(x), k) = Cov(x, k)`` exactly while ``Cov(r(x), z)`` keeps only the part of
    the label's cross-covariance that lies along the kept labels' directions (why: on a model whose
    gender direction leans on its age directions, plain LEACE of gender erases age recognition too).
    """
    z = one_hot(labels)
    xd = _check(x, z.shape[0])
    n = xd.shape[0]
    mu = xd.mean(0)
    xc = xd - mu
    zc = z - z.mean(0)
    sigma_xx = xc.T @ xc / n
    sigma_xz = xc.T @ zc / n
    evals, evecs = torch.linalg.eigh(sigma_xx)
    nonnull = evals > eig_tol * evals.max().clamp_min(torch.finfo(torch.float64).tiny)
    ev, V = evals[nonnull], evecs[:, nonnull]
    W = (V * ev.rsqrt()) @ V.T  # (Sigma^{1/2})^+
    W_pinv = (V * ev.sqrt()) @ V.T  # Sigma^{1/2}
    target = W @ sigma_xz
    if keep:
        kept = []
        for other in keep:
            k = one_hot(other)
            if k.shape[0] != n:
                raise ShapeError(f"{k.shape[0]} kept labels for {n} activations")
            kept.append(W @ (xc.T @ (k - k.mean(0)) / n))
        K = _range_basis(torch.cat(kept, dim=1), svd_tol)
        residual = target - K @ (K.T @ target)
        if float(residual.norm()) <= svd_tol * float(target.norm()):
            raise ConfigError("the labels' linear information lies entirely along the kept labels' directions; "
                              "nothing is left to erase without erasing them")
        target = residual
    Q = _range_basis(target, svd_tol)
    if Q.shape[1] == 0:
        raise ConfigError("labels carry no linear information about the activations (zero cross-covariance); nothing to erase")
    return ErasureSubspace(in_dirs=W @ Q, out_dirs=W_pinv @ Q, mu=mu, method="leace")


def group_mean_differences(x: torch.Tensor, labels: "Sequence | torch.Tensor") -> torch.Tensor:
    """``[d, classes]`` matrix of group mean minus overall mean (float64)."""
    ids, classes = encode_labels(labels)
    xd = _check(x, len(ids))
    if len(classes) < 2:
        raise ConfigError(f"need at least 2 groups to find a bias direction, got {len(classes)}")
    mu = xd.mean(0)
    return torch.stack([xd[ids == c].mean(0) - mu for c in range(len(classes))], dim=1)


def orthonormal_basis(m: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (``[d, r]``) of the column space of ``m`` (relative singular-value cut-off)."""
    m = m.double()
    if m.numel() == 0:
        return m.new_zeros(m.shape[0], 0)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    if float(s.max()) == 0.0:
        return m.new_zeros(m.shape[0], 0)
    return u[:, s > tol * s.max()]


def fit_mean_diff(x: torch.Tensor, labels: "Sequence | torch.Tensor") -> ErasureSubspace:
    """Orthogonal eraser of the span of group-mean differences (rank ``classes - 1``)."""
    D = orthonormal_basis(group_mean_differences(x, labels))
    return ErasureSubspace(in_dirs=D, out_dirs=D.clone(), mu=x.double().mean(0), method="mean_diff")


def fit_eraser(x: torch.Tensor, labels: "Sequence | torch.Tensor", method: str = "leace",
               keep: "Sequence[Sequence | torch.Tensor]" = ()) -> ErasureSubspace:
    """Fit the bias subspace with ``method`` ("leace" or "mean_diff"); ``keep``: see :func:`fit_leace`."""
    if method == "leace":
        return fit_leace(x, labels, keep=keep)
    if method == "mean_diff":
        if keep:
            raise ConfigError("keeping other labels' information needs method leace (mean_diff erases orthogonally)")
        return fit_mean_diff(x, labels)
    raise ConfigError(f"unknown erasure method {method!r}; expected one of {', '.join(METHODS)}")


def fair_directions(directions: torch.Tensor, bias: ErasureSubspace | None = None, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormalise ``directions [d, m]`` after removing their component in the bias subspace.

    The bias subspace is the range of ``A`` (``out_dirs``). Directions orthogonal to it are also
    orthogonal to every column of ``Sigma_xz``, so amplifying them (``g F F^T o``) re-introduces no
    linear information about the erased attribute.
    """
    F = directions.double()
    if F.dim() == 1:
        F = F[:, None]
    if bias is not None:
        if F.shape[0] != bias.dim:
            raise ShapeError(f"fair directions have width {F.shape[0]}, bias subspace has width {bias.dim}")
        B = orthonormal_basis(bias.out_dirs)
        F = F - B @ (B.T @ F)
    return orthonormal_basis(F, tol)


# ----- decodability: a small multinomial logistic-regression probe ---------------------------------
def train_probe(x: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, l2: float = 1e-3,
                steps: int = 100, seed: int = 0) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]":
    """Fit a standardised linear softmax classifier with L-BFGS; returns ``(W, b, mean, std)``."""
    torch.manual_seed(seed)
    x = x.double()
    k = int(num_classes or int(labels.max()) + 1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    xs = (x - mean) / std
    W = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ W + b, labels) + l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach(), mean, std


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   l2: float = 1e-3, steps: int = 100) -> float:
    """Held-out accuracy of a linear probe trained on ``(x_train, y_train)``."""
    k = int(max(int(y_train.max()), int(y_test.max())) + 1)
    W, b, mean, std = train_probe(x_train, y_train, k, l2=l2, steps=steps)
    pred = (((x_test.double() - mean) / std) @ W + b).argmax(-1)
    return float((pred == y_test).double().mean())


def split_indices(n: int, test_fraction: float = 0.3, seed: int = 0, labels: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-seed train/test split, stratified by ``labels`` when given."""
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        cut = int(round(n * (1 - test_fraction)))
        return perm[:cut], perm[cut:]
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(len(idx) * (1 - test_fraction)))
        train.append(idx[:cut])
        test.append(idx[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
