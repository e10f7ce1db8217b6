"""N-way K-shot classification of 2-D Gaussian clusters.

A task draws ``ways`` class means uniformly on the disk of radius ``radius``; the
points of class ``c`` are ``x ~ N(mu_c, std^2 I_2)``. Every support set holds exactly
``shots`` points per class and every query set ``queries`` per class, in a random
order. This is the isotropic-Gaussian toy problem used to study metric learners
(prototypical networks are the Bayes classifier when the class means are known up
to a flat prior: Snell et al., 2017, sec. 2.3); the bounded (disk) prior on the
means is what makes the exact oracle differ from nearest class mean.

With the defaults (radius 3, std 1, 5-way 1-shot) the nearest of the other class
means is typically about one standard deviation away, so the task is far from
trivial: the oracle classifies about 52% of query points correctly, nearest class
mean about 50% (chance: 20%).

>>> import torch
>>> family = Clusters(Clusters.Config(ways=3, shots=2, queries=4))
>>> ep = family.sample(2, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape, ep.support_y.shape, ep.query_x.shape, ep.query_y.shape
(torch.Size([2, 6, 2]), torch.Size([2, 6]), torch.Size([2, 12, 2]), torch.Size([2, 12]))
>>> family.oracle(ep.support_x, ep.support_y, ep.query_x).logits.shape
torch.Size([2, 12, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = ["Clusters", "log_disk_probability"]

_GL_PER_PANEL = 8  # Gauss-Legendre nodes per radial panel
_MIN_PANELS = 8
# Cap on the panels (memory and time): reached only when std / sqrt(shots + 1) < radius / 2048.
_MAX_PANELS = 1024
_CHUNK_ELEMENTS = 1 << 22  # largest [tasks, queries, classes, nodes] block held at once


def _radial_nodes(radius: float, width: float) -> tuple[Tensor, Tensor]:
    """Composite Gauss-Legendre rule on ``[0, radius]`` with panels no wider than ``width``
    (8 to 1024 panels of 8 nodes).

    Returns nodes ``r [n]`` and log-weights ``[n]`` (float64).
    """
    panels = min(_MAX_PANELS, max(_MIN_PANELS, math.ceil(radius / width)))
    u, w = np.polynomial.legendre.leggauss(_GL_PER_PANEL)
    h = radius / panels
    left = np.arange(panels)[:, None] * h
    r = (left + (u[None] + 1) * h / 2).reshape(-1)
    wr = np.broadcast_to(w[None] * h / 2, (panels, _GL_PER_PANEL)).reshape(-1)
    return torch.as_tensor(r, dtype=torch.float64), torch.as_tensor(np.log(wr), dtype=torch.float64)


def log_disk_probability(rho: Tensor, var: Tensor, radius: float, nodes: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``log P(|z| <= radius)`` for ``z ~ N(m, var I_2)`` with ``|m| = rho`` (a noncentral chi-square CDF).

    Integrating the angle exactly gives the radial integral
    ``P = int_0^R (r / v) exp(-(r - rho)^2 / (2 v)) i0e(r rho / v) dr`` (``i0e`` the
    exponentially scaled Bessel function), evaluated in log space by composite
    Gauss-Legendre quadrature with panels no wider than ``sqrt(min var) / 2``.

    Args:
        rho, var: broadcastable float64 tensors ``[...]``.
        nodes: the ``(r, log_w)`` rule to use; by default one is built from ``var``.

    Returns:
        ``[...]`` float64.

    >>> v = torch.tensor([0.5, 2.0], dtype=torch.float64)  # at rho = 0: 1 - exp(-R^2 / 2v)
    >>> log_disk_probability(torch.zeros(2, dtype=torch.float64), v, 1.0).exp()
    tensor([0.6321, 0.2212], dtype=torch.float64)
    """
    if nodes is None:
        nodes = _radial_nodes(radius, 0.5 * math.sqrt(float(var.min())))
    r, log_w = nodes
    rho, var = rho[..., None], var[..., None]
    log_f = r.log() - var.log() - (r - rho) ** 2 / (2 * var) + torch.special.i0e(r * rho / var).log()
    return (log_f + log_w).logsumexp(-1)


@TASKS.register("clusters")
class Clusters(TaskFamily):
    """N-way K-shot 2-D Gaussian clusters with class means uniform on a disk."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the 2-D Gaussian-clusters family."""

        ways: int = opt(5, "classes per task (N)", ge=2)
        shots: int = opt(1, "support points per class (K)", ge=1)
        queries: int = opt(5, "query points per class", ge=1)
        radius: float = opt(3.0, "class means are uniform on the disk of this radius", gt=0)
        std: float = opt(1.0, "standard deviation of the points around their class mean", gt=0)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind="classification", x_shape=(2,), num_classes=self.config.ways, oracle=self.oracle)

    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` tasks of ``ways`` clusters.

        Returns ``support_x [T, ways*shots, 2]``, ``support_y [T, ways*shots]``
        (int64), ``query_x [T, ways*queries, 2]``, ``query_y [T, ways*queries]``, each
        set in a random order. ``split`` is ignored.
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        c = self.config
        g, T, N = generator, n_tasks, c.ways
        r = c.radius * torch.rand(T, N, generator=g).sqrt()  # uniform on the disk: P(r' <= r) = r^2 / R^2
        theta = 2 * math.pi * torch.rand(T, N, generator=g)
        means = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1)  # [T, N, 2]

        def draw(per_class: int) -> tuple[Tensor, Tensor]:
            labels = torch.arange(N).repeat_interleave(per_class)  # [P], class-major
            P = labels.numel()
            perm = torch.argsort(torch.rand(T, P, generator=g), dim=1)  # [T, P]
            y = labels[perm]  # [T, P]
            x = means.gather(1, y[..., None].expand(T, P, 2)) + c.std * torch.randn(T, P, 2, generator=g)
            return x, y

        sx, sy = draw(c.shots)
        qx, qy = draw(c.queries)
        return Episode(sx, sy, qx, qy, num_classes=N)

    def log_predictive_density(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None
    ) -> Tensor:
        """``log p(x_q | support of class c)`` for every query point and class: ``[T, Q, N]`` float64.

        The mean of class c has prior ``U(disk)`` and, given its ``K_c`` support points
        with mean ``xbar_c``, posterior ``1_disk(mu) N(mu; xbar_c, s^2/K_c I) / P_c``.
        The product of Gaussians ``N(x; mu, s^2) N(mu; xbar, s^2/K)`` factorises as
        ``N(x; xbar, s^2 (1 + 1/K)) N(mu; m', s^2/(K+1))`` with ``m' = (x + K xbar)/(K+1)``,
        so the predictive density is exactly::

            p(x | S_c) = N(x; xbar_c, s^2 (1 + 1/K_c) I) * P(|m'|, s^2/(K_c+1)) / P(|xbar_c|, s^2/K_c)

        where ``P(rho, v)`` is the probability that ``N(m, v I)`` with ``|m| = rho``
        falls in the disk (:func:`log_disk_probability`: the angular integral is
        done exactly, the radial one by Gauss-Legendre quadrature). A class with no
        support point gets the prior predictive ``P(|x|, s^2) / (pi R^2)``.
        Masked support points are ignored. Chunked over tasks.
        """
        c = self.config
        N = c.ways
        T, S = _check_inputs(support_x, support_y, query_x, support_mask, N)
        s2, R = c.std**2, c.radius
        sx, xq = support_x.double(), query_x.double()
        onehot = torch.nn.functional.one_hot(support_y, N).double()  # [T, S, N]
        if support_mask is not None:
            onehot = onehot * support_mask.double()[..., None]
        K = onehot.sum(1)  # [T, N]
        Kc = K.clamp_min(1.0)
        xbar = onehot.transpose(1, 2) @ sx / Kc[..., None]  # [T, N, 2]
        v_prior = s2 / Kc  # [T, N] posterior variance of mu (before the disk)
        v_post = s2 / (K + 1)  # [T, N] variance of mu given the support and the query
        nodes = _radial_nodes(R, 0.5 * math.sqrt(float(v_post.min())))
        log_P_prior = log_disk_probability(xbar.norm(dim=-1), v_prior, R, nodes)  # [T, N]
        Q = xq.shape[1]
        chunk = max(1, _CHUNK_ELEMENTS // (Q * N * nodes[0].numel()))
        out = []
        for t0 in range(0, T, chunk):
            sl = slice(t0, t0 + chunk)
            xq_, xbar_, K_, v_ = xq[sl, :, None, :], xbar[sl, None], K[sl, None, :], v_prior[sl, None]
            d2 = ((xq_ - xbar_) ** 2).sum(-1)  # [t, Q, N]
            v_pred = s2 + v_  # predictive variance of the Gaussian factor
            log_gauss = -d2 / (2 * v_pred) - torch.log(2 * math.pi * v_pred)
            m_post = (xq_ + K_[..., None] * xbar_) / (K_[..., None] + 1)  # [t, Q, N, 2]
            log_P_post = log_disk_probability(m_post.norm(dim=-1), v_post[sl, None].expand_as(d2), R, nodes)
            log_p = log_gauss + log_P_post - log_P_prior[sl, None]
            empty = K_.expand_as(log_p) == 0  # no support point: the prior predictive
            log_p = torch.where(empty, log_P_post - math.log(math.pi * R * R), log_p)
            out.append(log_p)
        return torch.cat(out)

    def oracle(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None
    ) -> Distribution:
        """The Bayes classifier: ``p(y_q = c | x_q, support) ∝ p(x_q | support of c)`` (equal class priors).

        Args:
            support_x: ``[T, S, 2]``; support_y: ``[T, S]`` int64; query_x: ``[T, Q, 2]``;
            support_mask: ``[T, S]`` bool (``False`` = padded), or None.

        Returns:
            ``Categorical`` with logits ``[T, Q, N]`` (:meth:`log_predictive_density`)
            in ``query_x.dtype``.
        """
        logp = self.log_predictive_density(support_x, support_y, query_x, support_mask=support_mask)
        return Categorical(logits=logp.to(query_x.dtype))


def _check_inputs(sx: Tensor, sy: Tensor, qx: Tensor, mask: Tensor | None, N: int) -> tuple[int, int]:
    if sx.dim() != 3 or sx.shape[-1] != 2:
        raise ValueError(f"support_x must be [tasks, points, 2], got {list(sx.shape)}")
    T, S = sx.shape[:2]
    if sy.dtype != torch.int64 or tuple(sy.shape) != (T, S):
        raise ValueError(f"support_y must be int64 [{T}, {S}], got {sy.dtype} {list(sy.shape)}")
    if bool(((sy < 0) | (sy >= N)).any()):
        raise ValueError(f"support_y holds labels outside [0, {N})")
    if qx.dim() != 3 or qx.shape[0] != T or qx.shape[-1] != 2:
        raise ValueError(f"query_x must be [{T}, points, 2], got {list(qx.shape)}")
    if mask is not None and tuple(mask.shape) != (T, S):
        raise ValueError(f"support_mask must be [{T}, {S}], got {list(mask.shape)}")
    return T, S
