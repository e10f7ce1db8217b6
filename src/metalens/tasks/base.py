"""The task-family contract.

A task family is a distribution over tasks. It samples batches of tasks as
:class:`~metalens.episode.Episode` s from an explicit ``torch.Generator`` and, where
the family makes it tractable, gives the exact Bayes-optimal posterior predictive
(the *oracle*) for any support set.

Subclasses define a nested frozen dataclass ``Config`` deriving from
:class:`~metalens.config.Options` (one field per option, made with ``opt``: its default,
help and declared constraint), ``spec``, ``sample`` and, if they can, ``oracle``; they
register with ``@TASKS.register("name")``. A family may also propose training settings
that fit it (:meth:`TaskFamily.train_defaults`), which a run uses where its configuration
sets none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.distributions import Distribution

from metalens import rng
from metalens.episode import Episode, TaskSpec

__all__ = ["TaskFamily", "Split", "EVAL_CHUNK"]

Split = Literal["train", "val", "test"]

# Held-out evaluation episodes are drawn in chunks of this many tasks, chunk c from
# generator(seed, Stream.EVAL, c): task i of an evaluation is the same whatever the
# number of episodes asked for or the batch size used to score them.
EVAL_CHUNK = 50


class TaskFamily(ABC):
    """Base class of task families. See the module docstring."""

    Config: ClassVar[type]
    registry_name: ClassVar[str]

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    @abstractmethod
    def spec(self) -> TaskSpec:
        """What learners need to know (kind, shapes, classes, oracle)."""

    @abstractmethod
    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` tasks. Deterministic given the generator's state.

        ``split`` selects the meta-train, validation or test part of families with
        a finite set of classes or tasks; families with an unbounded task
        distribution ignore it.
        """

    @classmethod
    def train_defaults(cls, config: Any) -> dict[str, Any]:
        """Trainer options (``train.*`` keys and values) this family proposes for its options ``config``.

        A run uses them where its own configuration gives no value (the user's settings always
        win; :meth:`metalens.run.RunConfig.resolve`), and records them in ``config.json`` like any
        option. The default proposes nothing.
        """
        return {}

    @property
    def has_oracle(self) -> bool:
        return type(self).oracle is not TaskFamily.oracle

    def oracle(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None
    ) -> Distribution:
        """The exact Bayes-optimal posterior predictive over query targets.

        Same signature and output as :meth:`metalens.learners.base.Learner.predict`.
        """
        raise NotImplementedError(f"task family {self.registry_name!r} has no tractable oracle")

    # -- the deterministic entry points used by the trainer and the evaluator --------------------
    def episode(self, seed: int, step: int, n_tasks: int, *, split: Split = "train") -> Episode:
        """The training episode of ``step`` in a run with ``seed``: depends on (seed, step) only."""
        return self.sample(n_tasks, generator=rng.generator(seed, rng.Stream.TRAIN, step), split=split)

    def eval_episodes(self, seed: int, n_tasks: int, *, split: Split = "test") -> Episode:
        """``n_tasks`` held-out tasks, drawn in chunks of :data:`EVAL_CHUNK` from ``seed``.

        Task ``i`` does not depend on ``n_tasks``: asking for more episodes only adds tasks.
        """
        if n_tasks < 1:
            raise ValueError(f"episodes must be >= 1, got {n_tasks}")
        chunks = []
        for c in range((n_tasks + EVAL_CHUNK - 1) // EVAL_CHUNK):
            chunks.append(self.sample(EVAL_CHUNK, generator=rng.generator(seed, rng.Stream.EVAL, c), split=split))
        return Episode.cat(chunks)[:n_tasks]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
