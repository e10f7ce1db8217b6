"""The evaluator: fixed held-out episodes, metrics with 95% confidence intervals,
and the Bayes-optimal oracle scored on the very same episodes.

Metrics are computed per task (averaged over the task's real query points), then
summarised over tasks as the mean and the half-width of a normal-approximation 95%
confidence interval, ``1.96 * std / sqrt(n)`` (the field's convention):

- regression: ``mse`` of the predictive mean; ``nll`` in nats per target point
  (``-log p(y)`` summed over output dimensions) for probabilistic learners;
- classification: ``accuracy`` and ``nll`` (cross-entropy in nats).

A task on which the learner's predictions are non-finite (any of its metrics is NaN or
infinite: e.g. an inner loop that diverged on that task) is counted as **diverged**
(:attr:`Evaluation.diverged`, which tasks in :attr:`Evaluation.diverged_tasks`) and left
out of the metrics, which summarise the other tasks; the oracle is summarised on the very
same tasks. An evaluation on which every task diverged raises
:class:`~metalens.errors.NumericalError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution
from tqdm.auto import tqdm

from metalens.episode import Episode
from metalens.errors import NumericalError
from metalens.functional import task_mean
from metalens.learners.base import Learner
from metalens.tasks.base import Split, TaskFamily

__all__ = ["Metric", "Evaluation", "evaluate", "score", "score_tasks", "summarize", "default_episodes", "Z95"]

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Metric:
    mean: float
    ci95: float

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.ci95:.2g}"


@dataclass
class Evaluation:
    """What the evaluator measured on ``episodes`` held-out tasks drawn from ``seed``.

    ``metrics`` / ``oracle``: mean and 95% CI over the tasks that did not diverge; ``per_task`` /
    ``oracle_per_task``: the per-task values on those same tasks, in order (aligned, so paired
    differences are per task); ``diverged_tasks``: a bool mask over all ``episodes`` tasks, True
    where the learner's predictions were non-finite (None: none diverged).
    """

    task: str
    learner: str
    episodes: int
    seed: int
    metrics: dict[str, Metric]
    oracle: dict[str, Metric] | None
    per_task: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    oracle_per_task: dict[str, np.ndarray] | None = field(repr=False, default=None)
    diverged_tasks: np.ndarray | None = field(repr=False, default=None)

    @property
    def diverged(self) -> int:
        """How many of the ``episodes`` tasks diverged (non-finite predictions; left out of the metrics)."""
        return 0 if self.diverged_tasks is None else int(self.diverged_tasks.sum())

    @property
    def scored(self) -> int:
        """How many tasks the metrics summarise: ``episodes - diverged``."""
        return self.episodes - self.diverged

    def to_json(self) -> dict[str, Any]:
        """The JSON object printed by ``metalens eval --json`` (``diverged``: the count of tasks left out;
        ``diverged_tasks``: their indices among the held-out tasks)."""

        def conv(ms: dict[str, Metric] | None) -> dict[str, dict[str, float]] | None:
            return None if ms is None else {k: {"mean": m.mean, "ci95": m.ci95} for k, m in ms.items()}

        where = [] if self.diverged_tasks is None else np.flatnonzero(self.diverged_tasks).tolist()
        return {"task": self.task, "learner": self.learner, "episodes": self.episodes,
                "metrics": conv(self.metrics), "oracle": conv(self.oracle), "diverged": self.diverged,
                "diverged_tasks": where}


def default_episodes(family: TaskFamily) -> int:
    """600 held-out episodes for classification, 1000 for regression (the field's protocols)."""
    return 600 if family.spec.is_classification else 1000


def score(dist: Distribution, episode: Episode, *, with_nll: bool) -> dict[str, Tensor]:
    """Per-task metrics ``{name: [T]}`` of a predictive distribution on an episode's queries."""
    y, mask = episode.query_y, episode.query_mask
    out: dict[str, Tensor] = {}
    if episode.is_classification:
        probs = dist.probs if hasattr(dist, "probs") else None
        pred = probs.argmax(-1) if probs is not None else dist.mean.argmax(-1)
        out["accuracy"] = task_mean((pred == y).to(torch.float64), mask)
        out["nll"] = task_mean(-dist.log_prob(y).to(torch.float64), mask)
    else:
        out["mse"] = task_mean(((dist.mean - y) ** 2).mean(-1).to(torch.float64), mask)
        if with_nll:
            out["nll"] = task_mean(-dist.log_prob(y).sum(-1).to(torch.float64), mask)
    return out


def summarize(values: np.ndarray) -> Metric:
    """Mean and 95% CI half-width of per-task values."""
    n = len(values)
    mean = float(np.mean(values))
    ci = float(Z95 * np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return Metric(mean, ci)


def score_tasks(
    predict: Callable[..., Distribution],
    episode: Episode,
    *,
    with_nll: bool,
    batch_tasks: int = 100,
    device: str | torch.device = "cpu",
    empty_support: bool = False,
    bar: Any = None,
) -> dict[str, np.ndarray]:
    """Per-task metrics ``{name: [T]}`` (float64) of a predict-like callable on every task of ``episode``.

    ``predict(support_x, support_y, query_x, *, support_mask)`` is a learner's ``predict``, a family's
    ``oracle``, or any baseline returning a distribution over the queries. Tasks go through it
    ``batch_tasks`` at a time on ``device`` (memory only: results do not depend on it), under
    ``torch.no_grad``. ``empty_support``: every support point masked out (prediction from no example).
    """
    if batch_tasks < 1:
        raise ValueError(f"batch_tasks must be >= 1, got {batch_tasks}")
    per: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for lo in range(0, episode.n_tasks, batch_tasks):
            ep = episode[lo: lo + batch_tasks].to(device)
            mask = torch.zeros(ep.n_tasks, ep.n_support, dtype=torch.bool, device=device) if empty_support \
                else ep.support_mask
            dist = predict(ep.support_x, ep.support_y, ep.query_x, support_mask=mask)
            for k, v in score(dist, ep, with_nll=with_nll).items():
                per.setdefault(k, []).append(v.cpu())
            if bar is not None:
                bar.update(ep.n_tasks)
    return {k: torch.cat(v).numpy() for k, v in per.items()}


def evaluate(
    learner: Learner,
    family: TaskFamily,
    *,
    episodes: int | None = None,
    seed: int = 0,
    split: Split = "test",
    batch_tasks: int = 100,
    with_oracle: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Evaluation:
    """Score ``learner`` (and the family's oracle) on ``episodes`` held-out tasks drawn from ``seed``.

    Tasks come from :meth:`TaskFamily.eval_episodes`, so the same ``seed`` gives the
    same tasks for every learner. ``batch_tasks`` only bounds memory: results do
    not depend on it. Tasks with non-finite predictions are counted as diverged and
    left out of the metrics (see the module docstring); if every task diverged,
    :class:`~metalens.errors.NumericalError`.
    """
    n = default_episodes(family) if episodes is None else episodes
    if n < 2:
        raise ValueError(f"episodes must be >= 2 for a confidence interval, got {n}")
    all_tasks = family.eval_episodes(seed, n, split=split)
    oracle_fn = family.spec.oracle if (with_oracle and family.has_oracle) else None
    learner.to(device)
    learner.eval()
    with tqdm(total=n * (2 if oracle_fn else 1), disable=not progress, desc=f"eval {learner.registry_name}",
              unit="task", leave=False) as bar:
        per_np = score_tasks(learner.predict, all_tasks, with_nll=learner.probabilistic, batch_tasks=batch_tasks,
                             device=device, bar=bar)
        oper_np = score_tasks(oracle_fn, all_tasks, with_nll=True, batch_tasks=batch_tasks, device=device,
                              bar=bar) if oracle_fn is not None else None
    bad = np.zeros(n, dtype=bool)
    for v in per_np.values():
        bad |= ~np.isfinite(v)
    if bad.all():
        raise NumericalError(f"{learner.registry_name}'s predictions diverged (are non-finite) on every one of the {n} "
                             "held-out tasks: non-finite weights, or an inner loop that diverges with these options "
                             "(lower the inner rate or the adaptation steps, or cap the rate: "
                             "learner.inner_lr_cap=curvature)")
    if bad.any():  # score the tasks that did not diverge; the oracle on the very same tasks
        keep = ~bad
        per_np = {k: v[keep] for k, v in per_np.items()}
        oper_np = {k: v[keep] for k, v in oper_np.items()} if oper_np is not None else None
    return Evaluation(
        task=family.registry_name, learner=learner.registry_name, episodes=n, seed=seed,
        metrics={k: summarize(v) for k, v in per_np.items()},
        oracle={k: summarize(v) for k, v in oper_np.items()} if oper_np is not None else None,
        per_task=per_np, oracle_per_task=oper_np, diverged_tasks=bad,
    )
