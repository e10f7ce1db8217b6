"""What Reptile optimises: the Taylor expansion of its expected update (Nichol, Achiam & Schulman 2018, sec. 5.1).

A task ``i`` has ``m`` minibatch losses, here quadratics
``L_ia(phi) = 1/2 (phi - c_ia)^T A_ia (phi - c_ia)`` (``A_ia`` symmetric positive definite), and
its loss is their mean ``L_i = mean_a L_ia``. Reptile takes ``k`` SGD steps of rate ``alpha`` from
``theta``, step ``j`` on minibatch ``o_j`` of an order ``o`` drawn from a schedule, and moves
``theta`` along the update ``Delta = theta - phi_k``. With ``g_a = grad L_ia(theta)`` and
``H_a = A_ia`` (gradient and Hessian at ``theta``), expanding every inner gradient around ``theta``
gives (the paper's eq. for ``g_Reptile = Delta / alpha``)::

    Delta = alpha sum_j g_{o_j} - alpha^2 sum_{l < j} H_{o_j} g_{o_l} + O(alpha^3)

exactly (for quadratics the ``O(alpha^3)`` term is ``alpha^3 sum_{l < j < n} H_{o_n} H_{o_j} g_{o_l}``
and so on, a polynomial of degree ``k``). Averaged over tasks and equally likely orders, with
``E`` the mean over the finite task set (so every expectation below is exact):

    E[Delta] = alpha k grad E[L] - alpha^2 (n_cross AvgGradInner + n_same AvgGradSame) + O(alpha^3)

- ``AvgGradInner = E[H_a g_b]`` over ordered pairs ``a != b`` ``= 1/2 grad E[g_a . g_b]``: the
  gradient of the **gradient alignment** between different minibatches of a task (the paper's
  AvgGradInner); following ``-Delta`` ascends it (Reptile seeks parameters where a step on one
  minibatch helps another: within-task generalisation);
- ``AvgGradSame = E[H_a g_a] = 1/2 grad E[|g_a|^2]``, from pairs of steps on the same minibatch;
- ``n_cross`` and ``n_same``: the number of step pairs ``l < j`` on different and on the same
  minibatch (:func:`pair_counts`).

The schedules (:func:`orders`):

- ``"fresh"``: ``m = k`` minibatches in a uniformly random order, a new one each step, as in the
  paper: ``n_cross = k(k-1)/2``, ``n_same = 0``, so ``E[g_Reptile] = k AvgGrad - alpha k(k-1)/2 AvgGradInner``
  (for ``k = 2``: ``2 AvgGrad - alpha AvgGradInner``);
- ``"alternate"``: ``m = 2`` minibatches in turn, starting from either: ``n_cross = floor(k^2/4)``;
- ``"full"``: ``m = 1``, the whole task loss every step: ``n_same = k(k-1)/2``.

Every schedule is exchangeable in the minibatches (each ordered pair ``a != b`` is equally likely
at two given steps), which is what makes the cross pairs average to ``AvgGradInner``.

>>> import torch
>>> A, c = random_quadratics(4, 3, 2, generator=torch.Generator().manual_seed(0))
>>> theta = torch.zeros(3, dtype=torch.float64)
>>> def relative_residual(alpha):
...     exact = expected_update(theta, A, c, alpha=alpha, schedule="alternate", steps=3)
...     return float((exact - expansion(theta, A, c, alpha=alpha, schedule="alternate", steps=3)).norm()
...                  / exact.norm())
>>> relative_residual(1e-3) < 1e-5  # O(alpha^3) against O(alpha)
True
>>> round(relative_residual(1e-3) / relative_residual(5e-4))  # halving alpha: (1/2)^2 relative to O(alpha)
4
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Schedule", "MAX_FRESH_STEPS", "random_quadratics", "orders", "minibatches", "pair_counts", "sgd_update",
           "expected_update", "expansion", "expansion_terms", "minibatch_gradients", "alignment"]

Schedule = Literal["full", "alternate", "fresh"]
MAX_FRESH_STEPS = 7  # "fresh" enumerates the k! orders


def random_quadratics(n_tasks: int, dim: int, minibatches: int, *, generator: torch.Generator,
                      eig_range: tuple[float, float] = (0.5, 2.0)) -> tuple[Tensor, Tensor]:
    """Random quadratic minibatch losses: ``A [T, m, d, d]`` (SPD) and ``c [T, m, d]``, float64.

    ``A = Q diag(e) Q^T`` with ``Q`` a random rotation (QR of a Gaussian matrix) and eigenvalues
    ``e ~ U[eig_range]``; minimisers ``c ~ N(0, I)``. All from ``generator``.

    >>> A, c = random_quadratics(2, 3, 1, generator=torch.Generator().manual_seed(0))
    >>> A.shape, c.shape, bool((torch.linalg.eigvalsh(A) > 0).all())
    (torch.Size([2, 1, 3, 3]), torch.Size([2, 1, 3]), True)
    """
    lo, hi = eig_range
    if not 0 < lo <= hi:
        raise ValueError(f"eig_range must be (low, high) with 0 < low <= high, got {eig_range}")
    if n_tasks < 1 or dim < 1 or minibatches < 1:
        raise ValueError(f"n_tasks, dim and minibatches must be >= 1, got {n_tasks}, {dim}, {minibatches}")
    g, f64 = generator, torch.float64
    Q, _ = torch.linalg.qr(torch.randn(n_tasks, minibatches, dim, dim, generator=g, dtype=f64))
    e = lo + (hi - lo) * torch.rand(n_tasks, minibatches, dim, generator=g, dtype=f64)
    A = Q @ torch.diag_embed(e) @ Q.transpose(-1, -2)
    A = 0.5 * (A + A.transpose(-1, -2))  # exactly symmetric
    c = torch.randn(n_tasks, minibatches, dim, generator=g, dtype=f64)
    return A, c


def orders(schedule: Schedule, steps: int) -> tuple[tuple[int, ...], ...]:
    """The equally likely minibatch orders of ``steps`` inner steps under ``schedule`` (see the module docstring).

    >>> orders("alternate", 3), orders("full", 2), len(orders("fresh", 3))
    (((0, 1, 0), (1, 0, 1)), ((0, 0),), 6)
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "full":
        return ((0,) * steps,)
    if schedule == "alternate":
        return tuple(tuple((s + j) % 2 for j in range(steps)) for s in (0, 1))
    if schedule == "fresh":
        if steps > MAX_FRESH_STEPS:
            raise ValueError(f"steps must be <= {MAX_FRESH_STEPS} with schedule 'fresh' (its k! orders are "
                             f"enumerated), got {steps}")
        return tuple(itertools.permutations(range(steps)))
    raise ValueError(f"schedule must be 'full', 'alternate' or 'fresh', got {schedule!r}")


def minibatches(schedule: Schedule, steps: int) -> int:
    """How many minibatch losses a task needs under ``schedule``: 1 (full), 2 (alternate) or ``steps`` (fresh)."""
    return {"full": 1, "alternate": 2, "fresh": steps}[schedule]


def pair_counts(schedule: Schedule, steps: int) -> tuple[float, float]:
    """``(n_cross, n_same)``: step pairs ``l < j`` on different and on the same minibatch, averaged over the orders.

    >>> pair_counts("fresh", 4), pair_counts("alternate", 5), pair_counts("full", 3)
    ((6.0, 0.0), (6.0, 4.0), (0.0, 3.0))
    """
    os_ = orders(schedule, steps)
    cross = sum(o[l] != o[j] for o in os_ for j in range(steps) for l in range(j)) / len(os_)
    return float(cross), float(steps * (steps - 1) / 2 - cross)


def sgd_update(theta: Tensor, A: Tensor, c: Tensor, order: tuple[int, ...], *, alpha: float) -> Tensor:
    """Reptile's update ``theta - phi_k`` of every task after the SGD steps of one ``order``, exactly.

    ``theta [d]``; ``A [T, m, d, d]``, ``c [T, m, d]``; step ``j`` is
    ``phi <- phi - alpha A_{o_j} (phi - c_{o_j})``. Returns ``[T, d]`` (float64).

    >>> A = torch.eye(1).view(1, 1, 1, 1); c = torch.ones(1, 1, 1)
    >>> sgd_update(torch.zeros(1), A, c, (0, 0), alpha=0.5)  # phi: 0 -> 0.5 -> 0.75
    tensor([[-0.7500]], dtype=torch.float64)
    """
    theta, A, c = theta.double(), A.double(), c.double()
    phi = theta.expand(A.shape[0], -1)
    for a in order:
        phi = phi - alpha * (A[:, a] @ (phi - c[:, a])[..., None])[..., 0]
    return theta - phi


def expected_update(theta: Tensor, A: Tensor, c: Tensor, *, alpha: float, schedule: Schedule,
                    steps: int) -> Tensor:
    """``E[Delta]``: Reptile's update averaged over the tasks and the schedule's orders, exactly: ``[d]`` (float64)."""
    _check_minibatches(A, schedule, steps)
    os_ = orders(schedule, steps)
    return torch.stack([sgd_update(theta, A, c, o, alpha=alpha).mean(0) for o in os_]).mean(0)


def minibatch_gradients(theta: Tensor, A: Tensor, c: Tensor) -> Tensor:
    """``g_a = A_ia (theta - c_ia)`` of every task and minibatch: ``[T, m, d]`` (float64)."""
    theta, A, c = theta.double(), A.double(), c.double()
    return (A @ (theta - c)[..., None])[..., 0]


def alignment(theta: Tensor, A: Tensor, c: Tensor) -> float:
    """The gradient alignment ``E[g_a . g_b]`` over tasks and ordered minibatch pairs ``a != b`` (needs ``m >= 2``).

    >>> A = torch.eye(2).expand(1, 2, 2, 2); c = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    >>> alignment(torch.zeros(2), A, c)  # g_1 = (-1, 0), g_2 = (0, -1): orthogonal
    0.0
    """
    g = minibatch_gradients(theta, A, c)  # [T, m, d]
    m = g.shape[1]
    if m < 2:
        raise ValueError("the alignment needs at least 2 minibatches per task")
    gram = g @ g.transpose(-1, -2)  # [T, m, m]
    off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return float((off / (m * (m - 1))).mean())


def expansion_terms(theta: Tensor, A: Tensor, c: Tensor) -> dict[str, Tensor]:
    """The quantities of the expansion at ``theta``, each ``[d]`` (float64):

    ``avg_grad = grad E[L]`` (= E[g_a]), ``avg_grad_inner = E_{a != b}[H_a g_b]`` (zero when
    ``m = 1``) and ``avg_grad_same = E[H_a g_a]``.
    """
    A = A.double()
    g = minibatch_gradients(theta, A, c)  # [T, m, d]
    m = g.shape[1]
    Hg = A[:, :, None] @ g[:, None, :, :, None]  # [T, m(a), m(b), d, 1]: H_a g_b
    Hg = Hg[..., 0]
    same = Hg.diagonal(dim1=1, dim2=2).transpose(-1, -2)  # [T, m, d]
    cross = (Hg.sum((1, 2)) - same.sum(1)) / max(m * (m - 1), 1)
    return {"avg_grad": g.mean((0, 1)), "avg_grad_inner": cross.mean(0), "avg_grad_same": same.mean((0, 1))}


def expansion(theta: Tensor, A: Tensor, c: Tensor, *, alpha: float, schedule: Schedule, steps: int,
              order: int = 2) -> Tensor:
    """The expansion of ``E[Delta]`` to ``alpha^order`` (1 or 2; see the module docstring): ``[d]`` (float64).

    ``order=2``: ``alpha k grad E[L] - alpha^2 (n_cross AvgGradInner + n_same AvgGradSame)``, whose error
    is ``O(alpha^3)``; ``order=1``: ``alpha k grad E[L]`` (joint training on all tasks), error ``O(alpha^2)``.
    """
    _check_minibatches(A, schedule, steps)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    t = expansion_terms(theta, A, c)
    out = alpha * steps * t["avg_grad"]
    if order == 2:
        n_cross, n_same = pair_counts(schedule, steps)
        out = out - alpha**2 * (n_cross * t["avg_grad_inner"] + n_same * t["avg_grad_same"])
    return out


def _check_minibatches(A: Tensor, schedule: Schedule, steps: int) -> None:
    need = minibatches(schedule, steps) if schedule in ("full", "alternate", "fresh") else None
    if need is None:
        orders(schedule, steps)  # raises the error naming the schedules
    if A.dim() != 4 or A.shape[1] != need:
        raise ValueError(f"schedule {schedule!r} with {steps} steps needs A [tasks, {need}, d, d], got "
                         f"{list(A.shape)}")
