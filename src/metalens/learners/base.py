"""The learner contract, shared by every lens.

A learner is an ``nn.Module`` whose parameters are the meta-parameters. It maps a
support set to a predictive distribution over query targets, batched over tasks::

    predict(support_x [T, S, *x], support_y [T, S, dy] | [T, S],
            query_x [T, Q, *x], *, support_mask [T, S] | None) -> Distribution

The distribution's ``batch_shape`` is ``[T, Q, dy]`` for regression (its ``mean``
is the point prediction; ``log_prob(query_y)`` is ``[T, Q, dy]``) and ``[T, Q]``
for classification (a ``Categorical`` over the N classes). Padded support points
(``support_mask == False``) must not influence predictions.

``meta_loss(episode, generator=g)`` returns the scalar loss whose gradient is the
meta-gradient, and a dict of floats to log. All of the learner's randomness comes
from ``g`` (derived by the trainer from (seed, step)), which keeps resuming exact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal

from metalens.episode import Episode, TaskSpec
from metalens.functional import task_mean

__all__ = ["Learner", "masked_mean", "query_loss"]


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over tasks of each task's mean over its real points: ``values, mask [T, P]`` -> scalar.

    Every task weighs the same whatever its number of points, which also makes a
    batch split over processes average back to exactly the same loss.
    """
    if mask is None:  # every task has as many points: the mean of the task means, summed in one pass
        return values.mean()
    return task_mean(values, mask).mean()


def query_loss(dist: Distribution, y: Tensor, mask: Tensor | None, *, kind: str, mse: bool) -> Tensor:
    """The training loss of a predictive ``dist`` on targets ``y``, averaged per point.

    Classification: cross-entropy. Regression: mean squared error of the mean when
    ``mse`` (MSE-trained regressors), else the Gaussian negative log-likelihood.
    """
    if kind == "classification":
        per_point = -dist.log_prob(y)  # [T, P]
    elif mse:
        per_point = ((dist.mean - y) ** 2).mean(-1)  # [T, P]
    else:
        per_point = -dist.log_prob(y).sum(-1)  # [T, P]
    return masked_mean(per_point, mask)


class Learner(nn.Module, ABC):
    """Base class of all learners (see the module docstring).

    Class attributes:

    - ``trainable``: False for learners with nothing to meta-train (``oracle``,
      ``scratch``); the trainer then only records the run.
    - ``probabilistic``: True when ``predict``'s distribution is a real predictive
      (its NLL is reported); False for MSE-trained regressors whose Normal only
      carries the mean.
    """

    Config: ClassVar[type]
    registry_name: ClassVar[str]
    trainable: ClassVar[bool] = True
    probabilistic: ClassVar[bool] = False

    def __init__(self, spec: TaskSpec, config: Any) -> None:
        super().__init__()
        self.spec = spec
        self.config = config

    @abstractmethod
    def predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None
    ) -> Distribution:
        """Predictive distribution over query targets (see the module docstring)."""

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Default: the query loss of :meth:`predict` (MSE or NLL, or cross-entropy)."""
        dist = self.predict(episode.support_x, episode.support_y, episode.query_x, support_mask=episode.support_mask)
        loss = query_loss(dist, episode.query_y, episode.query_mask, kind=self.spec.kind, mse=not self.probabilistic)
        return loss, {"loss": float(loss.detach())}

    def compiled_meta_loss(self) -> Callable[..., tuple[Tensor, dict[str, float]]]:
        """:meth:`meta_loss` under ``torch.compile`` (``train.compile``), compiled lazily by its first call.

        Learners may compile a smaller piece instead (the gradient learners' loop over tasks
        compiles one task's function, reused for every task).
        """
        return torch.compile(self.meta_loss)

    # -- helpers for subclasses -------------------------------------------------------------------
    def output_distribution(self, out: Tensor, *, scale: Tensor | float = 1.0) -> Distribution:
        """Wrap a network's raw output ``[T, Q, out]`` as the contract's distribution.

        Built without ``torch.distributions``' argument checks: a diverging network's NaN outputs must
        reach the trainer's and the evaluator's finiteness checks (one clear message), not fail here.
        """
        if self.spec.is_classification:
            return Categorical(logits=out, validate_args=False)
        return Normal(out, torch.as_tensor(scale, dtype=out.dtype, device=out.device).expand_as(out),
                      validate_args=False)

    @property
    def out_features(self) -> int:
        return self.spec.num_classes if self.spec.is_classification else self.spec.y_dim

    def extra_repr(self) -> str:
        return repr(self.config)
