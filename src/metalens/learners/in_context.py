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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.learners.base import Learner, query_loss
from metalens.nets import TransformerBlock
from metalens.registry import LEARNERS

__all__ = ["InContextTransformer", "InContextLSTM"]



# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
def _full_mask(mask: Tensor | None, T: int, n: int, device: torch.device) -> Tensor:
    return mask if mask is not None else torch.ones(T, n, dtype=torch.bool, device=device)


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

        def check(self) -> None:
            if self.dim % self.heads:
                raise ValueError(f"heads must divide dim, got dim={self.dim} and heads={self.heads}")

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        c = self.config
        out = self._setup_outputs(spec, c.loss, c.min_scale)
        self.embed_x = nn.Linear(spec.x_dim, c.dim)
        self.embed_y = (nn.Embedding(spec.num_classes, c.dim) if spec.is_classification
                        else nn.Linear(spec.y_dim, c.dim))
        self.query_token = nn.Parameter(0.02 * torch.randn(c.dim))  # "target unknown"
        self.blocks = nn.ModuleList(TransformerBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, out)

    def _run(self, cx: Tensor, cy: Tensor, qx: Tensor, context_mask: Tensor | None,
             context_allowed: Tensor | None, query_allowed: Tensor | None) -> Tensor:
        """Context points ``(cx, cy)`` and query inputs ``qx`` through the blocks; head outputs ``[T, Q, out]``."""
        T, S = cx.shape[:2]
        nx = len(self.spec.x_shape)
        if context_mask is not None:  # padded points enter as zeros (they get zero weight anyway)
            cx = torch.where(context_mask.view(T, S, *([1] * nx)), cx, 0.0)
            cy = torch.where(context_mask.view(T, S, *([1] * (cy.dim() - 2))), cy, torch.zeros_like(cy))
        hc = self.embed_x(cx.flatten(2)) + self.embed_y(cy)  # [T, S, D]
        hq = self.embed_x(qx.flatten(2)) + self.query_token  # [T, Q, D]
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
        out = self._run(x, y, x, mask, context_allowed.expand(T, N, N), query_allowed.expand(T, N, N))
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
@LEARNERS.register("lstm")
class InContextLSTM(_InContext):
    """An LSTM reading (x_t, y_{t-1}) pairs and predicting y_t (Santoro et al. 2016; Duan et al. 2016)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the in-context LSTM."""

        hidden: int = opt(128, "width of the LSTM state", ge=1)
        layers: int = opt(1, "stacked LSTM layers", ge=1)
        loss: Literal["mse", "nll"] = opt(
            "mse", "regression: mse (predictive mean only) or nll (Gaussian mean and scale)")
        min_scale: float = opt(0.01, "loss nll: lower bound of the predicted standard deviation", gt=0, lt=1)

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        c = self.config
        out = self._setup_outputs(spec, c.loss, c.min_scale)
        y_width = spec.num_classes if spec.is_classification else spec.y_dim
        # input of step t: [x_t, y_{t-1}, 1 if there is a y_{t-1}]
        self.lstm = nn.LSTM(spec.x_dim + y_width + 1, c.hidden, c.layers, batch_first=True)
        self.head = nn.Linear(c.hidden, out)

    @staticmethod
    def _compact(mask: Tensor) -> Tensor:
        """The order that puts each task's real points first, in their original order: ``[T, P]`` int64."""
        return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)

    def _steps(self, x: Tensor, ye: Tensor) -> Tensor:
        """Step inputs ``[x_t, y_{t-1}, has_prev]`` of sequences ``x [T, P, *x]``, ``ye [T, P, w]``."""
        T, P = x.shape[:2]
        prev = torch.cat([torch.zeros_like(ye[:, :1]), ye[:, :-1]], 1)
        flag = torch.ones(T, P, 1, dtype=prev.dtype, device=x.device)
        flag[:, 0] = 0.0
        return torch.cat([x.flatten(2), prev, flag], -1)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        """Run over the support set, then one step per query from the final state."""
        T, S, Q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        ye = self._encode_y(support_y, support_x.dtype)  # [T, S, w]
        x = support_x
        if support_mask is None:
            _, (h, c) = self.lstm(self._steps(x, ye))  # each [layers, T, H]
            n = torch.full((T,), S, device=x.device)
        else:
            order = self._compact(support_mask)
            x = x.gather(1, order.view(T, S, *([1] * (x.dim() - 2))).expand_as(x))
            ye = ye.gather(1, order[..., None].expand_as(ye))
            n = support_mask.sum(1)
            packed = nn.utils.rnn.pack_padded_sequence(self._steps(x, ye), n.clamp(min=1).cpu(), batch_first=True,
                                                       enforce_sorted=False)
            _, (h, c) = self.lstm(packed)
            empty = (n == 0).view(1, T, 1)  # no real support point: start from the zero state
            h, c = h.masked_fill(empty, 0.0), c.masked_fill(empty, 0.0)
        last = ye.gather(1, (n - 1).clamp(min=0).view(T, 1, 1).expand(T, 1, ye.shape[-1]))  # y_S [T, 1, w]
        has = (n > 0).to(ye.dtype).view(T, 1, 1)
        step = torch.cat([query_x.flatten(2), (last * has).expand(T, Q, -1), has.expand(T, Q, 1)], -1)
        L, H = h.shape[0], h.shape[2]
        h0 = h[:, :, None].expand(L, T, Q, H).reshape(L, T * Q, H)  # every query branches from the same state
        c0 = c[:, :, None].expand(L, T, Q, H).reshape(L, T * Q, H)
        out, _ = self.lstm(step.reshape(T * Q, 1, -1), (h0.contiguous(), c0.contiguous()))
        return self._distribution(self.head(out.view(T, Q, H)))

    def sequence_predict(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Distribution:
        """Predictions at every position of ``x [T, N, *x]``, ``y``: the LSTM's output after reading
        ``(x_t, y_{t-1})``, with padded points skipped (``y_{t-1}`` is the last real target)."""
        T, N = x.shape[:2]
        ye = self._encode_y(y, x.dtype)
        if mask is None:
            out, _ = self.lstm(self._steps(x, ye))
            return self._distribution(self.head(out))
        order = self._compact(mask)
        xs = x.gather(1, order.view(T, N, *([1] * (x.dim() - 2))).expand_as(x))
        ys = ye.gather(1, order[..., None].expand_as(ye))
        out, _ = self.lstm(self._steps(xs, ys))  # padded points come last: they never reach a real one
        inverse = torch.argsort(order, dim=1)
        out = out.gather(1, inverse[..., None].expand_as(out))  # back to the original positions
        return self._distribution(self.head(out))

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss averaged over every position of the concatenated support + query sequence."""
        loss = self.sequence_loss(episode)
        return loss, {"loss": float(loss.detach())}
