"""MAML as MAP: closed-form gradient descent, the implicit precision and the MAP estimate, against loops,
direct solves, the linear family's oracle and the learners' own inner loop (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import metalens
from metalens.learners.gradient import adapt, sgd
from metalens.theory.maml_map import (gradient_descent, gradient_descent_loop, implicit_precision, map_estimate,
                                      precision_mismatch, shrinkage, spectrum, support_hessian, true_precision)

SEED = 0


def _tasks(T: int, S: int, d: int, seed: int = SEED):
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, S, d, generator=g, dtype=torch.float64)
    y = torch.randn(T, S, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    return X, y, theta


@pytest.mark.parametrize("S, d", [(3, 6), (12, 4)])  # S < d (unseen directions) and S > d
@pytest.mark.parametrize("alpha, steps", [(0.01, 1), (0.05, 7), (0.1, 20)])  # alpha lambda < 2: convergent
def test_closed_form_gradient_descent_is_the_loop(S, d, alpha, steps):
    X, y, theta = _tasks(5, S, d)
    torch.testing.assert_close(gradient_descent(X, y, theta, alpha=alpha, steps=steps),
                               gradient_descent_loop(X, y, theta, alpha=alpha, steps=steps), rtol=0, atol=1e-12)


def test_the_loss_scaling_is_the_learners_support_loss():
    # adapt() on a bias-free linear network takes exactly the steps of gradient_descent_loop
    X, y, theta = _tasks(1, 7, 3)
    net = nn.Linear(3, 1, bias=False).double()
    phi = adapt(net, {"weight": theta[None]}, X[0], y[0, :, None], steps=4, step=sgd(0.1), classification=False)
    torch.testing.assert_close(phi["weight"][0], gradient_descent(X[0], y[0], theta, alpha=0.1, steps=4),
                               rtol=0, atol=1e-13)
    torch.testing.assert_close(support_hessian(X[0]), 2 * X[0].T @ X[0] / 7)


@pytest.mark.parametrize("S, d", [(3, 6), (12, 4)])
@pytest.mark.parametrize("alpha", [0.01, 0.06, 0.12])  # up to alpha lambda ~ 1.9
def test_gradient_steps_are_the_map_estimate_under_the_implicit_prior(S, d, alpha):
    X, y, theta = _tasks(6, S, d)
    for steps in range(1, 21):
        prior = lambda lam, n=steps: implicit_precision(lam, alpha=alpha, steps=n)  # noqa: E731
        torch.testing.assert_close(map_estimate(X, y, theta, precision=prior),
                                   gradient_descent_loop(X, y, theta, alpha=alpha, steps=steps), rtol=0, atol=1e-10)


def test_map_estimate_with_a_constant_precision_is_a_direct_solve_and_the_oracle():
    X, y, theta = _tasks(4, 10, 3)
    p = 0.7
    H = support_hessian(X)
    grad = 2 * (X.transpose(1, 2) @ ((X @ theta) - y)[..., None])[..., 0] / 10
    direct = theta - torch.linalg.solve(H + p * torch.eye(3, dtype=torch.float64), grad)
    torch.testing.assert_close(map_estimate(X, y, theta, precision=p), direct, rtol=0, atol=1e-12)
    # theta = 0 and the true precision: the conjugate posterior mean of the linear family
    family = metalens.make_task("linear", dim=3, shots=10, noise_std=0.5)
    xq = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p_star = true_precision(noise_var=0.25, prior_precision=3, shots=10)
    w = map_estimate(X, y, torch.zeros(3, dtype=torch.float64), precision=p_star)
    oracle = family.oracle(X, y[..., None], xq).mean
    torch.testing.assert_close((xq @ w[..., None]), oracle, rtol=0, atol=1e-12)


def test_unseen_directions_have_zero_curvature_and_an_infinitely_strong_prior():
    X, y, theta = _tasks(3, 2, 5)
    lam, V = spectrum(X)
    assert ((lam == 0).sum(-1) == 3).all()
    assert torch.isinf(implicit_precision(lam, alpha=0.1, steps=3)[lam == 0]).all()
    # neither the steps nor the MAP estimate move theta along the null space of X
    w = map_estimate(X, y, theta, precision=lambda l: implicit_precision(l, alpha=0.1, steps=3))
    null = V[..., :3]  # eigenvalues ascending: the first 3 columns span the null space
    torch.testing.assert_close(null.transpose(1, 2) @ (w - theta)[..., None],
                               torch.zeros(3, 3, 1, dtype=torch.float64), rtol=0, atol=1e-13)


def test_implicit_precision_values_and_its_limit():
    lam = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    p = implicit_precision(lam, alpha=0.2, steps=3)
    q = (1 - 0.2 * lam[1:]) ** 3
    torch.testing.assert_close(p[1:], lam[1:] * q / (1 - q), rtol=1e-13, atol=0)
    assert math.isinf(p[0]) and p[3] == 0  # alpha lambda = 1: one step reaches least squares
    assert implicit_precision(torch.tensor([1.0]), alpha=0.5, steps=0).isinf().all()  # no step
    for steps in (1, 2, 5, 20):
        for al in (1e-4, 1e-6, 1e-9):
            pan = float(implicit_precision(torch.tensor([al]), alpha=1.0, steps=steps)[0]) * steps
            # p alpha N = 1 - (N + 1) alpha lambda / 2 + O((alpha lambda)^2)
            assert abs(pan - (1 - (steps + 1) * al / 2)) < 2 * (steps * al) ** 2 + 1e-13


def test_shrinkage_is_exact_for_tiny_rates():
    s = shrinkage(torch.tensor([1e-14], dtype=torch.float64), alpha=1.0, steps=5)
    assert abs(float(s[0]) / 5e-14 - 1) < 1e-12  # 1 - (1 - x)^5 = 5x - 10x^2 + ...
    torch.testing.assert_close(shrinkage(torch.tensor([3.0]), alpha=0.5, steps=3),  # alpha lambda > 1
                               torch.tensor([1 - (-0.5) ** 3], dtype=torch.float64))


def test_precision_mismatch_is_zero_only_where_the_shrinkages_agree():
    lam = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    # one step of rate alpha shrinks lambda by alpha lambda = lambda / (lambda + p) for p = (1 - alpha lambda) / alpha
    one = torch.tensor([1.0], dtype=torch.float64)
    assert float(precision_mismatch(one, alpha=0.25, steps=1, target=3.0)) < 1e-30
    manual = ((shrinkage(lam, alpha=0.1, steps=4) - lam / (lam + 0.5)) ** 2).mean()
    torch.testing.assert_close(precision_mismatch(lam, alpha=0.1, steps=4, target=0.5), manual)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        shrinkage(torch.ones(1), alpha=0.0, steps=1)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        gradient_descent_loop(torch.ones(1, 1), torch.ones(1), torch.zeros(1), alpha=0.1, steps=-1)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        true_precision(noise_var=1.0, prior_precision=1.0, shots=0)
