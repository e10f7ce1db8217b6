"""Gaussian-clusters family: labels, sampler statistics, the predictive density against
Monte Carlo and numerical integration, and the Bayes classifier against nearest class mean."""

from __future__ import annotations

import math

import pytest
import torch

import metalens
from metalens.config import ConfigError
from metalens.tasks.clusters import Clusters, log_disk_probability

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def nearest_class_mean(ep, N: int) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(ep.support_y, N).double()
    means = onehot.transpose(1, 2) @ ep.support_x.double() / onehot.sum(1)[..., None]  # [T, N, 2]
    return torch.cdist(ep.query_x.double(), means).argmin(-1)  # [T, Q]


def test_labels_are_balanced_shuffled_and_int64():
    seed = 61
    family = Clusters(Clusters.Config(ways=4, shots=3, queries=2))
    ep = family.sample(200, generator=gen(seed))
    assert ep.support_y.dtype == ep.query_y.dtype == torch.int64
    assert ep.support_x.shape == (200, 12, 2) and ep.query_x.shape == (200, 8, 2)
    counts_s = torch.nn.functional.one_hot(ep.support_y, 4).sum(1)
    counts_q = torch.nn.functional.one_hot(ep.query_y, 4).sum(1)
    assert bool((counts_s == 3).all()) and bool((counts_q == 2).all()), f"seed {seed}"
    class_major = torch.arange(4).repeat_interleave(3)
    unshuffled = (ep.support_y == class_major).all(1).double().mean()
    assert float(unshuffled) < 0.05, f"seed {seed}: support order is not shuffled"
    # different tasks get different orders
    assert len({tuple(r) for r in ep.support_y.tolist()}) > 150, f"seed {seed}"


def test_class_means_are_uniform_on_the_disk_and_points_have_the_std():
    seed = 62
    R, s = 3.0, 0.5
    family = Clusters(Clusters.Config(ways=2, shots=100, queries=1, radius=R, std=s))
    ep = family.sample(2000, generator=gen(seed))
    onehot = torch.nn.functional.one_hot(ep.support_y, 2).double()
    xbar = onehot.transpose(1, 2) @ ep.support_x.double() / 100  # [T, 2, 2] ~ the means (sd 0.05)
    r = xbar.norm(dim=-1).reshape(-1)
    assert float(r.max()) < R + 0.25, f"seed {seed}"
    # uniform on the disk: P(|mu| < R / sqrt 2) = 1/2, E[theta] over (-pi, pi] = 0
    assert abs(float((r < R / math.sqrt(2)).double().mean()) - 0.5) < 0.03, f"seed {seed}"
    theta = torch.atan2(xbar[..., 1], xbar[..., 0]).reshape(-1)
    assert abs(float(theta.mean())) < 0.1, f"seed {seed}"
    resid = ep.support_x.double() - (onehot @ xbar)
    var = float((resid**2).sum()) / (2000 * 2 * 99 * 2)  # per coordinate, unbiased
    assert abs(math.sqrt(var) - s) < 0.01, f"seed {seed}: within-class std {math.sqrt(var):.3f}"


def test_disk_probability_closed_form_and_monte_carlo():
    R = 3.0
    v = torch.tensor([1e-3, 0.1, 1.0, 9.0], dtype=torch.float64)
    centred = log_disk_probability(torch.zeros(4, dtype=torch.float64), v, R).exp()
    assert torch.allclose(centred, 1 - torch.exp(-(R**2) / (2 * v)), atol=1e-12)  # Rayleigh CDF
    seed = 63
    rho = torch.tensor([0.5, 2.8, 3.3, 4.5], dtype=torch.float64)
    z = torch.randn(200_000, 2, generator=gen(seed), dtype=torch.float64)
    for var in (0.05, 0.7):
        got = log_disk_probability(rho, torch.full_like(rho, var), R).exp()
        inside = [((z * math.sqrt(var) + torch.stack([r, r * 0])).norm(dim=1) <= R) for r in rho]
        mc = torch.stack([i.double().mean() for i in inside])
        assert torch.allclose(got, mc, atol=4e-3), f"seed {seed}, var {var}: {got} vs {mc}"


def _posterior_mc(xs: torch.Tensor, R: float, s: float, n: int, seed: int) -> torch.Tensor:
    """Samples of a class mean given its support points xs [K, 2]: N(xbar, s^2/K) restricted to the disk."""
    K = xs.shape[0]
    mu = xs.mean(0) + s / math.sqrt(K) * torch.randn(n, 2, generator=gen(seed), dtype=torch.float64)
    return mu[mu.norm(dim=1) <= R]


@pytest.mark.parametrize("shots", [1, 3])
def test_predictive_density_matches_monte_carlo_on_a_single_class(shots):
    """log p(x | support of c) against (1/M) sum_m N(x; mu_m, s^2 I), mu_m from the posterior."""
    seed = 64 + shots
    R, s = 3.0, 1.0
    family = Clusters(Clusters.Config(ways=2, shots=shots, radius=R, std=s))
    g = gen(seed)
    centre = torch.tensor([2.6, 0.4], dtype=torch.float64)  # near the edge: the disk prior matters
    support = torch.randn(shots, 2, generator=g, dtype=torch.float64) * 0.7 + centre
    # class 1 is a far-away dummy; we read the density of class 0
    sx = torch.cat([support, torch.full((1, 2), -2.0, dtype=torch.float64)])[None]
    sy = torch.tensor([[0] * shots + [1]])
    qx = torch.tensor([[[0.0, 0.0], [2.5, 0.5], [4.0, 1.0], [3.5, -3.0], [-1.0, 3.0]]], dtype=torch.float64)
    logp = family.log_predictive_density(sx, sy, qx)[0, :, 0]
    mu = _posterior_mc(support, R, s, 400_000, seed)
    d2 = ((qx[0][:, None] - mu[None]) ** 2).sum(-1)  # [Q, M]
    mc = (torch.exp(-d2 / (2 * s**2)) / (2 * math.pi * s**2)).mean(1)
    assert torch.allclose(logp.exp(), mc, rtol=0.02, atol=1e-5), f"seed {seed}: {logp.exp()} vs {mc}"


def test_predictive_density_integrates_to_one():
    seed = 66
    family = Clusters(Clusters.Config(ways=3, shots=2, std=0.8))
    ep = family.sample(2, generator=gen(seed)).to(dtype=torch.float64)
    h = 0.1  # midpoint rule: spectrally accurate for smooth densities that vanish at the edges
    u = torch.arange(-7.5, 7.5, h, dtype=torch.float64) + h / 2
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(1, -1, 2).expand(2, -1, -1)
    logp = family.log_predictive_density(ep.support_x, ep.support_y, grid)  # [2, G, 3]
    total = logp.exp().sum(1) * h * h
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4), f"seed {seed}: {total}"


def test_class_without_support_gets_the_prior_predictive():
    seed = 67
    R, s = 2.0, 0.6
    family = Clusters(Clusters.Config(ways=2, radius=R, std=s))
    sx = torch.tensor([[[0.5, 0.5], [9.0, 9.0]]], dtype=torch.float64)
    sy = torch.tensor([[0, 1]])
    mask = torch.tensor([[True, False]])  # class 1 has no real support point
    qx = torch.tensor([[[0.0, 0.0], [1.9, 0.0], [2.5, 1.0]]], dtype=torch.float64)
    logp = family.log_predictive_density(sx, sy, qx, support_mask=mask)[0, :, 1]
    g = gen(seed)
    r = R * torch.rand(400_000, generator=g, dtype=torch.float64).sqrt()  # uniform on the disk
    th = 2 * math.pi * torch.rand(400_000, generator=g, dtype=torch.float64)
    mu = torch.stack([r * torch.cos(th), r * torch.sin(th)], -1)
    mc = (torch.exp(-((qx[0][:, None] - mu) ** 2).sum(-1) / (2 * s**2)) / (2 * math.pi * s**2)).mean(1)
    assert torch.allclose(logp.exp(), mc, rtol=0.02), f"seed {seed}: {logp.exp()} vs {mc}"


def test_oracle_beats_nearest_class_mean_and_is_calibrated():
    """The disk prior pulls far-out support points in: the Bayes classifier must win (paired, 500 tasks)."""
    seed = 68
    family = Clusters()  # 5-way 1-shot, radius 3, std 1
    ep = family.sample(500, generator=gen(seed))
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    oracle = (d.logits.argmax(-1) == ep.query_y).double().mean(1)  # [T]
    ncm = (nearest_class_mean(ep, 5) == ep.query_y).double().mean(1)
    diff = oracle - ncm
    se = float(diff.std()) / math.sqrt(500)
    assert float(diff.mean()) > 3 * se, (
        f"seed {seed}: oracle {float(oracle.mean()):.3f} vs NCM {float(ncm.mean()):.3f} (se {se:.4f})")
    assert float(oracle.mean()) > 0.4, f"seed {seed}: accuracy {float(oracle.mean()):.3f}, chance is 0.2"
    # calibration of the exact posterior: mean confidence = accuracy
    conf = d.probs.max(-1).values.double().mean(1)
    gap = oracle - conf
    assert abs(float(gap.mean())) < 3 * float(gap.std()) / math.sqrt(500) + 1e-3, f"seed {seed}"
    # and its log-loss beats a softmax of negative squared distances to the class means
    onehot = torch.nn.functional.one_hot(ep.support_y, 5).float()
    means = onehot.transpose(1, 2) @ ep.support_x
    ncm_logits = -torch.cdist(ep.query_x, means) ** 2 / (2 * 2.0)  # predictive variance s^2 (1 + 1/K) = 2
    ncm_nll = torch.nn.functional.cross_entropy(ncm_logits.transpose(1, 2), ep.query_y)
    assert float(-d.log_prob(ep.query_y).mean()) < float(ncm_nll), f"seed {seed}"


def test_oracle_is_never_much_worse_than_nearest_class_mean_with_many_shots():
    """With many shots the prior hardly matters and both classifiers agree closely."""
    seed = 69
    family = Clusters(Clusters.Config(shots=10, queries=5))
    ep = family.sample(500, generator=gen(seed))
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    pred = d.logits.argmax(-1)
    ncm = nearest_class_mean(ep, 5)
    assert float((pred == ncm).double().mean()) > 0.95, f"seed {seed}"
    diff = (pred == ep.query_y).double().mean(1) - (ncm == ep.query_y).double().mean(1)
    assert float(diff.mean()) > -2 * float(diff.std()) / math.sqrt(500), f"seed {seed}"


def test_config_and_input_errors():
    with pytest.raises(ValueError, match=r"^ways must be >= 2, got 1$"):
        Clusters.Config(ways=1)
    with pytest.raises(ValueError, match=r"^std must be > 0, got 0.0$"):
        Clusters.Config(std=0.0)
    with pytest.raises(ConfigError, match=r"^task.ways must be >= 2, got 1$"):
        metalens.make_task("clusters", ways=1)
    with pytest.raises(ConfigError, match=r"^task.radius must be > 0, got -3.0$"):
        metalens.make_task("clusters", radius=-3)
    family = Clusters()
    with pytest.raises(ValueError, match=r"support_y holds labels outside \[0, 5\)"):
        family.oracle(torch.zeros(1, 2, 2), torch.tensor([[0, 5]]), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="support_y must be int64"):
        family.oracle(torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.zeros(1, 3, 2))
