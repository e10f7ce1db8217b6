"""The memory-augmented in-context learner ``mann`` (Santoro et al. 2016).

Santoro, Bartunov, Botvinick, Wierstra & Lillicrap (2016), "Meta-Learning with
Memory-Augmented Neural Networks": an LSTM controller reads the sequence of
``(x_t, y_{t-1})`` pairs (as the ``lstm`` learner does: a point's own label only
arrives at the next step) and works on an external memory ``M [slots, width]``
through ``heads`` read heads. At step ``t``, with controller state ``h_t``::

    h_t, c_t  = LSTM([x_t, onehot(y_{t-1}), has_prev, r_{t-1}], (h_{t-1}, c_{t-1}))
    k_t       = tanh(W_k h_t)                      one key per head      [heads, width]
    beta_t    = 1 + softplus(W_b h_t)              key strength per head
    alpha_t   = W_a h_t                            write gate per head
    w^lu_{t-1}: one-hot rows of the ``heads`` least-used slots of w^u_{t-1}, the least used to head 1
    M         <- M with the slots of w^lu_{t-1} set to zero            (erase before writing)
    w^w_t     = sigmoid(alpha_t) w^r_{t-1} + (1 - sigmoid(alpha_t)) w^lu_{t-1}   (LRU access)
    M_t       = M + sum_heads w^w_t(i) k_t                              (each head writes its key)
    w^r_t(i)  = softmax_i(beta_t cos(k_t, M_t(i)))                      (content-based read)
    r_t       = sum_i w^r_t(i) M_t(i)
    w^u_t     = gamma w^u_{t-1} + sum_heads (w^r_t + w^w_t)             (usage, decaying)
    output_t  = W_o [h_t, r_t]

Least-recently-used access writes either to the slot just read (``alpha -> inf``: update
a memory that matched) or to a fresh, least-used one (``alpha -> -inf``). The paper's
reads have ``beta = 1``; a learned key strength (from the Neural Turing Machine, Graves
et al. 2014) makes sharp reads reachable and training faster. Each head's LRU component
is its own least-used slot (the paper's ``n`` least-used slots, one per head), and ties
in usage go to the lowest slot index, so every step is deterministic. The memory starts
at ``1e-6`` everywhere (the paper's constant), usage and previous reads at zero.

``predict`` runs the controller over the real support points, then takes one step per
query ``(x_q, y_S)`` from the final state (queries never see each other); ``meta_loss``
averages the loss over every position of the support + query sequence (as ``lstm``).
Padded support points are skipped: the state does not change on them. Inputs are read
through the ``backbone`` of the other in-context learners (Conv-4 for images by default,
with each task's images one batch-norm batch; see :mod:`metalens.learners.in_context`).
Regression and classification, with the ``loss`` options of ``lstm``.

The memory's parts are pure functions, tested on their own: :func:`cosine_read`,
:func:`least_used`, :func:`lru_write`, :func:`update_usage`.

>>> import torch
>>> from metalens.episode import TaskSpec
>>> spec = TaskSpec(kind="classification", x_shape=(4,), num_classes=3)
>>> mann = MANN(spec, MANN.Config(hidden=16, slots=8, width=6, heads=2))
>>> sx, sy, qx = torch.randn(2, 6, 4), torch.tensor([[0, 1, 2] * 2] * 2), torch.randn(2, 5, 4)
>>> mann.predict(sx, sy, qx).probs.shape
torch.Size([2, 5, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalens.config import Options, opt
from metalens.episode import TaskSpec
from metalens.learners.in_context import InputBackbone, _Recurrent
from metalens.registry import LEARNERS

__all__ = ["MANN", "MemoryState", "cosine_read", "least_used", "lru_write", "update_usage"]

INITIAL_MEMORY = 1e-6  # every memory element at the start of a task (Santoro et al.)
_EPS = 1e-8  # keeps the norms of the cosine similarity away from zero


class MemoryState(NamedTuple):
    """What the learner carries from one step to the next, for ``B`` sequences."""

    h: Tensor  # [B, hidden] controller output
    c: Tensor  # [B, hidden] controller cell
    memory: Tensor  # [B, slots, width]
    read_weights: Tensor  # [B, heads, slots]: w^r of the last step
    usage: Tensor  # [B, slots]: w^u of the last step
    reads: Tensor  # [B, heads, width]: r of the last step


def cosine_read(memory: Tensor, keys: Tensor, strength: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Content-based addressing: ``w(i) = softmax_i(beta cos(k, M(i)))`` and the read ``r = sum_i w(i) M(i)``.

    ``memory [B, N, W]``, ``keys [B, R, W]``, ``strength`` (beta) ``[B, R]`` or a number ->
    ``(weights [B, R, N], reads [B, R, W])``.

    >>> M = torch.tensor([[[1., 0.], [0., 1.]]])
    >>> w, r = cosine_read(M, torch.tensor([[[0., 2.]]]), 50.0)
    >>> r.round(decimals=3)
    tensor([[[0., 1.]]])
    """
    cos = F.normalize(keys, dim=-1, eps=_EPS) @ F.normalize(memory, dim=-1, eps=_EPS).transpose(1, 2)  # [B, R, N]
    beta = strength[..., None] if isinstance(strength, Tensor) else strength
    weights = torch.softmax(beta * cos, -1)
    return weights, weights @ memory


def least_used(usage: Tensor, n: int) -> Tensor:
    """One-hot rows of the ``n`` least-used slots, least used first: ``usage [B, N] -> [B, n, N]``.

    Ties go to the lowest slot index.

    >>> least_used(torch.tensor([[0.5, 0.1, 0.1, 0.9]]), 2)
    tensor([[[0., 1., 0., 0.],
             [0., 0., 1., 0.]]])
    """
    if not 1 <= n <= usage.shape[-1]:
        raise ValueError(f"n must be in [1, {usage.shape[-1]}] (the number of slots), got {n}")
    idx = torch.argsort(usage, dim=-1, stable=True)[..., :n]  # [B, n]
    return F.one_hot(idx, usage.shape[-1]).to(usage.dtype)


def lru_write(memory: Tensor, keys: Tensor, gate: Tensor, prev_read: Tensor,
              prev_least_used: Tensor) -> tuple[Tensor, Tensor]:
    """Least-recently-used access: erase the least-used slots, then write each head's key.

    ``w^w = sigmoid(gate) w^r_{t-1} + (1 - sigmoid(gate)) w^lu_{t-1}``;
    ``M(i) <- M(i) (1 - [i least used]) + sum_heads w^w(i) k``.

    Args: ``memory [B, N, W]``, ``keys [B, R, W]``, ``gate`` (alpha) ``[B, R]``, ``prev_read``
    (w^r of the last step) ``[B, R, N]``, ``prev_least_used`` (from :func:`least_used`) ``[B, R, N]``.

    Returns: ``(memory [B, N, W], write_weights [B, R, N])``.
    """
    g = torch.sigmoid(gate)[..., None]  # [B, R, 1]
    write = g * prev_read + (1 - g) * prev_least_used  # [B, R, N]
    keep = 1 - prev_least_used.amax(1)  # [B, N]: 0 on the slots to erase
    return memory * keep[..., None] + write.transpose(1, 2) @ keys, write


def update_usage(usage: Tensor, read_weights: Tensor, write_weights: Tensor, gamma: float) -> Tensor:
    """``w^u_t = gamma w^u_{t-1} + sum_heads (w^r_t + w^w_t)``: ``[B, N]``, ``[B, R, N]`` x 2 -> ``[B, N]``."""
    return gamma * usage + (read_weights + write_weights).sum(1)


@LEARNERS.register("mann")
class MANN(_Recurrent):
    """An LSTM controller with an external memory: cosine reads, least-recently-used writes (Santoro et al. 2016)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the memory-augmented learner (defaults: Santoro et al.'s Omniglot model)."""

        hidden: int = opt(200, "width of the controller LSTM", ge=1)
        slots: int = opt(128, "memory slots (N)", ge=1)
        width: int = opt(40, "width of each memory slot (W)", ge=1)
        heads: int = opt(4, "read heads (R); each writes to its own least-used slot (at most slots)", ge=1)
        gamma: float = opt(0.95, "decay of the usage weights", ge=0, le=1)
        loss: Literal["mse", "nll"] = opt(
            "mse", "regression: mse (predictive mean only) or nll (Gaussian mean and scale)")
        min_scale: float = opt(0.01, "loss nll: lower bound of the predicted standard deviation", gt=0, lt=1)
        backbone: InputBackbone = opt(
            "auto", "input features: conv4 (Conv-4 embedding), linear (the flattened input, read by the "
                    "controller's input weights), or auto (conv4 for image inputs [C, H, W], else linear)")
        channels: int = opt(64, "conv4: channels of every convolution", ge=1)

        def check(self) -> None:
            if self.heads > self.slots:
                raise ValueError(f"heads must be at most slots (each head writes to its own least-used slot), "
                                 f"got heads={self.heads} and slots={self.slots}")

    def __init__(self, spec: TaskSpec, config: Config | None = None) -> None:
        super().__init__(spec, config or self.Config())
        c = self.config
        width, out = self._setup(spec, c)  # step input: [x_t, y_{t-1}, has_prev]; the controller also reads r_{t-1}
        self.controller = nn.LSTMCell(width + c.heads * c.width, c.hidden)
        self.interface = nn.Linear(c.hidden, c.heads * (c.width + 2))  # keys, key strengths, write gates
        self.head = nn.Linear(c.hidden + c.heads * c.width, out)

    # -- one step --------------------------------------------------------------------------------------
    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> MemoryState:
        """The state before the first point: zero controller, memory at 1e-6, zero usage and reads."""
        c = self.config
        zeros = torch.zeros(batch, c.hidden, dtype=dtype, device=device)
        return MemoryState(zeros, zeros, torch.full((batch, c.slots, c.width), INITIAL_MEMORY, dtype=dtype,
                                                    device=device),
                           torch.zeros(batch, c.heads, c.slots, dtype=dtype, device=device),
                           torch.zeros(batch, c.slots, dtype=dtype, device=device),
                           torch.zeros(batch, c.heads, c.width, dtype=dtype, device=device))

    def step(self, state: MemoryState, inp: Tensor, live: Tensor | None = None) -> tuple[MemoryState, Tensor]:
        """One step (see the module docstring): ``inp [B, in]`` -> the new state and the features
        ``[h_t, r_t] [B, hidden + heads * width]``. ``live [B]`` bool: where False, the state is kept."""
        c = self.config
        B = inp.shape[0]
        h, cell = self.controller(torch.cat([inp, state.reads.flatten(1)], -1), (state.h, state.c))
        iface = self.interface(h).view(B, c.heads, c.width + 2)
        keys = torch.tanh(iface[..., :c.width])  # [B, R, W]
        strength = 1 + F.softplus(iface[..., c.width])  # [B, R]
        gate = iface[..., c.width + 1]  # [B, R]
        memory, write = lru_write(state.memory, keys, gate, state.read_weights, least_used(state.usage, c.heads))
        read, reads = cosine_read(memory, keys, strength)
        usage = update_usage(state.usage, read, write, c.gamma)
        new = MemoryState(h, cell, memory, read, usage, reads)
        if live is not None:
            new = MemoryState(*(torch.where(live.view(B, *([1] * (a.dim() - 1))), a, b) for a, b in zip(new, state)))
        return new, torch.cat([new.h, new.reads.flatten(1)], -1)

    def _run(self, steps: Tensor, lengths: Tensor | None = None) -> tuple[MemoryState, Tensor]:
        """The steps ``[B, P, in]`` from the initial state: the final state and the features ``[B, P, F]``."""
        B, P = steps.shape[:2]
        state = self.initial_state(B, dtype=steps.dtype, device=steps.device)
        feats = []
        for t in range(P):
            state, f = self.step(state, steps[:, t], None if lengths is None else t < lengths)
            feats.append(f)
        width = self.config.hidden + self.config.heads * self.config.width
        return state, torch.stack(feats, 1) if feats else steps.new_zeros(B, 0, width)

    # -- the hooks of the recurrent learners (metalens.learners.in_context._Recurrent) ----------------
    def _final(self, steps: Tensor, lengths: Tensor | None) -> MemoryState:
        return self._run(steps, lengths)[0]

    def _outputs(self, steps: Tensor) -> Tensor:
        return self._run(steps)[1]

    def _branch(self, state: MemoryState, step: Tensor) -> Tensor:
        T, Q = step.shape[:2]
        branched = MemoryState(*(a[:, None].expand(T, Q, *a.shape[1:]).reshape(T * Q, *a.shape[1:]) for a in state))
        _, feats = self.step(branched, step.reshape(T * Q, -1))  # every query from the same state
        return feats.view(T, Q, -1)
