"""The pacbayes learner: its hyper level, its base learner, its meta-gradient and its bound on a tiny problem."""

from __future__ import annotations

import math

import pytest
import torch

import metalens
from metalens import rng
from metalens.certify import bounded_losses
from metalens.learners.pac_bayes import PACBayes
from metalens.theory.pac_bayes import gaussian_kl
from metalens.train import TrainConfig, train

torch.set_num_threads(1)

SEED = 20240611
SMALL = {"hidden": [], "prior_std": 1.0, "hyper_posterior_std": 1.0, "inner_lr": 0.3, "eval_samples": 4}


def family(**options):
    return metalens.make_task("clusters", **{"ways": 3, "shots": 4, "queries": 3, "std": 0.5, **options})


def learner(fam=None, **options) -> PACBayes:
    return metalens.make_learner("pacbayes", fam or family(), seed=SEED, **{**SMALL, **options})


def test_the_hyper_posterior_starts_on_the_hyper_prior_and_its_draws_average_to_the_kl():
    lrn = learner()
    assert lrn.kl_hyper().item() == pytest.approx(0.0, abs=1e-12), f"seed {SEED}"
    torch.testing.assert_close(lrn.hyper_prior_mean, lrn.prior_mean.detach())  # theta_0: the initial weights
    with torch.no_grad():
        lrn.prior_mean.add_(0.3)
        lrn.hyper_logstd.sub_(0.5)
    kl = lrn.kl_hyper().item()
    d = lrn.dim  # 2d coordinates: means shifted by 0.3, every std e^-0.5 of the hyper-prior's 1
    want = 0.5 * (d * 0.3 ** 2 + 2 * d * (math.exp(-1.0) - 1 + 1.0))
    assert kl == pytest.approx(want, rel=1e-6)
    g = torch.Generator().manual_seed(SEED)
    draws = [lrn.sample_prior(g).log_ratio.item() for _ in range(2000)]
    assert sum(draws) / len(draws) == pytest.approx(kl, rel=0.05), f"seed {SEED}"


def test_without_inner_steps_the_posterior_is_the_prior():
    lrn = learner(inner_steps=0)
    ep = family().episode(SEED, 0, 3)
    prior = lrn.prediction_prior()
    post = lrn.adapt(prior, ep.support_x, ep.support_y, None, lrn.inner_noise(3, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(post.mean, prior.mean.expand(3, -1))
    assert lrn.task_kl(post, prior).abs().max().item() < 1e-9


def test_the_base_learner_fits_the_support_set_and_pays_for_it_in_kl():
    fam = family(shots=20)
    lrn = learner(fam, inner_steps=10)
    ep = fam.episode(SEED, 0, 20)
    prior = lrn.prediction_prior()
    post = lrn.adapt(prior, ep.support_x, ep.support_y, None, lrn.inner_noise(20, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        before = bounded_losses(lrn.outputs(prior.mean.expand(20, 1, -1), ep.support_x), ep.support_y[:, None],
                                classification=True, clip=1.0).mean()
        after = bounded_losses(lrn.outputs(post.mean[:, None], ep.support_x), ep.support_y[:, None],
                               classification=True, clip=1.0).mean()
    kl = lrn.task_kl(post, prior)
    assert after < before - 0.2, f"seed {SEED}: support error {before:.3f} -> {after:.3f}"
    assert bool((kl > 0).all()) and bool(torch.isfinite(kl).all())
    torch.testing.assert_close(kl, gaussian_kl(post.mean, post.logvar, prior.mean, prior.logvar))
    assert bool((post.logvar < prior.logvar).all()), "the data only ever sharpens the posterior"


@pytest.mark.parametrize("objective", ["joint", "amit-meir"])
@pytest.mark.parametrize("task", ["clusters", "linear"])
def test_meta_loss_gradient_is_finite_and_reaches_every_parameter(objective, task):
    fam = family() if task == "clusters" else metalens.make_task("linear", dim=3, shots=6, queries=2, noise_std=0.5)
    lrn = learner(fam, objective=objective, inner_steps=3)
    loss, metrics = lrn.meta_loss(fam.episode(SEED, 0, 4), generator=rng.generator(SEED, rng.Stream.LEARNER, 0))
    assert set(metrics) == {"loss", "gibbs_loss", "kl_hyper", "kl_task"}
    assert bool(torch.isfinite(loss)) and metrics["loss"] >= metrics["gibbs_loss"] >= 0
    loss.backward()
    for name, p in lrn.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), f"{name}, seed {SEED}"
        assert p.grad.abs().sum() > 0, f"{name} has no meta-gradient (seed {SEED})"


def test_meta_loss_needs_a_generator():
    with pytest.raises(ValueError, match="pass generator="):
        learner().meta_loss(family().episode(SEED, 0, 2))


def test_predictions_are_deterministic_and_do_not_depend_on_the_batch():
    lrn = learner()
    ep = family().episode(SEED, 0, 4)
    with torch.no_grad():
        full = lrn.predict(ep.support_x, ep.support_y, ep.query_x).probs
        part = lrn.predict(ep.support_x[:2], ep.support_y[:2], ep.query_x[:2]).probs
        again = lrn.predict(ep.support_x, ep.support_y, ep.query_x).probs
    torch.testing.assert_close(full[:2], part)
    assert torch.equal(full, again)
    other = learner(eval_seed=1)
    other.load_state_dict(lrn.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other.predict(ep.support_x, ep.support_y, ep.query_x).probs, full)


def test_regression_predicts_a_mixture_whose_mean_is_the_average_output():
    fam = metalens.make_task("linear", dim=2, shots=5, queries=3, noise_std=0.1)
    lrn = learner(fam, eval_samples=3, output_std=0.2)
    ep = fam.episode(SEED, 0, 2)
    with torch.no_grad():
        dist = lrn.predict(ep.support_x, ep.support_y, ep.query_x)
    assert tuple(dist.batch_shape) == (2, 3, 1) and dist.component_distribution.scale.max().item() == pytest.approx(0.2)
    torch.testing.assert_close(dist.mean, dist.component_distribution.mean.mean(-1))


def test_the_meta_bound_decreases_when_trained_on_a_tiny_problem():
    """From priors too tight for the base learner to move (sigma_0 = 0.1), training widens them where the tasks
    need it: the meta-bound on held-out episodes falls."""
    fam = family(shots=10)
    lrn = learner(fam, inner_steps=3, bound_tasks=100, prior_std=0.1, hyper_posterior_std=0.1)

    def bound() -> float:
        return sum(lrn.meta_loss(fam.episode(SEED, s, 10), generator=rng.generator(SEED, 1, s))[1]["loss"]
                   for s in range(1000, 1008)) / 8

    before = bound()
    train(lrn, fam, TrainConfig(steps=40, batch_tasks=10, lr=0.05, seed=SEED), progress=False)
    after = bound()
    assert after < before - 0.1, f"seed {SEED}: meta-bound {before:.4f} -> {after:.4f} on held-out episodes"
