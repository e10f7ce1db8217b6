"""MAML's convergence theory on linear tasks: the closed forms against Monte Carlo, autograd and the learner itself,
and Lemma 1's bound against measured smoothness. Seeds are printed or fixed per test."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import metalens
from metalens.episode import Episode
from metalens.theory.convergence import (
    lemma1_bound,
    linear_meta_gradient,
    linear_meta_objective,
    loglog_slope,
    sgd_bound,
    sgd_step_size,
    shared_batch_expected_gradient,
    shared_batch_smoothness,
    stochastic_meta_gradient,
)

SEED = 0
F64 = torch.float64


def _episode(n: int, *, dim: int = 3, shots: int = 4, queries: int = 6, noise: float = 0.2, seed: int = SEED):
    fam = metalens.make_task("linear", dim=dim, shots=shots, queries=queries, noise_std=noise)
    ep = fam.sample(n, generator=torch.Generator().manual_seed(seed))
    return Episode(ep.support_x.to(F64), ep.support_y.to(F64), ep.query_x.to(F64), ep.query_y.to(F64))


@pytest.mark.parametrize("batches", ["shared", "independent"])
@pytest.mark.parametrize("steps", [1])
def test_closed_form_estimator_is_the_learners_meta_gradient(batches, steps):
    fam = metalens.make_task("linear", dim=3, shots=4, queries=6)
    ep = _episode(16)
    learner = metalens.make_learner("maml", fam, hidden=[], inner_lr=0.15, inner_steps=steps,
                                    meta_batches=batches).to(F64)
    loss, _ = learner.meta_loss(ep)
    loss.backward()
    lin = learner.net.layers[0]
    g = torch.cat([lin.weight.grad[0], lin.bias.grad])
    theta = torch.cat([lin.weight.detach()[0], lin.bias.detach()])
    closed = stochastic_meta_gradient(theta, ep.support_x, ep.support_y, ep.query_x, ep.query_y, alpha=0.15,
                                      batches=batches).mean(0)
    assert torch.allclose(g, closed, atol=1e-12)


def test_expectations_of_the_estimators_against_monte_carlo():
    """Shared batches: E g = grad F_K (biased for grad F); independent: E g = grad F. 4-sigma tolerances."""
    dim, shots, alpha = 3, 4, 0.2
    ep = _episode(40000, dim=dim, shots=shots, seed=SEED)
    theta = torch.tensor([0.7, -1.2, 0.4, 0.9], dtype=F64)
    exact = linear_meta_gradient(theta, alpha=alpha)
    for batches, target in (("shared", shared_batch_expected_gradient(theta, alpha=alpha, shots=shots, dim=dim)),
                            ("independent", exact)):
        g = stochastic_meta_gradient(theta, ep.support_x, ep.support_y, ep.query_x, ep.query_y, alpha=alpha,
                                     batches=batches)
        mean, se = g.mean(0), g.std(0) / np.sqrt(g.shape[0])
        print(f"seed={SEED} {batches}: mean={mean.tolist()} target={target.tolist()}")
        assert bool(((mean - target).abs() <= 4 * se).all()), (batches, mean, target, se)
    bias = shared_batch_expected_gradient(theta, alpha=alpha, shots=shots, dim=dim) - exact
    assert float(bias.norm()) > 10 * float(g.std(0).max() / np.sqrt(g.shape[0]))  # a bias the sample resolves


def test_the_exact_objective_is_the_expected_adapted_loss_with_population_losses():
    """F_N against Monte Carlo: N exact gradient steps on each task's expected loss |theta - u|^2 + s^2."""
    alpha, N, s = 0.1, 3, 0.3
    g = torch.Generator().manual_seed(SEED)
    d = 4
    u = torch.cat([torch.randn(200000, d, generator=g, dtype=F64) / np.sqrt(d), torch.zeros(200000, 1, dtype=F64)], 1)
    theta = torch.tensor([0.5, -0.3, 1.0, 0.2, -0.8], dtype=F64)
    phi = theta.expand_as(u)
    for _ in range(N):
        phi = phi - alpha * 2 * (phi - u)
    mc = ((phi - u) ** 2).sum(1) + s**2
    assert float(mc.mean()) == pytest.approx(float(linear_meta_objective(theta, alpha=alpha, steps=N, noise_std=s)),
                                             abs=4 * float(mc.std()) / np.sqrt(len(mc)))


def test_lemma1_bound_is_fallahs_form_below_1_over_L_and_reduces_to_it():
    for L, rho, g in itertools.product([0.5, 2.0, 10.0], [0.0, 0.3, 4.0], [0.0, 1.0, 7.0]):
        for alpha in np.linspace(1e-3, 1 / L, 7):
            assert lemma1_bound(L, rho, alpha, g) <= 4 * L + 2 * rho * alpha * g + 1e-12
        assert lemma1_bound(L, rho, 0.1, g, steps=1) == pytest.approx(L * (1 + 0.1 * L) ** 2 + rho * 0.1 *
                                                                      (1 + 0.1 * L) * g)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        lemma1_bound(1.0, 0.0, 0.1, 0.0, steps=0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lemma1_bound_holds_for_random_quadratic_tasks_by_finite_differences(steps):
    """The N-step meta-objective of random quadratic tasks: ||g(w) - g(u)|| / ||w - u|| <= L (1 + alpha L)^(2N)."""
    g = torch.Generator().manual_seed(SEED)
    p, T = 4, 6
    A = torch.randn(T, p, p, generator=g, dtype=F64)
    H = A @ A.transpose(1, 2) / p  # task Hessians (PSD)
    b = torch.randn(T, p, generator=g, dtype=F64)
    L = float(torch.linalg.eigvalsh(H).max())

    def meta(w):
        phi = w.expand(T, p)
        for _ in range(steps):
            phi = phi - 0.3 * ((H @ phi.unsqueeze(-1))[..., 0] - b)
        return (0.5 * (phi.unsqueeze(1) @ H @ phi.unsqueeze(-1)).squeeze() - (b * phi).sum(-1)).mean()

    grad = torch.func.grad(meta)
    worst = 0.0
    for _ in range(20):
        w, u = torch.randn(p, generator=g, dtype=F64), torch.randn(p, generator=g, dtype=F64)
        worst = max(worst, float((grad(w) - grad(u)).norm() / (w - u).norm()))
    print(f"seed={SEED} N={steps}: measured {worst:.4f}, bound {lemma1_bound(L, 0.0, 0.3, 0.0, steps=steps):.4f}")
    assert worst <= lemma1_bound(L, 0.0, 0.3, 0.0, steps=steps)


def test_shared_batch_smoothness_is_the_top_eigenvalue_of_2M():
    theta = torch.eye(6, dtype=F64)
    M2 = torch.stack([shared_batch_expected_gradient(t, alpha=0.2, shots=5, dim=5) for t in theta])  # rows: 2 M e_i
    assert float(torch.linalg.eigvalsh(M2).max()) == pytest.approx(shared_batch_smoothness(alpha=0.2, shots=5, dim=5))


def test_sgd_step_size_minimises_the_bound_and_gives_the_T_to_the_minus_half_rate():
    L, gap, var = 3.0, 2.0, 5.0
    for T in (10, 1000, 100000):
        best = sgd_step_size(L, gap, var, T)
        grid = np.linspace(best / 3, min(1 / L, 3 * best), 201)
        assert sgd_bound(L, gap, var, T, best) <= min(sgd_bound(L, gap, var, T, b) for b in grid) + 1e-12
    Ts = [1000, 10000, 100000]
    bounds = [sgd_bound(L, gap, var, T, sgd_step_size(L, gap, var, T)) for T in Ts]
    assert loglog_slope(Ts, bounds) == pytest.approx(-0.5)
