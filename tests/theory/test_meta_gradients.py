"""Per-task meta-gradients against the learners' meta-losses, closed forms, finite differences and loops (float64);
the variance of batch means against its expectation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import metalens
from metalens.episode import Episode
from metalens.learners.gradient import support_grad, support_loss
from metalens.nets import MLP
from metalens.rng import seeded_init
from metalens.theory.meta_gradients import (batch_mean_variance, cosine, flat, gradient_alignment, loglog_slope,
                                            meta_gradient, relative_error, reptile_direction, task_meta_gradients,
                                            task_reptile_directions)

SEED = 0


def _episode(T: int = 4, S: int = 5, Q: int = 6, seed: int = SEED) -> Episode:
    print(f"seed {seed}")
    ep = metalens.make_task("sinusoid", shots=S, queries=Q).eval_episodes(seed, T)
    return Episode(ep.support_x.double(), ep.support_y.double(), ep.query_x.double(), ep.query_y.double())


def _net(hidden=(8, 8), seed: int = SEED):
    with seeded_init(seed):  # initial weights from the seed alone
        net = MLP((1,), 1, hidden=hidden).double()
    return net, {k: v.detach().clone() for k, v in net.named_parameters()}


@pytest.mark.parametrize("name, first_order", [("maml", False), ("fomaml", True)])
@pytest.mark.parametrize("steps", [1, 3])
def test_task_average_is_the_gradient_of_the_learners_meta_loss(name, first_order, steps):
    ep = _episode()
    family = metalens.make_task("sinusoid", shots=5, queries=6)
    learner = metalens.make_learner(name, family, hidden=[8, 8], inner_lr=0.05, inner_steps=steps).double()
    loss, _ = learner.meta_loss(ep)
    expected = torch.autograd.grad(loss, list(learner.net.parameters()))
    theta = {k: v.detach() for k, v in learner.net.named_parameters()}
    g = task_meta_gradients(learner.net, theta, ep, alpha=0.05, steps=steps, first_order=first_order)
    for v, e in zip(g.values(), expected):
        torch.testing.assert_close(v.mean(0), e, rtol=1e-10, atol=1e-12)


def test_maml_meta_gradient_against_finite_differences():
    ep = _episode(T=1)
    net, theta = _net()
    sx, sy, qx, qy = ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0]
    g = meta_gradient(net, theta, sx, sy, qx, qy, alpha=0.03, steps=2)

    def objective(th):
        phi = dict(th)
        for _ in range(2):
            gs = support_grad(net, phi, sx, sy, None, classification=False)
            phi = {k: phi[k] - 0.03 * gs[k] for k in phi}
        return float(support_loss(net, phi, qx, qy, None, classification=False))

    eps = 1e-6
    for k in ("layers.0.weight", "layers.4.bias"):
        for idx in [(0, 0), (3, 0)] if k.endswith("weight") else [(0,)]:
            plus, minus = copy.deepcopy(theta), copy.deepcopy(theta)
            plus[k][idx] += eps
            minus[k][idx] -= eps
            fd = (objective(plus) - objective(minus)) / (2 * eps)
            assert abs(fd - float(g[k][idx])) < 1e-7 * max(1.0, abs(fd))


def test_one_step_on_a_linear_model_in_closed_form():
    # y = w x + b: features (x, 1); H_S = 2 F_S^T F_S / S; MAML: (I - alpha H_S) grad L_Q(phi); FOMAML: grad L_Q(phi)
    ep = _episode(T=1)
    net, theta = _net(hidden=())
    sx, sy, qx, qy = ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0]
    F_s, F_q = torch.cat([sx, torch.ones_like(sx)], 1), torch.cat([qx, torch.ones_like(qx)], 1)
    w = torch.cat([theta["layers.0.weight"][0], theta["layers.0.bias"]])
    grad = lambda F, y, v: 2 * F.T @ (F @ v - y[:, 0]) / F.shape[0]  # noqa: E731
    phi = w - 0.1 * grad(F_s, sy, w)
    H = 2 * F_s.T @ F_s / F_s.shape[0]
    maml = (torch.eye(2, dtype=torch.float64) - 0.1 * H) @ grad(F_q, qy, phi)
    for first_order, expected in ((False, maml), (True, grad(F_q, qy, phi))):
        g = meta_gradient(net, theta, sx, sy, qx, qy, alpha=0.1, steps=1, first_order=first_order)
        torch.testing.assert_close(torch.cat([g["layers.0.weight"][0], g["layers.0.bias"]]), expected,
                                   rtol=1e-12, atol=1e-13)


def test_reptile_direction_is_the_mean_inner_gradient():
    ep = _episode(T=1)
    net, theta = _net()
    sx, sy = ep.support_x[0], ep.support_y[0]
    phi, total = dict(theta), {k: torch.zeros_like(v) for k, v in theta.items()}
    for _ in range(3):
        gs = support_grad(net, phi, sx, sy, None, classification=False)
        total = {k: total[k] + gs[k] / 3 for k in total}
        phi = {k: phi[k] - 0.02 * gs[k] for k in phi}
    d = reptile_direction(net, theta, sx, sy, alpha=0.02, steps=3)
    for k in theta:
        torch.testing.assert_close(d[k], total[k], rtol=1e-9, atol=1e-12)
    one = reptile_direction(net, theta, sx, sy, alpha=0.7, steps=1)  # k = 1: the support gradient, any alpha
    for k, v in support_grad(net, theta, sx, sy, None, classification=False).items():
        torch.testing.assert_close(one[k], v, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        reptile_direction(net, theta, sx, sy, alpha=0.1, steps=0)


def test_vmap_chunks_and_loop_agree():
    ep = _episode(T=5)
    net, theta = _net()
    a = task_meta_gradients(net, theta, ep, alpha=0.05, steps=2, batching="vmap", chunk=2)
    b = task_meta_gradients(net, theta, ep, alpha=0.05, steps=2, batching="loop")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    r1 = task_reptile_directions(net, theta, ep, alpha=0.05, steps=2, chunk=3)
    r2 = task_reptile_directions(net, theta, ep, alpha=0.05, steps=2, batching="loop")
    torch.testing.assert_close(flat(r1), flat(r2), rtol=1e-10, atol=1e-12)
    assert flat(a).shape == (5, sum(v.numel() for v in theta.values()))


def test_gradient_alignment_against_a_loop():
    ep = _episode(T=3)
    net, theta = _net()
    dots = []
    for t in range(3):
        g1 = support_grad(net, theta, ep.support_x[t], ep.support_y[t], None, classification=False)
        g2 = support_grad(net, theta, ep.query_x[t], ep.query_y[t], None, classification=False)
        dots.append(sum(float((g1[k] * g2[k]).sum()) for k in g1))
    assert abs(float(gradient_alignment(net, theta, ep)) - np.mean(dots)) < 1e-10


def test_batch_mean_variance_by_hand_and_in_expectation():
    g = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 3.0], [6.0, 3.0], [9.0, 9.0]])
    means = torch.tensor([[1.0, 1.0], [5.0, 3.0]])  # the 5th task is left out at B = 2
    assert batch_mean_variance(g, 2) == pytest.approx(float(((means - means.mean(0)) ** 2).sum()))
    # i.i.d. Gaussian vectors with covariance diag(1, 4, 9): E = 14 / B
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(1 << 15, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for B in (1, 4, 16):
        assert batch_mean_variance(x, B) == pytest.approx(14 / B, rel=0.1)
    with pytest.raises(ValueError, match="at least 2 disjoint batches"):
        batch_mean_variance(g, 3)


def test_small_statistics():
    assert loglog_slope([1, 10, 100], [5, 0.5, 0.05]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="positive, finite"):
        loglog_slope([1, 2], [0.0, 1.0])
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(4 / 3)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])) == pytest.approx(-1.0)
