"""The gradient lens: a predictor is a few gradient steps on the support set from meta-learned parameters.

Everything here is built around one functional inner loop, :func:`adapt`, written for
*one* task and mapped over the tasks of an episode by :func:`map_tasks` (``vmap``, or a
plain loop where that is faster). The learners are small compositions of it:

=========  ======================================  ==============  ==========================================
learner    inner step rule                         adapted params  meta-gradient
=========  ======================================  ==============  ==========================================
maml       ``phi - alpha g``                       all             through the inner steps (second order)
fomaml     ``phi - alpha g``                       all             inner gradients held constant
metasgd    ``phi - alpha (.) g``, alpha learned    all             through the inner steps, also into alpha
           per element
anil       ``phi - alpha g``                       the head only   through the inner steps (body and head)
reptile    ``phi - alpha g``                       all             ``theta - mean_t phi_t`` (surrogate loss)
imaml      ``phi - alpha g`` on                    all             implicit: ``(I + H/lambda)^-1 grad L_Q``
           ``L_S + lambda/2 ||phi - theta||^2``                    by conjugate gradients (surrogate loss)
=========  ======================================  ==============  ==========================================

Papers: MAML and FOMAML, Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning
for Fast Adaptation of Deep Networks"; Meta-SGD, Li, Zhou, Chen & Li (2017); ANIL,
Raghu, Raghu, Bengio & Vinyals (2020), "Rapid Learning or Feature Reuse?"; Reptile,
Nichol, Achiam & Schulman (2018), "On First-Order Meta-Learning Algorithms"; iMAML,
Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with Implicit Gradients".

Losses: regression learners are MSE-trained (their ``predict`` is a ``Normal(mean, 1)``
that only carries the mean; ``probabilistic = False``), classifiers use cross-entropy
and predict a ``Categorical``. Padded support points (``support_mask == False``) are
left out of every inner loss; padded query points out of the meta-loss.

``inner_steps`` steps are taken in ``meta_loss`` (training), ``eval_inner_steps`` in
``predict`` (evaluation), whatever ``module.training`` says.

>>> import torch
>>> from metalens.episode import TaskSpec
>>> learner = MAML(TaskSpec(kind="regression", x_shape=(1,)), MAML.Config(hidden=(8,)))
>>> sx, sy, qx = torch.randn(3, 5, 1), torch.randn(3, 5, 1), torch.randn(3, 7, 1)
>>> learner.predict(sx, sy, qx).mean.shape
torch.Size([3, 7, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.func import functional_call, grad, grad_and_value, vmap

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.functional import Params, point_losses, task_mean
from metalens.learners.base import Learner, query_loss
from metalens.nets import RESNET12_CHANNELS, Activation, Conv4, MLP, ResNet12
from metalens.registry import LEARNERS
from metalens.theory.curvature import capped_rate, extreme_eigenvalues

__all__ = [
    "StepRule", "sgd", "per_parameter_sgd", "support_loss", "support_grad", "adapt", "map_tasks", "head_names",
    "conjugate_gradient", "solve_proximal", "implicit_meta_gradient", "surrogate_loss",
    "lanczos_start", "split_points", "GradientConfig", "MAMLConfig", "GradientLearner", "MAML", "FOMAML", "MetaSGD",
    "ANIL", "Reptile", "IMAML",
]

# (phi, grads) -> next phi, over the adapted parameters of one task.
StepRule = Callable[[Params, Params], Params]

# What ``batching="auto"`` picks per backbone, measured with benchmarks/maml_speed.py on CPU.
AUTO_BATCHING = {"mlp": "vmap", "conv4": "loop", "resnet12": "loop"}


# --------------------------------------------------------------------------------------------
# The functional core: one task
# --------------------------------------------------------------------------------------------
def sgd(alpha: float | Tensor) -> StepRule:
    """Plain gradient descent, ``phi <- phi - alpha * g`` (MAML's inner step).

    >>> rule = sgd(0.5)
    >>> rule({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    {'w': tensor([0.])}
    """
    return lambda phi, g: {k: phi[k] - alpha * g[k] for k in phi}


def per_parameter_sgd(alpha: Params) -> StepRule:
    """Meta-SGD's step, ``phi <- phi - alpha (.) g`` with one rate per parameter element.

    ``alpha`` maps each adapted parameter's name to a tensor of its shape (Li et al.
    2017, eq. 2); gradients flow into it, so the rates are meta-learned.
    """
    return lambda phi, g: {k: phi[k] - alpha[k] * g[k] for k in phi}


def support_loss(net: nn.Module, params: Params, x: Tensor, y: Tensor, mask: Tensor | None, *,
                 classification: bool) -> Tensor:
    """Mean training loss of one task's real points: ``x [P, *x]``, ``y [P, dy] | [P]``, ``mask [P]``.

    Squared error (mean over output dims) for regression, cross-entropy for
    classification; padded points (``mask == False``) weigh nothing.
    """
    return task_mean(point_losses(functional_call(net, params, (x,)), y, classification=classification), mask)


def support_grad(net: nn.Module, params: Params, x: Tensor, y: Tensor, mask: Tensor | None, *,
                 classification: bool) -> Params:
    """``grad_params`` of :func:`support_loss` (``torch.func.grad``: no graph unless the caller builds one)."""
    return grad(lambda p: support_loss(net, p, x, y, mask, classification=classification))(params)


def adapt(
    net: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    support_mask: Tensor | None = None,
    *,
    steps: int,
    step: StepRule,
    adapted: Collection[str] | None = None,
    first_order: bool = False,
    proximal: float = 0.0,
    hessian_batch: tuple[Tensor, Tensor, Tensor | None] | None = None,
    classification: bool,
) -> Params:
    """The inner loop for one task: ``steps`` gradient steps on its support loss.

    Starting from ``theta = params`` (the meta-parameters, unbatched), the adapted
    subset ``phi`` (``adapted`` names; all parameters when None) follows::

        phi_0 = theta
        phi_{i+1} = step(phi_i, grad_phi [ L_S(phi_i) + proximal / 2 * ||phi_i - theta||^2 ])

    where ``L_S`` is :func:`support_loss` on ``support_x [S, *x]``, ``support_y``
    and ``support_mask [S]``. The other parameters stay at ``theta``.

    Gradients are taken with ``torch.func.grad``, so the result stays differentiable
    with respect to ``params`` (and to any tensor the step rule closes over) through
    ordinary autograd: back-propagating a query loss through it gives MAML's
    second-order meta-gradient, made of Hessian-vector products (Finn et al. 2017,
    eq. 1). ``first_order=True`` treats the inner gradients as constants (FOMAML), so
    ``d phi / d theta = I``. Pass detached ``params`` to run it without any graph
    (Reptile, iMAML: memory independent of ``steps``). The ``proximal`` term is
    iMAML's regulariser toward the starting point (Rajeswaran et al. 2019, eq. 3).

    ``hessian_batch = (x [H, *x], y, mask [H] | None)``: the curvature that the meta-gradient
    sees comes from this independent batch ``D_h`` while the steps themselves are those of the
    support loss (Fallah, Mokhtari & Ozdaglar 2020, eq. 8: independent batches for the inner
    step, the outer gradient and the Hessian). Each step uses the gradient
    ``g_S(phi) + g_h(phi) - stop_grad(g_h(phi))``: its value is the support gradient ``g_S``, its
    derivative the Hessian of the ``D_h`` loss, so one step's Jacobian is ``I - alpha H_h(phi)``
    and back-propagating a query loss gives ``prod_i (I - alpha H_h(phi_i)) grad L_Q(phi_N)``.
    Ignored with ``first_order`` (there is no Hessian in the meta-gradient).

    Returns all parameters (adapted and not) as a dict of unbatched tensors.

    >>> net = MLP((1,), 1, hidden=())
    >>> theta = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
    >>> x, y = torch.ones(4, 1), 3 * torch.ones(4, 1)
    >>> phi = adapt(net, theta, x, y, steps=1, step=sgd(0.25), classification=False)
    >>> phi["layers.0.weight"]  # 0 - 0.25 * d/dw mean((w x + b - y)^2) = 0.25 * 2 * 3
    tensor([[1.5000]])
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    names = list(params) if adapted is None else [k for k in params if k in adapted]
    fixed = {k: v for k, v in params.items() if k not in names}
    phi = {k: params[k] for k in names}
    anchor = {k: v.detach() for k, v in phi.items()}

    def loss_on(x: Tensor, y: Tensor, mask: Tensor | None) -> Callable[[Params], Tensor]:
        def loss(phi: Params) -> Tensor:
            value = support_loss(net, {**fixed, **phi}, x, y, mask, classification=classification)
            if proximal:
                value = value + 0.5 * proximal * sum(((phi[k] - anchor[k]) ** 2).sum() for k in phi)
            return value
        return loss

    inner_loss = loss_on(support_x, support_y, support_mask)
    hessian_loss = loss_on(*hessian_batch) if hessian_batch is not None and not first_order else None
    for _ in range(steps):
        g = grad(inner_loss)(phi)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        elif hessian_loss is not None:  # value: the support gradient; derivative: the D_h Hessian
            gh = grad(hessian_loss)(phi)
            g = {k: g[k].detach() + (gh[k] - gh[k].detach()) for k in g}
        phi = step(phi, g)
    return {**fixed, **phi}


def lanczos_start(like: Params) -> Params:
    """The fixed start vector of the curvature estimates (:func:`metalens.theory.curvature.lanczos`): shaped
    like ``like``, components ``cos(2.39996 i)`` along the flattened parameters (the golden angle: both signs in
    every tensor, not orthogonal to an eigenvector but by accident). No random draw, so the estimate is the same
    for every call, inside ``vmap`` too.

    >>> lanczos_start({"w": torch.zeros(3)})["w"]
    tensor([ 1.0000, -0.7374,  0.0874])
    """
    out, i = {}, 0
    for k, v in like.items():
        idx = torch.arange(i, i + v.numel(), dtype=v.dtype, device=v.device)
        out[k] = torch.cos(2.399963229728653 * idx).reshape(v.shape)
        i += v.numel()
    return out


def split_points(x: Tensor, y: Tensor, mask: Tensor | None) -> tuple[tuple[Tensor, Tensor, Tensor | None],
                                                                      tuple[Tensor, Tensor, Tensor | None]]:
    """Cut every task's points ``[T, P, ...]`` in two interleaved halves: even-numbered points and odd-numbered
    ones (``P >= 2``). Interleaved rather than first / second half, so that padded points, which families put
    last, leave real points in both halves.

    >>> (a, _, _), (b, _, _) = split_points(torch.arange(5.0).view(1, 5, 1), torch.zeros(1, 5, 1), None)
    >>> a[0, :, 0].tolist(), b[0, :, 0].tolist()
    ([0.0, 2.0, 4.0], [1.0, 3.0])
    """
    if x.shape[1] < 2:
        raise ValueError(f"splitting a task's points in two needs at least 2 points per task, got {x.shape[1]}")
    m0, m1 = (None, None) if mask is None else (mask[:, 0::2], mask[:, 1::2])
    return (x[:, 0::2], y[:, 0::2], m0), (x[:, 1::2], y[:, 1::2], m1)


def map_tasks(fn: Callable[..., Any], *args: Any, batching: str) -> Any:
    """Apply a one-task function to every task: ``args`` are ``[T, ...]`` tensors, dicts of them, or None.

    ``batching="vmap"`` uses ``torch.func.vmap`` (``randomness="error"``: the inner loop
    draws nothing); ``"loop"`` runs a Python loop and stacks the results (a tensor or a
    dict of tensors). Both give the same numbers; which is faster depends on the
    backbone (see :data:`AUTO_BATCHING`).
    """
    if batching == "vmap":
        in_dims = tuple(None if a is None else 0 for a in args)
        return vmap(fn, in_dims=in_dims, randomness="error")(*args)
    if batching != "loop":
        raise ValueError(f"batching must be 'vmap' or 'loop', got {batching!r}")
    first = next(a for a in args if a is not None)
    T = (next(iter(first.values())) if isinstance(first, dict) else first).shape[0]

    def take(a: Any, t: int) -> Any:
        if a is None:
            return None
        return {k: v[t] for k, v in a.items()} if isinstance(a, dict) else a[t]

    outs = [fn(*(take(a, t) for a in args)) for t in range(T)]
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    return torch.stack(outs)


def head_names(net: nn.Module) -> tuple[str, ...]:
    """Names of the parameters of ``net``'s last module that holds any: its output layer (ANIL's head).

    >>> head_names(MLP((1,), 1, hidden=(40, 40)))
    ('layers.4.weight', 'layers.4.bias')
    """
    last = None
    for name, module in net.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = (name, module)
    if last is None:
        raise ValueError("the network has no parameters")
    prefix = last[0] + "." if last[0] else ""
    return tuple(prefix + n for n, _ in last[1].named_parameters(recurse=False))


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _norm(a: Params) -> Tensor:
    return torch.sqrt(_dot(a, a))


def _safe_div(n: Tensor, d: Tensor) -> Tensor:
    """``n / d`` where ``d > 0``, else 0 (no Python branch, so it runs under vmap)."""
    ok = d > 0
    return torch.where(ok, n / torch.where(ok, d, torch.ones_like(d)), torch.zeros_like(n))


def conjugate_gradient(A: Callable[[Params], Params], b: Params, *, steps: int) -> Params:
    """Approximately solve ``A x = b`` for symmetric ``A`` by at most ``steps`` CG iterations.

    ``A`` is only applied to vectors (dicts of tensors shaped like ``b``), starting
    from ``x_0 = 0`` (Hestenes & Stiefel 1952; Nocedal & Wright 2006, alg. 5.2). The
    iteration stops (``x`` stays where it is) at the first direction ``p`` with
    ``p^T A p <= 0``: ``A`` is not positive definite there, and going on would make
    ``x`` blow up (truncated CG, as in Steihaug 1983); an exact solve (zero residual)
    stops it the same way. A fixed number of iterations and no data-dependent Python
    branch, so it can be ``vmap``-ped over tasks.

    >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> x = conjugate_gradient(lambda v: {"x": M @ v["x"]}, {"x": torch.tensor([1.0, 2.0])}, steps=2)
    >>> torch.allclose(M @ x["x"], torch.tensor([1.0, 2.0]))
    True
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rr = _dot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    for _ in range(steps):
        Ap = A(p)
        pAp = _dot(p, Ap)
        active = active & (pAp > 0)
        a = torch.where(active, _safe_div(rr, pAp), torch.zeros_like(rr))
        x = {k: x[k] + a * p[k] for k in x}
        r = {k: r[k] - a * Ap[k] for k in r}
        rr_next = _dot(r, r)
        beta = torch.where(active, _safe_div(rr_next, rr), torch.zeros_like(rr))
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_next
    return x


def implicit_meta_gradient(
    net: nn.Module,
    phi: Params,
    query_grad: Params,
    support_x: Tensor,
    support_y: Tensor,
    support_mask: Tensor | None = None,
    *,
    lam: float,
    cg_steps: int,
    damping: float = 0.0,
    classification: bool,
) -> Params:
    """iMAML's meta-gradient of one task (Rajeswaran et al. 2019, eq. 6 and alg. 2).

    At the solution ``phi`` of the regularised inner problem
    ``min L_S(phi) + lam/2 ||phi - theta||^2`` the implicit function theorem gives
    ``d phi / d theta = (I + H / lam)^-1`` with ``H`` the Hessian of ``L_S`` at ``phi``,
    so the meta-gradient is::

        g = ((1 + damping) I + H / lam)^-1  grad_phi L_Q(phi)      (query_grad)

    solved by :func:`conjugate_gradient` on Hessian-vector products (reverse-over-reverse:
    the gradient of ``<grad L_S, v>``; measured faster on CPU here than ``jvp`` of ``grad``,
    which also needs forward-mode formulas for every op). The Hessian is never formed.
    ``damping > 0`` keeps the system positive definite where ``H`` is not (a network's
    Hessian is indefinite in general); where it still is not, CG stops at the first
    direction of non-positive curvature rather than blow up.
    """

    def A(v: Params) -> Params:
        Hv = grad(lambda p: _dot(support_grad(net, p, support_x, support_y, support_mask,
                                              classification=classification), v))(phi)  # H v
        return {k: (1.0 + damping) * v[k] + Hv[k] / lam for k in v}

    return conjugate_gradient(A, query_grad, steps=cg_steps)


def solve_proximal(
    net: nn.Module,
    theta: Params,
    support_x: Tensor,
    support_y: Tensor,
    support_mask: Tensor | None = None,
    *,
    lam: float,
    steps: int,
    lr: float,
    classification: bool,
) -> Params:
    """iMAML's inner problem ``min_phi F(phi) = L_S(phi) + lam/2 ||phi - theta||^2`` for one task.

    ``steps`` gradient steps from ``phi_0 = theta`` with Barzilai-Borwein step sizes
    (Barzilai & Borwein 1988): the first rate is ``lr``, later ones ``<s, y> / <y, y>``
    (``s`` the last step, ``y`` the change of the gradient along it: an inverse curvature),
    capped at ``1 / lam`` and replaced by ``lr`` where the curvature met is not positive.
    A step that does not lower ``F`` is undone and the rate halved, so ``F`` never rises.
    Why not a fixed rate: it must stay below ``2 / (L + lam)`` for the largest curvature
    ``L`` of any task, and meta-training keeps raising ``L`` (iMAML's objective rewards sharp
    support losses, since ``lam``, not the rate, bounds the adaptation), until the inner
    loop diverges. Vmappable (no data-dependent control flow); pass detached ``theta``:
    iMAML needs no graph of these steps.
    """

    def grad_and_objective(p: Params) -> tuple[Params, Tensor]:
        g, loss = grad_and_value(lambda q: support_loss(net, q, support_x, support_y, support_mask,
                                                        classification=classification))(p)
        d = {k: p[k] - theta[k] for k in p}
        return {k: g[k] + lam * d[k] for k in p}, loss + 0.5 * lam * _dot(d, d)

    phi = dict(theta)
    g, f = grad_and_objective(phi)
    first = torch.full_like(f, lr)
    rate = first
    for _ in range(steps):
        new = {k: phi[k] - rate * g[k] for k in phi}
        g_new, f_new = grad_and_objective(new)
        s, y = {k: new[k] - phi[k] for k in phi}, {k: g_new[k] - g[k] for k in g}
        sy, yy = _dot(s, y), _dot(y, y)
        bb = torch.where(sy > 0, sy / yy.clamp_min(torch.finfo(yy.dtype).tiny), first).clamp(max=1.0 / lam)
        ok = (f_new <= f) & torch.isfinite(f_new)
        rate = torch.where(ok, bb, 0.5 * rate)
        phi = {k: torch.where(ok, new[k], phi[k]) for k in phi}
        g = {k: torch.where(ok, g_new[k], g[k]) for k in g}
        f = torch.where(ok, f_new, f)
    return phi


def surrogate_loss(theta: Params, direction: Params) -> Tensor:
    """``sum_k <theta_k, direction_k>`` with ``direction`` held constant: its gradient in ``theta`` is ``direction``.

    How Reptile and iMAML, whose meta-gradients are not the gradient of a loss that
    autograd can see, fit the ``meta_loss -> (loss, metrics)`` contract: the trainer's
    ``loss.backward()`` then deposits exactly ``direction`` into ``theta.grad``.
    """
    return sum((theta[k] * direction[k].detach()).sum() for k in direction)


# --------------------------------------------------------------------------------------------
# The learners: thin shells around the functional core
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradientConfig(Options):
    """Options shared by the gradient learners (defaults: Finn et al. 2017's sinusoid setup)."""

    backbone: Literal["mlp", "conv4", "resnet12"] = opt(
        "mlp", "network: mlp (any inputs, flattened), conv4 or resnet12 (image inputs)")
    hidden: tuple[int, ...] = opt((40, 40), "mlp: hidden layer widths (empty: a linear model)", ge=1)
    activation: Activation = opt("relu", "mlp: activation")
    channels: int = opt(64, "conv4: channels of every convolution", ge=1)
    blocks: int = opt(4, "conv4: number of conv-norm-relu-pool blocks", ge=1)
    resnet_channels: tuple[int, ...] = opt(RESNET12_CHANNELS, "resnet12: channels of each residual block (one "
                                                              "block per entry, each halving the image)",
                                           ge=1, min_len=1)
    inner_steps: int = opt(1, "inner gradient steps on the support set in meta-training", ge=0)
    inner_lr: float = opt(0.01, "inner learning rate alpha (Meta-SGD: the initial value of its learned rates)", gt=0)
    eval_inner_steps: int | None = opt(10, "inner steps when predicting (evaluation); null or 0: inner_steps", ge=0)
    batching: Literal["auto", "vmap", "loop"] = opt(
        "auto", "tasks in parallel: vmap, a Python loop, or auto (vmap for mlp, loop for conv4 and resnet12)")
    inner_lr_cap: Literal["none", "curvature"] = opt(
        "none", "curvature: each task's inner rate is min(inner_lr, inner_lr_cap_c / lambda_max), lambda_max the "
                "largest eigenvalue of its support loss's Hessian at theta (Lanczos); none: inner_lr for every task")
    inner_lr_cap_c: float = opt(1.0, "c of inner_lr_cap = curvature (below 2: every step is stable along the top "
                                     "eigenvector at theta)", gt=0)
    curvature_iters: int = opt(20, "inner_lr_cap = curvature: Lanczos iterations (Hessian-vector products) per task",
                               ge=2)


@dataclass(frozen=True)
class MAMLConfig(GradientConfig):
    """Options of MAML and first-order MAML."""

    meta_batches: Literal["shared", "independent"] = opt(
        "shared", "data of each task's meta-gradient: shared (the inner step and its Hessian on the support set, "
                  "the outer gradient on the query set) or independent (Fallah et al. 2020: the inner step on the "
                  "support set, the outer gradient on the even-numbered query points, the Hessian on the odd ones)")


class GradientLearner(Learner):
    """The shell shared by the gradient learners: the backbone ``net`` (its parameters are
    ``theta``), the batching of :func:`adapt` over tasks, and ``predict``.

    A learner is defined by three choices: :meth:`step_rule` (the inner update),
    ``adapted`` (names of the parameters the inner loop changes; None: all) and
    ``first_order`` / ``proximal`` (passed to :func:`adapt`), plus its ``meta_loss``.
    """

    first_order: bool = False

    def __init__(self, spec: TaskSpec, config: GradientConfig | None = None) -> None:
        super().__init__(spec, config if config is not None else type(self).Config())
        c = self.config
        # the fused batch-norm kernel is exact outside vmap (the loop over tasks), not under it
        if c.backbone == "mlp":
            self.net: nn.Module = MLP(spec.x_shape, self.out_features, c.hidden, c.activation)
        elif c.backbone == "conv4":
            self.net = Conv4(spec.x_shape, self.out_features, channels=c.channels, blocks=c.blocks,
                             fused_norm=self.batching == "loop")
        else:
            self.net = ResNet12(spec.x_shape, self.out_features, c.resnet_channels, fused_norm=self.batching == "loop")
        self.adapted: tuple[str, ...] | None = None
        self._compiled_task: Callable[..., Tensor] | None = None  # set by compiled_meta_loss

    # -- the parts each learner chooses ----------------------------------------------------------
    def step_rule(self) -> StepRule:
        return sgd(self.config.inner_lr)

    @property
    def proximal(self) -> float:
        return 0.0

    # -- shared machinery -------------------------------------------------------------------------
    @property
    def batching(self) -> str:
        c = self.config
        return AUTO_BATCHING[c.backbone] if c.batching == "auto" else c.batching

    @property
    def eval_steps(self) -> int:
        return self.config.eval_inner_steps or self.config.inner_steps

    def theta(self) -> Params:
        """The meta-learned initialisation, ``{name: tensor}`` of the backbone."""
        return dict(self.net.named_parameters())

    def adapt_task(self, theta: Params, sx: Tensor, sy: Tensor, sm: Tensor | None, *, steps: int,
                   hessian_batch: tuple[Tensor, Tensor, Tensor | None] | None = None) -> Params:
        """The inner loop of one task (:func:`adapt` with this learner's choices): ``sx [S, *x]`` -> parameters.

        With ``inner_lr_cap = "curvature"`` the task's rate is ``min(inner_lr, c / lambda_max)``, ``lambda_max``
        from :meth:`curvature` (held constant: no meta-gradient flows through the cap).
        """
        step = self.step_rule()
        if self.config.inner_lr_cap == "curvature" and steps > 0:
            step = sgd(capped_rate(self.config.inner_lr, self.curvature(theta, sx, sy, sm),
                                   c=self.config.inner_lr_cap_c))
        return adapt(self.net, theta, sx, sy, sm, steps=steps, step=step, adapted=self.adapted,
                     first_order=self.first_order, proximal=self.proximal, hessian_batch=hessian_batch,
                     classification=self.spec.is_classification)

    def curvature(self, theta: Params, sx: Tensor, sy: Tensor, sm: Tensor | None) -> Tensor:
        """``lambda_max``: the largest eigenvalue of the Hessian of one task's inner objective at ``theta`` (the
        support loss, plus ``proximal`` for iMAML) with respect to the adapted parameters, by
        ``curvature_iters`` Lanczos iterations from :func:`lanczos_start` (no graph: ``theta`` is detached)."""
        theta = {k: v.detach() for k, v in theta.items()}
        names = list(theta) if self.adapted is None else [k for k in theta if k in self.adapted]
        fixed = {k: v for k, v in theta.items() if k not in names}
        phi = {k: theta[k] for k in names}

        def loss(p: Params) -> Tensor:
            return support_loss(self.net, {**fixed, **p}, sx, sy, sm, classification=self.spec.is_classification)

        _, lam_max = extreme_eigenvalues(loss, phi, lanczos_start(phi), steps=self.config.curvature_iters)
        return (lam_max + self.proximal).detach()

    def adapt_tasks(self, theta: Params, support_x: Tensor, support_y: Tensor, support_mask: Tensor | None,
                    *, steps: int) -> Params:
        """:meth:`adapt_task` on every task: ``support_x [T, S, *x]`` -> parameters ``[T, *shape]``."""
        return map_tasks(lambda sx, sy, sm: self.adapt_task(theta, sx, sy, sm, steps=steps),
                         support_x, support_y, support_mask, batching=self.batching)

    def adapt_and_apply(self, theta: Params, support_x: Tensor, support_y: Tensor, support_mask: Tensor | None,
                        query_x: Tensor, *, steps: int, compiled: bool = False) -> Tensor:
        """Adapt to each task's support set and run the adapted network on its queries: ``[T, Q, out]``.

        One task's function (:meth:`task_outputs`) mapped over the tasks, so the adapted parameters
        are never stacked (on the loop path that would copy every parameter per task, forward and
        backward). ``compiled``: call its compiled version where :meth:`compiled_meta_loss` made one.
        """
        fn = self._compiled_task if compiled and self._compiled_task is not None else self.task_outputs
        return map_tasks(lambda sx, sy, sm, qx: fn(theta, sx, sy, sm, qx, steps),
                         support_x, support_y, support_mask, query_x, batching=self.batching)

    def task_outputs(self, theta: Params, sx: Tensor, sy: Tensor, sm: Tensor | None, qx: Tensor, steps: int) -> Tensor:
        """One task: adapt to its support set ``sx [S, *x]``, then the adapted network on ``qx [Q, *x]``."""
        return functional_call(self.net, self.adapt_task(theta, sx, sy, sm, steps=steps), (qx,))

    def compiled_meta_loss(self) -> Callable[..., tuple[Tensor, dict[str, float]]]:
        """With a loop over tasks, compile one task's :meth:`task_outputs` and call it for every task.

        The whole meta-loss would trace into one graph holding every task's copy (minutes to
        compile for Conv-4); one task's graph compiles once and is reused. Learners with their
        own meta-loss (Reptile, iMAML), and the vmap path, compile the whole meta-loss.
        """
        if self.batching != "loop" or type(self).meta_loss is not GradientLearner.meta_loss:
            return super().compiled_meta_loss()
        self._compiled_task = torch.compile(self.task_outputs)
        return self.meta_loss

    def apply_tasks(self, phi: Params, x: Tensor) -> Tensor:
        """The network with per-task parameters ``phi [T, ...]`` on ``x [T, P, *x]`` -> ``[T, P, out]``."""
        return map_tasks(lambda p, xt: functional_call(self.net, p, (xt,)), phi, x, batching=self.batching)

    def query_loss(self, phi: Params, episode: Episode) -> Tensor:
        """The query loss (MSE or cross-entropy, masked) of adapted parameters ``phi [T, ...]``."""
        return self.outputs_loss(self.apply_tasks(phi, episode.query_x), episode)

    def outputs_loss(self, out: Tensor, episode: Episode) -> Tensor:
        """The query loss (MSE or cross-entropy, masked) of the adapted networks' outputs ``out [T, Q, out]``.

        NaN when the inner loop diverged (non-finite outputs), so that the trainer
        stops with :class:`~metalens.train.TrainingDiverged` (lower ``inner_lr`` then).
        """
        loss = query_loss(self.output_distribution(out), episode.query_y, episode.query_mask, kind=self.spec.kind,
                          mse=True)
        # no Python branch on a tensor: torch.compile traces the whole meta-loss as one graph
        return torch.where(torch.isfinite(out).all(), loss, torch.full_like(loss, float("nan")))

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        """Adapt to each support set with ``eval_inner_steps`` steps, then predict the queries.

        Under ``torch.no_grad`` (the evaluator) no graph is kept: ``torch.func.grad``
        still computes the inner gradients. Tasks are independent: where the inner loop
        diverges on a task (its rate above ``2 / lambda_max`` of that task's support loss; see
        :mod:`metalens.theory.curvature`), that task's predictions are non-finite and the
        others are unaffected. The evaluator counts such tasks apart
        (:attr:`metalens.evaluate.Evaluation.diverged`); ``inner_lr_cap = "curvature"`` keeps
        every task's rate below ``c / lambda_max``.
        """
        out = self.adapt_and_apply(self.theta(), support_x, support_y, support_mask, query_x, steps=self.eval_steps)
        return self.output_distribution(out)

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """MAML's meta-objective: the query loss after ``inner_steps`` steps, differentiated through them.

        ``L(theta) = mean_t L_Q_t(adapt(theta, S_t))`` (Finn et al. 2017, eq. 1). With
        ``meta_batches = "independent"`` (MAML, FOMAML): :meth:`independent_meta_loss`.
        """
        if getattr(self.config, "meta_batches", "shared") == "independent":
            return self.independent_meta_loss(episode)
        out = self.adapt_and_apply(self.theta(), episode.support_x, episode.support_y, episode.support_mask,
                                   episode.query_x, steps=self.config.inner_steps, compiled=True)
        loss = self.outputs_loss(out, episode)
        return loss, {"loss": float(loss.detach())}

    def independent_meta_loss(self, episode: Episode) -> tuple[Tensor, dict[str, float]]:
        """The meta-loss whose gradient uses three independent batches per task (Fallah et al. 2020, eq. 8)::

            phi_t = adapt(theta, D_in)                      D_in: the support set (as at prediction time)
            g_t   = prod_i (I - alpha H(phi_i; D_h)) grad L(phi_t; D_o)

        ``D_o``: the even-numbered query points, ``D_h``: the odd-numbered ones (:func:`split_points`;
        at least 2 query points per task). Splitting the query set keeps the inner step exactly as at
        prediction time, on the whole support set. Each batch being independent of the others, ``g_t``
        is unbiased for the gradient of the meta-objective with every loss an expectation over the
        task's data (exactly, for quadratic losses; see :mod:`metalens.theory.convergence`), which the
        shared estimator is not: its Hessian and its inner step see the same points. The logged
        ``loss`` is the query loss on ``D_o``.
        """
        if episode.n_query < 2:
            raise ValueError(f"meta_batches = independent splits each task's query set in two and needs at least 2 "
                             f"query points per task, got {episode.n_query}")
        (qx, qy, qm), (hx, hy, hm) = split_points(episode.query_x, episode.query_y, episode.query_mask)
        theta = self.theta()

        def one(sx: Tensor, sy: Tensor, sm: Tensor | None, hx_t: Tensor, hy_t: Tensor, hm_t: Tensor | None,
                qx_t: Tensor) -> Tensor:
            phi = self.adapt_task(theta, sx, sy, sm, steps=self.config.inner_steps, hessian_batch=(hx_t, hy_t, hm_t))
            return functional_call(self.net, phi, (qx_t,))

        out = map_tasks(one, episode.support_x, episode.support_y, episode.support_mask, hx, hy, hm, qx,
                        batching=self.batching)
        loss = query_loss(self.output_distribution(out), qy, qm, kind=self.spec.kind, mse=True)
        loss = torch.where(torch.isfinite(out).all(), loss, torch.full_like(loss, float("nan")))
        return loss, {"loss": float(loss.detach())}


@LEARNERS.register("maml")
class MAML(GradientLearner):
    """MAML: learned initialisation, second-order meta-gradient through the inner steps (Finn et al. 2017)."""

    Config = MAMLConfig


@LEARNERS.register("fomaml")
class FOMAML(GradientLearner):
    """First-order MAML: the inner gradients are held constant in the meta-gradient (Finn et al. 2017)."""

    Config = MAMLConfig
    first_order = True


@dataclass(frozen=True)
class MetaSGDConfig(GradientConfig):
    """Options of Meta-SGD (its learned rates are tuned to ``inner_steps``, so evaluation takes as many)."""

    eval_inner_steps: int | None = opt(None, "inner steps when predicting (evaluation); null or 0: inner_steps",
                                       ge=0)

    def check(self) -> None:
        super().check()
        if self.inner_lr_cap != "none":
            raise ValueError("inner_lr_cap caps one inner rate, and Meta-SGD learns a rate per parameter: leave "
                             "inner_lr_cap = none")


@LEARNERS.register("metasgd")
class MetaSGD(GradientLearner):
    """Meta-SGD: MAML with a meta-learned inner learning rate per parameter element (Li et al. 2017)."""

    Config = MetaSGDConfig

    def __init__(self, spec: TaskSpec, config: MetaSGDConfig | None = None) -> None:
        super().__init__(spec, config)
        # alpha[i] has the shape of the i-th backbone parameter (ParameterList: names hold dots)
        self.alpha = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, self.config.inner_lr)) for p in self.net.parameters()])

    def alphas(self) -> Params:
        """The learned rates by parameter name."""
        return {k: a for (k, _), a in zip(self.net.named_parameters(), self.alpha)}

    def step_rule(self) -> StepRule:
        return per_parameter_sgd(self.alphas())


@LEARNERS.register("anil")
class ANIL(GradientLearner):
    """ANIL: only the head is adapted in the inner loop; the body is meta-trained (Raghu et al. 2020)."""

    Config = GradientConfig

    def __init__(self, spec: TaskSpec, config: GradientConfig | None = None) -> None:
        super().__init__(spec, config)
        self.adapted = head_names(self.net)


@dataclass(frozen=True)
class ReptileConfig(GradientConfig):
    """Options of Reptile."""

    inner_steps: int = opt(5, "inner SGD steps from theta to phi in meta-training (0 would give no meta-gradient)",
                           ge=1)
    inner_data: Literal["support", "support+query"] = opt(
        "support", "points the inner steps fit in meta-training: support, or support and query points")


@LEARNERS.register("reptile")
class Reptile(GradientLearner):
    """Reptile: move the initialisation toward the parameters adapted to each task (Nichol et al. 2018)."""

    Config = ReptileConfig

    def __init__(self, spec: TaskSpec, config: ReptileConfig | None = None) -> None:
        super().__init__(spec, config)

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Surrogate whose gradient is Reptile's update direction (Nichol et al. 2018, alg. 2).

        Each task runs ``inner_steps`` SGD steps (rate ``inner_lr``, no graph) from
        ``theta`` to ``phi_t`` on its support set, or on support and query points
        together with ``inner_data="support+query"``. The gradient of the returned
        loss is ``theta - mean_t phi_t`` (each task weighs the same), so one outer
        SGD step of rate ``epsilon`` gives ``theta + epsilon (mean_t phi_t - theta)``.
        The logged ``loss`` is the query loss at ``phi`` (with ``support+query`` the
        query points were fitted, so it is an in-sample loss).
        """
        theta = self.theta()
        theta0 = {k: v.detach() for k, v in theta.items()}
        x, y, m = episode.support_x, episode.support_y, episode.support_mask
        if self.config.inner_data == "support+query":
            x, y = torch.cat([x, episode.query_x], 1), torch.cat([y, episode.query_y], 1)
            if m is not None or episode.query_mask is not None:
                m = torch.cat([_ones_if_none(m, episode.n_tasks, episode.n_support, x.device),
                               _ones_if_none(episode.query_mask, episode.n_tasks, episode.n_query, x.device)], 1)
        phi = self.adapt_tasks(theta0, x, y, m, steps=self.config.inner_steps)
        with torch.no_grad():
            q = self.query_loss(phi, episode)
        direction = {k: theta0[k] - phi[k].mean(0) for k in theta0}
        return surrogate_loss(theta, direction), {"loss": float(q)}


def _ones_if_none(mask: Tensor | None, T: int, n: int, device: torch.device) -> Tensor:
    return mask if mask is not None else torch.ones(T, n, dtype=torch.bool, device=device)


@dataclass(frozen=True)
class IMAMLConfig(GradientConfig):
    """Options of implicit MAML."""

    inner_steps: int = opt(10, "inner gradient steps on the regularised support loss in meta-training", ge=0)
    lam: float = opt(1.0, "lambda: weight of the proximal term lambda/2 ||phi - theta||^2 (inner_lr * lam < 2)",
                     gt=0)
    cg_steps: int = opt(5, "conjugate-gradient iterations for (I + H/lambda)^-1 grad L_Q", ge=1)
    cg_damping: float = opt(0.0, "damping d: solve ((1 + d) I + H/lambda) x = grad L_Q (keeps it positive definite)",
                            ge=0)
    inner_solver: Literal["bb", "gd"] = opt(
        "bb", "inner steps: bb (Barzilai-Borwein rates from inner_lr, capped at 1/lam, never raising the inner "
              "objective; see solve_proximal) or gd (fixed inner_lr)")

    def check(self) -> None:
        super().check()
        if not self.inner_lr * self.lam < 2:
            raise ValueError(f"inner_lr * lam must be < 2 or the inner steps diverge on the proximal term, "
                             f"got {self.inner_lr} * {self.lam}; lower inner_lr or lam")
        if self.inner_lr_cap != "none" and self.inner_solver == "bb":
            raise ValueError("inner_lr_cap applies to inner_solver = gd (bb chooses its own rates, at most 1/lam): "
                             "set inner_solver = gd or inner_lr_cap = none")


@LEARNERS.register("imaml")
class IMAML(GradientLearner):
    """Implicit MAML: proximal inner problem, meta-gradient by the implicit function theorem (Rajeswaran et al. 2019)."""

    Config = IMAMLConfig
    # ~35 ms a step: a smaller budget; rare meta-gradient spikes (where H is indefinite) are clipped

    def __init__(self, spec: TaskSpec, config: IMAMLConfig | None = None) -> None:
        super().__init__(spec, config)

    @property
    def proximal(self) -> float:
        return self.config.lam

    def adapt_task(self, theta: Params, sx: Tensor, sy: Tensor, sm: Tensor | None, *, steps: int) -> Params:
        """One task's inner problem, by :func:`solve_proximal` (``inner_solver = bb``) or :func:`adapt`."""
        c = self.config
        if c.inner_solver == "gd":
            return super().adapt_task(theta, sx, sy, sm, steps=steps)
        return solve_proximal(self.net, theta, sx, sy, sm, lam=c.lam, steps=steps, lr=c.inner_lr,
                              classification=self.spec.is_classification)

    def meta_loss(self, episode: Episode, *, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Surrogate whose gradient is the implicit meta-gradient (Rajeswaran et al. 2019, alg. 1-2).

        The inner problem ``min_phi L_S(phi) + lam/2 ||phi - theta||^2`` is solved
        approximately by ``inner_steps`` gradient steps from ``theta`` without a graph
        (memory does not grow with the steps). With ``b_t = grad_{phi_t}`` of the
        episode's query loss (the same masked mean as MAML's, so ``b_t`` carries the
        task's weight, ``1/T`` without masks), each task's meta-gradient
        ``g_t = (I + H_t/lam)^-1 b_t`` comes from :func:`implicit_meta_gradient`, and
        the loss returned has gradient ``sum_t g_t`` in ``theta``. The logged ``loss``
        is the real query loss at ``phi``.
        """
        c = self.config
        theta = self.theta()
        theta0 = {k: v.detach() for k, v in theta.items()}
        phi = self.adapt_tasks(theta0, episode.support_x, episode.support_y, episode.support_mask,
                               steps=c.inner_steps)
        phi = {k: v.contiguous() for k, v in phi.items()}  # vmap returns 0 steps as expanded views
        b, q = grad_and_value(lambda p: self.query_loss(p, episode))(phi)  # b: [T, ...] per task

        def one(phi_t: Params, b_t: Params, sx: Tensor, sy: Tensor, sm: Tensor | None) -> Params:
            return implicit_meta_gradient(self.net, phi_t, b_t, sx, sy, sm, lam=c.lam, cg_steps=c.cg_steps,
                                          damping=c.cg_damping, classification=self.spec.is_classification)

        g = map_tasks(one, phi, b, episode.support_x, episode.support_y, episode.support_mask,
                      batching=self.batching)
        residual = map_tasks(lambda p, sx, sy, sm: self.inner_residual(theta0, p, sx, sy, sm), phi,
                             episode.support_x, episode.support_y, episode.support_mask, batching=self.batching)
        return surrogate_loss(theta, {k: v.sum(0) for k, v in g.items()}), {
            "loss": float(q), "inner_residual": float(residual.median())}

    def inner_residual(self, theta: Params, phi: Params, sx: Tensor, sy: Tensor, sm: Tensor | None) -> Tensor:
        """How far ``phi`` is from solving one task's inner problem (the implicit gradient assumes it does).

        ``||grad L_S(phi) + lam (phi - theta)|| / ||grad L_S(theta)||``: 0 at the solution, 1
        where no step was taken. The trainer logs its median over the episode's tasks as
        ``inner_residual``; where it stays large, take more (or smaller) inner steps, or a larger lam.
        """
        kind = self.spec.is_classification
        g_phi = support_grad(self.net, phi, sx, sy, sm, classification=kind)
        g_theta = support_grad(self.net, theta, sx, sy, sm, classification=kind)
        r = _norm({k: g_phi[k] + self.config.lam * (phi[k] - theta[k]) for k in phi})
        return r / _norm(g_theta).clamp_min(1e-12)
