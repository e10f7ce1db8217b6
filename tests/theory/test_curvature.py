"""Curvature of support losses: Lanczos and Hessian-vector products against dense linear algebra, vmap against a
loop over tasks, and the stability law of gradient descent that the inner-loop cap relies on. Seeds: ``SEED``."""

from __future__ import annotations

import pytest
import torch
from torch.func import hessian, vmap

from metalens.learners.gradient import lanczos_start, support_loss
from metalens.nets import MLP
from metalens.rng import seeded_init
from metalens.theory.curvature import (
    capped_rate,
    extreme_eigenvalues,
    flatten,
    gd_growth,
    hessian_vector_product,
    lanczos,
    power_iteration,
    unflatten,
)

SEED = 0
F64 = torch.float64


def random_symmetric(n: int, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    return (a + a.T) / 2


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_lanczos_finds_the_extreme_eigenvalues_of_symmetric_matrices(reorthogonalize):
    for seed in range(5):
        A = random_symmetric(30, seed=seed)
        exact = torch.linalg.eigvalsh(A)
        v0 = torch.randn(30, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
        ritz = lanczos(lambda v, A=A: A @ v, v0, steps=30, reorthogonalize=reorthogonalize)
        print(f"seed={seed} exact=({exact[0]:.6f}, {exact[-1]:.6f}) lanczos=({ritz[0]:.6f}, {ritz[-1]:.6f})")
        assert torch.allclose(ritz[[0, -1]], exact[[0, -1]], atol=1e-8)
        # fewer iterations: Ritz values lie inside the spectrum (interlacing)
        few = lanczos(lambda v, A=A: A @ v, v0, steps=8, reorthogonalize=reorthogonalize)
        assert exact[0] - 1e-9 <= few[0] and few[-1] <= exact[-1] + 1e-9


def test_power_iteration_finds_the_eigenvalue_of_largest_magnitude():
    A = torch.diag(torch.tensor([5.0, -1.0, 2.0, 0.5], dtype=F64))
    assert float(power_iteration(lambda v: A @ v, torch.ones(4, dtype=F64), steps=200)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        power_iteration(lambda v: v, torch.ones(2), steps=0)


def _task(seed: int, shots: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shots, 1, generator=g, dtype=F64) * 10 - 5
    return x, 3 * torch.sin(x - 1.0)


def _net():
    with seeded_init(SEED):
        net = MLP((1,), 1, hidden=(5, 5)).to(F64)
    return net, {k: v.detach() for k, v in net.named_parameters()}


def test_hessian_vector_product_and_lanczos_against_the_dense_hessian_of_a_network_loss():
    net, theta = _net()
    x, y = _task(SEED)
    loss = lambda p: support_loss(net, p, x, y, None, classification=False)
    flat = lambda v: loss(unflatten(v, theta))
    H = hessian(flat)(flatten(theta))  # [P, P]
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
    hv = flatten(hessian_vector_product(loss, theta, unflatten(v, theta)))
    assert torch.allclose(hv, H @ v, atol=1e-10)
    exact = torch.linalg.eigvalsh(H)
    lo, hi = extreme_eigenvalues(loss, theta, lanczos_start(theta), steps=40)
    print(f"seed={SEED} exact=({exact[0]:.6f}, {exact[-1]:.6f}) lanczos=({lo:.6f}, {hi:.6f})")
    assert float(hi) == pytest.approx(float(exact[-1]), rel=1e-6)
    assert float(lo) == pytest.approx(float(exact[0]), rel=1e-4, abs=1e-6)


def test_vmapped_curvature_equals_a_loop_over_tasks():
    net, theta = _net()
    xs, ys = zip(*(_task(s) for s in range(4)))
    X, Y = torch.stack(xs), torch.stack(ys)
    v0 = lanczos_start(theta)

    def one(x, y):
        return torch.stack(extreme_eigenvalues(lambda p: support_loss(net, p, x, y, None, classification=False),
                                               theta, v0, steps=12))

    batched = vmap(one, randomness="error")(X, Y)
    looped = torch.stack([one(X[t], Y[t]) for t in range(4)])
    assert torch.allclose(batched, looped, rtol=1e-9, atol=1e-9)


def test_gradient_descent_on_a_quadratic_grows_by_exactly_gd_growth_and_the_cap_makes_it_contract():
    lam = torch.tensor([1.0, 30.0, 300.0], dtype=F64)  # H = diag(lam), loss = x^T H x / 2
    alpha, n = 0.01, 12
    x = torch.ones(3, dtype=F64)
    for _ in range(n):  # a plain loop of gradient steps
        x = x - alpha * lam * x
    assert torch.allclose(x.abs(), gd_growth(lam, alpha, n))
    assert bool(gd_growth(lam, alpha, n)[-1] > 1) and bool((gd_growth(lam, alpha, n)[:2] < 1).all())  # 0.01*300 > 2
    rate = capped_rate(alpha, lam.max(), c=1.0)
    assert float(rate) == pytest.approx(1 / 300)
    assert bool((gd_growth(lam, float(rate), n) <= 1).all())
    assert torch.equal(capped_rate(alpha, torch.tensor([-5.0, 0.0]), c=1.0), torch.tensor([0.01, 0.01]))
