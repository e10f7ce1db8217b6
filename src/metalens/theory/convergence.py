"""Convergence theory of MAML (Fallah, Mokhtari & Ozdaglar 2020), with the closed forms it takes on linear tasks.

**The meta-objective.** With ``f_i(w)`` the expected loss of task ``i`` (an expectation over its data) and
``alpha`` the inner rate, MAML minimises ``F(w) = E_i f_i(w - alpha grad f_i(w))`` (Fallah et al., eq. 2;
``N`` inner steps: :func:`linear_meta_objective`). A stochastic meta-gradient replaces each expectation
by a batch: the inner step on ``D_in``, the outer gradient on ``D_o``, the Hessian on ``D_h``::

    g_i = (I - alpha grad^2 f_i(w; D_h)) grad f_i(w - alpha grad f_i(w; D_in); D_o)

With the three batches independent (their eq. 8) the only bias left comes from the inner step inside
``grad f_i(.; D_o)``, zero when ``grad f_i`` is affine (a quadratic loss). MAML as usually run shares the
batches: its Hessian and its inner step see the same support set, so ``E g_i`` is the gradient of
another objective, ``F_K(w) = E_i E_S f_i(w - alpha grad f_i(w; S))``, and ``E g - grad F`` does not
shrink however many tasks are averaged.

**Linear tasks in closed form.** For the ``linear`` family (``x ~ N(0, I_d)``, ``w* ~ N(0, I / d)``,
``y = w* . x + eps``, ``eps ~ N(0, s^2)``) and a linear model with a bias, ``theta = (v, b)`` acting on
``z = (x, 1)`` in ``R^p``, ``p = d + 1``, with squared loss ``(theta . z - y)^2``: the task's expected loss
is ``f(theta) = |theta - u|^2 + s^2`` with ``u = (w*, 0)``, since ``E z z^T = I_p``. Every gradient step is
then affine, ``phi - u -> (1 - 2 alpha)(phi - u)``, and, with ``E u = 0``, ``E |u|^2 = 1``::

    F_N(theta) = (1 - 2 alpha)^(2N) (|theta|^2 + 1) + s^2,     grad F_N = 2 (1 - 2 alpha)^(2N) theta

a quadratic in theta (:func:`linear_meta_objective`, :func:`linear_meta_gradient`). The shared-batch
estimator's expectation (one step, ``K`` support points) uses the fourth moments of ``z``:
``E[Sigma_S^2] = I + diag((d + 2) I_d, d) / K`` for ``Sigma_S = Z_S^T Z_S / K``, so::

    E g_shared = 2 M theta,   M = (1 - 2 alpha)^2 I + (4 alpha^2 / K) diag((d + 2) I_d, d)
    bias       = (8 alpha^2 / K) diag((d + 2) I_d, d) theta

(:func:`shared_batch_expected_gradient`, :func:`shared_batch_bias`): of order ``alpha^2 / K``, and
independent of the number of tasks averaged.

>>> theta = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 2.0])  # d = 5: (v, b)
>>> linear_meta_gradient(theta, alpha=0.1).tolist()
[1.2799999713897705, 0.0, 0.0, 0.0, 0.0, 2.559999942779541]
>>> [round(x, 4) for x in shared_batch_bias(theta, alpha=0.1, shots=10, dim=5).tolist()]
[0.056, 0.0, 0.0, 0.0, 0.0, 0.08]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "features",
    "fourth_moment_diagonal",
    "lemma1_bound",
    "linear_meta_gradient",
    "linear_meta_objective",
    "linear_meta_smoothness",
    "loglog_slope",
    "sgd_bound",
    "sgd_step_size",
    "shared_batch_bias",
    "shared_batch_expected_gradient",
    "shared_batch_smoothness",
    "stochastic_meta_gradient",
]


def linear_meta_objective(theta: Tensor, *, alpha: float, steps: int = 1, noise_std: float = 0.0) -> Tensor:
    """``F_N(theta) = (1 - 2 alpha)^(2N) (|theta|^2 + 1) + s^2``: the exact ``N``-step MAML objective of the
    ``linear`` family with a linear model (see the module docstring); ``theta [..., p]``.

    >>> float(linear_meta_objective(torch.zeros(6), alpha=0.25, steps=1))  # (1/2)^2 * 1
    0.25
    """
    return (1 - 2 * alpha) ** (2 * steps) * ((theta**2).sum(-1) + 1.0) + noise_std**2


def linear_meta_gradient(theta: Tensor, *, alpha: float, steps: int = 1) -> Tensor:
    """``grad F_N(theta) = 2 (1 - 2 alpha)^(2N) theta`` (see :func:`linear_meta_objective`).

    >>> theta = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> fd = torch.func.grad(lambda t: linear_meta_objective(t, alpha=0.1, steps=3))(theta)
    >>> torch.allclose(fd, linear_meta_gradient(theta, alpha=0.1, steps=3))
    True
    """
    return 2 * (1 - 2 * alpha) ** (2 * steps) * theta


def linear_meta_smoothness(*, alpha: float, steps: int = 1) -> float:
    """The smoothness constant of ``F_N`` (its Hessian is this times ``I``): ``2 (1 - 2 alpha)^(2N)``.

    >>> linear_meta_smoothness(alpha=0.25, steps=2)
    0.125
    """
    return 2 * (1 - 2 * alpha) ** (2 * steps)


def fourth_moment_diagonal(dim: int) -> Tensor:
    """``diag(E[|z|^2 z z^T]) - 1 = ((d + 2) I_d, d)`` for ``z = (x, 1)``, ``x ~ N(0, I_d)`` (the matrix is
    diagonal): ``E[|x|^2 x x^T] = (d + 2) I`` for a standard Gaussian, ``E[|x|^2 + 1] = d + 1``.

    >>> fourth_moment_diagonal(3).tolist()
    [5.0, 5.0, 5.0, 3.0]
    """
    return torch.tensor([dim + 2.0] * dim + [float(dim)], dtype=torch.float64)


def shared_batch_expected_gradient(theta: Tensor, *, alpha: float, shots: int, dim: int) -> Tensor:
    """``E g_shared = 2 M theta`` with ``M = (1 - 2 alpha)^2 I + (4 alpha^2 / K) diag((d + 2) I_d, d)``: the
    expectation, over tasks and data, of one-step MAML's meta-gradient with the inner step and its Hessian
    on the same ``K = shots`` support points (the outer gradient on independent query points), i.e. the
    gradient of ``F_K`` (module docstring). ``theta [..., d + 1]``.

    >>> theta = torch.ones(6, dtype=torch.float64)
    >>> torch.allclose(shared_batch_expected_gradient(theta, alpha=0.1, shots=10**9, dim=5),
    ...                linear_meta_gradient(theta, alpha=0.1))  # infinitely many shots: no bias
    True
    """
    m = (1 - 2 * alpha) ** 2 + 4 * alpha**2 / shots * fourth_moment_diagonal(dim).to(theta)
    return 2 * m * theta


def shared_batch_bias(theta: Tensor, *, alpha: float, shots: int, dim: int) -> Tensor:
    """``E g_shared - grad F = (8 alpha^2 / K) diag((d + 2) I_d, d) theta`` (one inner step).

    >>> shared_batch_bias(torch.ones(3, dtype=torch.float64), alpha=0.5, shots=2, dim=2).tolist()
    [4.0, 4.0, 2.0]
    """
    return 8 * alpha**2 / shots * fourth_moment_diagonal(dim).to(theta) * theta


def shared_batch_smoothness(*, alpha: float, shots: int, dim: int) -> float:
    """The smoothness constant of ``F_K`` (one step, shared batches): the largest eigenvalue of ``2 M``,
    ``2 ((1 - 2 alpha)^2 + 4 alpha^2 (d + 2) / K)``.

    >>> round(shared_batch_smoothness(alpha=0.1, shots=10, dim=5), 4)
    1.336
    """
    return 2 * ((1 - 2 * alpha) ** 2 + 4 * alpha**2 * (dim + 2) / shots)


def features(x: Tensor) -> Tensor:
    """``z = (x, 1)``: a linear model with a bias as a linear map of ``z`` (``x [..., d]`` -> ``[..., d + 1]``).

    >>> features(torch.zeros(2, 3)).tolist()
    [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    """
    return torch.cat([x, torch.ones_like(x[..., :1])], -1)


def _moments(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``Sigma = Z^T Z / n`` and ``c = Z^T y / n`` of each task's points: ``x [..., n, d]``, ``y [..., n, 1]``."""
    z = features(x)
    n = z.shape[-2]
    return z.transpose(-1, -2) @ z / n, (z.transpose(-1, -2) @ y)[..., 0] / n


def stochastic_meta_gradient(theta: Tensor, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                             *, alpha: float, batches: str = "shared") -> Tensor:
    """One-step MAML's stochastic meta-gradient of each task, in closed form, for a linear model with squared loss.

    ``theta [..., p]`` (``p = d + 1``: weights then bias); ``support_x [..., T, K, d]``, ``support_y
    [..., T, K, 1]``, ``query_x [..., T, Q, d]``, ``query_y``; returns ``[..., T, p]``. With ``Sigma_B`` and
    ``c_B`` the moments of batch ``B`` (``grad L_B(theta) = 2 (Sigma_B theta - c_B)``, Hessian ``2 Sigma_B``)::

        theta' = theta - 2 alpha (Sigma_in theta - c_in)
        g      = (I - 2 alpha Sigma_h) 2 (Sigma_o theta' - c_o)

    ``batches = "shared"``: ``D_in = D_h`` = the support set, ``D_o`` = the query set (MAML as usually
    run); ``"independent"``: ``D_in`` = the support set, ``D_o`` / ``D_h`` = the even / odd-numbered query
    points (MAML's ``meta_batches = "independent"``, :func:`metalens.learners.gradient.split_points`).
    The mean over tasks is the gradient of the learner's meta-loss on the same episode.

    >>> g = torch.Generator().manual_seed(0)
    >>> sx, qx = torch.randn(4, 5, 2, generator=g), torch.randn(4, 6, 2, generator=g)
    >>> sy, qy = sx.sum(-1, keepdim=True), qx.sum(-1, keepdim=True)  # u = (1, 1, 0)
    >>> stochastic_meta_gradient(torch.tensor([1.0, 1.0, 0.0]), sx, sy, qx, qy, alpha=0.1).abs().max() < 1e-5
    tensor(True)
    """
    if batches not in ("shared", "independent"):
        raise ValueError(f"batches must be 'shared' or 'independent', got {batches!r}")
    s_in, c_in = _moments(support_x, support_y)
    if batches == "shared":
        s_o, c_o = _moments(query_x, query_y)
        s_h = s_in
    else:
        s_o, c_o = _moments(query_x[..., 0::2, :], query_y[..., 0::2, :])
        s_h, _ = _moments(query_x[..., 1::2, :], query_y[..., 1::2, :])
    th = theta.unsqueeze(-2)  # [..., 1, p]: broadcast over tasks
    inner = th - 2 * alpha * ((s_in @ th.unsqueeze(-1))[..., 0] - c_in)  # [..., T, p]
    outer = 2 * ((s_o @ inner.unsqueeze(-1))[..., 0] - c_o)
    return outer - 2 * alpha * (s_h @ outer.unsqueeze(-1))[..., 0]


def lemma1_bound(L: float, rho: float, alpha: float, grad_norm: float, *, steps: int = 1) -> float:
    """The smoothness constant of the ``N``-step meta-objective at ``w`` that Lemma 1 of Fallah et al. (2020)
    gives (``N = 1``), and its extension to ``N`` steps, for task losses that are ``L``-smooth with a
    ``rho``-Lipschitz Hessian and ``grad_norm = E_i ||grad f_i(w)||``::

        L_N(w) = L (1 + alpha L)^(2N) + (rho / L) (1 + alpha L)^(2N - 1) ((1 + alpha L)^N - 1) grad_norm

    For ``N = 1`` this is ``L (1 + alpha L)^2 + rho alpha (1 + alpha L) grad_norm``, at most Lemma 1's
    ``4 L + 2 rho alpha grad_norm`` when ``alpha <= 1 / L`` (the lemma's premise). The ``N``-step form follows
    the lemma's proof: the inner map's Jacobian is a product of ``N`` factors ``I - alpha H`` of norm at
    most ``1 + alpha L``; its change between two points sums, over the steps, the Hessians' changes
    ``alpha rho (1 + alpha L)^j ||w - u||``, each times the other factors; and ``||grad f(phi_N)|| <=
    (1 + alpha L)^N ||grad f(w)||``.

    >>> lemma1_bound(2.0, 0.0, 0.1, 5.0)  # 2 * 1.2^2
    2.88
    >>> lemma1_bound(1.0, 1.0, 1.0, 1.0) <= 4 * 1.0 + 2 * 1.0 * 1.0 * 1.0  # alpha = 1 / L: Lemma 1 as stated
    True
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    q = 1 + alpha * L
    first = L * q ** (2 * steps)
    if rho == 0:
        return round(first, 12)
    return first + rho / L * q ** (2 * steps - 1) * (q**steps - 1) * grad_norm


def sgd_step_size(smoothness: float, gap: float, variance: float, horizon: int) -> float:
    """The step that minimises :func:`sgd_bound` over ``T = horizon`` steps: ``min(1 / L, sqrt(2 Delta / (L
    sigma^2 T)))``, with ``L`` the smoothness constant, ``Delta = F(w_0) - inf F`` and ``sigma^2`` the
    variance of the stochastic gradient. Shrinks like ``1 / sqrt(T)``.

    >>> sgd_step_size(2.0, 1.0, 1.0, 100)
    0.1
    """
    return min(1.0 / smoothness, math.sqrt(2 * gap / (smoothness * variance * horizon)))


def sgd_bound(smoothness: float, gap: float, variance: float, horizon: int, step: float) -> float:
    """``min_{t < T} E ||grad F(w_t)||^2 <= 2 Delta / (beta T) + L beta sigma^2``: SGD of constant step
    ``beta <= 1 / L`` on an ``L``-smooth function with unbiased gradients of variance ``sigma^2`` (Ghadimi &
    Lan 2013, Theorem 2.1; the descent argument of Fallah et al.'s Theorem 1 with Lemma 1's constant).
    At :func:`sgd_step_size` it is ``2 sqrt(2 Delta L sigma^2 / T)`` (when that step is below ``1 / L``):
    the rate ``T^(-1/2)``.

    >>> round(sgd_bound(2.0, 1.0, 1.0, 100, sgd_step_size(2.0, 1.0, 1.0, 100)), 6)  # 2 sqrt(2 * 2 / 100)
    0.4
    """
    return 2 * gap / (step * horizon) + smoothness * step * variance


def loglog_slope(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """The least-squares slope of ``log y`` against ``log x``.

    >>> round(loglog_slope([1, 10, 100], [1.0, 0.1, 0.01]), 6)
    -1.0
    """
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    return float(np.polyfit(lx, ly, 1)[0])
