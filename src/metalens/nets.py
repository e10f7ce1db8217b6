"""Backbones shared by every lens.

Networks here are plain ``nn.Module`` s. Lenses that adapt parameters call them
through ``torch.func.functional_call`` with a dict of (possibly per-task) tensors,
so no network needs to know it is being meta-learned.

>>> import torch
>>> net = MLP(in_shape=(1,), out_features=1, hidden=(40, 40))
>>> net(torch.zeros(7, 1)).shape
torch.Size([7, 1])
>>> net(torch.zeros(3, 7, 1)).shape  # any leading dims
torch.Size([3, 7, 1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


__all__ = ["MLP", "Conv4", "ResNet12", "ResidualBlock", "drop_block", "TaskBatchNorm2d", "Activation", "ACTIVATIONS",
           "RESNET12_CHANNELS", "in_context_attention", "TransformerBlock", "MultiheadAttention", "SelfAttentionBlock"]

Activation = Literal["relu", "tanh", "gelu", "silu"]  # the choices of every "activation" option
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs of shape ``in_shape``.

    ``forward(x [..., *in_shape]) -> [..., out_features]``. The default
    ``hidden=(40, 40)`` with ReLU is the sinusoid network of Finn et al. (2017).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_features: int,
        hidden: Sequence[int] = (40, 40),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden layer widths must be >= 1, got {tuple(hidden)}")
        self.in_shape = tuple(in_shape)
        in_features = 1
        for s in self.in_shape:
            in_features *= s
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[: x.dim() - len(self.in_shape)]
        return self.layers(x.reshape(*lead, -1))

    def embed(self, x: Tensor) -> Tensor:
        """The last hidden layer's activations (everything but the output layer)."""
        lead = x.shape[: x.dim() - len(self.in_shape)]
        return self.layers[:-1](x.reshape(*lead, -1))


class TaskBatchNorm2d(nn.Module):
    """Batch normalisation with statistics of the current batch only, written in primitive ops.

    ``forward(x [..., B, C, H, W])``: each leading index (a task) is normalised with
    the mean and variance over its own ``B, H, W`` -- per-task batch statistics,
    never running statistics shared across tasks (as in Finn et al.'s MAML code).
    Under ``vmap`` over tasks every call sees one task's batch, so the two uses agree.

    Why not ``nn.BatchNorm2d``: besides its running statistics, ``vmap`` over
    ``torch.func.grad`` with a second-order backward through it gives wrong
    meta-gradients (functorch issue 534); these primitive ops differentiate exactly.
    ``fused=True`` uses PyTorch's fused kernel (one task's ``[B, C, H, W]``, or several
    tasks folded into its channel axis), for callers that never ``vmap`` this module: a
    Python loop over tasks, or learners without an inner loop (Prototypical and Matching
    networks).
    """

    def __init__(self, channels: int, eps: float = 1e-5, *, fused: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and x.dim() == 4:
            # one task's [B, C, H, W] outside vmap: PyTorch's fused kernel (batch statistics,
            # no running statistics) is exact here, including second order, and faster
            return nn.functional.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        if self.fused and x.dim() > 4:
            # tasks [..., B, C, H, W] -> [B, tasks * C, H, W]: per-channel statistics of the fused
            # kernel are then per task and channel, exactly the per-task batch statistics
            lead, (b, c, h, w) = x.shape[:-4], x.shape[-4:]
            t = math.prod(lead)
            y = x.reshape(t, b, c, h, w).transpose(0, 1).reshape(b, t * c, h, w)
            y = nn.functional.batch_norm(y, None, None, self.weight.repeat(t), self.bias.repeat(t), training=True,
                                         eps=self.eps)
            return y.reshape(b, t, c, h, w).transpose(0, 1).reshape(*lead, b, c, h, w)
        dims = (-4, -2, -1)  # batch, height, width of each task
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        return x_hat * self.weight[:, None, None] + self.bias[:, None, None]


class _MaxPool2(torch.autograd.Function):
    """2x2 max-pool (stride 2) of an NCHW ``x``: ``F.max_pool2d(x, 2)``'s values and gradients, faster on CPU.

    The forward runs PyTorch's channels-last kernel (on a channels-last copy of ``x``; about 3x
    faster than the NCHW forward on CPU, see docs/benchmarks.md, where Conv-4's time goes) and
    returns NCHW; the backward is the NCHW kernel with the same window indices. A maximum is
    exact, so the values are the same bit for bit, and the gradient goes to the same element
    of each window. The backward is differentiable (second-order MAML on the loop path). Not
    for use under ``vmap`` (Conv4 uses it only with ``fused_norm``, which is never vmapped) nor
    under ``torch.compile``.
    """

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        y, idx = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), [2, 2],
                                                         [2, 2])
        return y.contiguous(), idx.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_idx: Tensor) -> Tensor:
        x, idx = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_y, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


class Conv4(nn.Module):
    """The Conv-4 backbone of the few-shot literature (Vinyals et al. 2016; Finn et al. 2017).

    4 x [3x3 conv (``channels``, padding 1), batch norm, ReLU, 2x2 max-pool], then a
    linear head to ``out_features`` (``out_features=0``: no head, the flattened
    embedding is the output, as for Prototypical Networks). Inputs may have any number of
    channels and any size of at least ``2^blocks`` pixels a side; the embedding follows the
    input: ``channels`` features for 28x28 (spatial size 28 -> 14 -> 7 -> 3 -> 1), ``channels
    x 5 x 5`` (1600 at the default width) for 84x84 (84 -> 42 -> 21 -> 10 -> 5).

    ``forward(x [..., B, C, H, W]) -> [..., B, out]``; batch norm uses per-task batch
    statistics (:class:`TaskBatchNorm2d`).

    >>> net = Conv4(in_shape=(1, 28, 28), out_features=5, channels=8)
    >>> net(torch.zeros(3, 10, 1, 28, 28)).shape
    torch.Size([3, 10, 5])
    """

    def __init__(self, in_shape: Sequence[int], out_features: int, channels: int = 64, blocks: int = 4, *,
                 fused_norm: bool = False) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"backbone 'conv4' needs image inputs [channels, height, width], got x_shape "
                             f"{tuple(in_shape)}; use backbone 'mlp'")
        if channels < 1 or blocks < 1:
            raise ValueError(f"channels and blocks must be >= 1, got {channels} and {blocks}")
        c, h, w = in_shape
        self.in_shape = tuple(in_shape)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Conv2d(c, channels, 3, padding=1), TaskBatchNorm2d(channels, fused=fused_norm), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c, h, w = channels, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"inputs of {tuple(in_shape)} are too small for {blocks} pooling blocks")
        self.features = nn.Sequential(*layers)  # [conv, norm, relu, pool] per block (see embed)
        self.fast_pool = fused_norm  # never vmapped either: the pool may use _MaxPool2 (same values and gradients)
        self.embedding_dim = c * h * w
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        z = self.embed(x)
        return self.head(z) if self.head is not None else z

    def embed(self, x: Tensor) -> Tensor:
        """The flattened embedding before the head: ``[..., B, C, H, W] -> [..., B, embedding_dim]``."""
        lead = x.shape[: x.dim() - 3]
        if len(lead) == 0:
            raise ValueError("Conv4 expects [..., batch, channels, height, width]")
        # fold leading dims into one batch for the convolutions, keep them for the norm
        z = x.reshape(-1, *x.shape[-3:])
        for i in range(0, len(self.features), 4):
            conv, norm, relu, pool = self.features[i: i + 4]
            z = conv(z)
            z = norm(z.view(*lead, *z.shape[-3:])).reshape(-1, *z.shape[-3:])
            # relu(max-pool(z)) = max-pool(relu(z)), value and gradient (ReLU is monotone and zero where
            # a window's maximum is <= 0), with the ReLU on a quarter of the elements
            # _MaxPool2 in eager mode only: torch.compile generates its own pooling kernels, and its tracing of a
            # custom autograd.Function drops the backward's own derivative (second-order MAML would be wrong)
            fast = self.fast_pool and not torch.compiler.is_compiling()
            z = relu(_MaxPool2.apply(z)[0] if fast else pool(z))
        return z.reshape(*lead, -1)


RESNET12_CHANNELS = (64, 160, 320, 640)  # Lee et al. 2019 (MetaOptNet), Oreshkin et al. 2018 (TADAM)


def drop_block(x: Tensor, rate: float, block_size: int, *, generator: torch.Generator) -> Tensor:
    """DropBlock (Ghiasi, Lin & Le 2018): zero ``block_size x block_size`` squares of each feature map.

    ``x [B, C, H, W]``. Block centres are drawn independently per sample and channel with
    probability ``gamma = rate / k^2 * H W / ((H - k + 1)(W - k + 1))`` (``k = min(block_size,
    H, W)``), so that about ``rate`` of the units are dropped; the kept units are rescaled by
    ``numel / kept``. Every draw comes from ``generator`` (on its own device; the mask then
    moves to ``x``'s), so the same generator state drops the same blocks.

    >>> x = torch.ones(2, 3, 6, 6)
    >>> y = drop_block(x, 0.3, 3, generator=torch.Generator().manual_seed(0))
    >>> y.shape, bool(((y == 0) | (y > 1)).all())
    (torch.Size([2, 3, 6, 6]), True)
    """
    B, C, H, W = x.shape
    k = min(block_size, H, W)
    gamma = rate / k ** 2 * (H * W) / ((H - k + 1) * (W - k + 1))
    seeds = (torch.rand(B, C, H - k + 1, W - k + 1, generator=generator, device=generator.device) < gamma)
    seeds = F.pad(seeds.to(x.dtype).to(x.device), (k - 1, k - 1, k - 1, k - 1))
    keep = 1.0 - F.max_pool2d(seeds, k, stride=1)  # [B, C, H, W]: 0 inside any block
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    """One ResNet-12 block: 3 x [3x3 conv, batch norm, leaky ReLU (0.1)] with a 1x1-conv shortcut, then 2x2 max-pool.

    ``z -> pool(lrelu(norm3(conv3(a2)) + norm_s(conv_s(z))))``, ``a_i = lrelu(norm_i(conv_i(a_{i-1})))``, ``a_0 = z``;
    convolutions have no bias (batch norm follows each). Called by :class:`ResNet12` on a folded
    batch ``z [B, C, H, W]`` with the leading (task) dimensions ``lead`` that its norms keep apart.
    """

    def __init__(self, in_channels: int, out_channels: int, *, fused_norm: bool = False, slope: float = 0.1) -> None:
        super().__init__()
        self.slope = slope
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = TaskBatchNorm2d(out_channels, fused=fused_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = TaskBatchNorm2d(out_channels, fused=fused_norm)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = TaskBatchNorm2d(out_channels, fused=fused_norm)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm_shortcut = TaskBatchNorm2d(out_channels, fused=fused_norm)

    def forward(self, z: Tensor, lead: tuple[int, ...]) -> Tensor:
        def norm(bn: nn.Module, t: Tensor) -> Tensor:  # per-task statistics: unfold the tasks for the norm
            return bn(t.view(*lead, *t.shape[-3:])).reshape(-1, *t.shape[-3:])

        a = F.leaky_relu(norm(self.norm1, self.conv1(z)), self.slope)
        a = F.leaky_relu(norm(self.norm2, self.conv2(a)), self.slope)
        a = norm(self.norm3, self.conv3(a)) + norm(self.norm_shortcut, self.shortcut(z))
        # lrelu(max-pool(a)) = max-pool(lrelu(a)), values and gradients (leaky ReLU is increasing), on a quarter
        # of the elements
        return F.leaky_relu(F.max_pool2d(a, 2), self.slope)


class ResNet12(nn.Module):
    """The ResNet-12 backbone of the few-shot literature (Oreshkin et al. 2018, TADAM; Lee et al. 2019, MetaOptNet).

    ``len(channels)`` residual blocks (:class:`ResidualBlock`; four by default, 64-160-320-640
    channels), each halving the height and width, then a linear head to ``out_features``
    (``out_features=0``: no head, the embedding is the output). The embedding is the flattened
    last feature map (``pool="flatten"``, as in MetaOptNet: 640 x 5 x 5 = 16000 features for
    84x84 inputs) or its spatial mean (``pool="avg"``: ``channels[-1]`` features, as in TADAM).
    Batch norm uses per-task batch statistics (:class:`TaskBatchNorm2d`), so the gradient
    learners keep them in their inner loop; ``fused_norm`` as for :class:`Conv4`.

    DropBlock (``dropblock`` > 0, the rate; Ghiasi et al. 2018, as MetaOptNet uses it) is
    applied after the last two blocks, and only when ``forward`` / ``embed`` are given a
    ``generator`` (a learner passes the one ``meta_loss`` receives, derived from (seed, step)):
    predictions, which get none, are deterministic and use every unit.

    ``forward(x [..., B, C, H, W], generator=None) -> [..., B, out]``.

    >>> net = ResNet12((3, 32, 32), 5, channels=(4, 6, 8, 10))
    >>> net(torch.zeros(2, 7, 3, 32, 32)).shape, net.embedding_dim  # 32 -> 16 -> 8 -> 4 -> 2
    (torch.Size([2, 7, 5]), 40)
    """

    def __init__(self, in_shape: Sequence[int], out_features: int, channels: Sequence[int] = RESNET12_CHANNELS, *,
                 dropblock: float = 0.0, dropblock_size: int = 5, pool: Literal["flatten", "avg"] = "flatten",
                 fused_norm: bool = False) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"backbone 'resnet12' needs image inputs [channels, height, width], got x_shape "
                             f"{tuple(in_shape)}; use backbone 'mlp'")
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(f"resnet12 channels must be one or more widths >= 1, got {tuple(channels)}")
        if not 0.0 <= dropblock < 1.0 or dropblock_size < 1:
            raise ValueError(f"dropblock must be in [0, 1) and dropblock_size >= 1, got {dropblock} and "
                             f"{dropblock_size}")
        if pool not in ("flatten", "avg"):
            raise ValueError(f"pool must be 'flatten' or 'avg', got {pool!r}")
        c, h, w = in_shape
        self.in_shape = tuple(in_shape)
        blocks = []
        for width in channels:
            blocks.append(ResidualBlock(c, width, fused_norm=fused_norm))
            c, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"inputs of {tuple(in_shape)} are too small for {len(channels)} pooling blocks "
                             f"(at least {2 ** len(channels)} pixels a side)")
        self.blocks = nn.ModuleList(blocks)
        self.dropblock, self.dropblock_size, self.pool = dropblock, dropblock_size, pool
        self.embedding_dim = c * h * w if pool == "flatten" else c
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features > 0 else None
        for m in self.modules():  # as in MetaOptNet's code
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        z = self.embed(x, generator)
        return self.head(z) if self.head is not None else z

    def embed(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The embedding before the head: ``[..., B, C, H, W] -> [..., B, embedding_dim]``; DropBlock with a
        ``generator`` (and ``dropblock > 0``) only."""
        lead = x.shape[: x.dim() - 3]
        if len(lead) == 0:
            raise ValueError("ResNet12 expects [..., batch, channels, height, width]")
        z = x.reshape(-1, *x.shape[-3:])  # fold the leading dims for the convolutions
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            z = block(z, lead)
            if generator is not None and self.dropblock > 0 and i >= n - 2:
                z = drop_block(z, self.dropblock, self.dropblock_size, generator=generator)
        if self.pool == "avg":
            z = z.mean((-2, -1))
        return z.reshape(*lead, -1)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def in_context_attention(q: Tensor, k: Tensor, v: Tensor, n_context: int, context_allowed: Tensor | None,
                         query_allowed: Tensor | None) -> Tensor:
    """Scaled dot-product attention over ``n_context`` context tokens followed by query tokens.

    ``q, k, v [T, H, S + Q, d_h]``: the first ``S = n_context`` tokens are the context
    (support points), the last ``Q`` the queries. With ``a_ij = q_i . k_j / sqrt(d_h)``::

        context token i: softmax over { a_ij : j context, context_allowed[i, j] or j = i }
        query token t:   softmax over { a_tj : j context, query_allowed[t, j] }  U  { a_tt }

    so a query attends to the allowed context tokens and to itself, never to another
    query, and a context token always attends at least to itself. Disallowed keys get
    exactly zero weight.

    Args:
        context_allowed: bool ``[T | 1, S, S]`` or None (every context token allowed).
        query_allowed: bool ``[T | 1, Q, S]`` or None (every context token allowed).

    Returns:
        ``[T, H, S + Q, d_h]``.

    >>> q = k = v = torch.randn(2, 1, 5, 4)
    >>> out = in_context_attention(q, k, v, 3, None, None)
    >>> v2 = v.clone(); v2[:, :, 4] += 1.0  # change the second query's value
    >>> torch.equal(out[:, :, :4], in_context_attention(q, k, v2, 3, None, None)[:, :, :4])
    True
    """
    S = n_context
    scale = 1.0 / math.sqrt(q.shape[-1])
    kc, vc = k[:, :, :S], v[:, :, :S]
    mask = None
    if context_allowed is not None:
        eye = torch.eye(S, dtype=torch.bool, device=q.device)
        mask = (context_allowed | eye)[:, None]  # [T|1, 1, S, S]
    out_c = F.scaled_dot_product_attention(q[:, :, :S], kc, vc, attn_mask=mask)  # [T, H, S, d_h]
    qq, kq, vq = q[:, :, S:], k[:, :, S:], v[:, :, S:]
    s_ctx = (qq @ kc.transpose(-1, -2)) * scale  # [T, H, Q, S]
    if query_allowed is not None:
        s_ctx = s_ctx.masked_fill(~query_allowed[:, None], float("-inf"))
    s_self = (qq * kq).sum(-1, keepdim=True) * scale  # [T, H, Q, 1]: each query's own key
    p = torch.softmax(torch.cat([s_ctx, s_self], -1), -1)
    out_q = p[..., :S] @ vc + p[..., S:] * vq  # [T, H, Q, d_h]
    return torch.cat([out_c, out_q], 2)


class TransformerBlock(nn.Module):
    """A pre-LayerNorm transformer block with :func:`in_context_attention`.

    ``h <- h + W_o attn(LN(h));  h <- h + MLP(LN(h))`` with a GELU MLP of width
    ``mlp_ratio * dim``. ``forward(h [T, S + Q, dim], n_context, context_allowed,
    query_allowed) -> [T, S + Q, dim]``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h: Tensor, n_context: int, context_allowed: Tensor | None,
                query_allowed: Tensor | None) -> Tensor:
        T, N, D = h.shape
        qkv = self.qkv(self.norm1(h)).view(T, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [T, H, N, d_h]
        a = in_context_attention(q, k, v, n_context, context_allowed, query_allowed)
        h = h + self.proj(a.transpose(1, 2).reshape(T, N, D))
        return h + self.mlp(self.norm2(h))


class MultiheadAttention(nn.Module):
    """Multi-head scaled dot-product attention with a mask over the keys (Vaswani et al. 2017, sec. 3.2).

    For each head ``h`` (``heads`` of them, ``d_h = dim / heads``)::

        head_h = softmax( (q W_q^h) (k W_k^h)^T / sqrt(d_h) ) (v W_v^h)
        out    = concat_h(head_h) W_o + b_o

    ``forward(q [T, Q, dq], k [T, S, dk], v [T, S, dv], mask [T, S] | None) -> [T, Q, dim]``.
    Masked keys (``False``) get exactly zero weight; a query whose keys are all
    masked attends to nothing (its heads are zero, the output is ``b_o``).
    """

    def __init__(self, query_dim: int, key_dim: int, value_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or dim % heads != 0:
            raise ValueError(f"heads must be >= 1 and divide the width {dim}, got heads={heads}")
        self.heads = heads
        self.w_q = nn.Linear(query_dim, dim, bias=False)
        self.w_k = nn.Linear(key_dim, dim, bias=False)
        self.w_v = nn.Linear(value_dim, dim, bias=False)
        self.w_o = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        T, Q = q.shape[:2]

        def split(t: Tensor) -> Tensor:  # [T, P, dim] -> [T, heads, P, d_h]
            return t.view(T, t.shape[1], self.heads, -1).transpose(1, 2)

        qh, kh, vh = split(self.w_q(q)), split(self.w_k(k)), split(self.w_v(v))
        keep = None
        if mask is not None:
            vh = torch.where(mask[:, None, :, None], vh, 0.0)  # padded values never reach a sum
            # A task with no real key attends uniformly to its (zeroed) values: heads are 0, not 0/0.
            keep = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]  # [T, 1, 1, S]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep)  # [T, heads, Q, d_h]
        out = out.transpose(1, 2).reshape(T, Q, -1)  # [T, Q, dim]
        return self.w_o(out)


class SelfAttentionBlock(nn.Module):
    """``H = LN(X + MHA(X, X, X)); out = LN(H + relu(H W + b))`` over a set (Lee et al. 2019, MAB).

    ``forward(x [T, P, dim], mask [T, P] | None) -> [T, P, dim]``. Padded points are
    never attended to; their own outputs are meaningless and must stay masked.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = MultiheadAttention(dim, dim, dim, dim, heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.norm1(x + self.attention(x, x, x, mask))
        return self.norm2(h + F.relu(self.ff(h)))
