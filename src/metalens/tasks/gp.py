"""Functions drawn from a 1-D Gaussian process, the regression benchmark of Neural Processes.

The protocol follows the ConvCNP paper (Gordon et al., 2020, sec. 5.1 and app. C):
inputs ``x ~ U[-2, 2]``, a random number of context points ``U{3..50}`` (the support
set) and of target points ``U{3..50}`` (the query set), disjoint points of one
function ``f ~ GP(0, k)`` observed with Gaussian noise. Tasks are padded to the
largest counts and carry ``support_mask`` / ``query_mask``.

Kernels, with length scale ``l`` (``r = x - x'``) and signal variance ``s2``:

- ``rbf`` (exponentiated quadratic): ``s2 exp(-r^2 / (2 l^2))``;
- ``matern52``: ``s2 (1 + sqrt5 |r|/l + 5 r^2 / (3 l^2)) exp(-sqrt5 |r| / l)``;
- ``periodic`` (weakly periodic): ``s2 exp(-2 sin^2(pi |r| / p) / l_p^2) exp(-r^2 / (2 l_w^2))``
  with period ``p = l``, periodic length ``l_p = 1`` and decay length ``l_w = 8 l``.
  The default ``l = 0.25`` gives ``p = 0.25, l_w = 2``: the kernel of the ConvCNP
  experiments (Gordon et al., 2020; code ``cambridge-mlg/convcnp``). All three
  kernels are functions of ``r / l``, so a random length scale stretches each.

With ``lengthscale_range = (lo, hi)`` every task draws its own length scale,
log-uniform on ``[lo, hi]`` (``log l ~ U[log lo, log hi]``), and the oracle
integrates it out.

>>> import torch
>>> family = GP(GP.Config(max_context=10, max_target=8))
>>> ep = family.sample(4, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape, ep.query_x.shape, ep.support_mask.shape
(torch.Size([4, 10, 1]), torch.Size([4, 8, 1]), torch.Size([4, 10]))
>>> family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask).batch_shape
torch.Size([4, 8, 1])
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, MixtureSameFamily, Normal

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = ["GP", "kernel_matrix", "KERNELS"]

Kernel = Literal["rbf", "matern52", "periodic"]
KERNELS: tuple[str, ...] = typing.get_args(Kernel)
# Diagonal jitter, relative to the signal variance, added to the covariance when
# sampling. It acts as extra white noise on every point, so the oracle adds it to
# the noise variance and stays exact for the sampler.
JITTER = 1e-6
# Largest number of float64 entries of one [tasks, nodes, points, points] block in the oracle.
_CHUNK_ELEMENTS = 1 << 19
_WP_DECAY = 8.0  # weakly periodic: decay length l_w = 8 l (ConvCNP: l = 0.25 -> l_w = 2)


def kernel_matrix(kernel: str, x1: Tensor, x2: Tensor, lengthscale: Tensor | float, variance: float = 1.0) -> Tensor:
    """Covariance ``k(x1_i, x2_j)`` of the ``kernel`` named (see the module docstring).

    Args:
        x1: ``[..., n]`` inputs; x2: ``[..., m]``.
        lengthscale: a float or a tensor broadcastable to the batch shape ``[...]``.
        variance: the signal variance ``s2 = k(x, x)``.

    Returns:
        ``[..., n, m]``.

    >>> kernel_matrix("rbf", torch.tensor([0.0, 1.0]), torch.tensor([0.0]), 1.0)
    tensor([[1.0000],
            [0.6065]])
    """
    ls = torch.as_tensor(lengthscale, dtype=x1.dtype, device=x1.device)
    r = (x1[..., :, None] - x2[..., None, :]) / ls[..., None, None]  # a fresh tensor: updated in place below
    if kernel == "rbf":
        k = r.square_().mul_(-0.5).exp_()
    elif kernel == "matern52":
        a = r.abs_().mul_(math.sqrt(5.0))
        k = (a * a).div_(3.0).add_(a).add_(1.0).mul_(torch.exp(-a))
    elif kernel == "periodic":
        k = torch.sin(math.pi * r).square_().mul_(-2.0).add_(r.square_().mul_(-0.5 / _WP_DECAY**2)).exp_()
    else:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    return k.mul_(variance) if variance != 1.0 else k


@TASKS.register("gp")
class GP(TaskFamily):
    """1-D Gaussian-process functions with a random number of points (ConvCNP protocol)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the GP family (defaults: Gordon et al., 2020)."""

        kernel: Kernel = opt("rbf", "covariance (periodic: weakly periodic; see the module docstring)")
        lengthscale: float = opt(0.25, "kernel length scale (periodic: the period; ignored with lengthscale_range)",
                                 gt=0)
        lengthscale_range: tuple[float, float] | None = opt(
            None, "(low, high): a length scale per task, log-uniform on [low, high]; None: fixed", gt=0,
            increasing=True)
        signal_variance: float = opt(1.0, "prior variance of f(x), k(x, x)", gt=0)
        noise_std: float = opt(0.05, "standard deviation of the Gaussian noise on y", ge=0)
        x_range: tuple[float, float] = opt((-2.0, 2.0), "inputs x ~ U[low, high]", increasing=True)
        min_context: int = opt(3, "fewest support (context) points per task", ge=1)
        max_context: int = opt(50, "most support (context) points per task (at least min_context)", ge=1)
        min_target: int = opt(3, "fewest query (target) points per task", ge=1)
        max_target: int = opt(50, "most query (target) points per task (at least min_target)", ge=1)
        oracle_nodes: int = opt(48, "Gauss-Legendre nodes in log length scale for the oracle (random length scale)",
                                ge=1)

        def check(self) -> None:
            for what in ("context", "target"):
                lo, hi = getattr(self, f"min_{what}"), getattr(self, f"max_{what}")
                if hi < lo:
                    raise ValueError(f"max_{what} must be >= min_{what} = {lo}, got {hi}")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind="regression", x_shape=(1,), y_dim=1, x_range=tuple(self.config.x_range),
                        oracle=self.oracle)

    @property
    def noise_var(self) -> float:
        """Variance of y around f the oracle uses: ``noise_std^2`` plus the sampler's jitter."""
        return self.config.noise_std**2 + JITTER * self.config.signal_variance

    # -- sampling ---------------------------------------------------------------------------------
    def sample_lengthscales(self, n_tasks: int, *, generator: torch.Generator) -> Tensor:
        """Per-task length scales ``[T]`` (float64): fixed, or log-uniform on ``lengthscale_range``."""
        c = self.config
        if c.lengthscale_range is None:
            return torch.full((n_tasks,), c.lengthscale, dtype=torch.float64)
        lo, hi = math.log(c.lengthscale_range[0]), math.log(c.lengthscale_range[1])
        return torch.exp(lo + (hi - lo) * torch.rand(n_tasks, generator=generator, dtype=torch.float64))

    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` functions from the GP with their context and target points.

        Each task draws ``n_c ~ U{min_context..max_context}`` and
        ``n_t ~ U{min_target..max_target}``, inputs ``x ~ U(x_range)`` and one joint
        sample of ``y = f(x) + noise`` over all its points (Cholesky in float64, with
        :data:`JITTER`). Returns ``support_x, support_y [T, max_context, 1]``,
        ``query_x, query_y [T, max_target, 1]`` (float32), real points first, padded
        ones (x inside ``x_range``, y = 0) marked ``False`` in ``support_mask [T, S]``
        / ``query_mask [T, Q]``; the masks are None when the counts are fixed.
        ``split`` is ignored.
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        c = self.config
        g, T, S, Q = generator, n_tasks, c.max_context, c.max_target
        n_c = torch.randint(c.min_context, c.max_context + 1, (T,), generator=g)
        n_t = torch.randint(c.min_target, c.max_target + 1, (T,), generator=g)
        ls = self.sample_lengthscales(T, generator=g)  # [T]
        lo, hi = c.x_range
        x = lo + (hi - lo) * torch.rand(T, S + Q, generator=g)  # [T, P], float32
        K = kernel_matrix(c.kernel, x.double(), x.double(), ls, c.signal_variance)  # [T, P, P]
        K = K + JITTER * c.signal_variance * torch.eye(S + Q, dtype=torch.float64)
        L, info = torch.linalg.cholesky_ex(K)
        if bool((info != 0).any()):
            raise RuntimeError(
                f"GP covariance is not positive definite for task {int(info.nonzero()[0, 0])} "
                f"(kernel {c.kernel!r}); use a larger lengthscale_range low end or fewer points"
            )
        z = torch.randn(T, S + Q, 1, generator=g, dtype=torch.float64)
        y = (L @ z)[..., 0] + c.noise_std * torch.randn(T, S + Q, generator=g, dtype=torch.float64)
        y = y.float()
        s_mask = torch.arange(S) < n_c[:, None]  # [T, S]
        q_mask = torch.arange(Q) < n_t[:, None]  # [T, Q]
        sy, qy = y[:, :S] * s_mask, y[:, S:] * q_mask
        fixed_c, fixed_t = c.min_context == c.max_context, c.min_target == c.max_target
        return Episode(
            x[:, :S, None], sy[..., None], x[:, S:, None], qy[..., None],
            support_mask=None if fixed_c else s_mask, query_mask=None if fixed_t else q_mask,
        )

    # -- the oracle -------------------------------------------------------------------------------
    def _factor(self, x: Tensor, y: Tensor, m: Tensor, ls: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The Gaussian model of the real points of each task, for each length scale in ``ls [L]``.

        Padded points are removed exactly: their rows and columns of ``K + noise I`` are
        replaced by the identity and their y by 0, and only real points count in the
        ``log(2 pi)`` term, so they contribute nothing to the solve or the likelihood.

        Args (float64): ``x, y, m [t, P]`` (``m`` 1 for a real point), ``ls [L]``.

        Returns:
            the Cholesky factor ``[t, L, P, P]`` of ``K + noise I``, ``alpha = (K + noise I)^-1 y``
            ``[t, L, P, 1]`` and the log marginal likelihood of the real points ``[t, L]``
            (Rasmussen & Williams 2006, eq. 2.30).
        """
        c = self.config
        P = x.shape[1]
        K = kernel_matrix(c.kernel, x[:, None], x[:, None], ls, c.signal_variance)  # [t, L, P, P]
        mm = m[:, None, :, None] * m[:, None, None, :]
        K = mm * (K + self.noise_var * torch.eye(P, dtype=x.dtype)) + torch.diag_embed(1.0 - m)[:, None]
        chol = torch.linalg.cholesky(K)
        ym = (y * m)[:, None, :, None].expand(-1, ls.numel(), -1, -1)  # [t, L, P, 1]
        alpha = torch.cholesky_solve(ym, chol)
        log_ml = (-0.5 * (ym * alpha).sum((-1, -2))
                  - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
                  - 0.5 * m.sum(-1, keepdim=True) * math.log(2 * math.pi))  # [t, L]
        return chol, alpha, log_ml

    def _posterior(self, sx: Tensor, sy: Tensor, m: Tensor, qx: Tensor, ls: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """GP posterior predictive for each task and each length scale in ``ls [L]``.

        Args (float64): ``sx, sy, m [t, S]``, ``qx [t, Q]``, ``ls [L]``.

        Returns:
            ``mean, var [t, L, Q]`` of y at the queries (var includes the noise) and
            ``log_ml [t, L]``, the log marginal likelihood of the real support points.
        """
        c = self.config
        chol, alpha, log_ml = self._factor(sx, sy, m, ls)
        Kqs = kernel_matrix(c.kernel, qx[:, None], sx[:, None], ls, c.signal_variance) * m[:, None, None, :]
        mean = (Kqs @ alpha)[..., 0]  # [t, L, Q]
        v = torch.linalg.solve_triangular(chol, Kqs.transpose(-1, -2), upper=False)  # [t, L, S, Q]
        var = (c.signal_variance - (v * v).sum(-2)).clamp_min(0.0) + self.noise_var
        return mean, var, log_ml

    def joint_log_likelihood(self, episode: Episode, *, chunk: int = 25) -> Tensor:
        """Exact ``log p(y_T | x_T, y_C, x_C)`` of each task's targets given its context (float64, ``[T]``).

        ``log p(y_C, y_T) - log p(y_C)``, each a Gaussian log marginal likelihood of the
        real points; with a random length scale both integrate it by :meth:`quadrature`,
        ``log sum_l w_l p(. | l)``. Padded points are left out exactly. Divide by the number
        of real targets for nats per target (the joint convention of the Neural-Process
        literature, beside the per-point predictive the evaluator scores).
        """
        ls, log_w = self.quadrature()
        T = episode.n_tasks
        s_mask = episode.support_mask if episode.support_mask is not None else torch.ones(
            T, episode.n_support, dtype=torch.bool)
        q_mask = episode.query_mask if episode.query_mask is not None else torch.ones(
            T, episode.n_query, dtype=torch.bool)
        out = []
        for lo in range(0, T, chunk):
            sl = slice(lo, lo + chunk)
            x = torch.cat([episode.support_x[sl, :, 0], episode.query_x[sl, :, 0]], 1).double()
            y = torch.cat([episode.support_y[sl, :, 0], episode.query_y[sl, :, 0]], 1).double()
            both = torch.cat([s_mask[sl], q_mask[sl]], 1).double()
            context = torch.cat([s_mask[sl], torch.zeros_like(q_mask[sl])], 1).double()
            joint = self._factor(x, y, both, ls)[2]  # [t, L]
            marginal = self._factor(x, y, context, ls)[2]
            out.append(torch.logsumexp(joint + log_w, -1) - torch.logsumexp(marginal + log_w, -1))
        return torch.cat(out)

    def quadrature(self) -> tuple[Tensor, Tensor]:
        """Gauss-Legendre nodes over the length-scale prior: ``(lengthscales [L], log_weights [L])``.

        Nodes are placed in ``log l`` on ``[log lo, log hi]``; the prior is uniform
        there, so the prior weight of node i is its Legendre weight (normalised).
        A fixed length scale gives one node of weight 1.
        """
        c = self.config
        if c.lengthscale_range is None:
            return torch.tensor([c.lengthscale], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        u, w = np.polynomial.legendre.leggauss(c.oracle_nodes)  # on [-1, 1]
        lo, hi = math.log(c.lengthscale_range[0]), math.log(c.lengthscale_range[1])
        logl = torch.as_tensor(lo + (hi - lo) * (u + 1) / 2, dtype=torch.float64)
        logw = torch.as_tensor(np.log(w / w.sum()), dtype=torch.float64)
        return logl.exp(), logw

    def oracle(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None
    ) -> Distribution:
        """Exact GP posterior predictive of y at each query point (Rasmussen & Williams, 2006, eq. 2.25-2.26).

        ``mean = k_q^T (K + s_n^2 I)^-1 y``, ``var = k(x_q, x_q) - k_q^T (K + s_n^2 I)^-1 k_q + s_n^2``
        over the real (unmasked) support points, with ``s_n^2`` = :attr:`noise_var`.

        With a random length scale, the posterior over it is approximated by
        Gauss-Legendre quadrature in ``log l`` (``oracle_nodes`` nodes): node weights
        ``prior weight x p(y_support | x_support, l)`` (the marginal likelihood of
        the task's real support points), normalised per task, mix the per-node GP
        predictives: a ``MixtureSameFamily`` whose ``mean`` is the predictive mean.
        Computed in float64, chunked over tasks.

        Args:
            support_x, support_y: ``[T, S, 1]``; query_x: ``[T, Q, 1]``;
            support_mask: ``[T, S]`` bool (``False`` = padded), or None.

        Returns:
            ``Normal`` (fixed length scale) or ``MixtureSameFamily`` (random length
            scale) with ``batch_shape [T, Q, 1]``, in ``query_x.dtype``.
        """
        T, S = _check_oracle_inputs(support_x, support_y, query_x, support_mask)
        Q = query_x.shape[1]
        sx, sy, qx = support_x[..., 0].double(), support_y[..., 0].double(), query_x[..., 0].double()
        m = support_mask.double() if support_mask is not None else torch.ones_like(sx)
        ls, log_prior = self.quadrature()
        L = ls.numel()
        chunk = max(1, _CHUNK_ELEMENTS // (L * S * max(S, Q)))
        means, vars_, logws = [], [], []
        for t0 in range(0, T, chunk):
            sl = slice(t0, t0 + chunk)
            mean, var, log_ml = self._posterior(sx[sl], sy[sl], m[sl], qx[sl], ls)
            means.append(mean)
            vars_.append(var)
            logws.append(log_ml + log_prior)
        dtype = query_x.dtype
        mean = torch.cat(means).transpose(1, 2)[:, :, None, :].to(dtype)  # [T, Q, 1, L]
        std = torch.cat(vars_).sqrt().transpose(1, 2)[:, :, None, :].to(dtype)
        if L == 1:
            return Normal(mean[..., 0], std[..., 0])
        logw = torch.cat(logws)
        logw = (logw - logw.logsumexp(-1, keepdim=True)).to(dtype)  # [T, L]
        mix = Categorical(logits=logw[:, None, None, :].expand(T, Q, 1, L))
        return MixtureSameFamily(mix, Normal(mean, std))


def _check_oracle_inputs(sx: Tensor, sy: Tensor, qx: Tensor, mask: Tensor | None) -> tuple[int, int]:
    """Check 1-D regression oracle inputs; returns (tasks, support points)."""
    if sx.dim() != 3 or sx.shape[-1] != 1 or sy.shape != sx.shape:
        raise ValueError(
            f"support_x and support_y must both be [tasks, points, 1], got {list(sx.shape)} and {list(sy.shape)}"
        )
    if qx.dim() != 3 or qx.shape[-1] != 1 or qx.shape[0] != sx.shape[0]:
        raise ValueError(f"query_x must be [{sx.shape[0]}, points, 1], got {list(qx.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(sx.shape[:2]):
        raise ValueError(f"support_mask must be {list(sx.shape[:2])}, got {list(mask.shape)}")
    return sx.shape[0], sx.shape[1]
