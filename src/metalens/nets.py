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
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from metalens import rng

__all__ = ["MLP", "ACTIVATIONS", "seeded_init"]

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
