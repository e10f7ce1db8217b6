"""PAC-Bayes bounds: hand computations, the kl inverse against bisection, monotonicity, the softening's union bound,
and the coverage of the kl bound on simulated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metalens.theory.pac_bayes import (amit_meir_bound, binary_kl, gaussian_kl, gaussian_log_ratio, kl_inverse,
                                       mcallester_bound, meta_kl_bound, pentina_lampert_bound, sample_convergence_bound,
                                       seeger_bound, soften, softening_grid)

SEED = 20240611


def bisection(q: float, c: float) -> float:
    """Reference: sup {p in [q, 1]: kl(q || p) <= c} by plain bisection (200 halvings)."""
    lo, hi = q, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if binary_kl(q, mid) <= c:
            lo = mid
        else:
            hi = mid
    return lo


def test_kl_inverse_matches_a_bisection_reference_to_1e_12():
    rng = np.random.default_rng(SEED)
    qs = np.concatenate([[0.0, 1e-9, 0.5, 1 - 1e-9], rng.uniform(0, 1, 200)])
    cs = np.concatenate([[1e-12, 1e-3, 0.1, 5.0], rng.exponential(0.3, 200)])
    for q, c in zip(qs, cs):
        p = kl_inverse(float(q), float(c))
        assert abs(p - bisection(float(q), float(c))) <= 1e-12, (q, c, p, f"seed {SEED}")
        assert q <= p <= 1.0
        if p < 1.0 - 1e-9:
            assert binary_kl(float(q), p) == pytest.approx(c, abs=1e-9), (q, c)


def test_kl_inverse_edge_cases():
    assert kl_inverse(0.25, 0.0) == 0.25 and kl_inverse(0.25, -1.0) == 0.25  # no room: the empirical value
    assert kl_inverse(1.0, 3.0) == 1.0
    assert kl_inverse(0.0, 2.0) == pytest.approx(1 - math.exp(-2.0), abs=1e-15)
    assert kl_inverse(0.3, 1e6) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="q must be in"):
        kl_inverse(1.5, 0.1)


def test_single_task_bounds_against_hand_computations():
    # McAllester: 0.2 + sqrt((3 + ln(2 sqrt(400) / 0.1)) / 800) = 0.2 + sqrt((3 + ln 400) / 800)
    assert mcallester_bound(0.2, 3.0, 400, 0.1) == pytest.approx(0.2 + math.sqrt((3 + math.log(400)) / 800), rel=1e-14)
    # Seeger: kl^-1(0.2, (3 + ln 400) / 400), then kl(0.2 || p) equals the right-hand side
    p = seeger_bound(0.2, 3.0, 400, 0.1)
    assert binary_kl(0.2, p) == pytest.approx((3 + math.log(400)) / 400, rel=1e-10)
    # the kl form is never looser than the square-root form (Pinsker)
    for q, kl, m in ((0.0, 0.0, 10), (0.1, 5.0, 100), (0.4, 50.0, 1000), (0.9, 1.0, 30)):
        assert seeger_bound(q, kl, m, 0.05) <= mcallester_bound(q, kl, m, 0.05) + 1e-12


def test_meta_bounds_against_hand_computations():
    kls, n, m, d = [1.0, 2.0, 3.0, 6.0], 4, 50, 0.1
    # Pentina & Lampert: er^ + (1/sqrt(n) + 1/(n sqrt(m))) (KL + ln(2/d)) + sum KL_i / (n sqrt m)
    #                    + 1/(8 sqrt n) + 1/(8 sqrt m)
    a, b = 1 / math.sqrt(n), 1 / (n * math.sqrt(m))
    want = 0.1 + (a + b) * (2.0 + math.log(2 / d)) + b * 12.0 + 1 / (8 * 2) + 1 / (8 * math.sqrt(m))
    assert pentina_lampert_bound(0.1, 2.0, kls, m, d) == pytest.approx(want, rel=1e-14)
    # Amit & Meir: er^ + mean_i sqrt((KL + KL_i + ln(2nm/d)) / (2(m-1))) + sqrt((KL + ln(2n/d)) / (2(n-1)))
    within = sum(math.sqrt((2.0 + k + math.log(2 * n * m / d)) / (2 * (m - 1))) for k in kls) / n
    want = 0.1 + within + math.sqrt((2.0 + math.log(2 * n / d)) / (2 * (n - 1)))
    assert amit_meir_bound(0.1, 2.0, kls, m, d) == pytest.approx(want, rel=1e-14)
    # the kl meta-bound: two kl inversions, delta split in halves
    b = meta_kl_bound(0.1, 2.0, kls, m, d)
    c_task = (2.0 + 12.0 + math.log(2 * math.sqrt(n * m) / (d / 2))) / (n * m)
    c_env = (2.0 + math.log(2 * math.sqrt(n) / (d / 2))) / n
    assert b.task_complexity == pytest.approx(c_task) and b.env_complexity == pytest.approx(c_env)
    assert b.task_bound == pytest.approx(bisection(0.1, c_task), abs=1e-12)
    assert b.bound == pytest.approx(bisection(b.task_bound, c_env), abs=1e-12)
    assert (b.delta_env, b.delta_task, b.n, b.m, b.kl_tasks_mean) == (0.05, 0.05, 4, 50, 3.0)
    # the split moves confidence between the levels
    assert meta_kl_bound(0.1, 2.0, kls, m, d, split=0.9).delta_env == pytest.approx(0.09)


def _bounds(emp: float, kl_h: float, kl_t: float, n: int, m: int, delta: float) -> dict[str, float]:
    return {"mcallester": mcallester_bound(emp, kl_h + kl_t, m, delta),
            "seeger": seeger_bound(emp, kl_h + kl_t, m, delta),
            "pentina_lampert": pentina_lampert_bound(emp, kl_h, [kl_t] * n, m, delta),
            "amit_meir": amit_meir_bound(emp, kl_h, [kl_t] * n, m, delta),
            "meta_kl": meta_kl_bound(emp, kl_h, [kl_t] * n, m, delta).bound}


@pytest.mark.parametrize("what", ["n", "m", "delta", "kl_hyper", "kl_task", "emp"])
def test_every_bound_is_monotone(what):
    base = {"emp": 0.1, "kl_h": 5.0, "kl_t": 3.0, "n": 50, "m": 40, "delta": 0.05}
    # (option, values in the order the bound must not decrease)
    steps = {"n": ("n", [400, 100, 20]), "m": ("m", [400, 100, 20]), "delta": ("delta", [0.5, 0.1, 0.01]),
             "kl_hyper": ("kl_h", [0.0, 5.0, 50.0]), "kl_task": ("kl_t", [0.0, 3.0, 30.0]),
             "emp": ("emp", [0.0, 0.1, 0.3])}
    key, values = steps[what]
    rows = [_bounds(**{**base, key: v}) for v in values]
    for name in rows[0]:
        if what == "n" and name in ("mcallester", "seeger"):
            continue  # single-task bounds do not see n
        seq = [r[name] for r in rows]
        assert all(a <= b + 1e-12 for a, b in zip(seq, seq[1:])), (name, what, seq)
        if name not in ("seeger", "meta_kl") or seq[-1] < 1 - 1e-9:  # kl forms saturate at 1
            assert seq[0] < seq[-1], (name, what, seq)


def test_softening_pays_for_its_grid_with_a_union_bound():
    grid = softening_grid(0.01, 10.0, 4)
    assert grid == (0.01, 0.1, 1.0, 10.0)

    def bound_at(sigma: float, delta: float) -> float:  # KL falls, empirical risk rises with sigma
        return seeger_bound(min(0.05 * sigma, 1.0), 1.0 / sigma ** 2, 200, delta)

    s = soften(bound_at, grid, 0.05)
    assert s.delta_each == pytest.approx(0.05 / 4)
    assert s.bounds == tuple(bound_at(g, 0.05 / 4) for g in grid)
    assert s.bound == min(s.bounds) and s.value == grid[s.index] == 1.0
    # the union bound costs: the chosen point at the full delta would have been tighter
    assert bound_at(s.value, 0.05) < s.bound
    # a grid of one is no union at all
    assert soften(bound_at, (1.0,), 0.05).bound == bound_at(1.0, 0.05)
    with pytest.raises(ValueError, match="delta"):
        soften(bound_at, grid, 1.0)


def test_gaussian_kl_and_log_ratio_against_torch_distributions():
    g = torch.Generator().manual_seed(SEED)
    mq, mp = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    lq, lp = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, (0.5 * lq).exp()),
                                            torch.distributions.Normal(mp, (0.5 * lp).exp())).sum(-1)
    torch.testing.assert_close(gaussian_kl(mq, lq, mp, lp), ref)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = (torch.distributions.Normal(mq, (0.5 * lq).exp()).log_prob(x)
           - torch.distributions.Normal(mp, (0.5 * lp).exp()).log_prob(x)).sum(-1)
    torch.testing.assert_close(gaussian_log_ratio(x, mq, lq, mp, lp), ref)
    # the log ratio at draws from q averages to the KL
    draws = mq[0] + (0.5 * lq[0]).exp() * torch.randn(40000, 6, generator=g, dtype=torch.float64)
    assert gaussian_log_ratio(draws, mq[0], lq[0], mp[0], lp[0]).mean().item() == pytest.approx(
        gaussian_kl(mq[0], lq[0], mp[0], lp[0]).item(), rel=0.05)


def test_kl_bound_and_sample_convergence_cover_the_truth_on_simulated_data():
    """With the posterior equal to the prior (KL = 0), the kl bound fails on at most delta of the samples."""
    rng = np.random.default_rng(SEED)
    risk, m, delta, trials = 0.3, 50, 0.1, 4000
    emp = rng.binomial(m, risk, size=trials) / m
    fails = np.mean([seeger_bound(float(e), 0.0, m, delta) < risk for e in emp])
    assert fails <= delta, f"seed {SEED}: the bound failed on {fails:.3f} of the samples"
    fails = np.mean([sample_convergence_bound(float(e), m, delta) < risk for e in emp])
    assert fails <= delta, f"seed {SEED}: the sample-convergence bound failed on {fails:.3f}"


@pytest.mark.parametrize("call, match", [
    (lambda: mcallester_bound(1.2, 0.0, 10, 0.05), "emp_risk must be in"),
    (lambda: seeger_bound(0.1, -1.0, 10, 0.05), "KL divergence >= 0"),
    (lambda: seeger_bound(0.1, 0.0, 0, 0.05), "m must be an integer >= 1"),
    (lambda: mcallester_bound(0.1, 0.0, 10, 0.0), r"delta must be in \(0, 1\)"),
    (lambda: amit_meir_bound(0.1, 0.0, [1.0], 10, 0.05), "n >= 2 tasks"),
    (lambda: meta_kl_bound(0.1, 0.0, [], 10, 0.05), "one KL per observed task"),
    (lambda: meta_kl_bound(0.1, math.inf, [1.0], 10, 0.05), "kl_hyper must be finite"),
])
def test_bad_arguments_are_refused_with_a_message(call, match):
    with pytest.raises(ValueError, match=match):
        call()
