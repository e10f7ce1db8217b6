"""Synthetic classification tables: a prior over tabular tasks to meta-train on, with no real data.

The idea of TabPFN (Hollmann et al. 2023, "TabPFN: A Transformer That Solves Small Tabular
Classification Problems in a Second"; Müller et al. 2022, "Transformers Can Do Bayesian
Inference"), at a small scale: draw many small classification tables from a prior over
data-generating processes, meta-train an in-context learner on them, then let it read a real
table's labelled rows and classify the rest, without any training on real data.

**A task** (every draw from the generator only):

1. ``d`` features, ``min_features <= d <= max_features``, log-uniform or uniform (a fair
   coin per task: small tables are frequent, wide ones common); the inputs are
   ``max_features`` wide and features ``d + 1, ...`` are zero (zero padding, as a user's
   narrower table is padded);
2. inputs ``z`` Gaussian ``N(0, 1)`` or uniform with unit variance (``inputs``; ``mix``: a
   fair coin per task); with probability ``correlated`` mixed by a random matrix,
   ``x = z A``, ``A ~ N(0, 1/d)``, so features are correlated;
3. random scaling: feature ``j`` is multiplied by ``s_j``, log-uniform in ``scale_range``
   (it changes how much a feature matters to the MLP labeler; the model's inputs are
   standardised, step 6); then, with probability ``transforms`` per feature, a random
   monotone transform, as real columns often have: discretised into 2 to 10 equal-width
   levels, rectified at the value of a random point (many zeros), or exponentiated (skewed);
4. a labeler gives every point ``c`` class scores: a random MLP (two ``tanh`` layers of
   ``mlp_hidden`` units, a random gain on the first layer: smooth to wiggly boundaries) read out
   by ``c`` random linear functions or, with probability ``prototype_readout``, by the distances
   to ``c`` random points of the task in the MLP's feature space (the nearest wins: Voronoi
   cells of the features as the MLP sees them), or a random tree (axis-aligned splits on random
   features at the values of random points, depth in ``tree_depth``, a random score vector per
   node), a fair coin per task with
   ``labeler = "mix"``; each class's scores are standardised over the task's points and
   Gaussian noise of standard deviation ``label_noise`` is added;
5. labels by a balanced assignment: every class gets exactly ``k + queries`` of the
   ``c (k + queries)`` points drawn, ``k`` the number of shots (class ``j`` in turn takes the
   free points that prefer it most, ``s_j - logsumexp`` of the later classes' scores); the
   labels are then permuted at random. Per class, ``k`` points form the support set and
   ``queries`` the query set;
6. the inputs are standardised per task with the mean and standard deviation of the
   task's support points, a feature constant on the support set is set to 0 (it
   cannot tell the classes apart), and values are clipped to ``[-clip, clip]``. This is
   :func:`standardize_by_support`, which ``metalens predict`` and ``FewShotClassifier``
   apply to a user's table in the same way.

**Classes.** ``spec.num_classes`` is ``max_classes``: a learner's output width. With
``min_classes`` below it, each episode batch draws its number of classes ``c`` uniformly in
``[min_classes, max_classes]``, and its tasks have exactly ``c`` classes, labelled ``0..c-1``
(an :class:`~metalens.episode.Episode` has one ``num_classes`` and every class in every
support set); a learner with ``max_classes`` outputs learns that labels beyond those in the
support set never occur. Used on a user's table with ``n <= max_classes`` classes, the
outputs of the absent classes are dropped and the rest renormalised; more classes than
``max_classes`` are refused. Held-out episodes (:meth:`eval_episodes`, what
``metalens eval`` scores) are ``max_classes``-way, so that they concatenate.

**Shots.** With ``min_shots`` below ``shots``, each episode batch draws its number of
support points per class uniformly in ``[min_shots, shots]`` (no padding: every token is a
real point), so one model learns from 1 to ``shots`` examples per class. Held-out episodes
have ``shots``.

There is no oracle (the posterior over labelers is intractable).

>>> import torch
>>> family = SyntheticTables(SyntheticTables.Config(max_features=8, max_classes=4, min_classes=2, shots=3,
...                                                 min_shots=1, queries=2))
>>> ep = family.sample(5, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape[2], ep.num_classes <= 4, ep.n_support % ep.num_classes, ep.n_query // ep.num_classes
(8, True, 0, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from metalens import rng
from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.registry import TASKS
from metalens.tasks.base import EVAL_CHUNK, Split, TaskFamily

__all__ = ["SyntheticTables", "standardize_by_support", "fit_width"]

_EPS = 1e-6


def standardize_by_support(support_x: Tensor, query_x: Tensor, support_mask: Tensor | None = None, *,
                           clip: float = 6.0) -> tuple[Tensor, Tensor]:
    """Standardise each task's features with its real support points' mean and standard deviation.

    ``support_x [T, S, F]``, ``query_x [T, Q, F]``, ``support_mask [T, S]`` (True: a real point).
    A feature whose standard deviation over the support set is below ``1e-6`` is set to 0
    everywhere (constant on the support set, it cannot separate its classes); values are
    clipped to ``[-clip, clip]``. Padded support points are set to 0.

    >>> sx = torch.tensor([[[1.0, 5.0], [3.0, 5.0]]]); qx = torch.tensor([[[2.0, 9.0]]])
    >>> s, q = standardize_by_support(sx, qx)
    >>> s.tolist(), q.tolist()
    ([[[-1.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.0]]])
    """
    w = torch.ones(support_x.shape[:2], dtype=support_x.dtype, device=support_x.device) if support_mask is None \
        else support_mask.to(support_x.dtype)
    n = w.sum(1).clamp_min(1.0)[:, None, None]  # [T, 1, 1]
    mean = (w[..., None] * support_x).sum(1, keepdim=True) / n  # [T, 1, F]
    var = (w[..., None] * (support_x - mean) ** 2).sum(1, keepdim=True) / n
    std = var.sqrt()
    keep = std > _EPS
    scale = torch.where(keep, std, torch.ones_like(std))

    def one(x: Tensor) -> Tensor:
        return torch.where(keep, (x - mean) / scale, torch.zeros_like(x)).clamp(-clip, clip)

    s = one(support_x)
    if support_mask is not None:
        s = s * support_mask[..., None].to(s.dtype)
    return s, one(query_x)


def fit_width(x: Tensor, width: int) -> Tensor:
    """Features ``[..., F]`` zero-padded or truncated to ``[..., width]`` (what a table narrower or wider
    than a learner's input sees).

    >>> fit_width(torch.ones(2, 3), 5).tolist()
    [[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]]
    """
    F = x.shape[-1]
    if F >= width:
        return x[..., :width]
    return torch.cat([x, x.new_zeros(*x.shape[:-1], width - F)], -1)


def _check_scale(value: tuple[float, float]) -> None:
    """low > 0."""
    if value[0] <= 0:
        raise ValueError("must be > 0")


@TASKS.register("synthetic_tables")
class SyntheticTables(TaskFamily):
    """Synthetic classification tables from random MLP and tree labelers (a TabPFN-style prior), zero-padded."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the synthetic-tables family."""

        max_features: int = opt(64, "input width: tables with fewer features are zero-padded to it", ge=1)
        min_features: int = opt(1, "fewest features of a task (log-uniform or uniform between min and max)", ge=1)
        max_classes: int = opt(10, "most classes of a task: the learners' output width (spec.num_classes)", ge=2)
        min_classes: int | None = opt(None, "fewest classes of a task; below max_classes each episode batch draws "
                                            "its number of classes (null: every task has max_classes)", ge=2)
        shots: int = opt(5, "support points per class (the most, with min_shots)", ge=1)
        min_shots: int | None = opt(None, "fewest support points per class; below shots each episode batch draws "
                                          "its number in [min_shots, shots] (null: shots)", ge=1)
        queries: int = opt(5, "query points per class", ge=1)
        labeler: Literal["mix", "mlp", "tree"] = opt("mix", "labeler of each task: a random MLP, a random tree, or "
                                                            "either (a fair coin per task)")
        inputs: Literal["mix", "gaussian", "uniform"] = opt("mix", "distribution of the raw features (mix: a "
                                                                   "fair coin per task)")
        correlated: float = opt(0.5, "probability that a task's features are mixed by a random matrix", ge=0, le=1)
        scale_range: tuple[float, float] = opt((0.2, 5.0), "each feature is scaled by a log-uniform factor in "
                                                           "[low, high] before labelling", nondecreasing=True,
                                               check=_check_scale)
        transforms: float = opt(0.3, "probability that a feature is discretised, rectified or exponentiated",
                                ge=0, le=1)
        mlp_hidden: int = opt(32, "MLP labeler: units of each of its two tanh layers", ge=1)
        prototype_readout: float = opt(0.5, "MLP labeler: probability that a task's classes are the nearest of c "
                                            "random points in the MLP's feature space (else c linear readouts)",
                                       ge=0, le=1)
        tree_depth: tuple[int, int] = opt((2, 6), "tree labeler: depth, uniform in [low, high]", ge=1, le=12,
                                          nondecreasing=True)
        label_noise: float = opt(0.1, "standard deviation of the noise on the standardised class scores", ge=0)
        clip: float = opt(6.0, "standardised features are clipped to [-clip, clip]", gt=0)

        def check(self) -> None:
            if self.min_features > self.max_features:
                raise ValueError(f"min_features must be <= max_features, got {self.min_features} > "
                                 f"{self.max_features}")
            if self.min_classes is not None and self.min_classes > self.max_classes:
                raise ValueError(f"min_classes must be <= max_classes, got {self.min_classes} > {self.max_classes}")
            if self.min_shots is not None and self.min_shots > self.shots:
                raise ValueError(f"min_shots must be <= shots, got {self.min_shots} > {self.shots}")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())

    @property
    def class_range(self) -> tuple[int, int]:
        """The fewest and the most classes a task has."""
        c = self.config
        return (c.max_classes if c.min_classes is None else c.min_classes), c.max_classes

    @property
    def spec(self) -> TaskSpec:
        c = self.config
        return TaskSpec(kind="classification", x_shape=(c.max_features,), num_classes=c.max_classes)

    def user_inputs(self) -> dict[str, Any]:
        """How a user's table is prepared for a learner trained on this family (``metalens predict``, the
        estimators, model files): features zero-padded or truncated to ``max_features``, standardised per task
        by :func:`standardize_by_support`; any number of classes up to ``max_classes``."""
        return {"standardize": "support", "pad_features": True, "clip": self.config.clip,
                "class_range": [2, self.config.max_classes]}

    def _transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Each feature of ``x [T, P, D]``, with probability ``transforms``, discretised, rectified or exponentiated."""
        T, P, D = x.shape
        kind = torch.randint(3, (T, 1, D), generator=g)
        chosen = torch.rand(T, 1, D, generator=g) < self.config.transforms
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        levels = torch.randint(2, 11, (T, 1, D), generator=g).to(x.dtype)
        discrete = torch.round((x - lo) / (hi - lo).clamp_min(_EPS) * (levels - 1)) * (hi - lo) / (levels - 1) + lo
        at = torch.randint(P, (T, 1, D), generator=g)
        rectified = torch.relu(x - x.gather(1, at))
        spread = x.std(1, keepdim=True).clamp_min(_EPS)
        skewed = torch.exp((x - x.mean(1, keepdim=True)) / spread)
        out = torch.where(kind == 0, discrete, torch.where(kind == 1, rectified, skewed))
        return torch.where(chosen, out, x)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` tables (``split`` is ignored: the prior is unbounded).

        Returns ``support_x [T, c*k, max_features]``, ``support_y [T, c*k]`` (int64),
        ``query_x [T, c*queries, max_features]``, ``query_y [T, c*queries]``: ``c`` classes (drawn per call
        when ``min_classes < max_classes``) of ``k`` support points (drawn per call when ``min_shots < shots``).
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        c = self.config
        lo, hi = self.class_range
        ways = hi if lo == hi else int(torch.randint(lo, hi + 1, (), generator=generator))
        k_lo = c.shots if c.min_shots is None else c.min_shots
        shots = c.shots if k_lo == c.shots else int(torch.randint(k_lo, c.shots + 1, (), generator=generator))
        return self._sample(n_tasks, ways, shots, generator)

    def eval_episodes(self, seed: int, n_tasks: int, *, split: Split = "test") -> Episode:
        """``n_tasks`` held-out tables, all ``max_classes``-way ``shots``-shot (chunks of :data:`EVAL_CHUNK`
        from ``seed``)."""
        if n_tasks < 1:
            raise ValueError(f"episodes must be >= 1, got {n_tasks}")
        c_max, k_max = self.config.max_classes, self.config.shots
        chunks = [self._sample(EVAL_CHUNK, c_max, k_max, rng.generator(seed, rng.Stream.EVAL, c))
                  for c in range((n_tasks + EVAL_CHUNK - 1) // EVAL_CHUNK)]
        return Episode.cat(chunks)[:n_tasks]

    def _sample(self, T: int, C: int, K: int, g: torch.Generator) -> Episode:
        c = self.config
        D, Q = c.max_features, c.queries
        M = K + Q
        P = C * M  # points per task, M per class

        # 1. features per task (log-uniform or uniform) and the inputs
        u = torch.rand(T, generator=g)
        log_d = torch.exp(math.log(c.min_features) + u * (math.log(c.max_features + 1) - math.log(c.min_features)))
        lin_d = c.min_features + u * (c.max_features + 1 - c.min_features)
        d = torch.where(torch.rand(T, generator=g) < 0.5, log_d, lin_d)
        d = d.floor().long().clamp(c.min_features, c.max_features)  # [T]
        real = torch.arange(D) < d[:, None]  # [T, D]
        gaussian = torch.randn(T, P, D, generator=g)
        uniform = (2 * torch.rand(T, P, D, generator=g) - 1) * math.sqrt(3.0)
        pick_gauss = {"gaussian": torch.ones(T, dtype=torch.bool), "uniform": torch.zeros(T, dtype=torch.bool),
                      "mix": torch.rand(T, generator=g) < 0.5}[c.inputs]
        z = torch.where(pick_gauss[:, None, None], gaussian, uniform) * real[:, None, :]
        A = torch.randn(T, D, D, generator=g) * (real[:, :, None] & real[:, None, :]) / d.sqrt()[:, None, None]
        mixed = torch.rand(T, generator=g) < c.correlated
        x = torch.where(mixed[:, None, None], z @ A, z)  # [T, P, D], zero beyond d
        lo_s, hi_s = (math.log(v) for v in c.scale_range)
        scale = torch.exp(lo_s + (hi_s - lo_s) * torch.rand(T, 1, D, generator=g))
        x = x * scale
        x = torch.where(real[:, None, :], self._transform(x, g), x)

        # 2. class scores [T, P, C] from a random MLP and from a random tree
        H = c.mlp_hidden
        gain = torch.exp(math.log(0.5) + math.log(6.0) * torch.rand(T, 1, 1, generator=g))  # in [0.5, 3]
        W1 = torch.randn(T, D, H, generator=g) * gain / d.sqrt()[:, None, None]
        h = torch.tanh(x @ W1 + torch.randn(T, 1, H, generator=g))
        h = torch.tanh(h @ (torch.randn(T, H, H, generator=g) / math.sqrt(H)) + torch.randn(T, 1, H, generator=g))
        linear = h @ (torch.randn(T, H, C, generator=g) / math.sqrt(H))
        centre = torch.randint(P, (T, C), generator=g)  # C random points of the task
        hc = h[torch.arange(T)[:, None], centre]  # [T, C, H]
        nearest = -((h[:, :, None, :] - hc[:, None]) ** 2).sum(-1)  # [T, P, C]
        by_distance = torch.rand(T, generator=g) < c.prototype_readout
        mlp = torch.where(by_distance[:, None, None], nearest, linear)

        d_lo, d_hi = c.tree_depth
        depth = torch.randint(d_lo, d_hi + 1, (T, 1), generator=g)
        n_inner = 2 ** d_hi - 1
        feat = (torch.rand(T, n_inner, generator=g) * d[:, None]).long().clamp_max(D - 1)  # a real feature
        at = torch.randint(P, (T, n_inner), generator=g)
        thr = x[torch.arange(T)[:, None], at, feat]  # [T, n_inner]: the value of a random point
        node = torch.zeros(T, P, dtype=torch.int64)
        for level in range(d_hi):
            f = feat.gather(1, node.clamp_max(n_inner - 1))
            t = thr.gather(1, node.clamp_max(n_inner - 1))
            v = x.gather(2, f[..., None])[..., 0]
            node = torch.where(level < depth, 2 * node + 1 + (v > t).long(), node)
        leaf = torch.randn(T, 2 ** (d_hi + 1) - 1, C, generator=g)
        tree = leaf[torch.arange(T)[:, None], node]  # [T, P, C]

        use_tree = {"mlp": torch.zeros(T, dtype=torch.bool), "tree": torch.ones(T, dtype=torch.bool),
                    "mix": torch.rand(T, generator=g) < 0.5}[c.labeler]
        s = torch.where(use_tree[:, None, None], tree, mlp)
        s = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(_EPS)
        s = s + c.label_noise * torch.randn(T, P, C, generator=g)

        # 3. balanced labels: class j takes the M free points that prefer it most over the later classes
        labels = torch.full((T, P), C - 1, dtype=torch.int64)
        taken = torch.zeros(T, P, dtype=torch.bool)
        for j in range(C - 1):
            pref = s[..., j] - torch.logsumexp(s[..., j + 1:], -1)
            idx = pref.masked_fill(taken, -math.inf).topk(M, dim=1).indices  # [T, M]
            labels.scatter_(1, idx, j)
            taken.scatter_(1, idx, True)
        relabel = torch.argsort(torch.rand(T, C, generator=g), dim=1)
        labels = relabel.gather(1, labels)

        # 4. per class: the first K of a random order support, the rest queries
        order = torch.argsort(labels.double() + torch.rand(T, P, generator=g, dtype=torch.float64), dim=1)
        order = order.view(T, C, M)  # [T, C, M] points of class j in row j
        rows = torch.arange(T)[:, None]
        s_idx, q_idx = order[..., :K].reshape(T, C * K), order[..., K:].reshape(T, C * Q)
        sp = torch.argsort(torch.rand(T, C * K, generator=g), dim=1)
        qp = torch.argsort(torch.rand(T, C * Q, generator=g), dim=1)
        s_idx, q_idx = s_idx.gather(1, sp), q_idx.gather(1, qp)
        sx, qx = standardize_by_support(x[rows, s_idx], x[rows, q_idx], clip=c.clip)
        return Episode(sx.contiguous(), labels[rows, s_idx], qx.contiguous(), labels[rows, q_idx], num_classes=C)
