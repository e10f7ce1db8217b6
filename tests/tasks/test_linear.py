"""Linear-regression family: sampler statistics and the oracle against closed-form ridge."""

from __future__ import annotations

import math

import pytest
import torch

import metalens
from metalens.config import ConfigError
from metalens.tasks.linear import NOISE_FLOOR, Linear

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sampled_weights_and_inputs_have_the_prior_moments():
    seed = 51
    d = 4
    family = Linear(Linear.Config(dim=d, shots=8, queries=8))
    ep = family.sample(3000, generator=gen(seed)).to(dtype=torch.float64)
    X = torch.cat([ep.support_x, ep.query_x], 1)  # [T, 16, d]
    y = torch.cat([ep.support_y, ep.query_y], 1)
    w = torch.linalg.lstsq(X, y).solution[..., 0]  # noiseless: the exact weights, [T, d]
    assert float((X @ w[..., None] - y).abs().max()) < 1e-5, f"seed {seed}: targets are not linear in x"
    cov_w = w.T @ w / w.shape[0]
    assert torch.allclose(cov_w, torch.eye(d, dtype=torch.float64) / d, atol=0.02), f"seed {seed}: Cov w != I/d"
    Xf = X.reshape(-1, d)
    assert torch.allclose(Xf.T @ Xf / Xf.shape[0], torch.eye(d, dtype=torch.float64), atol=0.03), f"seed {seed}"


def test_noise_has_the_configured_std():
    seed = 52
    family = Linear(Linear.Config(dim=3, shots=40, queries=40, noise_std=0.3))
    ep = family.sample(200, generator=gen(seed)).to(dtype=torch.float64)
    X = torch.cat([ep.support_x, ep.query_x], 1)
    y = torch.cat([ep.support_y, ep.query_y], 1)
    resid = X @ torch.linalg.lstsq(X, y).solution - y
    std = math.sqrt(float((resid**2).sum()) / (200 * (80 - 3)))
    assert abs(std - 0.3) < 0.01, f"seed {seed}: residual std {std:.4f}"


@pytest.mark.parametrize("noise,shots", [(0.3, 3), (0.3, 12), (0.0, 3), (1.0, 1)])
def test_posterior_mean_is_ridge_and_variance_is_closed_form(noise, shots):
    seed = 53 + shots
    d = 5
    family = Linear(Linear.Config(dim=d, shots=shots, queries=7, noise_std=noise))
    ep = family.sample(6, generator=gen(seed)).to(dtype=torch.float64)
    dist = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    s2 = max(noise, NOISE_FLOOR) ** 2
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(6):
        X, y, Xq = ep.support_x[i], ep.support_y[i], ep.query_x[i]
        w_ridge = torch.linalg.solve(X.T @ X + s2 * d * eye, X.T @ y)  # lambda = sigma^2 d
        Sigma = torch.linalg.inv(X.T @ X / s2 + d * eye)  # posterior covariance of w
        var = s2 + ((Xq @ Sigma) * Xq).sum(1, keepdim=True)
        assert torch.allclose(dist.mean[i], Xq @ w_ridge, atol=1e-8), f"seed {seed}, task {i}"
        assert torch.allclose(dist.variance[i], var, rtol=1e-8), f"seed {seed}, task {i}"


def test_noiseless_oracle_is_exact_with_enough_shots():
    seed = 54
    family = Linear(Linear.Config(dim=5, shots=10, queries=10))
    ep = family.sample(300, generator=gen(seed))
    dist = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    mse = float(((dist.mean - ep.query_y) ** 2).mean())
    assert mse < 1e-5, f"seed {seed}: MSE {mse:.2e} from n = 2d noiseless points"
    assert bool(torch.isfinite(dist.log_prob(ep.query_y)).all()), f"seed {seed}"


def test_underdetermined_noiseless_error_matches_the_null_space():
    """n < d noiseless: E[MSE] = E[x^T Sigma x] = (d - n) / d (prior variance 1/d in d - n directions)."""
    seed = 55
    d, n = 8, 3
    family = Linear(Linear.Config(dim=d, shots=n, queries=20))
    ep = family.sample(2000, generator=gen(seed))
    dist = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    mse = float(((dist.mean - ep.query_y) ** 2).mean())
    assert abs(mse - (d - n) / d) < 0.05, f"seed {seed}: MSE {mse:.3f}, expected {(d - n) / d}"
    assert abs(float(dist.variance.mean()) - (d - n) / d) < 0.02, f"seed {seed}"


def test_oracle_is_calibrated():
    seed = 56
    family = Linear(Linear.Config(dim=5, shots=4, queries=10, noise_std=0.5))
    ep = family.sample(1000, generator=gen(seed))
    dist = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    z = ((ep.query_y - dist.mean) / dist.stddev).double()
    n = z.numel()
    assert abs(float((z**2).mean()) - 1) < 5 * math.sqrt(2 / n), f"seed {seed}: E z^2 = {float((z**2).mean()):.3f}"


def test_masked_support_equals_the_unpadded_task():
    seed = 57
    family = Linear(Linear.Config(dim=3, shots=6, queries=4, noise_std=0.2))
    ep = family.sample(4, generator=gen(seed)).to(dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1]] * 4, dtype=torch.bool)
    masked = family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=mask)
    alone = family.oracle(ep.support_x[:, mask[0]], ep.support_y[:, mask[0]], ep.query_x)
    assert torch.allclose(masked.mean, alone.mean, atol=1e-10), f"seed {seed}"
    assert torch.allclose(masked.stddev, alone.stddev, atol=1e-10), f"seed {seed}"


def test_oracle_shape_checks_and_config_errors():
    family = Linear(Linear.Config(dim=3))
    with pytest.raises(ValueError, match=r"support_x must be \[tasks, points, 3\]"):
        family.oracle(torch.zeros(2, 4, 2), torch.zeros(2, 4, 1), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match=r"^dim must be >= 1, got 0$"):
        Linear.Config(dim=0)
    with pytest.raises(ValueError, match=r"^queries must be >= 1, got 0$"):
        Linear.Config(queries=0)
    with pytest.raises(ConfigError, match=r"^task.noise_std must be >= 0, got -1.0$"):
        metalens.make_task("linear", noise_std=-1)
    with pytest.raises(ConfigError, match=r"^task.dim must be an integer, got 2.5$"):
        metalens.make_task("linear", dim=2.5)
    assert Linear().oracle_std == NOISE_FLOOR and Linear(Linear.Config(noise_std=0.1)).oracle_std == 0.1
