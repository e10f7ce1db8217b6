"""Contract tests run over every registered learner, on a regression and a classification family.

A learner added to the registry is covered automatically: it runs with the small options of
:data:`SMALL`, or with its defaults when it has no entry there. A learner that refuses a family
(ConfigError when built) is skipped on it, by name; every learner must accept at least one.
Every test uses the module's :data:`SEED` and names it in its messages.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

import pytest
import torch
from torch.distributions import Categorical, Distribution

import metalens
from metalens import checkpoint, rng
from metalens.config import ConfigError, from_dict
from metalens.episode import Episode
from metalens.experiments.recipes import ADAPTATION_STEPS
from metalens.learners.base import Learner
from metalens.tasks.base import TaskFamily

torch.set_num_threads(1)

SEED = 20240611
LEARNERS = metalens.LEARNERS.names()

# Small options per learner, so that the whole file runs in seconds on one CPU thread. A learner
# without an entry runs with its defaults.
_SMALL_MLP = {"hidden": [8]}
_SMALL_NP = {"hidden": 8, "encoder_layers": 2, "decoder_layers": 2}
SMALL: dict[str, dict[str, Any]] = {
    "oracle": {},
    "scratch": {**_SMALL_MLP, "steps": 3},
    "pretrain": {**_SMALL_MLP, "finetune_steps": 2},
    "maml": {**_SMALL_MLP, "eval_inner_steps": 2},
    "fomaml": {**_SMALL_MLP, "eval_inner_steps": 2},
    "metasgd": {**_SMALL_MLP},
    "anil": {**_SMALL_MLP, "eval_inner_steps": 2},
    "reptile": {**_SMALL_MLP, "inner_steps": 2, "eval_inner_steps": 2},
    "imaml": {**_SMALL_MLP, "inner_steps": 2, "cg_steps": 2, "eval_inner_steps": 2},
    "cnp": _SMALL_NP,
    "lnp": {**_SMALL_NP, "latent_dim": 4, "eval_samples": 3},
    "anp": {**_SMALL_NP, "latent_dim": 4, "eval_samples": 3, "heads": 2},
    "protonet": {"backbone": "mlp", "hidden": [8], "embedding_dim": 8},
    "matching": {"backbone": "mlp", "hidden": [8], "embedding_dim": 8, "fce": True, "fce_steps": 2},
    "transformer": {"dim": 8, "layers": 1, "heads": 2, "mlp_ratio": 2},
    "lstm": {"hidden": 8},
    "mann": {"hidden": 8, "slots": 6, "width": 4, "heads": 2},
    "pacbayes": {**_SMALL_MLP, "inner_steps": 2, "eval_samples": 3},
}

# One small family of each kind.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "regression": ("sinusoid", {"shots": 5, "queries": 4}),
    "classification": ("clusters", {"ways": 3, "shots": 2, "queries": 2}),
}
KINDS = list(FAMILIES)
PAIRS = [pytest.param(name, kind, id=f"{name}-{kind}") for name in LEARNERS for kind in KINDS]
N_TASKS = 3


@cache
def family(kind: str) -> TaskFamily:
    task, options = FAMILIES[kind]
    return metalens.make_task(task, **options)


@cache
def episode(kind: str) -> Episode:
    return family(kind).episode(SEED, 0, N_TASKS)


def build(name: str, kind: str, *, seed: int = SEED, **options: Any) -> Learner:
    """Learner ``name`` for the family of ``kind`` (its small options, then ``options``); ConfigError if refused."""
    return metalens.make_learner(name, family(kind), seed=seed, **{**SMALL.get(name, {}), **options})


def build_or_skip(name: str, kind: str, **kwargs: Any) -> Learner:
    try:
        return build(name, kind, **kwargs)
    except ConfigError as e:
        if supported_kinds(name) and kind not in supported_kinds(name):
            pytest.skip(f"{name} refuses the {kind} family ({FAMILIES[kind][0]}): {e}")
        raise


@cache
def supported_kinds(name: str) -> tuple[str, ...]:
    kinds = []
    for kind in KINDS:
        try:
            build(name, kind)
        except ConfigError:
            continue
        kinds.append(kind)
    return tuple(kinds)


def predict(learner: Learner, ep: Episode) -> Distribution:
    with torch.no_grad():  # as the evaluator calls it
        return learner.predict(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)


def outputs(dist: Distribution) -> torch.Tensor:
    """What a prediction is: the mean (regression) or the class probabilities (classification)."""
    return dist.probs if isinstance(dist, Categorical) else dist.mean


# -- the registry and the options of this file --------------------------------------------------------


def test_every_small_entry_is_a_registered_learner_with_valid_options():
    assert set(SMALL) <= set(LEARNERS), f"SMALL names unregistered learners: {sorted(set(SMALL) - set(LEARNERS))}"
    for name in LEARNERS:
        config_cls = metalens.LEARNERS[name].cls.Config
        config = from_dict(config_cls, SMALL.get(name, {}))  # a learner without an entry runs with its defaults
        assert dataclasses.is_dataclass(config), name


@pytest.mark.parametrize("name", LEARNERS)
def test_every_learner_supports_a_regression_or_a_classification_family(name):
    assert supported_kinds(name), (f"{name} refuses both {FAMILIES['regression'][0]} and "
                                   f"{FAMILIES['classification'][0]} (seed {SEED})")


def test_adaptation_step_options_name_real_learners_and_options():
    for name, option in ADAPTATION_STEPS.items():
        assert name in LEARNERS, name
        fields = {f.name for f in dataclasses.fields(metalens.LEARNERS[name].cls.Config)}
        assert option in fields, f"{name} has no option {option!r}"


# -- predictions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", PAIRS)
def test_prediction_shapes_and_distribution(name, kind):
    learner = build_or_skip(name, kind)
    ep = episode(kind)
    dist = predict(learner, ep)
    T, Q = ep.n_tasks, ep.n_query
    msg = f"{name} on {kind}, seed {SEED}"
    assert isinstance(dist, Distribution), msg
    if kind == "classification":
        N = ep.num_classes
        assert isinstance(dist, Categorical), msg
        assert tuple(dist.batch_shape) == (T, Q) and tuple(dist.probs.shape) == (T, Q, N), msg
        torch.testing.assert_close(dist.probs.sum(-1), torch.ones(T, Q), msg=msg)
        assert bool(torch.isfinite(dist.log_prob(ep.query_y)).all()), msg
    else:
        dy = ep.query_y.shape[-1]
        assert tuple(dist.batch_shape) == (T, Q, dy), msg
        assert tuple(dist.mean.shape) == (T, Q, dy) and bool(torch.isfinite(dist.mean).all()), msg
        if learner.probabilistic:
            lp = dist.log_prob(ep.query_y)
            assert tuple(lp.shape) == (T, Q, dy) and bool(torch.isfinite(lp).all()), msg


@pytest.mark.parametrize("name, kind", PAIRS)
def test_the_seed_decides_the_initial_weights_and_the_predictions(name, kind):
    a = build_or_skip(name, kind)
    b = build(name, kind)
    sa, sb = a.state_dict(), b.state_dict()
    msg = f"{name} on {kind}, seed {SEED}"
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), msg
    ep = episode(kind)
    assert torch.equal(outputs(predict(a, ep)), outputs(predict(b, ep))), msg
    if any(True for _ in a.parameters()):
        c = build(name, kind, seed=SEED + 1).state_dict()
        assert any(not torch.equal(sa[k], c[k]) for k in sa), f"{name} on {kind}: seeds {SEED} and {SEED + 1} " \
                                                               "gave the same initial weights"


# -- training ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", PAIRS)
def test_meta_gradient_is_finite(name, kind):
    learner = build_or_skip(name, kind)
    if not learner.trainable:
        pytest.skip(f"{name} has nothing to meta-train")
    msg = f"{name} on {kind}, seed {SEED}"
    loss, metrics = learner.meta_loss(episode(kind), generator=rng.generator(SEED, rng.Stream.LEARNER, 0))
    assert loss.dim() == 0 and bool(torch.isfinite(loss)), f"{msg}: loss {loss}"
    assert all(isinstance(v, float) for v in metrics.values()) and "loss" in metrics, msg
    loss.backward()
    grads = {k: p.grad for k, p in learner.named_parameters() if p.grad is not None}
    not_finite = sorted(k for k, g in grads.items() if not bool(torch.isfinite(g).all()))
    assert not not_finite, f"{msg}: non-finite meta-gradient on {not_finite}"
    assert any(bool(g.abs().sum() > 0) for g in grads.values()), f"{msg}: no parameter has a non-zero meta-gradient"


@pytest.mark.parametrize("name, kind", PAIRS)
def test_a_saved_and_loaded_state_predicts_the_same(name, kind, tmp_path):
    learner = build_or_skip(name, kind)
    checkpoint.save(tmp_path, step=1, model=learner.state_dict(), optimizer=None, state={"seed": SEED})
    fresh = build(name, kind, seed=SEED + 1)
    fresh.load_state_dict(checkpoint.load(checkpoint.latest(tmp_path)).model)  # strict
    ep = episode(kind)
    assert torch.equal(outputs(predict(learner, ep)), outputs(predict(fresh, ep))), f"{name} on {kind}, seed {SEED}"


# -- evaluation-time options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [p for p in PAIRS if p.values[0] in ADAPTATION_STEPS])
def test_adaptation_steps_change_the_predictions_not_the_parameters(name, kind):
    option = ADAPTATION_STEPS[name]
    one = build_or_skip(name, kind, **{option: 1})
    five = build(name, kind, seed=SEED + 1, **{option: 5})
    state = one.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in five.state_dict().items()}, name
    five.load_state_dict(state)  # strict: the option changes no parameter
    ep = episode(kind)
    a, b = outputs(predict(one, ep)), outputs(predict(five, ep))
    assert not torch.allclose(a, b, rtol=0, atol=1e-6), (
        f"{name} on {kind}, seed {SEED}: {option} = 1 and 5 predict the same")
