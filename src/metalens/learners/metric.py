"""The metric lens: embed the support and query points, then compare them.

- ``protonet``: Prototypical Networks (Snell, Swersky & Zemel 2017). Each class is the
  mean of its support embeddings, the prototype ``c_n = mean_{i: y_i = n} f(x_i)``; a
  query is classified by a softmax over negative squared Euclidean distances,
  ``p(y = n | x) ∝ exp(-||f(x) - c_n||^2)``.
- ``matching``: Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra
  2016). A query attends to every support point, ``a(x, x_i) = softmax_i(s * cos(f(x),
  g(x_i)))``, and predicts ``p(y = n | x) = sum_{i: y_i = n} a(x, x_i)``. With full-context
  embeddings (``fce``) ``g`` is a bidirectional LSTM over the support embeddings and ``f``
  an attention LSTM that reads the support set for ``fce_steps`` steps (the paper's
  appendix); without, ``f = g`` is the plain embedding.

Embeddings (``backbone``): ``conv4`` (:class:`~metalens.nets.Conv4` without its head, the
64-d embedding of 28x28 images, 1600-d at 84x84), ``resnet12`` (:class:`~metalens.nets.ResNet12`
without its head, 16000-d at 84x84 with the default widths), ``mlp`` (:class:`~metalens.nets.MLP`
on flattened inputs, for vector tasks such as ``clusters``), ``identity`` (the flattened input
itself: ProtoNet is then the nearest-class-mean classifier and has nothing to train) or
``auto`` (conv4 for image inputs ``[C, H, W]``, else mlp). ResNet-12's DropBlock
(``dropblock`` > 0) regularises meta-training only: its blocks are drawn from the generator
``meta_loss`` receives, and predictions use every unit.

Batch norm. Conv4 and ResNet-12 normalise each task with the statistics of its own batch (no running
statistics). The support and query images of a task are embedded together, as one batch
(as in the training mode of Snell et al.'s code and in Finn et al.'s MAML), so a query's
prediction also depends, through those statistics, on the other queries of its task --
never on other tasks. Padded support points (``support_mask == False``) are dropped
before embedding, so they influence nothing.

The number of classes N comes from the task spec; neither learner has a parameter that
depends on it, so a learner trained 20-way can be evaluated 5-way (``metalens eval
--set task.ways=5``).

>>> import torch
>>> from metalens.episode import TaskSpec
>>> spec = TaskSpec(kind="classification", x_shape=(2,), num_classes=3)
>>> learner = ProtoNet(spec, ProtoNet.Config(backbone="identity"))
>>> sx = torch.tensor([[[0., 0.], [4., 0.], [0., 4.]]]); sy = torch.tensor([[0, 1, 2]])
>>> learner.predict(sx, sy, torch.tensor([[[3.5, 0.5]]])).probs.argmax(-1)
tensor([[1]])
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.learners.base import Learner, query_loss
from metalens.nets import MLP, RESNET12_CHANNELS, Conv4, ResNet12
from metalens.registry import LEARNERS

__all__ = ["MetricConfig", "MatchingConfig", "ProtoNet", "MatchingNet", "make_embedding", 
           "BACKBONES", "CHUNK_IMAGES"]

Backbone = Literal["auto", "conv4", "resnet12", "mlp", "identity"]
BACKBONES: tuple[str, ...] = typing.get_args(Backbone)
CHUNK_IMAGES = 128  # conv4 embeds at most this many images at once (whole tasks; see embeddings)



@dataclass(frozen=True)
class MetricConfig(Options):
    """Options shared by the metric learners: the embedding network."""

    backbone: Backbone = opt("auto", "embedding network; auto: conv4 for image inputs, else mlp; resnet12: "
                                     "ResNet-12 (image inputs); identity: the flattened input")
    channels: int = opt(64, "conv4: channels of every convolution (the embedding's width)", ge=1)
    blocks: int = opt(4, "conv4: number of conv-norm-relu-pool blocks", ge=1)
    resnet_channels: tuple[int, ...] = opt(RESNET12_CHANNELS, "resnet12: channels of each residual block (one "
                                                              "block per entry, each halving the image)",
                                           ge=1, min_len=1)
    dropblock: float = opt(0.0, "resnet12: DropBlock rate after its last two blocks in meta-training (0: off)",
                           ge=0, lt=1)
    dropblock_size: int = opt(5, "resnet12: side of the blocks DropBlock drops", ge=1)
    hidden: tuple[int, ...] = opt((64, 64), "mlp: hidden layer widths", ge=1)
    embedding_dim: int = opt(64, "mlp: width of the embedding", ge=1)


class _Flatten(nn.Module):
    """The identity embedding: ``[..., *x_shape] -> [..., prod(x_shape)]``."""

    def __init__(self, x_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.n = len(x_shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(start_dim=x.dim() - self.n)


def make_embedding(spec: TaskSpec, config: MetricConfig) -> tuple[nn.Module, int, bool]:
    """The embedding network of ``config`` for inputs of ``spec``: ``(net, width, per_point)``.

    ``net(x [T, P, *x]) -> [T, P, width]``. ``per_point`` is False for conv4, whose batch norm
    makes a point's embedding depend on the rest of its task's batch.
    """
    c = config
    backbone = c.backbone
    if backbone == "auto":
        backbone = "conv4" if len(spec.x_shape) == 3 else "mlp"
    if c.dropblock > 0 and backbone != "resnet12":
        raise ValueError(f"dropblock applies to the resnet12 backbone, not {backbone}; set learner.backbone = "
                         "resnet12 or learner.dropblock = 0")
    # no inner loop and no vmap here: the fused batch-norm kernel is exact and faster
    if backbone == "conv4":
        net: nn.Module = Conv4(spec.x_shape, 0, channels=c.channels, blocks=c.blocks, fused_norm=True)
        return net, net.embedding_dim, False
    if backbone == "resnet12":
        net = ResNet12(spec.x_shape, 0, c.resnet_channels, dropblock=c.dropblock, dropblock_size=c.dropblock_size,
                       fused_norm=True)
        return net, net.embedding_dim, False
    if backbone == "mlp":
        return MLP(spec.x_shape, c.embedding_dim, c.hidden), c.embedding_dim, True
    return _Flatten(spec.x_shape), spec.x_dim, True


class _MetricLearner(Learner):
    """The shell shared by the metric learners: embedding, masks, and ``predict``.

    Subclasses implement :meth:`logits` for unpadded tasks: ``z_s [T, S, D]``, ``support_y
    [T, S]``, ``z_q [T, Q, D]`` -> ``[T, Q, N]``.
    """

    def __init__(self, spec: TaskSpec, config: MetricConfig) -> None:
        super().__init__(spec, config)
        if not spec.is_classification:
            raise ValueError(f"{type(self).__name__} classifies; this task family is a regression family")
        self.embed, self.embedding_dim, self._per_point = make_embedding(spec, config)

    @property
    def trainable(self) -> bool:  # type: ignore[override]
        """False when there is nothing to meta-train (the identity embedding, no other parameters)."""
        return any(p.requires_grad for p in self.parameters())

    def embeddings(self, support_x: Tensor, query_x: Tensor, *,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(z_s [T, S, D], z_q [T, Q, D])``; each task's support and query points are one batch.

        Conv4 and ResNet-12 run on groups of whole tasks of at most :data:`CHUNK_IMAGES` images (at
        least one task): per-task batch statistics make the result the same, and on CPU small
        batches are faster (the activations stay in cache) and bound the evaluator's memory.
        ``generator``: ResNet-12's DropBlock draws its blocks from it (meta-training only).
        """
        S = support_x.shape[1]
        x = torch.cat([support_x, query_x], 1)  # [T, S+Q, *x]
        extra = () if generator is None else (generator,)
        if self._per_point:
            z = self.embed(x)
        else:
            per = max(1, CHUNK_IMAGES // x.shape[1])
            z = torch.cat([self.embed(x[t: t + per], *extra) for t in range(0, x.shape[0], per)])  # [T, S+Q, D]
        return z[:, :S], z[:, S:]

    def logits(self, z_s: Tensor, support_y: Tensor, z_q: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        """``Categorical`` over the N classes with logits ``[T, Q, N]``.

        Tasks with padded support points are predicted one by one from their real points.
        """
        return self._predict(support_x, support_y, query_x, support_mask, None)

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The query cross-entropy of :meth:`predict`; with DropBlock on, the embeddings drop blocks drawn from
        ``generator``."""
        if getattr(self.config, "dropblock", 0.0) == 0 or generator is None:
            return super().meta_loss(episode, generator=generator)
        dist = self._predict(episode.support_x, episode.support_y, episode.query_x, episode.support_mask, generator)
        loss = query_loss(dist, episode.query_y, episode.query_mask, kind=self.spec.kind, mse=True)
        return loss, {"loss": float(loss.detach())}

    def _predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, support_mask: Tensor | None,
                 generator: torch.Generator | None) -> Distribution:
        if support_mask is None or bool(support_mask.all()):
            out = self._logits(support_x, support_y, query_x, generator)
        else:
            out = torch.cat([self._logits(support_x[t:t + 1, support_mask[t]], support_y[t:t + 1, support_mask[t]],
                                          query_x[t:t + 1], generator) for t in range(support_x.shape[0])])
        return Categorical(logits=out, validate_args=False)

    def _logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        z_s, z_q = self.embeddings(support_x, query_x, generator=generator)
        return self.logits(z_s, support_y, z_q)


@LEARNERS.register("protonet")
class ProtoNet(_MetricLearner):
    """Prototypical Networks: softmax over -squared distances to class-mean embeddings (Snell et al. 2017)."""

    Config = MetricConfig

    def __init__(self, spec: TaskSpec, config: MetricConfig | None = None) -> None:
        super().__init__(spec, config if config is not None else MetricConfig())

    def prototypes(self, z_s: Tensor, support_y: Tensor) -> Tensor:
        """Class means of the support embeddings: ``[T, S, D]``, ``[T, S]`` -> ``[T, N, D]``."""
        onehot = nn.functional.one_hot(support_y, self.spec.num_classes).to(z_s.dtype)  # [T, S, N]
        counts = onehot.sum(1)  # [T, N]
        return onehot.transpose(1, 2) @ z_s / counts.clamp_min(1.0)[..., None]

    def logits(self, z_s: Tensor, support_y: Tensor, z_q: Tensor) -> Tensor:
        """``-||f(x_q) - c_n||^2`` for every query and class ``[T, Q, N]``; -inf for a class without support."""
        prototypes = self.prototypes(z_s, support_y)  # [T, N, D]
        d2 = ((z_q[:, :, None, :] - prototypes[:, None, :, :]) ** 2).sum(-1)  # [T, Q, N]
        present = nn.functional.one_hot(support_y, self.spec.num_classes).sum(1) > 0  # [T, N]
        return torch.where(present[:, None, :], -d2, torch.full_like(d2, -math.inf))


@dataclass(frozen=True)
class MatchingConfig(MetricConfig):
    """Options of Matching Networks."""

    fce: bool = opt(False, "full-context embeddings: a bidirectional LSTM over the support set (g) and an "
                           "attention LSTM for the queries (f)")
    fce_steps: int = opt(5, "fce: processing steps of the attention LSTM (K in the paper)", ge=1)
    scale: float = opt(10.0, "cosine similarities are multiplied by this before the softmax "
                             "(1: the paper's formula; larger makes the attention sharper and training faster)", gt=0)


class _AttentionLSTM(nn.Module):
    """Vinyals et al.'s read-attend LSTM (appendix A.2): ``f(x, S) = attLSTM(f'(x), g(S), K)``.

    ``h_hat_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``; ``h_k = h_hat_k + f'(x)``;
    ``r_k = sum_i a(h_k, g(x_i)) g(x_i)`` with ``a = softmax_i(h_k . g(x_i))``. The hidden input
    is the concatenation ``[h, r]``, so the recurrent weights take ``2D`` features.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.input = nn.Linear(dim, 4 * dim)
        self.recurrent = nn.Linear(2 * dim, 4 * dim, bias=False)

    def forward(self, f_q: Tensor, g_s: Tensor, steps: int) -> Tensor:
        """``f_q [T, Q, D]``, ``g_s [T, S, D]`` -> ``[T, Q, D]``."""
        h, r, c = torch.zeros_like(f_q), torch.zeros_like(f_q), torch.zeros_like(f_q)
        x_gates = self.input(f_q)  # [T, Q, 4D]
        for _ in range(steps):
            i, f, g, o = (x_gates + self.recurrent(torch.cat([h, r], -1))).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c) + f_q  # skip connection to f'(x)
            a = torch.softmax(h @ g_s.transpose(1, 2), -1)  # [T, Q, S]
            r = a @ g_s  # [T, Q, D]
        return h


@LEARNERS.register("matching")
class MatchingNet(_MetricLearner):
    """Matching Networks: cosine attention over every support point, optional FCE (Vinyals et al. 2016)."""

    Config = MatchingConfig

    def __init__(self, spec: TaskSpec, config: MatchingConfig | None = None) -> None:
        super().__init__(spec, config if config is not None else MatchingConfig())
        D = self.embedding_dim
        if self.config.fce:
            self.support_lstm = nn.LSTM(D, D, batch_first=True, bidirectional=True)
            self.query_lstm = _AttentionLSTM(D)

    def contextual(self, z_s: Tensor, z_q: Tensor) -> tuple[Tensor, Tensor]:
        """``(g(S) [T, S, D], f(x, S) [T, Q, D])``: the full-context embeddings, or the inputs without FCE."""
        if not self.config.fce:
            return z_s, z_q
        D = z_s.shape[-1]
        out, _ = self.support_lstm(z_s)  # [T, S, 2D]: forward and backward states
        g_s = out[..., :D] + out[..., D:] + z_s
        return g_s, self.query_lstm(z_q, g_s, self.config.fce_steps)

    def similarities(self, z_s: Tensor, z_q: Tensor) -> Tensor:
        """``scale * cos(f(x_q), g(x_i))`` ``[T, Q, S]`` (after the full-context embeddings, if any)."""
        g_s, f_q = self.contextual(z_s, z_q)
        g_s = nn.functional.normalize(g_s, dim=-1, eps=1e-8)
        f_q = nn.functional.normalize(f_q, dim=-1, eps=1e-8)
        return self.config.scale * (f_q @ g_s.transpose(1, 2))

    def attention(self, support_x: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None) -> Tensor:
        """The attention ``a(x_q, x_i)`` ``[T, Q, S]`` of every query over the support set.

        Rows sum to one over the real support points; padded points get exactly 0.
        """
        T, S = support_x.shape[:2]
        if support_mask is None or bool(support_mask.all()):
            return torch.softmax(self.similarities(*self.embeddings(support_x, query_x)), -1)
        out = query_x.new_zeros(T, query_x.shape[1], S)
        for t in range(T):
            m = support_mask[t]
            z_s, z_q = self.embeddings(support_x[t:t + 1, m], query_x[t:t + 1])
            out[t, :, m] = torch.softmax(self.similarities(z_s, z_q), -1)[0]
        return out

    def logits(self, z_s: Tensor, support_y: Tensor, z_q: Tensor) -> Tensor:
        """``log sum_{i: y_i = n} a(x_q, x_i)`` ``[T, Q, N]``, computed stably as a log-sum-exp."""
        sim = self.similarities(z_s, z_q)  # [T, Q, S]
        onehot = nn.functional.one_hot(support_y, self.spec.num_classes).bool()  # [T, S, N]
        masked = sim[..., None].masked_fill(~onehot[:, None], -math.inf)  # [T, Q, S, N]
        return torch.logsumexp(masked, 2) - torch.logsumexp(sim, -1, keepdim=True)  # [T, Q, N]


# ------------------------------------------------------------------------------------------------
# The 2-D picture
# ------------------------------------------------------------------------------------------------
