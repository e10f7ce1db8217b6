"""Sinusoid family: the sampler's distribution and the grid oracle against direct computations."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.distributions import Normal

import metalens
from metalens.config import ConfigError
from metalens.tasks.sinusoid import Sinusoid

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fit_sine(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (A, phase) of y = A sin(x - phase) per task; x, y [T, P]."""
    F = torch.stack([torch.sin(x), torch.cos(x)], -1).double()  # y = a sin x + b cos x
    ab = torch.linalg.lstsq(F, y.double()[..., None]).solution[..., 0]  # [T, 2]
    a, b = ab.unbind(-1)
    return torch.hypot(a, b), torch.atan2(-b, a)


def brute_force(family: Sinusoid, sx, sy, qx):
    """Full-grid mixture predictive, written out directly: log-density function and mean, variance."""
    sigma = family.oracle_std
    A, P = family._grid()
    A, P = torch.meshgrid(A, P, indexing="ij")
    A, P = A.reshape(-1, 1), P.reshape(-1, 1)  # [G, 1]
    out = []
    for i in range(sx.shape[0]):
        loglik = Normal(A * torch.sin(sx[i, :, 0].double() - P), sigma).log_prob(sy[i, :, 0].double()).sum(1)
        logw = loglik - loglik.logsumexp(0)  # [G]
        fq = A * torch.sin(qx[i, :, 0].double() - P)  # [G, Q]
        mean = (logw.exp()[:, None] * fq).sum(0)
        var = (logw.exp()[:, None] * (fq - mean) ** 2).sum(0) + sigma**2
        out.append((logw, fq, mean, var))
    return out, sigma


def test_sampled_functions_are_sines_with_parameters_in_range():
    seed = 11
    family = Sinusoid(Sinusoid.Config(shots=5, queries=5))
    ep = family.sample(4000, generator=gen(seed))
    x = torch.cat([ep.support_x, ep.query_x], 1)[..., 0]
    y = torch.cat([ep.support_y, ep.query_y], 1)[..., 0]
    assert float(x.min()) >= -5 and float(x.max()) <= 5, f"seed {seed}"
    assert abs(float(x.mean())) < 0.05 and abs(float(x.var()) - 100 / 12) < 0.15, f"seed {seed}: x not U[-5, 5]"
    A, phase = fit_sine(x, y)
    resid = y.double() - A[:, None] * torch.sin(x.double() - phase[:, None])
    assert float(resid.abs().max()) < 1e-4, f"seed {seed}: noiseless targets are not exact sines"
    assert float(A.min()) > 0.1 - 1e-4 and float(A.max()) < 5 + 1e-4, f"seed {seed}"
    assert float(phase.min()) > -1e-4 and float(phase.max()) < math.pi + 1e-4, f"seed {seed}"
    # uniform: mean and standard deviation of U[lo, hi] (4000 draws: standard errors ~0.022, ~0.025)
    assert abs(float(A.mean()) - 2.55) < 0.1 and abs(float(A.std()) - 4.9 / math.sqrt(12)) < 0.1, f"seed {seed}"
    assert abs(float(phase.mean()) - math.pi / 2) < 0.07, f"seed {seed}"


def test_noise_has_the_configured_std():
    seed = 12
    family = Sinusoid(Sinusoid.Config(shots=20, queries=20, noise_std=0.5))
    ep = family.sample(500, generator=gen(seed))
    x = torch.cat([ep.support_x, ep.query_x], 1)[..., 0]
    y = torch.cat([ep.support_y, ep.query_y], 1)[..., 0]
    A, phase = fit_sine(x, y)
    resid = y.double() - A[:, None] * torch.sin(x.double() - phase[:, None])
    std = float(resid.pow(2).sum().div(resid.numel() - 2 * 500).sqrt())  # 2 fitted parameters per task
    assert abs(std - 0.5) < 0.02, f"seed {seed}: residual std {std:.3f}, expected 0.5"


@pytest.mark.parametrize("shots,noise", [(1, 0.4), (3, 0.2), (2, 0.0)])
def test_oracle_equals_the_full_grid_mixture(shots, noise):
    """On a grid small enough to keep every point, the oracle is exactly the grid mixture."""
    seed = 100 + shots
    family = Sinusoid(Sinusoid.Config(shots=shots, queries=6, noise_std=noise, oracle_grid=(40, 30),
                                      oracle_components=1200))
    ep = family.sample(8, generator=gen(seed)).to(dtype=torch.float64)
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    ref, sigma = brute_force(family, ep.support_x, ep.support_y, ep.query_x)
    y = ep.query_y[..., 0]
    for i, (logw, fq, mean, var) in enumerate(ref):
        logp = (Normal(fq, sigma).log_prob(y[i]) + logw[:, None]).logsumexp(0)
        msg = f"seed {seed}, task {i}"
        assert torch.allclose(d.log_prob(ep.query_y)[i, :, 0], logp, atol=1e-5), msg
        assert torch.allclose(d.mean[i, :, 0], mean, atol=1e-5), msg
        assert torch.allclose(d.variance[i, :, 0], var, rtol=1e-4), msg


@pytest.mark.parametrize("shots,noise", [(1, 0.3), (1, 0.0), (4, 1.0)])
def test_block_merged_oracle_keeps_the_grid_mean_and_variance(shots, noise):
    """With fewer components than significant grid points, cells are merged into
    moment-matched blocks: mean and variance stay those of the full grid mixture."""
    seed = 200 + shots
    family = Sinusoid(Sinusoid.Config(shots=shots, queries=6, noise_std=noise, oracle_grid=(64, 48),
                                      oracle_components=192))
    ep = family.sample(6, generator=gen(seed)).to(dtype=torch.float64)
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    assert d.mixture_distribution.logits.shape[-1] == 192, f"seed {seed}: expected the 16 x 12 block mixture"
    ref, sigma = brute_force(family, ep.support_x, ep.support_y, ep.query_x)
    for i, (logw, fq, mean, var) in enumerate(ref):
        assert torch.allclose(d.mean[i, :, 0], mean, atol=1e-6), f"seed {seed}, task {i}"
        assert torch.allclose(d.variance[i, :, 0], var, rtol=1e-6), f"seed {seed}, task {i}"
        if noise >= 0.3:  # smooth posterior: the merged density is close to the grid density too
            y = ep.query_y[i, :, 0]
            logp = (Normal(fq, sigma).log_prob(y) + logw[:, None]).logsumexp(0)
            assert torch.allclose(d.log_prob(ep.query_y)[i, :, 0], logp, atol=0.05), f"seed {seed}, task {i}"


def test_oracle_is_nearly_exact_from_five_noiseless_shots():
    seed = 5
    family = Sinusoid(Sinusoid.Config(shots=5, queries=10))
    ep = family.sample(200, generator=gen(seed))
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    mse = float(((d.mean - ep.query_y) ** 2).mean())
    assert mse < 0.01, f"seed {seed}: oracle MSE {mse:.4f} from 5 noiseless shots"
    assert bool(torch.isfinite(d.log_prob(ep.query_y)).all()), f"seed {seed}"


def test_noisy_oracle_beats_the_prior_predictive_by_far():
    seed = 6
    noise = 0.3
    family = Sinusoid(Sinusoid.Config(shots=5, queries=10, noise_std=noise))
    ep = family.sample(300, generator=gen(seed))
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    mse = float(((d.mean - ep.query_y) ** 2).mean())
    # prior predictive mean: E[A] E[sin(x - phase)] = 2.55 * (-2 cos(x) / pi) for phase ~ U[0, pi]
    prior_mean = 2.55 * (-2 / math.pi) * torch.cos(ep.query_x)
    mse_prior = float(((prior_mean - ep.query_y) ** 2).mean())
    mse_zero = float((ep.query_y**2).mean())
    assert noise**2 * 0.8 < mse < 0.2, f"seed {seed}: oracle MSE {mse:.4f} (noise variance {noise**2})"
    assert mse < 0.1 * min(mse_prior, mse_zero), f"seed {seed}: {mse:.3f} vs prior {mse_prior:.3f}, zero {mse_zero:.3f}"
    nll = -d.log_prob(ep.query_y)
    assert bool(torch.isfinite(nll).all()), f"seed {seed}"
    # a proper predictive is better than a Normal at its mean with the noise scale only
    nll_plugin = -Normal(d.mean, noise).log_prob(ep.query_y)
    assert float(nll.mean()) < float(nll_plugin.mean()), f"seed {seed}"


def test_uninformative_support_gives_the_prior_predictive():
    """With overwhelming noise the posterior is the prior: mean -2 E[A] cos(x) / pi."""
    seed = 7
    family = Sinusoid(Sinusoid.Config(shots=1, queries=20, noise_std=1000.0))
    ep = family.sample(4, generator=gen(seed))
    # y = 0 (a draw of y would itself carry information: y f / noise^2 is not negligible)
    d = family.oracle(ep.support_x, torch.zeros_like(ep.support_y), ep.query_x)
    prior_mean = 2.55 * (-2 / math.pi) * torch.cos(ep.query_x)
    assert torch.allclose(d.mean, prior_mean, atol=2e-3), f"seed {seed}"


def test_oracle_std_is_the_noise_floored_at_the_grid_resolution():
    floor = math.sqrt(((4.9 / 256) ** 2 + (5 * math.pi / 256) ** 2) / 12)
    assert Sinusoid().oracle_std == pytest.approx(floor)
    assert 0.01 < floor < 0.05
    assert Sinusoid(Sinusoid.Config(noise_std=0.2)).oracle_std == 0.2
    coarse = Sinusoid(Sinusoid.Config(oracle_grid=(64, 64))).oracle_std
    assert coarse == pytest.approx(4 * floor)


def test_oracle_handles_a_thousand_tasks_with_bounded_components():
    seed = 8
    family = Sinusoid(Sinusoid.Config(shots=1, queries=10))
    ep = family.sample(1000, generator=gen(seed))
    d = family.oracle(ep.support_x, ep.support_y, ep.query_x)
    assert d.mixture_distribution.logits.shape == (1000, 10, 1, 1024), f"seed {seed}"
    assert torch.allclose(d.mixture_distribution.probs.sum(-1), torch.ones(())), f"seed {seed}"
    assert bool(torch.isfinite(d.log_prob(ep.query_y)).all()), f"seed {seed}"


def test_config_errors():
    with pytest.raises(ValueError, match=r"^shots must be >= 1, got 0$"):
        Sinusoid.Config(shots=0)
    with pytest.raises(ValueError, match=r"^amplitude_range must be increasing \(low < high\), got \(5.0, 0.1\)$"):
        Sinusoid.Config(amplitude_range=(5.0, 0.1))
    with pytest.raises(ValueError, match="^noise_std must be >= 0, got -0.1$"):
        Sinusoid.Config(noise_std=-0.1)
    with pytest.raises(ValueError, match=r"^amplitude_range values must be >= 0, got \(-1.0, 1.0\)$"):
        Sinusoid.Config(amplitude_range=(-1.0, 1.0))


@pytest.mark.parametrize("options, message", [
    ({"queries": 0}, "task.queries must be >= 1, got 0"),  # ge
    ({"noise_std": -0.1}, "task.noise_std must be >= 0, got -0.1"),
    ({"noise_std": float("nan")}, "task.noise_std must be finite, got nan"),  # floats are finite by default
    ({"amplitude_range": [0.1, float("inf")]}, "task.amplitude_range must be finite, got (0.1, inf)"),
    ({"x_range": [1, -1]}, "task.x_range must be increasing (low < high), got (1.0, -1.0)"),  # increasing
    ({"phase_range": [0.0]}, "task.phase_range must be a list of 2 numbers, got [0.0]"),
    ({"oracle_grid": [256, 1]}, "task.oracle_grid values must be >= 2, got (256, 1)"),  # ge on every element
])
def test_make_task_refuses_options_outside_their_declared_constraint(options, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        metalens.make_task("sinusoid", **options)


def test_oracle_rejects_wrong_shapes():
    family = Sinusoid()
    with pytest.raises(ValueError, match="support_x and support_y must both be"):
        family.oracle(torch.zeros(2, 3, 1), torch.zeros(2, 4, 1), torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match="support_mask must be"):
        family.oracle(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.zeros(2, 5, 1),
                      support_mask=torch.ones(2, 4, dtype=torch.bool))
