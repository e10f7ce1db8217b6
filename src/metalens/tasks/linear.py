"""Noisy linear regression in ``dim`` dimensions, the in-context learning benchmark of Garg et al. (2022).

A task is a weight vector ``w ~ N(0, I / d)``; inputs are ``x ~ N(0, I_d)`` and
targets ``y = w . x + noise`` with ``noise ~ N(0, noise_std^2)``. The oracle is
conjugate Bayesian linear regression (Bishop, 2006, sec. 3.3), whose posterior mean
is ridge regression with ``lambda = sigma^2 d``.

>>> import torch
>>> family = Linear(Linear.Config(dim=3, shots=4, queries=2))
>>> ep = family.sample(5, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape, ep.support_y.shape, ep.query_x.shape
(torch.Size([5, 4, 3]), torch.Size([5, 4, 1]), torch.Size([5, 2, 3]))
>>> family.oracle(ep.support_x, ep.support_y, ep.query_x).batch_shape
torch.Size([5, 2, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, Normal

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = ["Linear"]

# Smallest noise standard deviation the oracle assumes. With noiseless data the exact
# posterior collapses onto a subspace; this floor keeps the solve well conditioned
# and the predictive a proper density, and is far below any error a learner makes.
NOISE_FLOOR = 1e-3


@TASKS.register("linear")
class Linear(TaskFamily):
    """Linear functions w . x with a Gaussian weight prior (Garg et al., 2022)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the linear-regression family."""

        dim: int = opt(5, "input dimension d", ge=1)
        shots: int = opt(10, "support points per task", ge=1)
        queries: int = opt(10, "query points per task", ge=1)
        noise_std: float = opt(0.0, "standard deviation of the Gaussian noise on y", ge=0)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind="regression", x_shape=(self.config.dim,), y_dim=1, oracle=self.oracle)

    @property
    def oracle_std(self) -> float:
        """Noise standard deviation the oracle assumes: ``max(noise_std, NOISE_FLOOR)``."""
        return max(self.config.noise_std, NOISE_FLOOR)

    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` weight vectors and their support / query points.

        Returns ``support_x [T, shots, d]``, ``support_y [T, shots, 1]``,
        ``query_x [T, queries, d]``, ``query_y [T, queries, 1]`` (float32). ``split``
        is ignored.
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        c = self.config
        g, T, S, Q, d = generator, n_tasks, c.shots, c.queries, c.dim
        w = torch.randn(T, d, 1, generator=g) / math.sqrt(d)  # [T, d, 1]
        x = torch.randn(T, S + Q, d, generator=g)  # [T, S+Q, d]
        y = x @ w + c.noise_std * torch.randn(T, S + Q, 1, generator=g)  # [T, S+Q, 1]
        return Episode(x[:, :S], y[:, :S], x[:, S:], y[:, S:])

    def oracle(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None
    ) -> Distribution:
        """Posterior predictive of conjugate Bayesian linear regression (Bishop, 2006, eq. 3.53-3.59).

        With prior ``w ~ N(0, I / d)`` and noise ``sigma = oracle_std``::

            A    = X^T X / sigma^2 + d I            (posterior precision)
            mu   = A^-1 X^T y / sigma^2             (= ridge solution, lambda = sigma^2 d)
            y_q ~ N(x_q^T mu, sigma^2 + x_q^T A^-1 x_q)

        over the real (unmasked) support rows ``X [S, d]``. Computed in float64.

        Args:
            support_x: ``[T, S, d]``; support_y: ``[T, S, 1]``; query_x: ``[T, Q, d]``;
            support_mask: ``[T, S]`` bool (``False`` = padded), or None.

        Returns:
            ``Normal`` with ``batch_shape [T, Q, 1]`` in ``query_x.dtype``.
        """
        d = self.config.dim
        if support_x.dim() != 3 or support_x.shape[-1] != d:
            raise ValueError(f"support_x must be [tasks, points, {d}], got {list(support_x.shape)}")
        T, S = support_x.shape[:2]
        if tuple(support_y.shape) != (T, S, 1):
            raise ValueError(f"support_y must be [{T}, {S}, 1], got {list(support_y.shape)}")
        if query_x.dim() != 3 or query_x.shape[0] != T or query_x.shape[-1] != d:
            raise ValueError(f"query_x must be [{T}, points, {d}], got {list(query_x.shape)}")
        if support_mask is not None and tuple(support_mask.shape) != (T, S):
            raise ValueError(f"support_mask must be [{T}, {S}], got {list(support_mask.shape)}")
        sigma2 = self.oracle_std**2
        X, y, xq = support_x.double(), support_y.double(), query_x.double()
        if support_mask is not None:
            m = support_mask.double()[..., None]
            X, y = X * m, y * m
        A = X.transpose(1, 2) @ X / sigma2 + d * torch.eye(d, dtype=torch.float64)  # [T, d, d]
        chol = torch.linalg.cholesky(A)
        mu = torch.cholesky_solve(X.transpose(1, 2) @ y / sigma2, chol)  # [T, d, 1]
        mean = xq @ mu  # [T, Q, 1]
        v = torch.linalg.solve_triangular(chol, xq.transpose(1, 2), upper=False)  # [T, d, Q]
        var = sigma2 + (v * v).sum(1)[..., None]  # [T, Q, 1]
        return Normal(mean.to(query_x.dtype), var.sqrt().to(query_x.dtype))
