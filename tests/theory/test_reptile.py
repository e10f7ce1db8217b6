"""Reptile's expected update on quadratic tasks: exact updates against closed forms and loops, the expansion's
terms against autograd, and its error order (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from metalens.theory.reptile import (alignment, expansion, expansion_terms, expected_update, minibatch_gradients,
                                     minibatches, orders, pair_counts, random_quadratics, sgd_update)

SEED = 0


def _setup(schedule: str, k: int, T: int = 5, d: int = 4, seed: int = SEED):
    print(f"seed {seed}")
    A, c = random_quadratics(T, d, minibatches(schedule, k), generator=torch.Generator().manual_seed(seed))
    theta = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return theta, A, c


def test_sgd_update_on_one_quadratic_in_closed_form():
    theta, A, c = _setup("full", 4)
    I = torch.eye(4, dtype=torch.float64)
    for t in range(A.shape[0]):
        M = torch.linalg.matrix_power(I - 0.1 * A[t, 0], 4)  # phi_k - c = (I - alpha A)^k (theta - c)
        expected = (theta - c[t, 0]) - M @ (theta - c[t, 0])
        torch.testing.assert_close(sgd_update(theta, A, c, (0, 0, 0, 0), alpha=0.1)[t], expected, rtol=1e-12,
                                   atol=1e-13)


@pytest.mark.parametrize("schedule", ["full", "alternate", "fresh"])
def test_expected_update_is_the_mean_over_tasks_and_orders(schedule):
    theta, A, c = _setup(schedule, 3)
    total = torch.zeros(4, dtype=torch.float64)
    os_ = orders(schedule, 3)
    for o in os_:
        for t in range(A.shape[0]):
            phi = theta.clone()
            for a in o:
                phi = phi - 0.05 * A[t, a] @ (phi - c[t, a])
            total += (theta - phi) / (len(os_) * A.shape[0])
    torch.testing.assert_close(expected_update(theta, A, c, alpha=0.05, schedule=schedule, steps=3), total,
                               rtol=1e-12, atol=1e-14)


def test_the_terms_are_gradients_of_the_alignment_and_of_the_squared_norms():
    theta, A, c = _setup("fresh", 3)
    terms = expansion_terms(theta, A, c)

    def mean_pair_dot(th, same: bool):
        g = (A @ (th - c)[..., None])[..., 0]  # [T, m, d]
        gram = g @ g.transpose(-1, -2)
        m = g.shape[1]
        diag = gram.diagonal(dim1=-2, dim2=-1)
        return (diag.mean(-1) if same else (gram.sum((-1, -2)) - diag.sum(-1)) / (m * (m - 1))).mean()

    for same, key in ((False, "avg_grad_inner"), (True, "avg_grad_same")):
        th = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mean_pair_dot(th, same), th)
        # AvgGradInner = 1/2 grad E[g_a . g_b], AvgGradSame = 1/2 grad E[|g_a|^2]
        torch.testing.assert_close(terms[key], 0.5 * grad, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(terms["avg_grad"], minibatch_gradients(theta, A, c).mean((0, 1)))
    assert alignment(theta, A, c) == pytest.approx(float(mean_pair_dot(theta, False)), rel=1e-12)


@pytest.mark.parametrize("schedule", ["full", "alternate", "fresh"])
def test_two_steps_are_exactly_the_expansion(schedule):
    theta, A, c = _setup(schedule, 2)
    for alpha in (1e-3, 0.1, 0.5):
        torch.testing.assert_close(expected_update(theta, A, c, alpha=alpha, schedule=schedule, steps=2),
                                   expansion(theta, A, c, alpha=alpha, schedule=schedule, steps=2), rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("schedule", ["full", "alternate", "fresh"])
@pytest.mark.parametrize("k", [3, 4])
def test_the_residual_is_third_order_and_first_order_leaves_second(schedule, k):
    theta, A, c = _setup(schedule, k)

    def residual(alpha, order):
        exact = expected_update(theta, A, c, alpha=alpha, schedule=schedule, steps=k)
        return float((exact - expansion(theta, A, c, alpha=alpha, schedule=schedule, steps=k, order=order)).norm())

    assert residual(1e-3, 2) / residual(5e-4, 2) == pytest.approx(8.0, rel=0.02)
    assert residual(1e-3, 1) / residual(5e-4, 1) == pytest.approx(4.0, rel=0.02)


def test_the_papers_form_for_fresh_minibatches():
    # E[g_Reptile] = k AvgGrad - alpha k (k - 1) / 2 AvgGradInner  (Nichol et al. 2018, sec. 5.1)
    for k in (2, 3, 5):
        theta, A, c = _setup("fresh", k)
        t = expansion_terms(theta, A, c)
        paper = 0.01 * (k * t["avg_grad"] - 0.01 * k * (k - 1) / 2 * t["avg_grad_inner"])
        torch.testing.assert_close(expansion(theta, A, c, alpha=0.01, schedule="fresh", steps=k), paper)


def test_orders_and_pair_counts():
    for k in range(1, 7):
        assert pair_counts("fresh", k) == (k * (k - 1) / 2, 0.0)
        assert pair_counts("alternate", k) == ((k // 2) * ((k + 1) // 2), k * (k - 1) / 2 - (k // 2) * ((k + 1) // 2))
        assert pair_counts("full", k) == (0.0, k * (k - 1) / 2)
    assert set(orders("fresh", 3)) == set(itertools.permutations(range(3)))
    with pytest.raises(ValueError, match="schedule must be"):
        orders("random", 2)
    with pytest.raises(ValueError, match="steps must be <= 7"):
        orders("fresh", 8)
    theta, A, c = _setup("alternate", 3)
    with pytest.raises(ValueError, match="needs A \\[tasks, 3, d, d\\]"):
        expected_update(theta, A, c, alpha=0.1, schedule="fresh", steps=3)


def test_random_quadratics_are_symmetric_positive_definite_and_seeded():
    A, c = random_quadratics(3, 5, 2, generator=torch.Generator().manual_seed(SEED), eig_range=(0.5, 2.0))
    A2, c2 = random_quadratics(3, 5, 2, generator=torch.Generator().manual_seed(SEED), eig_range=(0.5, 2.0))
    assert torch.equal(A, A2) and torch.equal(c, c2)
    torch.testing.assert_close(A, A.transpose(-1, -2), rtol=0, atol=0)
    e = torch.linalg.eigvalsh(A)
    assert bool((e > 0.5 - 1e-12).all() and (e < 2.0 + 1e-12).all())
    with pytest.raises(ValueError, match="eig_range"):
        random_quadratics(1, 2, 1, generator=torch.Generator(), eig_range=(0.0, 1.0))
