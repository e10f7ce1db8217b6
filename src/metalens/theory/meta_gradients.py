"""Exact per-task meta-gradients of the gradient lens, and the statistics the theory makes claims about.

For one task with support set ``S`` and query set ``Q`` and the inner loop
``phi_N = adapt(theta)`` (``N`` steps ``phi <- phi - alpha grad L_S(phi)``,
:func:`metalens.learners.gradient.adapt`):

- **MAML** (Finn et al. 2017): ``g = d L_Q(phi_N) / d theta = prod_{i<N} (I - alpha H_S(phi_i)) grad L_Q(phi_N)``,
  differentiated through the inner steps (Hessian-vector products);
- **FOMAML**: the same with the inner gradients held constant, ``g_FO = grad L_Q(phi_N)``;
- **Reptile** (Nichol et al. 2018): the update direction ``(theta - phi_k) / (alpha k)`` after ``k``
  steps on the support set, the mean of the inner gradients along the way.

The FOMAML bias is ``g_MAML - g_FO = -alpha sum_i H_S(phi_i) grad L_Q(phi_N) + O(alpha^2)``, so its size
relative to ``g_MAML`` vanishes linearly as ``alpha -> 0`` (Finn et al. 2017, sec. 5.2; Fallah,
Mokhtari & Ozdaglar 2020, sec. 4). The stochastic meta-gradient averages ``B`` i.i.d. tasks, so its
variance (trace of the covariance) is ``tr Cov(g_t) / B`` (Fallah et al. 2020, Lemma 2 bounds it by
``sigma^2 / B`` plus terms from the data within a task): :func:`batch_mean_variance` measures it
from disjoint batches.

Everything is written for one task with ``torch.func`` and mapped over tasks with
:func:`metalens.learners.gradient.map_tasks`; losses are :func:`~metalens.learners.gradient.support_loss`
(the mean over a task's points), the one the learners train with, so the mean over tasks of
:func:`meta_gradient` is the gradient of the learners' ``meta_loss`` on the same episode.

>>> import torch
>>> from metalens.nets import MLP
>>> net = MLP((1,), 1, hidden=())  # y = w x + b
>>> theta = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
>>> x, y = torch.ones(2, 1), torch.ones(2, 1)
>>> # phi = (w, b) = (0.2, 0.2); grad L_Q(phi) = -1.2 (1, 1); H = 2 [[1, 1], [1, 1]]
>>> meta_gradient(net, theta, x, y, x, y, alpha=0.1, steps=1)["layers.0.weight"]  # (I - 0.1 H) grad L_Q
tensor([[-0.7200]])
>>> meta_gradient(net, theta, x, y, x, y, alpha=0.1, steps=1, first_order=True)["layers.0.weight"]
tensor([[-1.2000]])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad

from metalens.episode import Episode
from metalens.functional import Params
from metalens.learners.gradient import adapt, map_tasks, sgd, support_grad, support_loss

__all__ = ["meta_gradient", "reptile_direction", "task_meta_gradients", "task_reptile_directions",
           "gradient_alignment", "flat", "relative_error", "cosine", "batch_mean_variance", "loglog_slope"]


def meta_gradient(net: nn.Module, theta: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, *, alpha: float, steps: int, first_order: bool = False,
                  classification: bool = False) -> Params:
    """One task's MAML (``first_order=False``) or FOMAML meta-gradient ``d L_Q(adapt(theta)) / d theta``.

    ``steps`` inner steps of rate ``alpha`` on the support set (``support_x [S, *x]``), the query
    loss on ``query_x [Q, *x]``; ``theta``: the network's parameters by name (unbatched).
    ``torch.func.grad`` over :func:`~metalens.learners.gradient.adapt`, which takes its own inner
    gradients with ``torch.func.grad`` (and holds them constant with ``first_order``).
    """
    def query_after_adaptation(th: Params) -> Tensor:
        phi = adapt(net, th, support_x, support_y, steps=steps, step=sgd(alpha), first_order=first_order,
                    classification=classification)
        return support_loss(net, phi, query_x, query_y, None, classification=classification)

    return grad(query_after_adaptation)(theta)


def reptile_direction(net: nn.Module, theta: Params, support_x: Tensor, support_y: Tensor, *, alpha: float,
                      steps: int, classification: bool = False) -> Params:
    """One task's Reptile update direction ``(theta - phi_k) / (alpha k)`` after ``k = steps`` inner steps.

    The mean of the ``k`` inner gradients along the way (Nichol et al. 2018, sec. 5); for ``k = 1``
    it is ``grad L_S(theta)`` whatever ``alpha``.

    >>> from metalens.nets import MLP
    >>> net = MLP((1,), 1, hidden=())
    >>> theta = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
    >>> reptile_direction(net, theta, torch.ones(2, 1), torch.ones(2, 1), alpha=0.1, steps=1)["layers.0.bias"]
    tensor([-2.])
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (no step gives no direction), got {steps}")
    theta = {k: v.detach() for k, v in theta.items()}
    phi = adapt(net, theta, support_x, support_y, steps=steps, step=sgd(alpha), classification=classification)
    return {k: (theta[k] - phi[k]) / (alpha * steps) for k in theta}


def task_meta_gradients(net: nn.Module, theta: Params, episode: Episode, *, alpha: float, steps: int,
                        first_order: bool = False, batching: str = "vmap", chunk: int = 256) -> Params:
    """:func:`meta_gradient` of every task of ``episode``: ``{name: [T, *shape]}`` (no mask: full episodes).

    Tasks are mapped ``chunk`` at a time (memory only; the numbers do not depend on it).
    """
    _unmasked(episode)
    kind = episode.is_classification

    def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Params:
        return meta_gradient(net, theta, sx, sy, qx, qy, alpha=alpha, steps=steps, first_order=first_order,
                             classification=kind)

    return _chunked(one, (episode.support_x, episode.support_y, episode.query_x, episode.query_y), batching, chunk)


def task_reptile_directions(net: nn.Module, theta: Params, episode: Episode, *, alpha: float, steps: int,
                            batching: str = "vmap", chunk: int = 256) -> Params:
    """:func:`reptile_direction` of every task of ``episode`` on its support set: ``{name: [T, *shape]}``."""
    _unmasked(episode)
    kind = episode.is_classification

    def one(sx: Tensor, sy: Tensor) -> Params:
        return reptile_direction(net, theta, sx, sy, alpha=alpha, steps=steps, classification=kind)

    return _chunked(one, (episode.support_x, episode.support_y), batching, chunk)


def gradient_alignment(net: nn.Module, theta: Params, episode: Episode, *, batching: str = "vmap") -> Tensor:
    """``E[g_1 . g_2]``: the mean over tasks of the inner product of two minibatch gradients of one task.

    ``g_1 = grad L_S(theta)`` on the support set and ``g_2 = grad L_Q(theta)`` on the query set, two
    independent minibatches of the same task. Its gradient is what Reptile and first-order MAML
    follow beyond the average loss (Nichol et al. 2018, sec. 5.1: ``AvgGradInner = 1/2 grad E[g_1 . g_2]``):
    maximising it favours parameters where steps on one minibatch also lower the loss on another.
    Returns a 0-dim tensor.
    """
    _unmasked(episode)
    kind = episode.is_classification

    def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        g1 = support_grad(net, theta, sx, sy, None, classification=kind)
        g2 = support_grad(net, theta, qx, qy, None, classification=kind)
        return sum((g1[k] * g2[k]).sum() for k in g1)

    return map_tasks(one, episode.support_x, episode.support_y, episode.query_x, episode.query_y,
                     batching=batching).mean()


def flat(params: Params) -> Tensor:
    """Per-task parameters ``{name: [T, *shape]}`` as one matrix ``[T, P]`` (names in order)."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in params.values()], 1)


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    """``||estimate - reference|| / ||reference||`` of two vectors.

    >>> relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    1.0
    """
    return float(torch.linalg.vector_norm(estimate - reference) / torch.linalg.vector_norm(reference))


def cosine(a: Tensor, b: Tensor) -> float:
    """The cosine of the angle between two vectors.

    >>> round(cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])), 4)
    0.7071
    """
    return float(torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))


def batch_mean_variance(g: Tensor, batch: int) -> float:
    """The variance (trace of the covariance) of the mean of ``batch`` tasks, from disjoint batches.

    ``g [n, P]``: one meta-gradient per task, i.i.d. The first ``n // batch * batch`` rows are cut
    into ``m = n // batch`` consecutive batches with means ``G_j``; returns the unbiased estimate
    ``sum_j ||G_j - mean_j G_j||^2 / (m - 1)`` of ``E||G - E G||^2``, which is ``tr Cov(g) / batch``
    for i.i.d. tasks. Needs ``m >= 2``. Computed in float64.

    >>> g = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    >>> batch_mean_variance(g, 1), batch_mean_variance(g, 2)  # means 1 and 2
    (1.6666666666666667, 0.5)
    """
    n = g.shape[0]
    m = n // batch if batch >= 1 else 0
    if m < 2:
        raise ValueError(f"batch must be >= 1 and leave at least 2 disjoint batches of the {n} tasks, got {batch}")
    G = g[: m * batch].reshape(m, batch, -1).mean(1, dtype=torch.float64)  # [m, P]
    return float(((G - G.mean(0)) ** 2).sum() / (m - 1))


def loglog_slope(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """The least-squares slope of ``log y`` against ``log x`` (the exponent of a power law ``y ~ x^k``).

    >>> round(loglog_slope([1, 2, 4], [3, 12, 48]), 6)
    2.0
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.size < 2 or xa.shape != ya.shape or not all(np.all(np.isfinite(v) & (v > 0)) for v in (xa, ya)):
        raise ValueError("loglog_slope needs at least 2 points with positive, finite x and y")
    return float(np.polyfit(np.log(xa), np.log(ya), 1)[0])


def _unmasked(episode: Episode) -> None:
    if episode.support_mask is not None or episode.query_mask is not None:
        raise ValueError("per-task meta-gradients take full episodes (no support_mask or query_mask)")


def _chunked(fn: Callable[..., Params], tensors: tuple[Tensor, ...], batching: str, chunk: int) -> Params:
    """``map_tasks(fn, ...)`` over ``chunk`` tasks at a time, concatenated."""
    T = tensors[0].shape[0]
    parts = [map_tasks(fn, *(t[i: i + chunk] for t in tensors), batching=batching)
             for i in range(0, T, chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

