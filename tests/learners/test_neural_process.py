"""Neural Processes: masks, permutation invariance, the decoder's scale, the attention module against
a direct computation, the latent models' estimators, and a CNP that learns."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.distributions import Normal

import metalens
from metalens import rng
from metalens.episode import Episode
from metalens.evaluate import evaluate
from metalens.learners.neural_process import ANP, CNP, LNP, mean_pool
from metalens.nets import MultiheadAttention

torch.set_num_threads(1)

MODELS = ["cnp", "lnp", "anp"]
# Small networks: every property tested here holds at any width.
SMALL = {"cnp": {"hidden": 16}, "lnp": {"hidden": 16, "latent_dim": 8, "eval_samples": 8},
         "anp": {"hidden": 16, "latent_dim": 8, "eval_samples": 8, "heads": 4}}


def small(name: str, seed: int = 0, **options):
    family = metalens.make_task("gp", max_context=12, max_target=9)
    return family, metalens.make_learner(name, family, seed=seed, **{**SMALL[name], **options})


def padded_episode(seed: int, n_tasks: int = 4) -> Episode:
    family = metalens.make_task("gp", max_context=12, max_target=9)
    ep = family.episode(seed, 0, n_tasks)
    assert not bool(ep.support_mask.all()), f"seed {seed}: no padded context point to test"
    return ep


def predictive(learner, sx, sy, qx, mask=None):
    with torch.no_grad():
        d = learner.predict(sx, sy, qx, support_mask=mask)
    return d.mean, d.stddev


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_a_finite_loss_that_reaches_every_parameter(name):
    seed = 1
    family, lrn = small(name)
    ep = family.episode(seed, 0, 5)
    d = lrn.predict(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    assert d.batch_shape == (5, 9, 1) and d.mean.shape == (5, 9, 1)
    assert d.log_prob(ep.query_y).shape == (5, 9, 1)
    loss, metrics = lrn.meta_loss(ep, generator=rng.generator(seed, rng.Stream.LEARNER, 0))
    assert loss.dim() == 0 and math.isfinite(float(loss.detach())) and math.isfinite(metrics["loss"])
    loss.backward()
    missing = [k for k, p in lrn.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"seed {seed}: no gradient reaches {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_padded_context_points_never_influence_predictions(name):
    seed = 2
    _, lrn = small(name)
    ep = padded_episode(seed)
    mean, sd = predictive(lrn, ep.support_x, ep.support_y, ep.query_x, ep.support_mask)
    # 1. the prediction equals the one from each task's real points alone (no mask at all)
    for t in range(ep.n_tasks):
        m = ep.support_mask[t]
        alone_mean, alone_sd = predictive(lrn, ep.support_x[t:t + 1, m], ep.support_y[t:t + 1, m], ep.query_x[t:t + 1])
        torch.testing.assert_close(mean[t:t + 1], alone_mean, rtol=1e-4, atol=1e-5, msg=f"seed {seed}, task {t}")
        torch.testing.assert_close(sd[t:t + 1], alone_sd, rtol=1e-4, atol=1e-5, msg=f"seed {seed}, task {t}")
    # 2. garbage in the padded slots, and padded slots permuted, change nothing
    pad = ~ep.support_mask
    sx, sy = ep.support_x.clone(), ep.support_y.clone()
    sx[pad] = 1e4 * torch.randn(int(pad.sum()), 1, generator=torch.Generator().manual_seed(seed))
    sy[pad] = -3e3
    perm = torch.randperm(ep.n_support, generator=torch.Generator().manual_seed(seed))
    mask_p = ep.support_mask[:, perm]
    sx_p, sy_p = sx[:, perm], sy[:, perm]
    assert not torch.equal(mask_p, ep.support_mask), f"seed {seed}: the permutation must move padded slots"
    for args in ((sx, sy, ep.support_mask), (sx_p, sy_p, mask_p)):
        m2, s2 = predictive(lrn, args[0], args[1], ep.query_x, args[2])
        torch.testing.assert_close(m2, mean, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
        torch.testing.assert_close(s2, sd, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("name", MODELS)
def test_padded_targets_never_influence_the_loss(name):
    seed = 3
    family, lrn = small(name)
    ep = family.episode(seed, 0, 1)  # one task: the loss is a mean over its real targets
    q = ep.query_mask[0]
    assert not bool(q.all()), f"seed {seed}: no padded target"
    qx, qy = ep.query_x.clone(), ep.query_y.clone()
    qx[:, ~q], qy[:, ~q] = 7.0, 1e3
    garbage = Episode(ep.support_x, ep.support_y, qx, qy, ep.support_mask, ep.query_mask)
    alone = Episode(ep.support_x, ep.support_y, ep.query_x[:, q], ep.query_y[:, q], ep.support_mask, None)
    losses = [float(lrn.meta_loss(e, generator=rng.generator(seed, rng.Stream.LEARNER, 0))[0].detach())
              for e in (ep, garbage, alone)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) == pytest.approx(losses[2], rel=1e-5), (seed, losses)


@pytest.mark.parametrize("name", MODELS)
def test_permutation_invariance_over_the_context_set(name):
    seed = 4
    _, lrn = small(name)
    ep = padded_episode(seed)
    perm = torch.randperm(ep.n_support, generator=torch.Generator().manual_seed(seed))
    a = predictive(lrn, ep.support_x, ep.support_y, ep.query_x, ep.support_mask)
    b = predictive(lrn, ep.support_x[:, perm], ep.support_y[:, perm], ep.query_x, ep.support_mask[:, perm])
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    # and the targets are predicted independently of each other: permuting them permutes the outputs
    qperm = torch.randperm(ep.n_query, generator=torch.Generator().manual_seed(seed + 1))
    c = predictive(lrn, ep.support_x, ep.support_y, ep.query_x[:, qperm], ep.support_mask)
    torch.testing.assert_close(c[0], a[0][:, qperm], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_an_empty_context_gives_a_finite_prediction_independent_of_the_padding(name):
    seed = 5
    _, lrn = small(name)
    ep = padded_episode(seed)
    empty = torch.zeros_like(ep.support_mask)
    a = predictive(lrn, ep.support_x, ep.support_y, ep.query_x, empty)
    b = predictive(lrn, 5 * ep.support_x, ep.support_y + 10, ep.query_x, empty)
    assert all(bool(torch.isfinite(t).all()) for t in a)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_decoder_scale_is_positive_and_bounded_below(name):
    seed = 6
    family, lrn = small(name, min_scale=0.05)
    ep = family.episode(seed, 0, 3)
    with torch.no_grad():
        last = lrn.decoder.net.layers[-1]
        last.bias[1] = -1e4  # raw scale far below zero: softplus underflows to 0
        d = lrn.predict(ep.support_x, 100 * ep.support_y, ep.query_x, support_mask=ep.support_mask)
    sd = d.component_distribution.scale if name != "cnp" else d.scale
    assert bool((sd > 0).all()) and float(sd.min()) == pytest.approx(0.05, rel=1e-6)
    _, rest = small(name)
    with torch.no_grad():
        d = rest.predict(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    sd = d.component_distribution.scale if name != "cnp" else d.scale
    assert bool((sd >= 0.01).all())


def direct_attention(att: MultiheadAttention, q, k, v, mask):
    """Multi-head attention written with Python loops over tasks, heads and queries."""
    T, Q, _ = q.shape
    S = k.shape[1]
    H = att.heads
    Wq, Wk, Wv = att.w_q.weight, att.w_k.weight, att.w_v.weight  # [dim, d_in]
    dim = Wq.shape[0]
    dh = dim // H
    out = torch.zeros(T, Q, dim, dtype=torch.float64)
    for t in range(T):
        keys = [j for j in range(S) if mask[t, j]]
        for h in range(H):
            rows = slice(h * dh, (h + 1) * dh)
            for i in range(Q):
                qi = Wq[rows] @ q[t, i]
                scores = [float(qi @ (Wk[rows] @ k[t, j])) / math.sqrt(dh) for j in keys]
                if not keys:
                    continue  # nothing to attend to: the head is zero
                top = max(scores)
                w = [math.exp(s - top) for s in scores]
                for wj, j in zip(w, keys):
                    out[t, i, rows] += wj / sum(w) * (Wv[rows] @ v[t, j])
    return out @ att.w_o.weight.T + att.w_o.bias


def test_attention_matches_a_direct_computation():
    seed = 7
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        att = MultiheadAttention(query_dim=3, key_dim=2, value_dim=4, dim=6, heads=2).double()
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, n, d, generator=g, dtype=torch.float64) for n, d in ((4, 3), (5, 2), (5, 4)))
    mask = torch.tensor([[True] * 5, [True, False, True, False, False], [False] * 5])
    with torch.no_grad():
        got = att(q, k, v, mask)
        ref = direct_attention(att, q, k, v, mask)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
        torch.testing.assert_close(att(q, k, v), direct_attention(att, q, k, v, torch.ones(3, 5, dtype=torch.bool)))


def test_mean_pool_is_over_real_points_only():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("inf"), 0.0]]])
    torch.testing.assert_close(mean_pool(h, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(mean_pool(h, torch.tensor([[False, False, False]])), torch.zeros(1, 2))


@pytest.mark.parametrize("name", ["lnp", "anp"])
def test_latent_predictive_is_the_equal_weight_mixture_over_prior_samples(name):
    """log_prob equals log (1/K) sum_k N(y; mu(z_k), sigma(z_k)) with z_k = mu_z + sigma_z eps_k, computed here."""
    seed = 8
    _, lrn = small(name, eval_seed=seed)
    ep = padded_episode(seed, n_tasks=3)
    K, dz = lrn.config.eval_samples, lrn.config.latent_dim
    with torch.no_grad():
        got = lrn.predict(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
        eps = torch.randn(K, dz, generator=rng.generator(seed, rng.Stream.EVAL_LEARNER))
        sx = torch.where(ep.support_mask[..., None], ep.support_x, 0.0)
        sy = torch.where(ep.support_mask[..., None], ep.support_y, 0.0)
        prior = lrn.latent(sx, sy, ep.support_mask)
        r = lrn.deterministic_path(sx, sy, ep.support_mask, ep.query_x)
        comps = []
        for k in range(K):
            z = (prior.loc + prior.scale * eps[k])[:, None, :].expand(-1, ep.n_query, -1)
            mean, scale = lrn.decoder(torch.cat([r, z, ep.query_x], -1))
            comps.append(Normal(mean, scale).log_prob(ep.query_y))
        ref = torch.logsumexp(torch.stack(comps), 0) - math.log(K)
    torch.testing.assert_close(got.log_prob(ep.query_y), ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    # deterministic, and a task's estimate does not depend on the batch it is scored in
    again = lrn.predict(ep.support_x[1:], ep.support_y[1:], ep.query_x[1:], support_mask=ep.support_mask[1:])
    torch.testing.assert_close(again.log_prob(ep.query_y[1:]), ref[1:], rtol=1e-5, atol=1e-5)


def _make_z_matter(lrn) -> None:
    """Wide, informative latent: scale the decoder's z inputs so the predictive is a real mixture."""
    with torch.no_grad():
        first = lrn.decoder.net.layers[0]
        h = lrn.config.hidden
        first.weight[:, h:h + lrn.config.latent_dim] *= 20.0


@pytest.mark.parametrize("name", ["lnp"])
def test_latent_estimators_are_consistent(name):
    """More samples: the spread over seeds shrinks like 1/sqrt(K) and the mean settles (Jensen: it rises)."""
    seeds = range(12)
    ep = padded_episode(9, n_tasks=6)
    means, spreads = {}, {}
    for K in (2, 32, 512):
        ll = []
        for s in seeds:
            _, lrn = small(name, seed=0, eval_samples=K, eval_seed=s)
            _make_z_matter(lrn)
            with torch.no_grad():
                d = lrn.predict(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
                ll.append(d.log_prob(ep.query_y)[ep.query_mask].mean())
        ll = torch.stack(ll)
        means[K], spreads[K] = float(ll.mean()), float(ll.std())
    assert spreads[2] > 3 * spreads[32] > 9 * spreads[512] > 0, spreads
    assert means[2] < means[32] < means[512] + 3 * spreads[512], means
    assert abs(means[512] - means[32]) < abs(means[512] - means[2]), means
    # the joint importance-weighted estimate: tighter with more samples, and rising toward its limit
    _, lrn = small(name, seed=0)
    _make_z_matter(lrn)
    joint = {K: torch.stack([lrn.joint_log_likelihood(ep, samples=K, generator=torch.Generator().manual_seed(s))
                             for s in seeds]) for K in (1, 16, 256)}  # [seeds, T]
    spread = {K: float(v.std(0).mean()) for K, v in joint.items()}
    mean = {K: float(v.mean()) for K, v in joint.items()}
    assert spread[1] > spread[16] > spread[256], spread
    assert mean[1] < mean[16] < mean[256] + 3 * spread[256], mean


def test_latent_models_need_a_generator_to_train():
    family, lrn = small("lnp")
    with pytest.raises(ValueError, match="pass generator="):
        lrn.meta_loss(family.episode(0, 0, 2))


def test_config_errors_say_how_to_fix_the_call():
    for name, options, message in [
        ("anp", {"hidden": 16, "heads": 5}, "learner.heads must divide hidden = 16, got 5"),
        ("anp", {"heads": 0}, "learner.heads must be >= 1, got 0"),
        ("cnp", {"min_scale": 0.0}, "learner.min_scale must be > 0 and < 1, got 0.0"),
        ("cnp", {"activation": "sigmoid"}, "learner.activation must be one of 'relu', 'tanh', 'gelu', 'silu', "
                                           "got 'sigmoid'"),
        ("lnp", {"eval_seed": -1}, "learner.eval_seed must be >= 0, got -1"),
        ("lnp", {"objective": "vi"}, "learner.objective must be one of 'elbo', 'ml', got 'vi'"),
    ]:
        with pytest.raises(metalens.config.ConfigError, match=f"^{re.escape(message)}$"):
            metalens.make_learner(name, metalens.make_task("gp"), **options)
    with pytest.raises(ValueError, match="regression model"):
        CNP(metalens.TaskSpec(kind="classification", x_shape=(2,), num_classes=3))


def test_registered():
    for name, cls in (("cnp", CNP), ("lnp", LNP), ("anp", ANP)):
        assert metalens.LEARNERS[name].cls is cls and cls.probabilistic


def test_a_briefly_trained_cnp_beats_the_gp_prior_predictive():
    """After 1000 steps (~10 s) the CNP's held-out NLL is below the prior's, N(0, s2 + noise^2), on the same tasks."""
    seed = 0
    family = metalens.make_task("gp")
    cnp = metalens.make_learner("cnp", family, seed=seed, hidden=64)
    metalens.train(cnp, family, metalens.TrainConfig(steps=1000, batch_tasks=16, lr=1e-3, seed=seed), progress=False)
    ev = evaluate(cnp, family, episodes=200, seed=seed, with_oracle=False)
    tasks = family.eval_episodes(seed, 200)
    prior = Normal(0.0, math.sqrt(family.config.signal_variance + family.config.noise_std**2))
    per_task = -(prior.log_prob(tasks.query_y[..., 0]) * tasks.query_mask).sum(1) / tasks.query_mask.sum(1)
    prior_nll = float(per_task.mean())
    assert ev.metrics["nll"].mean < prior_nll - 0.1, (seed, ev.metrics["nll"], prior_nll)


@pytest.mark.parametrize("name", ["lnp", "anp"])
def test_latent_meta_loss_is_the_negative_conditional_elbo(name):
    """-(sum_t log p(y_t | z) + KL(q(z | C u T) || q(z | C))) / targets, z ~ q(z | C u T), written out here."""
    seed = 12
    family, lrn = small(name, train_samples=2)
    ep = family.episode(seed, 0, 3)
    loss, metrics = lrn.meta_loss(ep, generator=rng.generator(seed, rng.Stream.LEARNER, 0))
    eps = torch.randn(3, 2, lrn.config.latent_dim, generator=rng.generator(seed, rng.Stream.LEARNER, 0))
    total, kl_sum = 0.0, 0.0
    for t in range(3):
        sm, qm = ep.support_mask[t], ep.query_mask[t]
        sx, sy = ep.support_x[t:t + 1, sm], ep.support_y[t:t + 1, sm]
        qx, qy = ep.query_x[t:t + 1, qm], ep.query_y[t:t + 1, qm]
        prior = lrn.latent(sx, sy, None)
        post = lrn.latent(torch.cat([sx, qx], 1), torch.cat([sy, qy], 1), None)
        r = lrn.deterministic_path(sx, sy, None, qx)
        log_p = 0.0
        for k in range(2):
            z = (post.loc + post.scale * eps[t, k])[:, None].expand(-1, qx.shape[1], -1)
            mean, scale = lrn.decoder(torch.cat([r, z, qx], -1))
            log_p = log_p + Normal(mean, scale).log_prob(qy).sum() / 2
        kl = torch.distributions.kl_divergence(post, prior).sum()
        total, kl_sum = total - log_p + kl, kl_sum + kl
    ref = total / ep.query_mask.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    assert metrics["kl"] == pytest.approx(float(kl_sum.detach()) / 3, rel=1e-4) and metrics["kl"] > 0


@pytest.mark.parametrize("name", ["lnp", "anp"])
def test_ml_objective_is_the_log_of_the_prior_sample_estimate_of_the_joint(name):
    """objective = ml: -sum_tasks log (1/L) sum_l prod_t p(y_t | z_l), z_l ~ q(z | C), per target, written out."""
    seed, L = 13, 3
    family, lrn = small(name, train_samples=L, objective="ml")
    _make_z_matter(lrn)
    ep = family.episode(seed, 0, 3)
    loss, metrics = lrn.meta_loss(ep, generator=rng.generator(seed, rng.Stream.LEARNER, 0))
    eps = torch.randn(3, L, lrn.config.latent_dim, generator=rng.generator(seed, rng.Stream.LEARNER, 0))
    total = 0.0
    for t in range(3):
        sm, qm = ep.support_mask[t], ep.query_mask[t]
        sx, sy = ep.support_x[t:t + 1, sm], ep.support_y[t:t + 1, sm]
        qx, qy = ep.query_x[t:t + 1, qm], ep.query_y[t:t + 1, qm]
        prior = lrn.latent(sx, sy, None)
        r = lrn.deterministic_path(sx, sy, None, qx)
        log_liks = []
        for k in range(L):
            z = (prior.loc + prior.scale * eps[t, k])[:, None].expand(-1, qx.shape[1], -1)
            mean, scale = lrn.decoder(torch.cat([r, z, qx], -1))
            log_liks.append(Normal(mean, scale).log_prob(qy).sum())
        total = total - (torch.logsumexp(torch.stack(log_liks), 0) - math.log(L))
    torch.testing.assert_close(loss, total / ep.query_mask.sum(), rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    assert metrics == {"loss": pytest.approx(float(loss.detach()))}
    loss.backward()  # and it trains every parameter of the latent path
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in lrn.latent.parameters())
    with pytest.raises(ValueError, match="objective must be one of 'elbo', 'ml', got 'vi'"):
        small(name, objective="vi")
