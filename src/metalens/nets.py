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

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from metalens import rng

__all__ = ["MLP", "Conv4", "TaskBatchNorm2d", "ACTIVATIONS", "seeded_init"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


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


class Conv4(nn.Module):
    """The Conv-4 backbone of the few-shot literature (Vinyals et al. 2016; Finn et al. 2017).

    4 x [3x3 conv (``channels``, padding 1), batch norm, ReLU, 2x2 max-pool], then a
    linear head to ``out_features`` (``out_features=0``: no head, the flattened
    embedding is the output, as for Prototypical Networks). For 28x28 inputs the
    embedding has ``channels`` features (spatial size 28 -> 14 -> 7 -> 3 -> 1).

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
            z = relu(pool(z))
        return z.reshape(*lead, -1)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build modules with initial weights that depend only on ``seed``.

    PyTorch's layer initialisers draw from the global generator; inside this
    context that generator is forked, seeded from ``(seed, Stream.INIT)`` and
    restored afterwards, so nothing outside observes the draw.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.derive_seed(seed, rng.Stream.INIT))
        yield
