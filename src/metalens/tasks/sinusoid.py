"""Sinusoid regression, the few-shot benchmark of MAML (Finn et al., 2017, sec. 5.1).

A task is a sine wave ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]`` and
phase ``phase ~ U[0, pi]``; inputs are ``x ~ U[-5, 5]``, optionally observed with
Gaussian noise. The oracle is the Bayes posterior predictive over ``(A, phase)``
computed by quadrature on a fine grid.

>>> import torch
>>> family = Sinusoid(Sinusoid.Config(shots=5, queries=3))
>>> ep = family.sample(4, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape, ep.support_y.shape, ep.query_y.shape
(torch.Size([4, 5, 1]), torch.Size([4, 5, 1]), torch.Size([4, 3, 1]))
>>> family.oracle(ep.support_x, ep.support_y, ep.query_x).batch_shape
torch.Size([4, 3, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, MixtureSameFamily, Normal

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = ["Sinusoid"]

# Posterior mass the oracle's mixture keeps: grid points are dropped, heaviest last,
# while what they hold together stays below 1 - _MASS_KEPT.
_MASS_KEPT = 1.0 - 1e-6
# Largest number of grid evaluations [tasks x grid points] held at once by the oracle.
_CHUNK_ELEMENTS = 1 << 22
# Log-weight of an empty mixture component: exp() of it is 0, yet it stays finite.
_EMPTY = -1e4


@TASKS.register("sinusoid")
class Sinusoid(TaskFamily):
    """Sine waves with random amplitude and phase (Finn et al., 2017)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the sinusoid family (defaults: Finn et al., 2017)."""

        shots: int = opt(10, "support points per task", ge=1)
        queries: int = opt(10, "query points per task", ge=1)
        amplitude_range: tuple[float, float] = opt((0.1, 5.0), "amplitude A ~ U[low, high]", ge=0, increasing=True)
        phase_range: tuple[float, float] = opt((0.0, math.pi), "phase ~ U[low, high] (radians)", increasing=True)
        x_range: tuple[float, float] = opt((-5.0, 5.0), "inputs x ~ U[low, high]", increasing=True)
        noise_std: float = opt(0.0, "standard deviation of the Gaussian noise on y", ge=0)
        oracle_grid: tuple[int, int] = opt((256, 256), "oracle quadrature grid: (amplitude points, phase points)",
                                           ge=2)
        oracle_components: int = opt(1024, "most components of the oracle's predictive mixture per task", ge=1)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind="regression", x_shape=(1,), y_dim=1, x_range=tuple(self.config.x_range),
                        oracle=self.oracle)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` sine waves and their support / query points.

        Returns an Episode with ``support_x, support_y [T, shots, 1]`` and
        ``query_x, query_y [T, queries, 1]`` (float32). ``split`` is ignored: the
        task distribution is continuous.
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        c = self.config
        T, S, Q = n_tasks, c.shots, c.queries
        g = generator
        (a_lo, a_hi), (p_lo, p_hi), (x_lo, x_hi) = c.amplitude_range, c.phase_range, c.x_range
        amplitude = a_lo + (a_hi - a_lo) * torch.rand(T, 1, 1, generator=g)  # [T, 1, 1]
        phase = p_lo + (p_hi - p_lo) * torch.rand(T, 1, 1, generator=g)  # [T, 1, 1]
        x = x_lo + (x_hi - x_lo) * torch.rand(T, S + Q, 1, generator=g)  # [T, S+Q, 1]
        y = amplitude * torch.sin(x - phase) + c.noise_std * torch.randn(T, S + Q, 1, generator=g)
        return Episode(x[:, :S], y[:, :S], x[:, S:], y[:, S:])

    # -- the oracle -------------------------------------------------------------------------------
    def _grid(self) -> tuple[Tensor, Tensor]:
        """Midpoints of the oracle's grid cells: amplitudes ``A [nA]`` and phases ``P [nP]`` (float64)."""
        c = self.config
        (nA, nP), (a_lo, a_hi), (p_lo, p_hi) = c.oracle_grid, c.amplitude_range, c.phase_range
        A = a_lo + (a_hi - a_lo) * (torch.arange(nA, dtype=torch.float64) + 0.5) / nA
        P = p_lo + (p_hi - p_lo) * (torch.arange(nP, dtype=torch.float64) + 0.5) / nP
        return A, P

    @property
    def oracle_std(self) -> float:
        """Likelihood scale the oracle uses: ``max(noise_std, grid floor)``.

        The grid floor is the root-mean-square error of replacing a sine wave by the
        one of its grid cell's midpoint, ``sqrt((dA^2 + (A_max dphase)^2) / 12)`` for
        cell sizes ``dA, dphase`` (about 0.019 on the default 256 x 256 grid). With
        noiseless data the exact posterior is a point mass the grid cannot resolve;
        the floor spreads it over the nearest grid points instead.
        """
        c = self.config
        (nA, nP), (a_lo, a_hi), (p_lo, p_hi) = c.oracle_grid, c.amplitude_range, c.phase_range
        dA, dP = (a_hi - a_lo) / nA, (p_hi - p_lo) / nP
        floor = math.sqrt((dA**2 + (a_hi * dP) ** 2) / 12.0)
        return max(c.noise_std, floor)

    def oracle(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None
    ) -> Distribution:
        """Bayes posterior predictive over query targets, by quadrature over (A, phase).

        The prior over ``(A, phase)`` is uniform, so on the midpoint grid of
        ``oracle_grid`` cells the posterior weights are proportional to the likelihood
        ``w_g ∝ prod_s N(y_s; A_g sin(x_s - phase_g), sigma^2)`` of the (unmasked)
        support points, with ``sigma = oracle_std`` (the noise, floored at the grid
        resolution). The predictive is the mixture
        ``p(y | x, support) = sum_g w_g N(y; A_g sin(x - phase_g), sigma^2)``, which is
        stored with at most ``K = oracle_components`` components per task:

        - *concentrated posteriors* (all but 1e-6 of the mass on at most K grid
          points, the usual case from a few shots): the heaviest grid points that
          hold all but 1e-6 of the mass, exactly as above;
        - *broad posteriors* (one shot, large noise): the grid is cut into at most K
          blocks of ``b x b`` cells (8 x 8 by default) and each block becomes one
          Normal per query point whose mean and variance are the block's weighted
          mean and variance of ``A_g sin(x - phase_g)`` plus ``sigma^2``. The mixture's
          mean and variance are then exactly those of the full-grid predictive;
          only its shape is smoothed at the block scale.

        Writing ``f = a sin x + b cos x`` (``a = A cos phase``, ``b = -A sin phase``)
        makes the log-likelihood linear in ``(a, b, a^2, ab, b^2)`` with five per-task
        sufficient statistics, so the grid is scored by one matrix product; block
        moments are sums of ``w (a, b, a^2, ab, b^2)``. Computed in float64, chunked
        over tasks.

        Args:
            support_x, support_y: ``[T, S, 1]``.
            query_x: ``[T, Q, 1]``.
            support_mask: ``[T, S]`` bool, ``False`` for padded points, or None.

        Returns:
            ``MixtureSameFamily`` with ``batch_shape [T, Q, 1]`` in ``query_x.dtype``;
            its ``mean`` is the posterior predictive mean. Tasks needing fewer
            components than others in the batch are padded with zero-weight ones
            (finite logits of -1e4), so each task's predictive does not depend on
            the rest of the batch.
        """
        T, S = _check_oracle_inputs(support_x, support_y, query_x, support_mask)
        c = self.config
        sigma = self.oracle_std
        A, P = self._grid()
        # A sin(x - P) = a sin x + b cos x with a = A cos P, b = -A sin P; grid point g = (i, j) -> i * nP + j
        a = (A[:, None] * torch.cos(P)).reshape(-1)  # [G]
        b = (-A[:, None] * torch.sin(P)).reshape(-1)
        basis = torch.stack([a, b, a * a, a * b, b * b])  # [5, G]
        x = support_x[..., 0].double()
        y = support_y[..., 0].double()
        m = support_mask.double() if support_mask is not None else torch.ones_like(x)
        s, co = torch.sin(x), torch.cos(x)
        # log-lik + const = -(1/2 sigma^2) sum_s m (a^2 s^2 + 2ab s c + b^2 c^2 - 2 a y s - 2 b y c)
        stats = torch.stack(
            [2 * (m * y * s).sum(1), 2 * (m * y * co).sum(1),
             -(m * s * s).sum(1), -2 * (m * s * co).sum(1), -(m * co * co).sum(1)], -1
        ) / (2 * sigma**2)  # [T, 5]
        xq = query_x[..., 0].double()
        sq, cq = torch.sin(xq)[..., None], torch.cos(xq)[..., None]  # [T, Q, 1]
        K = min(c.oracle_components, basis.shape[1])
        blocks = _BlockSums(A, P, K)
        chunk = max(1, _CHUNK_ELEMENTS // basis.shape[1])
        dtype = query_x.dtype
        parts = []  # per chunk: loc, scale [t, Q, k], logit [t, k]
        for t0 in range(0, T, chunk):
            sl = slice(t0, t0 + chunk)
            logw = stats[sl] @ basis  # [t, G]
            logw -= logw.amax(1, keepdim=True)
            w = logw.exp_()  # unnormalised weights, max 1
            w /= w.sum(1, keepdim=True)
            top_w, idx = torch.topk(w, K, dim=1)  # heaviest first
            needed = (top_w.cumsum(1) < _MASS_KEPT).sum(1) + 1  # [t] components each task keeps
            fine = needed <= K
            loc = a[idx][:, None] * sq[sl] + b[idx][:, None] * cq[sl]  # [t, Q, K]
            scale = torch.full_like(loc, sigma)
            logit = top_w.clamp_min(1e-300).log()  # [t, K]
            if not bool(fine.all()):
                b_loc, b_scale, b_logit = blocks(w, sq[sl], cq[sl], sigma)  # [t, Q, nb], [t, nb]
                nb = b_logit.shape[1]
                f = fine[:, None, None]
                loc[..., :nb] = torch.where(f, loc[..., :nb], b_loc)
                scale[..., :nb] = torch.where(f, scale[..., :nb], b_scale)
                logit[:, :nb] = torch.where(fine[:, None], logit[:, :nb], b_logit)
                needed = torch.where(fine, needed, nb)
            # a task's mixture depends on that task only, not on the others in the batch
            logit = torch.where(torch.arange(K) < needed[:, None], logit, _EMPTY)
            k = int(needed.max())
            parts.append((loc[..., :k].to(dtype), scale[..., :k].to(dtype), logit[:, :k].to(dtype)))
        width = max(p[2].shape[1] for p in parts)

        def padded(i: int, value: float) -> Tensor:
            return torch.cat([torch.nn.functional.pad(p[i], (0, width - p[i].shape[-1]), value=value) for p in parts])

        Q = xq.shape[1]
        loc = padded(0, 0.0)[:, :, None]  # [T, Q, 1, K]
        scale = padded(1, sigma)[:, :, None]
        logit = padded(2, _EMPTY)[:, None, None].expand(T, Q, 1, width)
        return MixtureSameFamily(Categorical(logits=logit), Normal(loc, scale))


class _BlockSums:
    """Merge the grid's cells into at most ``max_blocks`` blocks of ``f x f`` cells, moment-matched.

    The weighted sums of ``(1, a, b, a^2, ab, b^2)`` over a block separate into
    amplitude factors ``(1, A, A^2)`` and phase factors ``(1, cos, sin, cos^2,
    cos sin, sin^2)``, so they are two small contractions of the weights.
    """

    def __init__(self, A: Tensor, P: Tensor, max_blocks: int) -> None:
        nA, nP = A.numel(), P.numel()
        f = 1
        while math.ceil(nA / f) * math.ceil(nP / f) > max_blocks:
            f += 1
        bA, bP = math.ceil(nA / f), math.ceil(nP / f)
        self.n, self.f, self.blocks = (nA, nP), f, (bA, bP)
        pad = lambda v, n: torch.nn.functional.pad(v, (0, n * f - v.numel()))  # noqa: E731  zero weight
        ones_a, ones_p = pad(torch.ones_like(A), bA), pad(torch.ones_like(P), bP)
        A, cos, sin = pad(A, bA), pad(torch.cos(P), bP), pad(torch.sin(P), bP)
        self.rows = torch.stack([ones_a, A, A * A]).view(3, bA, f).transpose(0, 1)  # [bA, 3, f]
        self.cols = torch.stack([ones_p, cos, sin, cos * cos, cos * sin, sin * sin]).view(6, bP, f)

    def __call__(self, w: Tensor, sq: Tensor, cq: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
        """Block mixture of the predictive.

        Args: ``w [t, G]`` normalised grid weights; ``sq, cq [t, Q, 1]`` the sine and
        cosine of the query inputs; ``sigma`` the components' noise scale.

        Returns: ``loc, scale [t, Q, nb]`` and log-weights ``[t, nb]``.
        """
        (nA, nP), f, (bA, bP) = self.n, self.f, self.blocks
        t = w.shape[0]
        w = w.view(t, nA, nP)
        if (bA * f, bP * f) != (nA, nP):
            w = torch.nn.functional.pad(w, (0, bP * f - nP, 0, bA * f - nA))
        rows = self.rows @ w.view(t, bA, f, bP * f)  # [t, bA, 3, bP*f]: sums of (1, A, A^2) w
        sums = torch.einsum("tikjf,cjf->tikjc", rows.view(t, bA, 3, bP, f), self.cols)  # [t, bA, 3, bP, 6]
        W = sums[:, :, 0, :, 0].flatten(1)  # [t, nb]
        inv = 1.0 / W.clamp_min(1e-300)

        def mean(k: int, c: int, sign: float = 1.0) -> Tensor:  # block mean of A^k trig_c: [t, 1, nb]
            return (sign * sums[:, :, k, :, c].flatten(1) * inv)[:, None]

        Ea, Eb = mean(1, 1), mean(1, 2, -1.0)  # a = A cos P, b = -A sin P
        Eaa, Eab, Ebb = mean(2, 3), mean(2, 4, -1.0), mean(2, 5)
        loc = Ea * sq + Eb * cq  # [t, Q, nb]
        second = Eaa * sq * sq + 2 * Eab * sq * cq + Ebb * cq * cq
        var = (second - loc * loc).clamp_min(0.0) + sigma**2
        logit = torch.where(W > 0, W.clamp_min(1e-300).log(), _EMPTY)
        return loc, var.sqrt(), logit


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
