"""Functions computed by randomly initialised MLPs: the random-function tasks of GPICL.

Kirsch et al. (2022), "General-Purpose In-Context Learning by Meta-Learning
Transformers", meta-train sequence models on tasks generated at random and study how
the number of distinct tasks decides between memorisation and learning-to-learn.
Here a task is a function ``f: R^{x_dim} -> R^{y_dim}`` given by an MLP with ``depth``
hidden layers of width ``hidden`` and random weights::

    u   = (x - c) / r                       inputs rescaled to [-1, 1]^d (c, r: centre, half-width of x_range)
    h_1 = act(s (W_1 u + b_1))              W_1 ~ N(0, I / d), b_1 ~ N(0, 1), s = first_layer_scale
    h_l = act(W_l h_{l-1} + b_l)            W_l ~ N(0, I / hidden), b_l ~ N(0, 1),  l = 2..depth
    g   = W_o h_depth                       W_o ~ N(0, I / hidden)
    f   = a (g - mean g) / std g            a ~ U[output_std_range], mean and std of each output over
                                            256 reference inputs u ~ U[-1, 1]^d drawn with the task
    y   = f(x) + noise_std * eps,  x ~ U[x_range]^d

so every task has (close to) zero mean and standard deviation ``a`` over the input
distribution, whatever the depth or activation; ``first_layer_scale`` sets how wiggly
the functions are.

**Finite pools.** With ``pool_log2 = k`` the meta-training split (``split="train"``)
draws its tasks uniformly from a pool of ``2^k`` functions: function ``i`` is drawn
from the generator ``(pool_seed, i)`` alone, so the pool is fixed by ``pool_seed``,
the same in every run and process, and the pool of ``2^k`` tasks is contained in that
of ``2^(k+1)``. Inputs and noise stay fresh at every draw. The ``val`` and ``test``
splits draw new functions from the episode's generator: tasks never seen in training.
Without ``pool_log2`` every split draws new functions (an unbounded stream).

**No oracle; a pool posterior.** Held-out tasks come from the unbounded prior over
MLP weights, whose posterior predictive is intractable, so ``spec.oracle`` is None
and the evaluator reports no oracle. For a pool of at most ``2^12`` functions,
:meth:`RandomMLP.pool_oracle` is the exact Bayes predictive of the *meta-training*
distribution: a uniform prior over the pool, the Gaussian likelihood of the support
points with standard deviation ``max(noise_std, 1e-3)``, and the predictive mixture
``sum_i p(i | support) N(y | f_i(x), sigma^2)`` per output: on training tasks, the
perfect memoriser.

>>> import torch
>>> family = RandomMLP(RandomMLP.Config(shots=4, queries=3, pool_log2=3))
>>> ep = family.sample(5, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape, ep.query_y.shape
(torch.Size([5, 4, 1]), torch.Size([5, 3, 1]))
>>> family.pool_oracle(ep.support_x, ep.support_y, ep.query_x).batch_shape
torch.Size([5, 3, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, MixtureSameFamily, Normal

from metalens import rng
from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = ["RandomMLP", "MLPFunctions", "ORACLE_MAX_LOG2"]

_POOL_KEY = 0x9001  # pool member i comes from rng.generator(pool_seed, _POOL_KEY, i)
_REF_POINTS = 256  # reference inputs of each function's standardisation
ORACLE_MAX_LOG2 = 12  # the pool posterior (and the cached pool) for pools of at most 2^12 functions
NOISE_FLOOR = 1e-3  # the pool posterior's likelihood scale when noise_std is 0
_CHUNK_ELEMENTS = 1 << 22  # largest [members x points x hidden] block the oracle holds at once

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": torch.nn.functional.gelu,
                "silu": torch.nn.functional.silu}


@dataclass(frozen=True)
class MLPFunctions:
    """A batch of ``T`` random MLP functions, parameters stacked on a leading task dimension.

    ``weights[l] [T, out, in]`` (the last one the output layer), ``biases[l] [T, out]``
    (hidden layers), ``shift, scale [T, 1, y_dim]``; ``first_scale`` is the family's
    ``first_layer_scale``. ``f(u [T, P, x_dim]) -> [T, P, y_dim]`` on rescaled inputs.
    """

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]
    shift: Tensor
    scale: Tensor
    activation: str
    first_scale: float

    def raw(self, u: Tensor) -> Tensor:
        """``g(u)``, before standardisation."""
        act = _ACTIVATIONS[self.activation]
        h = u
        for i, (w, b) in enumerate(zip(self.weights[:-1], self.biases)):
            a = h @ w.transpose(1, 2) + b[:, None]  # [T, P, hidden]
            h = act(self.first_scale * a if i == 0 else a)
        return h @ self.weights[-1].transpose(1, 2)

    def __call__(self, u: Tensor) -> Tensor:
        return (self.raw(u) - self.shift) * self.scale

    def __getitem__(self, idx: Tensor) -> MLPFunctions:
        """The functions ``idx`` (an int64 index tensor over the task dimension)."""
        return MLPFunctions(tuple(w[idx] for w in self.weights), tuple(b[idx] for b in self.biases),
                            self.shift[idx], self.scale[idx], self.activation, self.first_scale)

    @staticmethod
    def cat(parts: list[MLPFunctions]) -> MLPFunctions:
        p = parts[0]
        return MLPFunctions(tuple(torch.cat(ws) for ws in zip(*(q.weights for q in parts))),
                            tuple(torch.cat(bs) for bs in zip(*(q.biases for q in parts))),
                            torch.cat([q.shift for q in parts]), torch.cat([q.scale for q in parts]),
                            p.activation, p.first_scale)


@TASKS.register("random_mlp")
class RandomMLP(TaskFamily):
    """Functions given by randomly initialised MLPs; a finite pool of 2^k of them or an unbounded stream (GPICL)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the random-MLP family."""

        x_dim: int = opt(1, "input width", ge=1)
        y_dim: int = opt(1, "output width", ge=1)
        hidden: int = opt(32, "width of each hidden layer of the random MLPs", ge=1)
        depth: int = opt(2, "hidden layers of the random MLPs", ge=1)
        activation: Literal["relu", "tanh", "gelu", "silu"] = opt("tanh", "activation of the random MLPs")
        first_layer_scale: float = opt(3.0, "multiplies the first layer's pre-activations: larger, wigglier functions",
                                       gt=0)
        x_range: tuple[float, float] = opt((-5.0, 5.0), "inputs x ~ U[low, high] in every dimension", increasing=True)
        output_std_range: tuple[float, float] = opt(
            (0.5, 2.0), "each task's standard deviation of f(x) over the inputs, ~ U[low, high], low <= high (equal: "
                        "one scale for every task)", gt=0, nondecreasing=True)
        noise_std: float = opt(0.0, "standard deviation of the Gaussian noise on y", ge=0)
        shots: int = opt(10, "support points per task", ge=1)
        queries: int = opt(10, "query points per task", ge=1)
        pool_log2: int | None = opt(None, "k: meta-train on a pool of 2^k fixed functions; None: an unbounded stream",
                                    ge=0, le=40)
        pool_seed: int = opt(0, "seed that fixes which functions the pool holds", ge=0)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        self._pool: MLPFunctions | None = None  # the whole pool, built on first use (small pools only)

    @property
    def pool_size(self) -> int | None:
        """``2^pool_log2``, or None for an unbounded stream."""
        return None if self.config.pool_log2 is None else 2 ** self.config.pool_log2

    @property
    def spec(self) -> TaskSpec:
        c = self.config
        return TaskSpec(kind="regression", x_shape=(c.x_dim,), y_dim=c.y_dim,
                        x_range=tuple(c.x_range) if c.x_dim == 1 else None)

    # -- functions --------------------------------------------------------------------------------
    def draw_functions(self, n: int, *, generator: torch.Generator) -> MLPFunctions:
        """``n`` new random functions from ``generator`` (see the module docstring)."""
        c, g = self.config, generator
        widths = [c.x_dim] + [c.hidden] * c.depth
        weights, biases = [], []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            weights.append(torch.randn(n, fan_out, fan_in, generator=g) / math.sqrt(fan_in))
            biases.append(torch.randn(n, fan_out, generator=g))
        weights.append(torch.randn(n, c.y_dim, c.hidden, generator=g) / math.sqrt(c.hidden))
        lo, hi = c.output_std_range
        std = lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # [n, 1, 1]
        u_ref = 2 * torch.rand(n, _REF_POINTS, c.x_dim, generator=g) - 1
        raw = MLPFunctions(tuple(weights), tuple(biases), torch.zeros(n, 1, c.y_dim), torch.ones(n, 1, c.y_dim),
                           c.activation, c.first_layer_scale)
        g_ref = raw.raw(u_ref)  # [n, R, y_dim]
        shift = g_ref.mean(1, keepdim=True)
        scale = std / g_ref.std(1, keepdim=True).clamp_min(1e-6)
        return MLPFunctions(tuple(weights), tuple(biases), shift, scale, c.activation, c.first_layer_scale)

    def pool_functions(self, ids: Tensor) -> MLPFunctions:
        """Members ``ids [n]`` (int64) of the pool; member ``i`` depends on ``(pool_seed, i)`` only."""
        size = self.pool_size
        if size is None:
            raise ValueError("this family has no pool (pool_log2 is None): its tasks are an unbounded stream")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < size):
            raise ValueError(f"pool member ids must be in [0, {size}), got {ids.min().item()}..{ids.max().item()}")
        if self.config.pool_log2 <= ORACLE_MAX_LOG2:
            if self._pool is None:
                self._pool = MLPFunctions.cat([self._member(i) for i in range(size)])
            return self._pool[ids]
        return MLPFunctions.cat([self._member(int(i)) for i in ids])

    def _member(self, i: int) -> MLPFunctions:
        return self.draw_functions(1, generator=rng.generator(self.config.pool_seed, _POOL_KEY, i))

    def rescale(self, x: Tensor) -> Tensor:
        """Inputs ``x`` to ``u = (x - c) / r`` in ``[-1, 1]``."""
        lo, hi = self.config.x_range
        return (x - (lo + hi) / 2) / ((hi - lo) / 2)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` functions (from the pool for ``split="train"`` of a finite pool) and their points.

        Returns ``support_x [T, shots, x_dim]``, ``support_y [T, shots, y_dim]``,
        ``query_x [T, queries, x_dim]``, ``query_y [T, queries, y_dim]`` (float32).
        """
        ids, functions, x, y = self.sample_with_ids(n_tasks, generator=generator, split=split)
        S = self.config.shots
        return Episode(x[:, :S], y[:, :S], x[:, S:], y[:, S:])

    def sample_with_ids(self, n_tasks: int, *, generator: torch.Generator,
                        split: Split = "train") -> tuple[Tensor | None, MLPFunctions, Tensor, Tensor]:
        """What :meth:`sample` draws: pool ids ``[T]`` (None for new functions), the functions,
        and all points ``x [T, shots + queries, x_dim]``, ``y [T, shots + queries, y_dim]``."""
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        c, g, T = self.config, generator, n_tasks
        ids = None
        if split == "train" and self.pool_size is not None:
            ids = torch.randint(self.pool_size, (T,), generator=g)
            functions = self.pool_functions(ids)
        else:
            functions = self.draw_functions(T, generator=g)
        lo, hi = c.x_range
        x = lo + (hi - lo) * torch.rand(T, c.shots + c.queries, c.x_dim, generator=g)
        y = functions(self.rescale(x)) + c.noise_std * torch.randn(T, c.shots + c.queries, c.y_dim, generator=g)
        return ids, functions, x, y

    # -- the pool posterior -----------------------------------------------------------------------
    @property
    def oracle_std(self) -> float:
        """Likelihood scale the pool posterior uses: ``max(noise_std, 1e-3)``."""
        return max(self.config.noise_std, NOISE_FLOOR)

    def pool_oracle(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                    support_mask: Tensor | None = None) -> Distribution:
        """The exact posterior predictive of the meta-training distribution of a finite pool
        (see the module docstring); same signature and output as ``Learner.predict``.

        ``log w_i = sum_s log N(y_s | f_i(x_s), sigma^2)`` over the real support points,
        ``p(y_q) = sum_i softmax(log w)_i N(y_q | f_i(x_q), sigma^2)`` per output, in float64.

        Returns:
            ``MixtureSameFamily`` with ``batch_shape [T, Q, y_dim]`` in ``query_x.dtype``.
        """
        c = self.config
        if c.pool_log2 is None or c.pool_log2 > ORACLE_MAX_LOG2:
            raise ValueError(f"random_mlp has a pool posterior only for pools of at most 2^{ORACLE_MAX_LOG2} "
                             f"functions (pool_log2 <= {ORACLE_MAX_LOG2}); got pool_log2={c.pool_log2}")
        T, S = support_x.shape[:2]
        if support_x.dim() != 3 or support_x.shape[-1] != c.x_dim:
            raise ValueError(f"support_x must be [tasks, points, {c.x_dim}], got {list(support_x.shape)}")
        if tuple(support_y.shape) != (T, S, c.y_dim):
            raise ValueError(f"support_y must be [{T}, {S}, {c.y_dim}], got {list(support_y.shape)}")
        if query_x.dim() != 3 or query_x.shape[0] != T or query_x.shape[-1] != c.x_dim:
            raise ValueError(f"query_x must be [{T}, points, {c.x_dim}], got {list(query_x.shape)}")
        if support_mask is not None and tuple(support_mask.shape) != (T, S):
            raise ValueError(f"support_mask must be [{T}, {S}], got {list(support_mask.shape)}")
        K = self.pool_size
        pool = self.pool_functions(torch.arange(K))
        pool = MLPFunctions(tuple(w.double() for w in pool.weights), tuple(b.double() for b in pool.biases),
                            pool.shift.double(), pool.scale.double(), pool.activation, pool.first_scale)
        Q = query_x.shape[1]
        u = self.rescale(torch.cat([support_x, query_x], 1).double()).reshape(1, T * (S + Q), c.x_dim)
        per = max(1, _CHUNK_ELEMENTS // (u.shape[1] * c.hidden))  # members per chunk
        f = torch.cat([pool[torch.arange(lo, min(lo + per, K))](u.expand(min(lo + per, K) - lo, -1, -1))
                       for lo in range(0, K, per)])  # [K, T (S + Q), y_dim]
        f = f.view(K, T, S + Q, c.y_dim).permute(1, 2, 3, 0)  # [T, S + Q, y_dim, K]
        sigma = self.oracle_std
        sq = ((support_y.double()[..., None] - f[:, :S]) ** 2).sum(2)  # [T, S, K]
        if support_mask is not None:
            sq = sq * support_mask.double()[..., None]
        log_w = torch.log_softmax(-0.5 * sq.sum(1) / sigma**2, -1)  # [T, K]: log p(i | support)
        logits = log_w[:, None, None, :].expand(T, Q, c.y_dim, K)
        comp = Normal(f[:, S:].to(query_x.dtype), torch.full((), sigma, dtype=query_x.dtype))
        return MixtureSameFamily(Categorical(logits=logits.to(query_x.dtype)), comp)
