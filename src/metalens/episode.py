"""Episodes: a batch of tasks as tensors with a leading task dimension.

An :class:`Episode` holds ``T`` tasks, each with a support set of ``S`` points and
a query set of ``Q`` points::

    support_x [T, S, *x]   support_y [T, S, dy] (regression, float) or [T, S] (class ids, int64)
    query_x   [T, Q, *x]   query_y   [T, Q, dy]                     or [T, Q]

Tasks whose number of points varies (e.g. Neural-Process protocols with a random
number of context points) are padded to a common ``S`` / ``Q`` and carry boolean
masks ``support_mask [T, S]`` / ``query_mask [T, Q]`` (``True`` = a real point).
Padded points must never influence a prediction nor a metric.

Classification episodes drawn from a family with a finite set of meta-training
classes may also say which of them each task's local labels ``0..N-1`` stand for:
``classes [T, N]`` (int64, in ``[0, spec.train_classes)``). Meta-learners ignore it;
a baseline that pre-trains one classifier over all training classes (``pretrain``)
needs it, since local labels are re-drawn in every task.

Validation happens once, in the constructor, with errors that say what is wrong:

>>> import torch
>>> ep = Episode(torch.zeros(2, 5, 1), torch.zeros(2, 5, 1), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
>>> ep.n_tasks, ep.n_support, ep.n_query, ep.is_classification
(2, 5, 3, False)
>>> Episode(torch.zeros(2, 0, 1), torch.zeros(2, 0, 1), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
Traceback (most recent call last):
...
ValueError: episode has zero shots: support_x has 0 points per task; every task needs at least one support point
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from torch import Tensor
from torch.distributions import Distribution

__all__ = ["Episode", "TaskSpec", "OracleFn"]

OracleFn = Callable[..., Distribution]


@dataclass(frozen=True)
class TaskSpec:
    """What a learner needs to know about a task family to be built for it.

    Learners never import task families; they receive this spec instead.
    """

    kind: Literal["regression", "classification"]
    x_shape: tuple[int, ...]  # shape of one input, e.g. (1,) or (1, 28, 28)
    y_dim: int = 1  # regression output width (ignored for classification)
    num_classes: int | None = None  # N of an N-way family
    x_range: tuple[float, float] | None = None  # 1-D inputs: the range to plot over
    # classification families with a finite meta-training split: how many classes it has (the
    # global ids that ``Episode.classes`` uses); None when tasks carry no such ids
    train_classes: int | None = None
    # The family's Bayes-optimal posterior predictive, with the signature of
    # ``Learner.predict``; None when it is not tractable.
    oracle: OracleFn | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("regression", "classification"):
            raise ValueError(f"kind must be 'regression' or 'classification', got {self.kind!r}")
        if self.kind == "classification" and (self.num_classes is None or self.num_classes < 2):
            raise ValueError(f"a classification spec needs num_classes >= 2, got {self.num_classes}")
        if self.kind == "regression" and self.y_dim < 1:
            raise ValueError(f"y_dim must be >= 1, got {self.y_dim}")
        if self.train_classes is not None and (self.kind != "classification" or self.train_classes < 1):
            raise ValueError(f"train_classes must be None or >= 1 for a classification spec, got {self.train_classes}")

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def x_dim(self) -> int:
        """Number of input features (product of ``x_shape``)."""
        n = 1
        for s in self.x_shape:
            n *= s
        return n


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _check_mask(name: str, mask: Tensor | None, shape: tuple[int, int]) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        i = int(empty.nonzero()[0, 0])
        raise ValueError(f"{name}: task {i} has no real points (every task needs at least one)")


@dataclass(frozen=True)
class Episode:
    """A validated batch of few-shot tasks (see the module docstring for shapes).

    ``num_classes`` is set for classification episodes (labels are int64 in
    ``[0, num_classes)`` and every class appears in every task's support set);
    it is ``None`` for regression. ``classes [T, num_classes]`` (optional, int64):
    the global meta-training class of each local label (see the module docstring).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    support_mask: Tensor | None = None
    query_mask: Tensor | None = None
    num_classes: int | None = None
    classes: Tensor | None = None

    def __post_init__(self) -> None:
        sx, sy, qx, qy = self.support_x, self.support_y, self.query_x, self.query_y
        for name in ("support_x", "query_x"):
            _check_float(name, getattr(self, name))
        if sx.dim() < 3 or qx.dim() < 3:
            raise ValueError(
                "support_x and query_x must be [tasks, points, *x] with at least one feature "
                f"dimension, got {list(sx.shape)} and {list(qx.shape)}"
            )
        T, S = sx.shape[:2]
        if qx.shape[0] != T:
            raise ValueError(f"support_x has {T} tasks but query_x has {qx.shape[0]}")
        if S == 0:
            raise ValueError(
                "episode has zero shots: support_x has 0 points per task; "
                "every task needs at least one support point"
            )
        Q = qx.shape[1]
        if Q == 0:
            raise ValueError("episode has no query points: query_x has 0 points per task")
        if T == 0:
            raise ValueError("episode has zero tasks")
        if sx.shape[2:] != qx.shape[2:]:
            raise ValueError(
                f"support and query inputs differ in shape: {list(sx.shape[2:])} vs {list(qx.shape[2:])}"
            )
        if self.num_classes is None:
            for name, y, n in (("support_y", sy, S), ("query_y", qy, Q)):
                _check_float(name, y)
                if y.dim() != 3 or tuple(y.shape[:2]) != (T, n):
                    raise ValueError(
                        f"{name} must be [tasks, points, y_dim] = [{T}, {n}, y_dim] for regression, "
                        f"got {list(y.shape)}"
                    )
            if sy.shape[2] != qy.shape[2]:
                raise ValueError(f"support_y and query_y differ in y_dim: {sy.shape[2]} vs {qy.shape[2]}")
        else:
            N = self.num_classes
            if N < 2:
                raise ValueError(f"num_classes must be >= 2, got {N}")
            for name, y, n in (("support_y", sy, S), ("query_y", qy, Q)):
                if not isinstance(y, Tensor) or y.dtype != torch.int64:
                    raise TypeError(f"{name} must hold int64 class labels, got {getattr(y, 'dtype', type(y))}")
                if tuple(y.shape) != (T, n):
                    raise ValueError(f"{name} must be [tasks, points] = [{T}, {n}], got {list(y.shape)}")
                if bool(((y < 0) | (y >= N)).any()):
                    bad = y[(y < 0) | (y >= N)][0].item()
                    raise ValueError(f"{name} holds label {bad}, outside [0, {N}) for a {N}-way episode")
        if self.classes is not None:
            if self.num_classes is None:
                raise ValueError("classes (global class ids) only go with a classification episode")
            c = self.classes
            if not isinstance(c, Tensor) or c.dtype != torch.int64:
                raise TypeError(f"classes must hold int64 class ids, got {getattr(c, 'dtype', type(c).__name__)}")
            if tuple(c.shape) != (T, self.num_classes):
                raise ValueError(f"classes must be [tasks, num_classes] = [{T}, {self.num_classes}], "
                                 f"got {list(c.shape)}")
            if bool((c < 0).any()):
                raise ValueError(f"classes holds a negative id ({int(c.min())})")
        _check_mask("support_mask", self.support_mask, (T, S))
        _check_mask("query_mask", self.query_mask, (T, Q))
        if self.num_classes is not None:
            onehot = torch.nn.functional.one_hot(sy, self.num_classes)  # [T, S, N]
            if self.support_mask is not None:
                onehot = onehot * self.support_mask[..., None]
            present = onehot.sum(1) > 0  # [T, N]
            if not bool(present.all()):
                t, c = (~present).nonzero()[0].tolist()
                raise ValueError(f"class {c} is missing from the support set of task {t}")

    # -- views ---------------------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def n_support(self) -> int:
        return self.support_x.shape[1]

    @property
    def n_query(self) -> int:
        return self.query_x.shape[1]

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    def tensors(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "num_classes"}

    def __getitem__(self, idx: slice) -> Episode:
        """The tasks ``idx`` (a slice) of this episode, e.g. ``episode[2:4]``."""
        if not isinstance(idx, slice):
            raise TypeError(f"index an Episode with a slice over tasks, got {type(idx).__name__}")
        out = {k: (v[idx] if v is not None else None) for k, v in self.tensors().items()}
        if out["support_x"].shape[0] == 0:
            raise ValueError(f"the slice {idx} selects no task of this {self.n_tasks}-task episode")
        # every check is per task (or per shape, unchanged by taking tasks): a slice of a valid episode is valid
        return self._validated(out)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Episode:
        """Move to ``device``; ``dtype`` converts the floating-point tensors only."""

        def conv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        out = {k: conv(v) for k, v in self.tensors().items()}
        if dtype is not None:  # a narrower float type may overflow to inf: check again
            return replace(self, **out)
        return self._validated(out)  # the same values on another device: nothing to check again

    def _validated(self, tensors: dict[str, Tensor | None]) -> Episode:
        """An episode of ``tensors`` (and this one's ``num_classes``) built without running the checks again.

        Only for tensors derived from this validated episode in ways that keep every check true
        (taking whole tasks, moving to a device). Validation reads every value (finiteness, label
        ranges, classes present) and is the largest cost of slicing and moving small episodes
        (the evaluator does both for every batch of held-out tasks).
        """
        ep = object.__new__(Episode)
        for k, v in tensors.items():
            object.__setattr__(ep, k, v)  # a frozen dataclass: its own __init__ sets fields the same way
        object.__setattr__(ep, "num_classes", self.num_classes)
        return ep

    @staticmethod
    def cat(episodes: Sequence[Episode]) -> Episode:
        """Concatenate episodes along the task dimension."""
        if not episodes:
            raise ValueError("cannot concatenate an empty list of episodes")
        first = episodes[0]
        if any(e.num_classes != first.num_classes for e in episodes):
            raise ValueError("cannot concatenate episodes with different num_classes")
        out: dict[str, Tensor | None] = {}
        for k, v in first.tensors().items():
            parts = [e.tensors()[k] for e in episodes]
            if all(p is None for p in parts) or (k == "classes" and any(p is None for p in parts)):
                out[k] = None  # global class ids survive only if every part has them
                continue
            if any(p is None for p in parts):  # mix of masked and unmasked: fill with all-True
                n = (first.n_support if k == "support_mask" else first.n_query)
                parts = [p if p is not None else torch.ones(e.n_tasks, n, dtype=torch.bool)
                         for p, e in zip(parts, episodes)]
            out[k] = torch.cat(parts, 0)
        return Episode(**out, num_classes=first.num_classes)
