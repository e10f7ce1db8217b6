"""GP family: sampler statistics and the oracle against direct float64 solves written here."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.distributions import Normal

import metalens
from metalens.config import ConfigError
from metalens.tasks.gp import GP, JITTER, KERNELS, kernel_matrix

torch.set_num_threads(1)

KERNELS_TESTED = ["rbf", "matern52", "periodic"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def k_direct(kernel: str, x1: torch.Tensor, x2: torch.Tensor, l: float, s2: float = 1.0) -> torch.Tensor:
    """The kernels as written in the gp module docstring, x1 [n], x2 [m] -> [n, m]."""
    r = x1[:, None] - x2[None, :]
    if kernel == "rbf":
        return s2 * torch.exp(-(r**2) / (2 * l**2))
    if kernel == "matern52":
        a = math.sqrt(5) * r.abs() / l
        return s2 * (1 + a + a**2 / 3) * torch.exp(-a)
    p, lp, lw = l, 1.0, 8 * l  # weakly periodic
    return s2 * torch.exp(-2 * torch.sin(math.pi * r.abs() / p) ** 2 / lp**2) * torch.exp(-(r**2) / (2 * lw**2))


def gp_direct(kernel, sx, sy, qx, l, s2, noise_var):
    """Posterior predictive of y at qx by a plain solve of (K + noise I). 1-D float64 inputs."""
    K = k_direct(kernel, sx, sx, l, s2) + noise_var * torch.eye(sx.numel(), dtype=torch.float64)
    Kq = k_direct(kernel, qx, sx, l, s2)
    mean = Kq @ torch.linalg.solve(K, sy)
    var = s2 - (Kq * torch.linalg.solve(K, Kq.T).T).sum(1) + noise_var
    log_ml = torch.distributions.MultivariateNormal(torch.zeros_like(sy), K).log_prob(sy)
    return mean, var, log_ml


def test_convcnp_weakly_periodic_kernel():
    """Default periodic kernel = Gordon et al. (2020): exp(-2 sin^2(4 pi r)) exp(-r^2 / 8)."""
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    r = x[:, None] - x[None, :]
    ref = torch.exp(-2 * torch.sin(4 * math.pi * r) ** 2 - r**2 / 8)
    assert torch.allclose(kernel_matrix("periodic", x, x, 0.25), ref, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS_TESTED)
def test_kernel_matrix_matches_the_formulas(kernel):
    x1 = torch.linspace(-2, 2, 7, dtype=torch.float64)
    x2 = torch.linspace(-1.3, 1.9, 5, dtype=torch.float64)
    got = kernel_matrix(kernel, x1, x2, 0.4, 1.7)
    assert torch.allclose(got, k_direct(kernel, x1, x2, 0.4, 1.7), atol=1e-12)
    batched = kernel_matrix(kernel, torch.stack([x1, x1]), torch.stack([x2, x2]), torch.tensor([0.4, 0.9]), 1.7)
    assert torch.allclose(batched[1], k_direct(kernel, x1, x2, 0.9, 1.7), atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS_TESTED)
def test_oracle_matches_a_direct_solve_on_masked_tasks(kernel):
    seed = 31
    family = GP(GP.Config(kernel=kernel, noise_std=0.1, signal_variance=1.5, max_context=12, max_target=9))
    ep = family.sample(6, generator=gen(seed)).to(dtype=torch.float64)
    assert ep.support_mask is not None and not bool(ep.support_mask.all()), f"seed {seed}: no padding to test"
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    noise_var = 0.1**2 + JITTER * 1.5
    for i in range(ep.n_tasks):
        m = ep.support_mask[i]
        sx, sy, qx = ep.support_x[i, m, 0], ep.support_y[i, m, 0], ep.query_x[i, :, 0]
        mean, var, _ = gp_direct(kernel, sx, sy, qx, 0.25, 1.5, noise_var)
        assert torch.allclose(d.mean[i, :, 0], mean, atol=1e-8), f"seed {seed}, task {i}"
        assert torch.allclose(d.variance[i, :, 0], var, atol=1e-8), f"seed {seed}, task {i}"
        # masked oracle == oracle on the unpadded task alone
        alone = family.oracle(ep.support_x[i : i + 1, m], ep.support_y[i : i + 1, m], ep.query_x[i : i + 1])
        assert torch.allclose(alone.mean[0], d.mean[i], atol=1e-10), f"seed {seed}, task {i}"
        assert torch.allclose(alone.stddev[0], d.stddev[i], atol=1e-10), f"seed {seed}, task {i}"


def test_oracle_is_calibrated_on_its_own_tasks():
    """Exact predictive: standardised query residuals are N(0, 1) (over many tasks)."""
    seed = 32
    family = GP(GP.Config(kernel="matern52"))
    ep = family.sample(400, generator=gen(seed))
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    z = ((ep.query_y - d.mean) / d.stddev)[..., 0][ep.query_mask].double()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n), f"seed {seed}: mean {float(z.mean()):.4f}"
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n), f"seed {seed}: variance {float(z.var()):.4f}"
    inside = (z.abs() < 1.6449).double().mean()  # 90% central interval
    assert abs(float(inside) - 0.9) < 0.01, f"seed {seed}: 90% interval covers {float(inside):.3f}"


@pytest.mark.parametrize("kernel", KERNELS_TESTED)
def test_samples_have_the_kernel_covariance(kernel):
    """Whitened by the Cholesky factor of k + noise (computed here), samples are iid N(0, 1)."""
    seed = 33
    family = GP(GP.Config(kernel=kernel, min_context=15, max_context=15, min_target=15, max_target=15))
    ep = family.sample(1000, generator=gen(seed)).to(dtype=torch.float64)
    x = torch.cat([ep.support_x, ep.query_x], 1)[..., 0]
    y = torch.cat([ep.support_y, ep.query_y], 1)[..., 0]
    zs = []
    for i in range(x.shape[0]):
        K = k_direct(kernel, x[i], x[i], 0.25) + (0.05**2 + JITTER) * torch.eye(30, dtype=torch.float64)
        zs.append(torch.linalg.solve_triangular(torch.linalg.cholesky(K), y[i, :, None], upper=False)[:, 0])
    z = torch.stack(zs)  # [1000, 30]
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n), f"seed {seed}"
    assert abs(float((z**2).mean()) - 1) < 5 * math.sqrt(2 / n), f"seed {seed}: E z^2 = {float((z**2).mean()):.4f}"
    C = z.T @ z / z.shape[0]  # [30, 30], should be the identity
    off = C - torch.diag(torch.diag(C))
    assert float(off.abs().max()) < 5 / math.sqrt(z.shape[0]), f"seed {seed}"


def test_rbf_empirical_covariance_by_distance():
    """E[y(x) y(x')] = k(|x - x'|) (+ noise at 0), estimated from pairs binned by distance."""
    seed = 34
    family = GP(GP.Config(min_context=20, max_context=20, min_target=20, max_target=20))
    ep = family.sample(2000, generator=gen(seed)).to(dtype=torch.float64)
    x = torch.cat([ep.support_x, ep.query_x], 1)[..., 0]
    y = torch.cat([ep.support_y, ep.query_y], 1)[..., 0]
    dist = (x[:, :, None] - x[:, None, :]).abs()
    prod = y[:, :, None] * y[:, None, :]
    off = ~torch.eye(40, dtype=torch.bool).expand_as(dist)
    dist, prod = dist[off], prod[off]
    for lo in (0.0, 0.1, 0.2, 0.3, 0.45, 0.6):
        sel = (dist >= lo) & (dist < lo + 0.05)
        d_mid = dist[sel]
        expect = torch.exp(-(d_mid**2) / (2 * 0.25**2)).mean()
        got = prod[sel].mean()
        assert abs(float(got - expect)) < 0.04, (
            f"seed {seed}: bin [{lo}, {lo + 0.05}) {float(got):.3f} vs {float(expect):.3f}")
    assert abs(float((y**2).mean()) - (1 + 0.05**2)) < 0.04, f"seed {seed}"


def test_counts_are_within_bounds_and_vary():
    seed = 35
    family = GP()
    ep = family.sample(300, generator=gen(seed))
    n_c, n_t = ep.support_mask.sum(1), ep.query_mask.sum(1)
    assert int(n_c.min()) >= 3 and int(n_c.max()) <= 50 and int(n_t.min()) >= 3 and int(n_t.max()) <= 50
    assert len(set(n_c.tolist())) > 20 and len(set(n_t.tolist())) > 20, f"seed {seed}: counts barely vary"
    assert ep.n_support == 50 and ep.n_query == 50
    # real points first; padded targets are 0 and padded inputs inside x_range
    prefix = torch.arange(50) < n_c[:, None]
    assert torch.equal(ep.support_mask, prefix), f"seed {seed}"
    assert bool((ep.support_y[~ep.support_mask] == 0).all()) and bool((ep.query_y[~ep.query_mask] == 0).all())
    assert float(ep.support_x.abs().max()) <= 2 and float(ep.query_x.abs().max()) <= 2
    # uniform counts: mean of U{3..50} is 26.5 (sd 13.9, 300 draws: standard error 0.8)
    assert abs(float(n_c.double().mean()) - 26.5) < 3.5, f"seed {seed}"


def test_fixed_counts_give_no_masks():
    ep = GP(GP.Config(min_context=5, max_context=5, min_target=7, max_target=7)).sample(3, generator=gen(36))
    assert ep.support_mask is None and ep.query_mask is None
    assert ep.support_x.shape == (3, 5, 1) and ep.query_x.shape == (3, 7, 1)
    ep = GP(GP.Config(min_context=5, max_context=5)).sample(3, generator=gen(36))
    assert ep.support_mask is None and ep.query_mask is not None


def test_random_lengthscales_are_log_uniform():
    seed = 37
    family = GP(GP.Config(lengthscale_range=(0.1, 1.6)))
    ls = family.sample_lengthscales(20000, generator=gen(seed))
    assert float(ls.min()) >= 0.1 and float(ls.max()) <= 1.6
    u = (ls.log() - math.log(0.1)) / math.log(16)  # should be U[0, 1]
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005, f"seed {seed}"


def test_random_lengthscale_oracle_is_the_posterior_mixture():
    """Mixture weights against a fine trapezoid over log l of prior x marginal likelihood (direct solves)."""
    seed = 38
    family = GP(GP.Config(lengthscale_range=(0.1, 1.0), max_context=15, max_target=5))
    ep = family.sample(3, generator=gen(seed)).to(dtype=torch.float64)
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    probs = d.mixture_distribution.probs  # [T, Q, 1, L]
    assert probs.shape == (3, 5, 1, 48), f"seed {seed}"
    assert torch.allclose(probs.sum(-1), torch.ones((), dtype=torch.float64)), f"seed {seed}"
    assert torch.equal(probs[:, :1].expand_as(probs), probs), "mixture weights differ across query points"
    noise_var = 0.05**2 + JITTER
    grid = torch.linspace(math.log(0.1), math.log(1.0), 801, dtype=torch.float64)
    for i in range(3):
        m = ep.support_mask[i]
        sx, sy, qx = ep.support_x[i, m, 0], ep.support_y[i, m, 0], ep.query_x[i, :, 0]
        outs = [gp_direct("rbf", sx, sy, qx, float(u.exp()), 1.0, noise_var) for u in grid]
        log_ml = torch.stack([o[2] for o in outs])
        w = torch.exp(log_ml - log_ml.max())
        w = torch.cat([w[:1] / 2, w[1:-1], w[-1:] / 2])  # trapezoid rule
        w = w / w.sum()
        mean = (w[:, None] * torch.stack([o[0] for o in outs])).sum(0)
        assert torch.allclose(d.mean[i, :, 0], mean, atol=2e-4), f"seed {seed}, task {i}"
        post_mean_logl = float((w * grid).sum())
        nodes = family.quadrature()[0].log()
        assert abs(float((probs[i, 0, 0] * nodes).sum()) - post_mean_logl) < 2e-4, f"seed {seed}, task {i}"


def test_tiny_lengthscale_range_reduces_to_the_fixed_lengthscale_gp():
    seed = 39
    fixed = GP(GP.Config(kernel="matern52", lengthscale=0.3))
    mixed = GP(GP.Config(kernel="matern52", lengthscale_range=(0.3, 0.3 * (1 + 1e-9)), oracle_nodes=8))
    ep = fixed.sample(5, generator=gen(seed)).to(dtype=torch.float64)
    a = fixed.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    b = mixed.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    assert isinstance(a, Normal) and not isinstance(b, Normal)
    assert torch.allclose(a.mean, b.mean, atol=1e-7), f"seed {seed}"
    assert torch.allclose(a.log_prob(ep.query_y), b.log_prob(ep.query_y), atol=1e-6), f"seed {seed}"


def test_noiseless_gp_is_handled_with_jitter():
    seed = 40
    family = GP(GP.Config(noise_std=0.0))
    ep = family.sample(20, generator=gen(seed))
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    lp = d.log_prob(ep.query_y)[..., 0][ep.query_mask]
    assert bool(torch.isfinite(lp).all()), f"seed {seed}"
    assert float(d.stddev.min()) >= math.sqrt(JITTER) * 0.99


@pytest.mark.parametrize("kernel", KERNELS_TESTED)
def test_wide_lengthscale_range_samples(kernel):
    """Long length scales make K near-singular; the jittered Cholesky must still succeed."""
    family = GP(GP.Config(kernel=kernel, lengthscale_range=(0.05, 4.0)))
    ep = family.sample(50, generator=gen(41))
    assert bool(torch.isfinite(ep.support_y).all())


def test_config_errors():
    with pytest.raises(ValueError, match="^kernel must be one of 'rbf', 'matern52', 'periodic', got 'cosine'$"):
        GP.Config(kernel="cosine")
    with pytest.raises(ValueError, match=r"^max_context must be >= min_context = 3, got 2$"):
        GP.Config(max_context=2)
    with pytest.raises(ValueError, match=r"^lengthscale_range values must be > 0, got \(0.0, 1.0\)$"):
        GP.Config(lengthscale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="^min_target must be >= 1, got 0$"):
        GP.Config(min_target=0)
    assert KERNELS == tuple(KERNELS_TESTED)


@pytest.mark.parametrize("options, message", [
    ({"kernel": "cosine"}, "task.kernel must be one of 'rbf', 'matern52', 'periodic', got 'cosine'"),  # a Literal
    ({"lengthscale": 0}, "task.lengthscale must be > 0, got 0.0"),  # gt
    ({"lengthscale_range": [2, 1]}, "task.lengthscale_range must be increasing (low < high), got (2.0, 1.0)"),
    ({"lengthscale_range": [0.1, float("inf")]}, "task.lengthscale_range must be finite, got (0.1, inf)"),
    ({"max_target": 2}, "task.max_target must be >= min_target = 3, got 2"),  # a rule between options
    ({"min_context": 5, "max_context": 4}, "task.max_context must be >= min_context = 5, got 4"),
])
def test_make_task_refuses_options_outside_their_declared_constraint(options, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        metalens.make_task("gp", **options)
