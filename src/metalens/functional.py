"""Functional helpers: a network's parameters as a dict, one copy per task.

The baselines fit one network per task. Rather than looping over tasks, the
parameters are stacked along a leading task dimension and the per-task loss is
``vmap`` ped; because the total loss is a sum of independent per-task losses,
the gradient of each task's slice is exactly that task's own gradient, and any
element-wise optimiser (SGD, Adam) stepping the stacked tensors is the same as
one optimiser per task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["Params", "stack_params", "task_apply", "point_losses", "task_mean", "fit_per_task"]

Params = dict[str, Tensor]


def stack_params(params: Params, n_tasks: int) -> Params:
    """Copies of ``params`` for ``n_tasks`` tasks: each ``[T, *shape]``, detached leaves."""
    return {k: v.detach().unsqueeze(0).expand(n_tasks, *v.shape).clone() for k, v in params.items()}


def task_apply(net: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Run ``net`` with per-task ``params`` ``[T, ...]`` on ``x [T, P, *x]`` -> ``[T, P, out]``."""
    return vmap(lambda p, xt: functional_call(net, p, (xt,)))(params, x)


def point_losses(out: Tensor, y: Tensor, *, classification: bool) -> Tensor:
    """Per-point training loss ``[..., P]`` of raw outputs: cross-entropy or squared error."""
    if classification:
        return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
    return ((out - y) ** 2).mean(-1)


def task_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Each task's mean over its real points: ``values, mask [..., P]`` -> ``[...]`` (padded points weigh nothing).

    The one masked mean of metalens: losses and metrics average each task's real points with
    it, then (where a scalar is needed) average the tasks, so that every task weighs the same.

    >>> task_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]]))
    tensor([2.])
    """
    if mask is None:
        return values.mean(-1)
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1)


def fit_per_task(
    net: nn.Module,
    init: Params,
    support_x: Tensor,
    support_y: Tensor,
    support_mask: Tensor | None,
    *,
    steps: int,
    lr: float,
    optimizer: str = "sgd",
    classification: bool,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Params:
    """Fit one copy of ``net`` per task to its support set; returns ``[T, ...]`` parameters.

    ``init`` holds the shared, unbatched starting parameters (a dict as from
    ``dict(net.named_parameters())``). ``steps`` full-batch steps of SGD or Adam
    on each task's mean support loss. Gradients never flow back into ``init``
    (this is fine-tuning, not MAML).
    """
    T = support_x.shape[0]
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = stack_params(init, T)
    if steps == 0:
        return params
    for v in params.values():
        v.requires_grad_(True)
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}.get(optimizer)
    if opt_cls is None:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    opt = opt_cls(list(params.values()), lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            out = task_apply(net, params, support_x)
            per_task = task_mean(point_losses(out, support_y, classification=classification), support_mask)
            opt.zero_grad(set_to_none=True)
            per_task.sum().backward()  # independent tasks: each slice gets its own gradient
            opt.step()
            if callback is not None:
                callback(step, per_task.detach())
    return {k: v.detach() for k, v in params.items()}
