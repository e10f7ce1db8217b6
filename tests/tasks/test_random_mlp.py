"""random_mlp: pools that are really finite and fixed by their seed, unseen tasks outside the pool,
standardised functions, and the exact pool posterior against a loop over the pool."""

from __future__ import annotations

import math
import re

import pytest
import torch

import metalens
from metalens.config import ConfigError
from metalens.tasks.random_mlp import RandomMLP

torch.set_num_threads(1)

SEED = 20240611


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fits(family: RandomMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error of each pool member on each task's points: ``[T, pool size]``."""
    K = family.pool_size
    f = family.pool_functions(torch.arange(K))
    u = family.rescale(x)  # [T, P, d]
    out = []
    for k in range(K):
        fk = f[torch.full((x.shape[0],), k)]
        out.append(((fk(u) - y) ** 2).mean((1, 2)))
    return torch.stack(out, 1)


def test_a_pool_is_really_finite_and_every_member_shows_up():
    family = metalens.make_task("random_mlp", pool_log2=3, shots=6, queries=2)
    ids, _, x, y = family.sample_with_ids(300, generator=gen(SEED))
    err = fits(family, x, y)
    best = err.min(1)
    assert bool((best.values < 1e-10).all()), f"seed {SEED}: a training task fits no pool member"
    assert torch.equal(best.indices, ids), f"seed {SEED}: tasks do not come from the members they say"
    assert set(ids.tolist()) == set(range(8)), f"seed {SEED}: 300 draws did not meet all 8 members"
    # the members are distinct functions
    second = err.topk(2, dim=1, largest=False).values[:, 1]
    assert bool((second > 1e-3).all())


def test_the_pool_is_fixed_by_its_seed_and_nested():
    x = torch.linspace(-5, 5, 50).view(1, 50, 1).expand(8, -1, -1)
    a = metalens.make_task("random_mlp", pool_log2=3)
    b = metalens.make_task("random_mlp", pool_log2=3, shots=3, noise_std=0.5)  # points do not matter
    bigger = metalens.make_task("random_mlp", pool_log2=5)
    other = metalens.make_task("random_mlp", pool_log2=3, pool_seed=1)
    ids = torch.arange(8)
    fa = a.pool_functions(ids)(a.rescale(x))
    assert torch.equal(fa, b.pool_functions(ids)(b.rescale(x))), "pool seed 0 gave two different pools"
    assert torch.equal(fa, bigger.pool_functions(ids)(bigger.rescale(x))), "the pool of 8 is not in the pool of 32"
    assert not torch.allclose(fa, other.pool_functions(ids)(other.rescale(x))), "pool seeds 0 and 1 agree"
    # a separately built family draws the same training episode for the same (seed, step)
    again = metalens.make_task("random_mlp", pool_log2=3)
    assert torch.equal(a.episode(SEED, 5, 10).query_y, again.episode(SEED, 5, 10).query_y), f"seed {SEED}"


def test_unseen_tasks_are_outside_the_pool_and_new_each_draw():
    family = metalens.make_task("random_mlp", pool_log2=3, shots=6, queries=2)
    for split in ("val", "test"):
        ids, _, x, y = family.sample_with_ids(100, generator=gen(SEED), split=split)
        assert ids is None
        assert bool((fits(family, x, y).min(1).values > 1e-4).all()), f"{split} (seed {SEED}): a task is in the pool"
    unbounded = metalens.make_task("random_mlp")
    f = unbounded.draw_functions(50, generator=gen(SEED))
    grid = torch.linspace(-1, 1, 20).view(1, 20, 1).expand(50, -1, -1)
    v = f(grid)[..., 0]  # [50, 20]
    d = torch.cdist(v, v) + torch.eye(50) * 1e9
    assert float(d.min()) > 1e-3, f"seed {SEED}: two unbounded draws gave the same function"


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_functions_are_standardised_to_their_drawn_scale(activation):
    family = metalens.make_task("random_mlp", activation=activation, output_std_range=(1.5, 1.5), x_dim=2,
                                y_dim=2, depth=3)
    f = family.draw_functions(200, generator=gen(SEED))
    u = 2 * torch.rand(200, 2000, 2, generator=gen(SEED + 1)) - 1  # fresh inputs
    y = f(u)
    assert abs(float(y.mean())) < 0.1, f"{activation}, seed {SEED}"
    assert abs(float(y.std(1).mean()) - 1.5) < 0.1, f"{activation}, seed {SEED}"


def test_the_pool_oracle_is_the_posterior_over_the_pool():
    family = metalens.make_task("random_mlp", pool_log2=4, shots=3, queries=4, noise_std=0.3)
    ep = family.episode(SEED, 0, 5)
    dist = family.pool_oracle(ep.support_x, ep.support_y, ep.query_x)
    # a loop over the pool: p(i | support) and the mixture's mean
    K, sigma = family.pool_size, family.oracle_std
    for t in range(5):
        f = family.pool_functions(torch.arange(K))
        u_s = family.rescale(ep.support_x[t:t + 1]).expand(K, -1, -1).double()
        u_q = family.rescale(ep.query_x[t:t + 1]).expand(K, -1, -1).double()
        f64 = type(f)(tuple(w.double() for w in f.weights), tuple(b.double() for b in f.biases), f.shift.double(),
                      f.scale.double(), f.activation, f.first_scale)
        loglik = torch.stack([torch.distributions.Normal(f64(u_s)[i], sigma).log_prob(ep.support_y[t].double()).sum()
                              for i in range(K)])
        w = torch.softmax(loglik, 0)
        mean = (w[:, None, None] * f64(u_q)).sum(0)
        torch.testing.assert_close(dist.mean[t].double(), mean, rtol=1e-4, atol=1e-5, msg=f"task {t}, seed {SEED}")


def test_without_noise_the_pool_oracle_recovers_a_training_task_and_ignores_padding():
    family = metalens.make_task("random_mlp", pool_log2=6, shots=4, queries=5)
    ep = family.episode(SEED, 0, 20)
    dist = family.pool_oracle(ep.support_x, ep.support_y, ep.query_x)
    assert float(((dist.mean - ep.query_y) ** 2).mean()) < 1e-8, f"seed {SEED}"
    junk = torch.cat([ep.support_x[:, :2], ep.support_x], 1), torch.cat([ep.support_y[:, :2] + 50, ep.support_y], 1)
    mask = torch.cat([torch.zeros(20, 2, dtype=torch.bool), torch.ones(20, 4, dtype=torch.bool)], 1)
    padded = family.pool_oracle(*junk, ep.query_x, support_mask=mask)
    torch.testing.assert_close(padded.log_prob(ep.query_y), dist.log_prob(ep.query_y))
    # a task's predictive does not depend on its batch, nor does the oracle touch the global RNG
    torch.manual_seed(SEED)
    state = torch.get_rng_state()
    part = family.pool_oracle(ep.support_x[3:5], ep.support_y[3:5], ep.query_x[3:5])
    assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(part.mean, dist.mean[3:5])


def test_no_oracle_and_a_pool_posterior_for_small_pools_only():
    for options in ({}, {"pool_log2": 3}):  # held-out tasks come from the intractable unbounded prior
        family = metalens.make_task("random_mlp", **options)
        assert family.spec.oracle is None and not family.has_oracle
        with pytest.raises(ValueError, match="no tractable oracle"):
            metalens.make_learner("oracle", family)
    ep = metalens.make_task("random_mlp").episode(SEED, 0, 2)
    for options in ({}, {"pool_log2": 13}):
        with pytest.raises(ValueError, match="only for pools of at most"):
            metalens.make_task("random_mlp", **options).pool_oracle(ep.support_x, ep.support_y, ep.query_x)


def test_large_pools_are_drawn_member_by_member_and_agree_with_the_cache():
    small = metalens.make_task("random_mlp", pool_log2=4)
    large = metalens.make_task("random_mlp", pool_log2=20)
    ids = torch.tensor([0, 3, 15, 3])
    u = torch.rand(4, 7, 1, generator=gen(SEED)) * 2 - 1
    torch.testing.assert_close(small.pool_functions(ids)(u), large.pool_functions(ids)(u))
    with pytest.raises(ValueError, match=r"must be in \[0, 16\)"):
        small.pool_functions(torch.tensor([16]))


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match=r"^pool_log2 must be >= 0 and <= 40, got -1$"):
        RandomMLP.Config(pool_log2=-1)
    with pytest.raises(ValueError, match="^shots must be >= 1, got 0$"):
        RandomMLP.Config(shots=0)
    with pytest.raises(ValueError, match=r"^output_std_range must be \(low, high\) with low <= high, got "
                                         r"\(2.0, 1.0\)$"):
        RandomMLP.Config(output_std_range=(2.0, 1.0))
    assert RandomMLP.Config(output_std_range=(1.0, 1.0)).output_std_range == (1.0, 1.0)  # a fixed scale
    for options, message in [
        ({"activation": "sigmoid"}, "task.activation must be one of 'relu', 'tanh', 'gelu', 'silu', got 'sigmoid'"),
        ({"pool_log2": 41}, "task.pool_log2 must be >= 0 and <= 40, got 41"),  # le
        ({"pool_log2": "many"}, "task.pool_log2 must be an integer (or null), got 'many'"),
        ({"pool_seed": -1}, "task.pool_seed must be >= 0, got -1"),
        ({"output_std_range": [2, 1]}, "task.output_std_range must be (low, high) with low <= high, got (2.0, 1.0)"),
        ({"output_std_range": [0, 1]}, "task.output_std_range values must be > 0, got (0.0, 1.0)"),
        ({"first_layer_scale": float("inf")}, "task.first_layer_scale must be finite, got inf"),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            metalens.make_task("random_mlp", **options)
    assert math.isfinite(metalens.make_task("random_mlp", x_dim=3).sample(2, generator=gen(0)).query_y.sum().item())
