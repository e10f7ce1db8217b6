"""Baselines every meta-learner must beat, and the oracle none can.

- ``oracle``: the family's exact Bayes-optimal posterior predictive; nothing to train.
- ``scratch``: a fresh network fitted to each task's support set by gradient
  descent; no meta-learning at all.
- ``pretrain``: one network trained on all tasks pooled (support and query points
  of every training task, as one regression or classification problem), then
  fine-tuned on each support set at prediction time ("pre-training + fine-tuning",
  the pretrained baseline of Finn et al. 2017); an MLP, Conv-4 or ResNet-12 (with optional
  DropBlock in pre-training, as in Tian et al. 2020's recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.functional import fit_per_task, point_losses, task_apply
from metalens.learners.base import Learner, masked_mean
from metalens.nets import RESNET12_CHANNELS, Activation, Conv4, MLP, ResNet12
from metalens.registry import LEARNERS

__all__ = ["Oracle", "Scratch", "Pretrain"]


@LEARNERS.register("oracle")
class Oracle(Learner):
    """The exact Bayes-optimal posterior predictive of the task family (nothing to train)."""

    @dataclass(frozen=True)
    class Config(Options):
        """No options: the oracle is the task family's."""

    trainable = False
    probabilistic = True

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
    class Config(Options):
        """Options of training from scratch."""

        hidden: tuple[int, ...] = opt((40, 40), "hidden layer widths of the MLP", ge=1, min_len=1)
        activation: Activation = opt("relu", "activation of the MLP")
        steps: int = opt(100, "gradient steps on each task's support set", ge=0)
        lr: float = opt(0.01, "learning rate of those steps", gt=0)
        optimizer: Literal["adam", "sgd"] = opt("adam", "optimiser of those steps")

    trainable = False

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
    """One network pre-trained on all tasks pooled, fine-tuned on each support set when predicting.

    Regression, and classification families whose tasks carry no global class ids: the
    network is trained on every point of every task pooled, then all of it is fine-tuned
    on each support set (the pre-trained baseline of Finn et al. 2017).

    Classification families with a finite meta-training split (``spec.train_classes``; the
    image families): local labels are re-drawn in every task, so pooling them would teach
    nothing. The network is instead a classifier over all ``train_classes`` training
    classes, trained on the global ids the episodes carry (``Episode.classes``). At
    prediction its head is dropped and a fresh N-way linear head, starting from zero, is
    fitted to the support set's features for ``finetune_steps`` steps with the body frozen
    (the "Baseline" of Chen et al. 2019, "A Closer Look at Few-shot Classification"). No
    parameter then depends on N: a model trained 20-way is evaluated at any way.
    """

    @dataclass(frozen=True)
    class Config(Options):
        """Options of pre-training + fine-tuning."""

        hidden: tuple[int, ...] = opt((40, 40), "mlp: hidden layer widths", ge=1, min_len=1)
        activation: Activation = opt("relu", "mlp: activation")
        backbone: Literal["mlp", "conv4", "resnet12"] = opt(
            "mlp", "network: mlp (on the flattened input), conv4 or resnet12 (image inputs; with a linear head)")
        channels: int = opt(64, "conv4: channels of every convolution", ge=1)
        resnet_channels: tuple[int, ...] = opt(RESNET12_CHANNELS, "resnet12: channels of each residual block (one "
                                                                  "block per entry, each halving the image)",
                                               ge=1, min_len=1)
        dropblock: float = opt(0.0, "resnet12: DropBlock rate after its last two blocks in pre-training (0: off)",
                               ge=0, lt=1)
        dropblock_size: int = opt(5, "resnet12: side of the blocks DropBlock drops", ge=1)
        finetune_steps: int = opt(10, "steps on each task's support set at prediction time (0: none; with "
                                      "global classes the fresh head then stays at zero, i.e. chance)", ge=0)
        finetune_lr: float = opt(0.01, "learning rate of the fine-tuning steps", gt=0)
        finetune_optimizer: Literal["sgd", "adam"] = opt("sgd", "optimiser of the fine-tuning steps")

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        c = self.config
        self.global_classes = spec.is_classification and spec.train_classes is not None
        out = spec.train_classes if self.global_classes else self.out_features
        if c.dropblock > 0 and c.backbone != "resnet12":
            raise ValueError(f"dropblock applies to the resnet12 backbone, not {c.backbone}; set learner.backbone = "
                             "resnet12 or learner.dropblock = 0")
        # the fused batch-norm kernel is exact outside vmap, which is where the global-class model runs
        if c.backbone == "conv4":
            self.net: nn.Module = Conv4(spec.x_shape, out, channels=c.channels, fused_norm=self.global_classes)
        elif c.backbone == "resnet12":
            self.net = ResNet12(spec.x_shape, out, c.resnet_channels, dropblock=c.dropblock,
                                dropblock_size=c.dropblock_size, fused_norm=self.global_classes)
        else:
            self.net = MLP(spec.x_shape, out, c.hidden, c.activation)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        c = self.config
        if self.global_classes:
            return self._predict_new_head(support_x, support_y, query_x, support_mask)
        if c.finetune_steps == 0:
            return self.output_distribution(self.net(query_x))
        params = fit_per_task(self.net, dict(self.net.named_parameters()), support_x, support_y, support_mask,
                              steps=c.finetune_steps, lr=c.finetune_lr, optimizer=c.finetune_optimizer,
                              classification=self.spec.is_classification)
        return self.output_distribution(task_apply(self.net, params, query_x))

    def _predict_new_head(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          support_mask: Tensor | None) -> Distribution:
        c = self.config
        S, N = support_x.shape[1], self.spec.num_classes
        with torch.no_grad():  # the body without its head; a task's points are one batch (Conv-4's batch norm)
            z = self.net.embed(torch.cat([support_x, query_x], 1))  # [T, S+Q, D]
        z_s, z_q = z[:, :S], z[:, S:]
        head = nn.Linear(z.shape[-1], N, device="meta")  # a shape only: fit_per_task supplies the parameters
        zero = {"weight": z.new_zeros(N, z.shape[-1]), "bias": z.new_zeros(N)}
        params = fit_per_task(head, zero, z_s, support_y, support_mask, steps=c.finetune_steps, lr=c.finetune_lr,
                              optimizer=c.finetune_optimizer, classification=True)
        return self.output_distribution(task_apply(head, params, z_q).detach())

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Pre-training: the plain loss of the one network on every point of every task, pooled."""
        x = torch.cat([episode.support_x, episode.query_x], 1)
        y = torch.cat([episode.support_y, episode.query_y], 1)
        masks = (episode.support_mask, episode.query_mask)
        mask = None
        if any(m is not None for m in masks):
            mask = torch.cat([m if m is not None else torch.ones(episode.n_tasks, n, dtype=torch.bool, device=x.device)
                              for m, n in zip(masks, (episode.n_support, episode.n_query))], 1)
        if self.global_classes:
            if episode.classes is None:
                raise ValueError("pretrain on this family trains on global class ids, but the episode carries none "
                                 "(Episode.classes); only meta-training episodes have them")
            if int(episode.classes.max()) >= self.spec.train_classes:
                raise ValueError(f"episode holds class id {int(episode.classes.max())}, outside the family's "
                                 f"{self.spec.train_classes} training classes")
            y = episode.classes.gather(1, y)  # local label -> global class
        # ResNet-12's DropBlock (pre-training only) draws its blocks from the step's generator
        out = self.net(x, generator) if self.config.dropblock > 0 and generator is not None else self.net(x)
        per_point = point_losses(out, y, classification=self.spec.is_classification)  # [T, S+Q]
        loss = masked_mean(per_point, mask)
        return loss, {"loss": float(loss.detach())}
