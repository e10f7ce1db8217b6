"""The in-context (black-box) lens: sequence models whose forward pass is the learning.

A network reads the support set as a sequence of ``(x_i, y_i)`` tokens and emits a
prediction for a query ``x``; nothing is adapted at test time. Meta-trained over many
tasks, the forward pass becomes a learning algorithm ("implicit meta-learning"):
Santoro et al. (2016), "Meta-Learning with Memory-Augmented Neural Networks"; Duan et
al. (2016), "RL^2"; Garg et al. (2022), "What Can Transformers Learn In-Context?";
Kirsch et al. (2022), "General-Purpose In-Context Learning by Meta-Learning
Transformers" (GPICL).

``transformer``, mode ``set`` (default)
    Support points enter as tokens ``e_x(x_i) + e_y(y_i)``, each query as a token
    ``e_x(x_q) + e_?`` (a learned "target unknown" vector). Pre-LayerNorm
    transformer blocks (Vaswani et al. 2017; Xiong et al. 2020) with this attention
    pattern (:func:`metalens.nets.in_context_attention`)::

        support token i  attends to every real support token (and to itself)
        query token q    attends to every real support token and to itself, never to another query

    There are no positional encodings, so a query's prediction is invariant to any
    permutation of the support set, and it does not depend on the other queries.
    Training: the query loss of :meth:`Learner.meta_loss`.

``transformer``, mode ``sequence``
    GPICL's online setting: the points ``(x_1, y_1), ..., (x_N, y_N)`` of a task form a
    sequence and, at every position ``t``, the model predicts ``y_t`` from
    ``(x_1, y_1), ..., (x_{t-1}, y_{t-1})`` and ``x_t``. The same two kinds of tokens
    with a causal pattern: context token ``i`` attends to context tokens ``j <= i``;
    the query token of position ``t`` (carrying ``x_t`` only) attends to context
    tokens ``j < t`` and to itself. Mapped onto the learner contract:

    - ``predict(support, query)``: the support set, in the order given, is the
      prefix, and every query is predicted as the next position after it
      (independently: queries never see each other);
    - ``meta_loss(episode)``: the support and query points of each task are
      concatenated (support first) into one sequence of ``N = S + Q`` points, and the
      loss is averaged over all ``N`` positions (position 1 predicts from ``x_1`` alone),
      as in GPICL and Garg et al.; so one model serves every number of examples
      from 0 to ``N - 1``.

    :meth:`InContextTransformer.sequence_predict` gives the predictions at every position.

``lstm``
    The recurrent baseline of Santoro et al. and Duan et al.: an LSTM reads the
    sequence of ``(x_t, y_{t-1})`` pairs (``y_0`` empty, flagged) and predicts ``y_t``
    at every step. ``predict`` runs it over the support set, then takes one step per
    query ``(x_q, y_S)`` from the final state; ``meta_loss`` averages the loss over
    all positions of the concatenated support + query sequence, like ``sequence``.
    Option ``rank``: the gates read ``[x_t, h_{t-1}]`` through a rank-``r`` projection
    (:class:`LowRankLSTM`), so the state size (``hidden``) and the parameter count can be
    set apart (Kirsch et al. 2022, sec. 4.4).

``backbone`` (every in-context learner)
    How an input ``x`` becomes a feature vector. ``linear``: the flattened input through a
    linear map (the transformer's ``e_x``; the LSTM's input weights). ``conv4``: each image
    ``[C, H, W]`` through the Conv-4 of :class:`metalens.nets.Conv4` (``channels`` wide; the
    transformer adds a linear map to ``dim``), as in Santoro et al.'s and Mishra et al.'s
    Omniglot models. ``auto`` (default): ``conv4`` for image inputs, ``linear`` otherwise.
    Batch norm uses the statistics of each task's own real points, support and queries together
    (as Conv-4 does for the metric and gradient learners): an image's features depend on the
    other images of its task, through those statistics, never on other tasks, never on padded
    points and never on a label (so, with ``conv4``, a query's prediction may move with the
    other queries of its task: the statistics change, which ``linear`` never does).

**Labels.** Class labels are read as one-hot vectors (Santoro et al. 2016): the LSTM's step
``t`` reads ``(x_t, onehot(y_{t-1}))``, so a point's own label only enters at the next step;
the transformer's support tokens add ``W_y onehot(y_i)`` (an ``nn.Embedding``) and its query
tokens carry the zero one-hot plus the learned "target unknown" vector ``e_?``. A query's own
label never reaches any prediction.

**Outputs.** Classification: a ``Categorical`` over the N classes (trained by
cross-entropy). Regression, option ``loss``: ``mse`` (default; as Garg et al.) trains
the predictive mean by squared error and returns ``Normal(mean, 1)``, a point
prediction (``probabilistic = False``: no NLL is reported); ``nll`` predicts a mean
and a scale ``sigma = min_scale + (1 - min_scale) softplus(.)`` trained by Gaussian
negative log-likelihood (``probabilistic = True``).

**Masks.** Padded support points (``support_mask == False``) get exactly zero
attention weight (transformer) or are skipped by the recurrence (LSTM: real points
are moved, in order, before the padded ones, and the state after the last real
point is used), so they never influence a prediction. A support set with no real
point is allowed: the models then predict from the query alone.

>>> import torch
>>> from metalens.episode import TaskSpec
>>> spec = TaskSpec(kind="regression", x_shape=(2,))
>>> model = InContextTransformer(spec, InContextTransformer.Config(dim=16, layers=2, heads=2))
>>> sx, sy, qx = torch.randn(3, 5, 2), torch.randn(3, 5, 1), torch.randn(3, 4, 2)
>>> model.predict(sx, sy, qx).batch_shape
torch.Size([3, 4, 1])
>>> lstm = InContextLSTM(spec, InContextLSTM.Config(hidden=16))
>>> lstm.predict(sx, sy, qx, support_mask=torch.arange(5) < torch.tensor([[5], [2], [0]])).mean.shape
torch.Size([3, 4, 1])
>>> images = TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=3)
>>> conv = InContextLSTM(images, InContextLSTM.Config(hidden=16, channels=8))  # backbone auto: conv4
>>> sx, sy, qx = torch.rand(2, 3, 1, 28, 28), torch.tensor([[0, 1, 2]] * 2), torch.rand(2, 4, 1, 28, 28)
>>> conv.predict(sx, sy, qx).probs.shape
torch.Size([2, 4, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.learners.base import Learner, query_loss
from metalens.nets import Conv4, TransformerBlock
from metalens.registry import LEARNERS

__all__ = ["InContextTransformer", "InContextLSTM", "LowRankLSTM", "ImageEmbedding", "InputBackbone",
           "uses_conv4"]

InputBackbone = Literal["auto", "conv4", "linear"]
CHUNK_IMAGES = 128  # Conv-4 embeds at most this many images at once (whole tasks: the result does not depend on it)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
def _full_mask(mask: Tensor | None, T: int, n: int, device: torch.device) -> Tensor:
    return mask if mask is not None else torch.ones(T, n, dtype=torch.bool, device=device)


def uses_conv4(spec: TaskSpec, backbone: str) -> bool:
    """Whether option ``backbone`` means Conv-4 for inputs of ``spec`` (``auto``: for images ``[C, H, W]``)."""
    if backbone == "conv4" and len(spec.x_shape) != 3:
        raise ValueError(f"backbone 'conv4' needs image inputs [channels, height, width], got x_shape "
                         f"{tuple(spec.x_shape)}; use backbone 'linear' (or 'auto')")
    return backbone == "conv4" or (backbone == "auto" and len(spec.x_shape) == 3)


class ImageEmbedding(nn.Module):
    """Conv-4 features of each task's images, with batch statistics over the task's real points.

    ``forward(x [T, P, C, H, W], mask [T, P] | None) -> [T, P, width]``: the images of one task
    are one batch for :class:`~metalens.nets.TaskBatchNorm2d` (PyTorch's fused kernel: no
    ``vmap`` here); padded points (``mask == False``) are left out of it and get zero features.
    ``out_features = 0``: the flattened Conv-4 embedding (``channels`` wide for 28x28 images),
    else a linear map to ``out_features``.
    """

    def __init__(self, x_shape: tuple[int, ...], out_features: int, channels: int) -> None:
        super().__init__()
        self.net = Conv4(x_shape, out_features, channels=channels, fused_norm=True)
        self.width = out_features if out_features > 0 else self.net.embedding_dim

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        T, P = x.shape[:2]
        if mask is None or bool(mask.all()):
            per = max(1, CHUNK_IMAGES // max(P, 1))  # whole tasks per call
            return torch.cat([self.net(x[t: t + per]) for t in range(0, T, per)])
        out = x.new_zeros(T, P, self.width)
        for t in range(T):  # a task with padded points: its real points alone
            m = mask[t]
            if bool(m.any()):
                out[t, m] = self.net(x[t: t + 1, m])[0]
        return out


class _InContext(Learner):
    """Parts shared by the in-context learners: output heads and the sequence loss."""

    def _setup_outputs(self, spec: TaskSpec, loss: str, min_scale: float) -> int:
        """Set ``probabilistic`` from the ``loss`` option; returns the head's width."""
        self.probabilistic = (not spec.is_classification) and loss == "nll"
        self.min_scale = min_scale
        return self.out_features * (2 if self.probabilistic else 1)

    def _distribution(self, out: Tensor) -> Distribution:
        """Raw head output ``[..., out]`` -> the contract's distribution."""
        if self.spec.is_classification:
            return Categorical(logits=out, validate_args=False)
        if not self.probabilistic:
            return Normal(out, torch.ones_like(out), validate_args=False)
        mean, raw = out.chunk(2, -1)
        return Normal(mean, self.min_scale + (1 - self.min_scale) * F.softplus(raw), validate_args=False)

    def _encode_y(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """Targets as features: one-hot ``[.., N]`` for class ids, else ``y`` itself ``[.., dy]``."""
        if self.spec.is_classification:
            return F.one_hot(y, self.spec.num_classes).to(dtype)
        return y

    # -- inputs of the recurrent learners (lstm, mann) ----------------------------------------------
    def _features(self, support_x: Tensor, query_x: Tensor, support_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Support and query inputs as the recurrence reads them: unchanged, or Conv-4 features
        ``[T, S, D]``, ``[T, Q, D]`` (each task's real support points and queries one batch)."""
        embed = getattr(self, "embed_x", None)
        if embed is None:
            return support_x, query_x
        T, S, Q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        mask = None if support_mask is None else torch.cat(
            [support_mask, torch.ones(T, Q, dtype=torch.bool, device=support_mask.device)], 1)
        z = embed(torch.cat([support_x, query_x], 1), mask)
        return z[:, :S], z[:, S:]

    def _sequence_features(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """The inputs of sequences ``x [T, N, *x]`` as the recurrence reads them (see :meth:`_features`)."""
        embed = getattr(self, "embed_x", None)
        return x if embed is None else embed(x, mask)

    @staticmethod
    def _compact(mask: Tensor) -> Tensor:
        """The order that puts each task's real points first, in their original order: ``[T, P]`` int64."""
        return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)

    @staticmethod
    def _steps(x: Tensor, ye: Tensor) -> Tensor:
        """Step inputs ``[x_t, y_{t-1}, has_prev]`` of sequences ``x [T, P, *x]``, ``ye [T, P, w]``."""
        T, P = x.shape[:2]
        prev = torch.cat([torch.zeros_like(ye[:, :1]), ye[:, :-1]], 1)
        flag = torch.ones(T, P, 1, dtype=prev.dtype, device=x.device)
        flag[:, 0] = 0.0
        return torch.cat([x.flatten(2), prev, flag], -1)

    def sequence_predict(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Distribution:
        """Predictions at every position ``t`` of the sequences ``x [T, N, *x]``, ``y``.

        Position ``t`` predicts ``y_t`` from the real points before it and ``x_t``.
        Returns the contract's distribution over ``[T, N(, dy)]``.
        """
        raise NotImplementedError

    def sequence_loss(self, episode: Episode) -> Tensor:
        """Support and query points of each task as one sequence (support first); the loss
        averaged over its real positions (per task, then over tasks)."""
        x = torch.cat([episode.support_x, episode.query_x], 1)
        y = torch.cat([episode.support_y, episode.query_y], 1)
        mask = None
        if episode.support_mask is not None or episode.query_mask is not None:
            T, dev = episode.n_tasks, x.device
            mask = torch.cat([_full_mask(episode.support_mask, T, episode.n_support, dev),
                              _full_mask(episode.query_mask, T, episode.n_query, dev)], 1)
        dist = self.sequence_predict(x, y, mask)
        return query_loss(dist, y, mask, kind=self.spec.kind, mse=not self.probabilistic)


class _Recurrent(_InContext):
    """What the recurrent in-context learners share (``lstm``, ``mann``): reading ``(x_t, y_{t-1})``
    step by step, then one step per query ``(x_q, y_S)`` from the state after the support set.

    A subclass builds its recurrence in ``__init__`` (after :meth:`_setup`) and gives three
    hooks: :meth:`_final` (the state after each task's real points), :meth:`_outputs` (the
    features at every step) and :meth:`_branch` (every query one step on from a state).
    """

    def _setup(self, spec: TaskSpec, c: Any) -> tuple[int, int]:
        """The image embedding where the backbone asks for one; returns the width of a step's input
        ``[x_t, y_{t-1}, 1 if there is a y_{t-1}]`` and the head's width."""
        out = self._setup_outputs(spec, c.loss, c.min_scale)
        y_width = spec.num_classes if spec.is_classification else spec.y_dim
        x_width = spec.x_dim
        if uses_conv4(spec, c.backbone):
            self.embed_x = ImageEmbedding(spec.x_shape, 0, c.channels)
            x_width = self.embed_x.width
        return x_width + y_width + 1, out

    def _final(self, steps: Tensor, lengths: Tensor | None) -> Any:
        """The state after the first ``lengths [T]`` step inputs ``steps [T, P, in]`` (all where None)."""
        raise NotImplementedError

    def _outputs(self, steps: Tensor) -> Tensor:
        """The features ``[T, P, F]`` after every step input of ``steps [T, P, in]``."""
        raise NotImplementedError

    def _branch(self, state: Any, step: Tensor) -> Tensor:
        """The features ``[T, Q, F]`` after one step input ``step [T, Q, in]`` per query, each from ``state``."""
        raise NotImplementedError

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        """Run over the real support points, then one step per query ``(x_q, y_S)`` from the final state."""
        T, S, Q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        ye = self._encode_y(support_y, support_x.dtype)  # [T, S, w]
        x, qx = self._features(support_x, query_x, support_mask)
        n = torch.full((T,), S, device=x.device)
        if support_mask is not None:
            order = self._compact(support_mask)
            x = x.gather(1, order.view(T, S, *([1] * (x.dim() - 2))).expand_as(x))
            ye = ye.gather(1, order[..., None].expand_as(ye))
            n = support_mask.sum(1)
        state = self._final(self._steps(x, ye), None if support_mask is None else n)
        last = ye.gather(1, (n - 1).clamp(min=0).view(T, 1, 1).expand(T, 1, ye.shape[-1]))  # y_S [T, 1, w]
        has = (n > 0).to(ye.dtype).view(T, 1, 1)
        step = torch.cat([qx.flatten(2), (last * has).expand(T, Q, -1), has.expand(T, Q, 1)], -1)
        return self._distribution(self.head(self._branch(state, step)))

    def sequence_predict(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Distribution:
        """Predictions at every position of ``x [T, N, *x]``, ``y``: the output after reading
        ``(x_t, y_{t-1})``, with padded points skipped (``y_{t-1}`` is the last real target)."""
        T, N = x.shape[:2]
        ye = self._encode_y(y, x.dtype)
        x = self._sequence_features(x, mask)
        if mask is None:
            return self._distribution(self.head(self._outputs(self._steps(x, ye))))
        order = self._compact(mask)
        xs = x.gather(1, order.view(T, N, *([1] * (x.dim() - 2))).expand_as(x))
        ys = ye.gather(1, order[..., None].expand_as(ye))
        out = self._outputs(self._steps(xs, ys))  # padded points come last: they never reach a real one
        inverse = torch.argsort(order, dim=1)
        out = out.gather(1, inverse[..., None].expand_as(out))  # back to the original positions
        return self._distribution(self.head(out))

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss averaged over every position of the concatenated support + query sequence."""
        loss = self.sequence_loss(episode)
        return loss, {"loss": float(loss.detach())}


# --------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------
@LEARNERS.register("transformer")
class InContextTransformer(_InContext):
    """A transformer that learns in context: support (x, y) tokens, query x tokens (Garg et al.; GPICL)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the in-context transformer."""

        mode: Literal["set", "sequence"] = opt(
            "set", "set: queries attend to the whole support set, order-free; sequence: causal, "
                   "trained on every position (GPICL)")
        dim: int = opt(64, "width of the tokens (d_model)", ge=1)
        layers: int = opt(4, "transformer blocks", ge=1)
        heads: int = opt(4, "attention heads (must divide dim)", ge=1)
        mlp_ratio: int = opt(4, "width of each block's MLP, in multiples of dim", ge=1)
        loss: Literal["mse", "nll"] = opt(
            "mse", "regression: mse (predictive mean only) or nll (Gaussian mean and scale)")
        min_scale: float = opt(0.01, "loss nll: lower bound of the predicted standard deviation", gt=0, lt=1)
        backbone: InputBackbone = opt(
            "auto", "input embedding e_x: conv4 (Conv-4, then linear to dim), linear (of the flattened input), "
                    "or auto (conv4 for image inputs [C, H, W], else linear)")
        channels: int = opt(64, "conv4: channels of every convolution", ge=1)

        def check(self) -> None:
            if self.dim % self.heads:
                raise ValueError(f"heads must divide dim, got dim={self.dim} and heads={self.heads}")

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        c = self.config
        out = self._setup_outputs(spec, c.loss, c.min_scale)
        self.images = uses_conv4(spec, c.backbone)
        self.embed_x = (ImageEmbedding(spec.x_shape, c.dim, c.channels) if self.images
                        else nn.Linear(spec.x_dim, c.dim))
        self.embed_y = (nn.Embedding(spec.num_classes, c.dim) if spec.is_classification
                        else nn.Linear(spec.y_dim, c.dim))
        self.query_token = nn.Parameter(0.02 * torch.randn(c.dim))  # "target unknown"
        self.blocks = nn.ModuleList(TransformerBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, out)

    def _embed_inputs(self, cx: Tensor, qx: Tensor, context_mask: Tensor | None,
                      same: bool) -> tuple[Tensor, Tensor]:
        """``e_x`` of the context ``cx [T, S, *x]`` and of the queries ``qx [T, Q, *x]`` (``same``: ``qx``
        is ``cx``, the sequence view); Conv-4 embeds each task's real context points and queries as one batch."""
        if not self.images:
            return self.embed_x(cx.flatten(2)), self.embed_x(qx.flatten(2))
        if same:
            z = self.embed_x(cx, context_mask)
            return z, z
        T, S, Q = cx.shape[0], cx.shape[1], qx.shape[1]
        mask = None if context_mask is None else torch.cat(
            [context_mask, torch.ones(T, Q, dtype=torch.bool, device=cx.device)], 1)
        z = self.embed_x(torch.cat([cx, qx], 1), mask)
        return z[:, :S], z[:, S:]

    def _run(self, cx: Tensor, cy: Tensor, qx: Tensor, context_mask: Tensor | None,
             context_allowed: Tensor | None, query_allowed: Tensor | None, *, same: bool = False) -> Tensor:
        """Context points ``(cx, cy)`` and query inputs ``qx`` through the blocks; head outputs ``[T, Q, out]``."""
        T, S = cx.shape[:2]
        nx = len(self.spec.x_shape)
        if context_mask is not None:  # padded points enter as zeros (they get zero weight anyway)
            cx = torch.where(context_mask.view(T, S, *([1] * nx)), cx, 0.0)
            cy = torch.where(context_mask.view(T, S, *([1] * (cy.dim() - 2))), cy, torch.zeros_like(cy))
        ex_c, ex_q = self._embed_inputs(cx, qx, context_mask, same)
        hc = ex_c + self.embed_y(cy)  # [T, S, D]
        hq = ex_q + self.query_token  # [T, Q, D]: the zero one-hot label and the "target unknown" token
        h = torch.cat([hc, hq], 1)
        for block in self.blocks:
            h = block(h, S, context_allowed, query_allowed)
        return self.head(self.norm(h[:, S:]))

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        """The predictive distribution of each query given the support set (see the module docstring)."""
        T, S, Q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        m = support_mask
        context_allowed = None if m is None else m[:, None, :]
        if self.config.mode == "sequence":
            tril = torch.ones(S, S, dtype=torch.bool, device=support_x.device).tril()
            context_allowed = tril[None] if m is None else tril[None] & m[:, None, :]
        query_allowed = None if m is None else m[:, None, :].expand(T, Q, S)
        if context_allowed is not None:
            context_allowed = context_allowed.expand(T, S, S)
        return self._distribution(self._run(support_x, support_y, query_x, m, context_allowed, query_allowed))

    def sequence_predict(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Distribution:
        """Causal predictions at every position of ``x [T, N, *x]``, ``y [T, N(, dy)]``.

        Position ``t`` sees context tokens ``(x_j, y_j)``, ``j < t``, real (``mask``), and
        its own ``x_t``: the GPICL objective. Used in ``sequence`` mode (also callable in
        ``set`` mode, e.g. to probe a set model causally).
        """
        T, N = x.shape[:2]
        tril = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        context_allowed = tril[None] if mask is None else tril[None] & mask[:, None, :]
        query_allowed = tril.tril(-1)[None] if mask is None else tril.tril(-1)[None] & mask[:, None, :]
        out = self._run(x, y, x, mask, context_allowed.expand(T, N, N), query_allowed.expand(T, N, N), same=True)
        return self._distribution(out)

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """``set``: the query loss of :meth:`predict`; ``sequence``: the loss averaged over every
        position of the concatenated support + query sequence."""
        if self.config.mode == "set":
            return super().meta_loss(episode, generator=generator)
        loss = self.sequence_loss(episode)
        return loss, {"loss": float(loss.detach())}


# --------------------------------------------------------------------------------------------
# The LSTM
# --------------------------------------------------------------------------------------------
class LowRankLSTM(nn.Module):
    """An LSTM whose gates read ``[x_t, h_{t-1}]`` through a rank-``r`` projection.

    Per layer, with ``z_t = V [x_t; h_{t-1}]`` (``V [r, in + H]``, no bias)::

        (i, f, g, o) = U z_t + b                  U [4H, r], b [4H]
        c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g);   h_t = sigmoid(o) tanh(c_t)

    (the gates of :class:`torch.nn.LSTM`, in its order), with ``r (5H + in) + 4H`` parameters
    instead of ``4H (in + H + 2)``: the state ``(h, c)`` is ``2H`` wide whatever ``r``, so state
    size and parameter count can be chosen apart (Kirsch et al. 2022, sec. 4.4). Initial weights:
    ``U, b ~ U(-1/sqrt(H), 1/sqrt(H))`` (``nn.LSTM``'s) and ``V`` uniform with variance ``1/r``, so
    that at initialisation the gates' pre-activations have ``nn.LSTM``'s variance whatever ``r``.

    ``forward(x [B, P, in], hx=None, *, lengths=None) -> (out [B, P, H], (h, c) [layers, B, H])``
    like ``nn.LSTM(batch_first=True)``; with ``lengths [B]`` a sequence's state stops changing
    after its first ``lengths`` steps (the final state is the one after them).

    >>> lstm = LowRankLSTM(3, 16, 1, rank=2)
    >>> out, (h, c) = lstm(torch.randn(4, 5, 3))
    >>> out.shape, h.shape, sum(p.numel() for p in lstm.parameters())
    (torch.Size([4, 5, 16]), torch.Size([1, 4, 16]), 230)
    """

    def __init__(self, input_size: int, hidden: int, layers: int, rank: int) -> None:
        super().__init__()
        self.hidden, self.layers = hidden, layers
        widths = [input_size] + [hidden] * (layers - 1)
        self.down = nn.ModuleList(nn.Linear(w + hidden, rank, bias=False) for w in widths)  # V
        self.up = nn.ModuleList(nn.Linear(rank, 4 * hidden) for _ in widths)  # U, b
        with torch.no_grad():
            for down, up in zip(self.down, self.up):
                down.weight.uniform_(-(3.0 / rank) ** 0.5, (3.0 / rank) ** 0.5)
                up.weight.uniform_(-hidden ** -0.5, hidden ** -0.5)
                up.bias.uniform_(-hidden ** -0.5, hidden ** -0.5)

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None, *,
                lengths: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, P = x.shape[:2]
        if hx is None:
            zeros = x.new_zeros(B, self.hidden)
            hs, cs = [zeros] * self.layers, [zeros] * self.layers
        else:
            hs, cs = list(hx[0].unbind(0)), list(hx[1].unbind(0))
        outs = []
        for t in range(P):
            inp = x[:, t]
            live = None if lengths is None else (t < lengths).view(B, 1)
            for layer in range(self.layers):
                gates = self.up[layer](self.down[layer](torch.cat([inp, hs[layer]], -1)))
                i, f, g, o = gates.chunk(4, -1)
                c = torch.sigmoid(f) * cs[layer] + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if live is not None:  # finished sequences keep their state
                    h, c = torch.where(live, h, hs[layer]), torch.where(live, c, cs[layer])
                hs[layer], cs[layer] = h, c
                inp = h
            outs.append(inp)
        return torch.stack(outs, 1), (torch.stack(hs), torch.stack(cs))


@LEARNERS.register("lstm")
class InContextLSTM(_Recurrent):
    """An LSTM reading (x_t, y_{t-1}) pairs and predicting y_t (Santoro et al. 2016; Duan et al. 2016)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the in-context LSTM."""

        hidden: int = opt(128, "width of the LSTM state", ge=1)
        layers: int = opt(1, "stacked LSTM layers", ge=1)
        loss: Literal["mse", "nll"] = opt(
            "mse", "regression: mse (predictive mean only) or nll (Gaussian mean and scale)")
        min_scale: float = opt(0.01, "loss nll: lower bound of the predicted standard deviation", gt=0, lt=1)
        backbone: InputBackbone = opt(
            "auto", "input features: conv4 (Conv-4 embedding), linear (the flattened input, read by the LSTM's "
                    "input weights), or auto (conv4 for image inputs [C, H, W], else linear)")
        channels: int = opt(64, "conv4: channels of every convolution", ge=1)
        rank: int | None = opt(None, "gates read [x_t, h_{t-1}] through a rank-r projection (LowRankLSTM: the "
                                     "state size and the parameter count set apart); None: a full nn.LSTM", ge=1)

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        c = self.config
        width, out = self._setup(spec, c)
        self.lstm: nn.Module = (nn.LSTM(width, c.hidden, c.layers, batch_first=True)
                                if c.rank is None else LowRankLSTM(width, c.hidden, c.layers, c.rank))
        self.head = nn.Linear(c.hidden, out)

    def _final(self, steps: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(h, c)``, each ``[layers, T, H]``, after the first ``lengths [T]`` steps (zero where it is 0)."""
        if lengths is None:
            _, (h, c) = self.lstm(steps)
            return h, c
        T = steps.shape[0]
        if isinstance(self.lstm, nn.LSTM):
            packed = nn.utils.rnn.pack_padded_sequence(steps, lengths.clamp(min=1).cpu(), batch_first=True,
                                                       enforce_sorted=False)
            _, (h, c) = self.lstm(packed)
        else:
            _, (h, c) = self.lstm(steps, lengths=lengths)
        empty = (lengths == 0).view(1, T, 1)  # no real support point: start from the zero state
        return h.masked_fill(empty, 0.0), c.masked_fill(empty, 0.0)

    def _outputs(self, steps: Tensor) -> Tensor:
        out, _ = self.lstm(steps)
        return out

    def _branch(self, state: tuple[Tensor, Tensor], step: Tensor) -> Tensor:
        h, c = state
        T, Q = step.shape[:2]
        L, H = h.shape[0], h.shape[2]
        h0 = h[:, :, None].expand(L, T, Q, H).reshape(L, T * Q, H)  # every query branches from the same state
        c0 = c[:, :, None].expand(L, T, Q, H).reshape(L, T * Q, H)
        out, _ = self.lstm(step.reshape(T * Q, 1, -1), (h0.contiguous(), c0.contiguous()))
        return out.view(T, Q, H)
