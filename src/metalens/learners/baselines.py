"""Baselines every meta-learner must beat, and the oracle none can.

- ``oracle``: the family's exact Bayes-optimal posterior predictive; nothing to train.
- ``scratch``: a fresh network fitted to each task's support set by gradient
  descent; no meta-learning at all.
- ``pretrain``: one network trained on all tasks pooled (support and query points
  of every training task, as one regression or classification problem), then
  fine-tuned on each support set at prediction time ("pre-training + fine-tuning",
  the pretrained baseline of Finn et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution

from metalens.config import opt
from metalens.episode import Episode, TaskSpec
from metalens.functional import fit_per_task, point_losses, task_apply
from metalens.learners.base import Learner, TourPlan, masked_mean
from metalens.nets import ACTIVATIONS, MLP
from metalens.registry import LEARNERS

__all__ = ["Oracle", "Scratch", "Pretrain"]

_SINUSOID_TOUR_TRAIN = {"steps": 2000, "batch_tasks": 25, "lr": 1e-3}


def _check_net_options(hidden: tuple[int, ...], activation: str) -> None:
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of widths >= 1, got {list(hidden)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


@LEARNERS.register("oracle")
class Oracle(Learner):
    """The exact Bayes-optimal posterior predictive of the task family (nothing to train)."""

    @dataclass(frozen=True)
    class Config:
        pass

    trainable = False
    probabilistic = True
    tour = TourPlan(task="sinusoid")

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        if spec.oracle is None:
            raise ValueError("this task family has no tractable oracle, so the 'oracle' learner cannot run on it")

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        return self.spec.oracle(support_x, support_y, query_x, support_mask=support_mask)


@LEARNERS.register("scratch")
class Scratch(Learner):
    """A fresh network fitted to each task's support set by gradient descent (no meta-learning)."""

    @dataclass(frozen=True)
    class Config:
        hidden: tuple[int, ...] = opt((40, 40), "hidden layer widths of the MLP")
        activation: str = opt("relu", "activation: relu, tanh, gelu or silu")
        steps: int = opt(100, "gradient steps on each task's support set")
        lr: float = opt(0.01, "learning rate of those steps")
        optimizer: str = opt("adam", "optimiser of those steps: adam or sgd")

        def __post_init__(self) -> None:
            _check_net_options(self.hidden, self.activation)
            if self.steps < 0:
                raise ValueError(f"steps must be >= 0, got {self.steps}")
            if not self.lr > 0:
                raise ValueError(f"lr must be > 0, got {self.lr}")
            if self.optimizer not in ("adam", "sgd"):
                raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")

    trainable = False
    tour = TourPlan(task="sinusoid")
    adaptation_steps_option = "steps"

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        c = self.config
        # The fresh initialisation every task starts from (drawn from the run's seed).
        self.net = MLP(spec.x_shape, self.out_features, c.hidden, c.activation)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        c = self.config
        params = fit_per_task(self.net, dict(self.net.named_parameters()), support_x, support_y, support_mask,
                              steps=c.steps, lr=c.lr, optimizer=c.optimizer,
                              classification=self.spec.is_classification)
        return self.output_distribution(task_apply(self.net, params, query_x))


@LEARNERS.register("pretrain")
class Pretrain(Learner):
    """One network pre-trained on all tasks pooled, fine-tuned on each support set when predicting."""

    @dataclass(frozen=True)
    class Config:
        hidden: tuple[int, ...] = opt((40, 40), "hidden layer widths of the MLP")
        activation: str = opt("relu", "activation: relu, tanh, gelu or silu")
        finetune_steps: int = opt(10, "SGD steps on each task's support set at prediction time (0: none)")
        finetune_lr: float = opt(0.01, "learning rate of the fine-tuning steps")

        def __post_init__(self) -> None:
            _check_net_options(self.hidden, self.activation)
            if self.finetune_steps < 0:
                raise ValueError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
            if not self.finetune_lr > 0:
                raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr}")

    tour = TourPlan(task="sinusoid", train=_SINUSOID_TOUR_TRAIN)
    adaptation_steps_option = "finetune_steps"

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        c = self.config
        self.net = MLP(spec.x_shape, self.out_features, c.hidden, c.activation)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        c = self.config
        if c.finetune_steps == 0:
            return self.output_distribution(self.net(query_x))
        params = fit_per_task(self.net, dict(self.net.named_parameters()), support_x, support_y, support_mask,
                              steps=c.finetune_steps, lr=c.finetune_lr, optimizer="sgd",
                              classification=self.spec.is_classification)
        return self.output_distribution(task_apply(self.net, params, query_x))

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Pre-training: the plain loss of the one network on every point of every task, pooled."""
        x = torch.cat([episode.support_x, episode.query_x], 1)
        y = torch.cat([episode.support_y, episode.query_y], 1)
        masks = (episode.support_mask, episode.query_mask)
        mask = None
        if any(m is not None for m in masks):
            mask = torch.cat([m if m is not None else torch.ones(episode.n_tasks, n, dtype=torch.bool, device=x.device)
                              for m, n in zip(masks, (episode.n_support, episode.n_query))], 1)
        per_point = point_losses(self.net(x), y, classification=self.spec.is_classification)  # [T, S+Q]
        loss = masked_mean(per_point, mask)
        return loss, {"loss": float(loss.detach())}
