"""MAML as MAP: gradient steps on a quadratic support loss are Bayesian inference under an implicit Gaussian prior.

Grant, Finn, Levine, Darrell & Griffiths (2018), "Recasting Gradient-Based Meta-Learning as
Hierarchical Bayes", sec. 3.1: for linear regression, ``N`` steps of gradient descent with rate
``alpha`` from ``theta`` on a task's squared-error support loss land exactly on the MAP estimate
under a Gaussian prior centred at ``theta``, with a precision fixed by ``alpha``, ``N`` and the
support inputs (early stopping is a prior; Santos 1996).

**The loss scaling used everywhere here** is metalens's support loss
(:func:`metalens.learners.gradient.support_loss`): the mean squared error over the ``S`` support
points ``X [S, d]`` (rows ``x_s``), ``y [S]``::

    L(w) = (1/S) sum_s (x_s . w - y_s)^2,      grad L(w) = H w - b,      H = 2 X^T X / S,  b = 2 X^T y / S.

In the eigenbasis of ``H`` (eigenvalues ``lambda``), ``N`` steps ``w <- w - alpha grad L(w)`` from
``theta`` move each component towards a least-squares solution ``w_LS`` by the factor
``1 - (1 - alpha lambda)^N``, while the MAP estimate under ``N(theta, P^-1)`` with ``P`` diagonal
in that basis, i.e. the minimiser of ``L(w) + 1/2 (w - theta)^T P (w - theta)``, moves it by
``lambda / (lambda + p)``. Equating the two gives the implicit prior precision
(:func:`implicit_precision`)::

    p(lambda) = lambda (1 - alpha lambda)^N / (1 - (1 - alpha lambda)^N),

``+inf`` where ``lambda = 0`` (gradient steps never move along directions the support set does
not see: there the prior is infinitely strong), and ``p -> 1 / (alpha N)`` as ``alpha lambda -> 0``.
For ``0 < alpha lambda < 1`` it is positive (a proper prior).

In this scaling the Bayes posterior of the ``linear`` family (noise variance ``sigma^2``, prior
``w ~ N(0, I / tau)``, ``tau = d``) is the MAP estimate with ``theta = 0`` and the isotropic
precision ``p* = 2 sigma^2 tau / S`` (:func:`true_precision`): multiply the negative
log-posterior ``||X w - y||^2 / (2 sigma^2) + tau ||w||^2 / 2`` by ``2 sigma^2 / S``.

All functions compute in float64 and take batches: ``X [..., S, d]``, ``y [..., S]``,
``theta [..., d]``.

>>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.tensor([1.0, 2.0]); theta = torch.zeros(2)
>>> gd = gradient_descent(X, y, theta, alpha=0.1, steps=3)
>>> prior = lambda lam: implicit_precision(lam, alpha=0.1, steps=3)
>>> torch.allclose(gd, map_estimate(X, y, theta, precision=prior), atol=1e-12)
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["support_hessian", "shrinkage", "implicit_precision", "true_precision", "gradient_descent",
           "gradient_descent_loop", "map_estimate", "spectrum", "precision_mismatch"]

Precision = Callable[[Tensor], Tensor]  # eigenvalues lambda of H -> prior precisions p(lambda) (inf allowed)


def _f64(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(torch.float64) for t in ts)


def _check_rate(alpha: float, steps: int) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def support_hessian(X: Tensor) -> Tensor:
    """``H = 2 X^T X / S``, the Hessian of the mean squared support loss: ``X [..., S, d]`` -> ``[..., d, d]``.

    >>> support_hessian(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    tensor([[1., 0.],
            [0., 4.]], dtype=torch.float64)
    """
    (X,) = _f64(X)
    return 2.0 * X.transpose(-1, -2) @ X / X.shape[-2]


def spectrum(X: Tensor, *, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``lambda [..., d]`` (ascending) and eigenvectors ``V [..., d, d]`` of :func:`support_hessian`.

    Eigenvalues below ``rtol * lambda_max`` (default ``d * eps``: the rank tolerance of
    ``torch.linalg.matrix_rank``) are set to exactly 0: directions the support set does not span
    (every one of them when ``S < d`` leaves ``d - S``).

    >>> lam, V = spectrum(torch.tensor([[1.0, 1.0]]))  # S = 1 < d = 2: one direction unseen
    >>> lam
    tensor([0., 4.], dtype=torch.float64)
    """
    lam, V = torch.linalg.eigh(support_hessian(X))
    tol = (rtol if rtol is not None else lam.shape[-1] * torch.finfo(torch.float64).eps)
    lam = torch.where(lam <= tol * lam[..., -1:].clamp_min(0), torch.zeros_like(lam), lam)
    return lam, V


def shrinkage(lam: Tensor, *, alpha: float, steps: int) -> Tensor:
    """``1 - (1 - alpha lambda)^N``: the fraction of the way to least squares that ``N`` steps go along ``lambda``.

    Computed as ``-expm1(N log1p(-alpha lambda))`` where ``alpha lambda < 1`` (exact for small
    ``alpha lambda``, where ``1 - (1 - alpha lambda)^N`` would cancel).

    >>> shrinkage(torch.tensor([0.0, 1.0, 10.0]), alpha=0.1, steps=1)
    tensor([0.0000, 0.1000, 1.0000], dtype=torch.float64)
    """
    _check_rate(alpha, steps)
    (lam,) = _f64(torch.as_tensor(lam))
    a = alpha * lam
    small = a < 1
    stable = -torch.expm1(steps * torch.log1p(-torch.where(small, a, torch.zeros_like(a))))
    return torch.where(small, stable, 1.0 - (1.0 - a) ** steps)


def implicit_precision(lam: Tensor, *, alpha: float, steps: int) -> Tensor:
    """The prior precision that ``N`` gradient steps of rate ``alpha`` impose along an eigenvalue ``lambda`` of ``H``.

    ``p = lambda (1 - alpha lambda)^N / (1 - (1 - alpha lambda)^N)`` (Grant et al. 2018, sec. 3.1, in
    the loss scaling of the module docstring): the MAP estimate under ``N(theta, P^-1)`` then equals
    the ``N``-step iterate. ``+inf`` where ``lambda = 0`` (or ``N = 0``: no step is an infinitely strong
    prior), ``0`` where ``alpha lambda = 1`` (one step lands on least squares), negative where
    ``(1 - alpha lambda)^N < 0`` (``alpha lambda > 1``, odd ``N``: the iterate overshoots, no proper
    prior reaches it). As ``alpha lambda -> 0``, ``p alpha N -> 1``.

    >>> implicit_precision(torch.tensor([0.0, 1e-8, 0.5]), alpha=0.05, steps=4) * 0.05 * 4
    tensor([   inf, 1.0000, 0.9383], dtype=torch.float64)
    """
    (lam,) = _f64(torch.as_tensor(lam))
    s = shrinkage(lam, alpha=alpha, steps=steps)
    p = lam * (1.0 - s) / torch.where(s == 0, torch.ones_like(s), s)
    return torch.where(s == 0, torch.full_like(p, float("inf")), p)


def true_precision(*, noise_var: float, prior_precision: float, shots: int) -> float:
    """The isotropic precision of the Bayes posterior of Gaussian linear regression in this module's loss scaling.

    ``p* = 2 sigma^2 tau / S`` for noise variance ``sigma^2``, prior ``w ~ N(0, I / tau)`` and ``S``
    support points (the ``linear`` family has ``tau = d``).

    >>> true_precision(noise_var=0.25, prior_precision=8, shots=16)
    0.25
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    return 2.0 * noise_var * prior_precision / shots


def gradient_descent(X: Tensor, y: Tensor, theta: Tensor, *, alpha: float, steps: int) -> Tensor:
    """``N`` steps of gradient descent on the mean squared support loss from ``theta``, in closed form.

    ``w_N = theta - V diag((1 - (1 - alpha lambda)^N) / lambda) V^T grad L(theta)`` with the
    factor ``alpha N`` where ``lambda = 0`` (there the gradient has no component anyway).
    ``X [..., S, d]``, ``y [..., S]``, ``theta [..., d]`` -> ``[..., d]`` (float64).

    >>> gradient_descent(torch.ones(1, 1), torch.ones(1), torch.zeros(1), alpha=0.25, steps=2)  # 1 - (1/2)^2
    tensor([0.7500], dtype=torch.float64)
    """
    X, y, theta = _f64(X, y, theta)
    lam, V = spectrum(X)
    s = shrinkage(lam, alpha=alpha, steps=steps)
    seen = lam > 0
    factor = torch.where(seen, s / torch.where(seen, lam, torch.ones_like(lam)), torch.full_like(lam, alpha * steps))
    return theta - _in_basis(V, factor, _grad(X, y, theta))


def gradient_descent_loop(X: Tensor, y: Tensor, theta: Tensor, *, alpha: float, steps: int) -> Tensor:
    """The reference for :func:`gradient_descent`: the ``N`` steps ``w <- w - alpha (H w - b)`` one by one."""
    _check_rate(alpha, steps)
    X, y, w = _f64(X, y, theta)
    for _ in range(steps):
        w = w - alpha * _grad(X, y, w)
    return w


def map_estimate(X: Tensor, y: Tensor, theta: Tensor, *, precision: Precision | float) -> Tensor:
    """The MAP estimate ``argmin_w L(w) + 1/2 (w - theta)^T P (w - theta)`` for a prior precision ``P = p(H)``.

    ``precision``: a number (``P = p I``) or a function of the eigenvalues ``lambda`` of ``H`` (a
    spectral prior, diagonal in the eigenbasis of ``H``; ``+inf`` pins a direction at ``theta``).
    Setting the gradient to zero, ``(H + P)(w - theta) = -grad L(theta)``, so
    ``w = theta - V diag(1 / (lambda + p(lambda))) V^T grad L(theta)``; a direction with
    ``lambda + p = 0`` (no data, flat prior) is left at ``theta``. ``X [..., S, d]``, ``y [..., S]``,
    ``theta [..., d]`` -> ``[..., d]`` (float64).

    With ``theta = 0`` and ``p = true_precision(...)`` it is the conjugate posterior mean
    (ridge regression with ``lambda_ridge = sigma^2 tau``):

    >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]]); y = torch.tensor([1.0, 0.0, 2.0])
    >>> ridge = torch.linalg.solve(X.T @ X + 0.3 * torch.eye(2), X.T @ y)
    >>> p = true_precision(noise_var=0.1, prior_precision=3.0, shots=3)
    >>> torch.allclose(map_estimate(X, y, torch.zeros(2), precision=p), ridge.double())
    True
    """
    X, y, theta = _f64(X, y, theta)
    lam, V = spectrum(X)
    p = precision(lam) if callable(precision) else torch.full_like(lam, float(precision))
    denom = lam + p
    ok = torch.isfinite(denom) & (denom != 0)
    inv = torch.where(ok, 1.0 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return theta - _in_basis(V, inv, _grad(X, y, theta))


def precision_mismatch(lam: Tensor, *, alpha: float, steps: int, target: float) -> Tensor:
    """How far the implicit prior of ``(alpha, N)`` is from an isotropic precision ``target``, on the shrinkage scale.

    The mean over the eigenvalues ``lam`` (of the support Hessians of some tasks, pooled) of
    ``(s_GD(lambda) - lambda / (lambda + target))^2`` with ``s_GD`` = :func:`shrinkage`: both are
    ``lambda / (lambda + p)``, the fraction of the way to least squares that the estimate goes, for
    ``p`` the implicit and the target precision. It weighs a mismatch by what it changes in the
    estimate: none where both priors are far weaker or far stronger than the data. Returns a
    0-dim float64 tensor.

    >>> lam = torch.tensor([0.5, 1.0, 2.0])
    >>> [round(float(precision_mismatch(lam, alpha=1e-3, steps=n, target=1.0)), 3) for n in (100, 1000)]
    [0.16, 0.02]
    """
    (lam,) = _f64(torch.as_tensor(lam))
    s_true = lam / (lam + target)
    return ((shrinkage(lam, alpha=alpha, steps=steps) - s_true) ** 2).mean()


def _grad(X: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """``grad L(w) = 2 X^T (X w - y) / S`` for ``X [..., S, d]``, ``y [..., S]``, ``w [..., d]``."""
    r = (X @ w[..., None])[..., 0] - y  # [..., S]
    return 2.0 * (X.transpose(-1, -2) @ r[..., None])[..., 0] / X.shape[-2]


def _in_basis(V: Tensor, diag: Tensor, v: Tensor) -> Tensor:
    """``V diag(diag) V^T v`` for ``V [..., d, d]``, ``diag [..., d]``, ``v [..., d]``."""
    return (V @ (diag * (V.transpose(-1, -2) @ v[..., None])[..., 0])[..., None])[..., 0]
