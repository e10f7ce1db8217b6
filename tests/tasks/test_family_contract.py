"""Contract tests run over every registered task family (default configs).

Each test names its seed in its id or its assertion messages.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import torch

from metalens import rng
from metalens.config import from_dict, to_dict
from metalens.episode import Episode
from metalens.registry import TASKS
from metalens.tasks.base import TaskFamily
from metalens.tasks.benchmarks import DataNotFound

torch.set_num_threads(1)

FAMILIES = TASKS.names()
# families whose class defines the exact oracle (the others' spec.oracle is None)
ORACLE_FAMILIES = [n for n in FAMILIES if TASKS[n].cls.oracle is not TaskFamily.oracle]
SEED = 20240611


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(name: str, config=None):
    """The family ``name`` with its default options; skipped where it reads a data set this machine lacks
    (the benchmark families: tests/tasks/test_benchmarks.py runs these checks on copies in their formats)."""
    try:
        return TASKS[name].cls(config)
    except DataNotFound as e:
        pytest.skip(f"{name}: no local copy of its data ({e})")


def episodes_equal(a: Episode, b: Episode) -> bool:
    for (k, x), (_, y) in zip(a.tensors().items(), b.tensors().items()):
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return a.num_classes == b.num_classes


def test_the_four_synthetic_families_are_registered():
    assert {"sinusoid", "gp", "linear", "clusters"} <= set(FAMILIES), FAMILIES


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_matches_spec(name):
    family = make(name)
    spec = family.spec
    ep = family.sample(7, generator=gen(SEED))
    msg = f"{name}, seed {SEED}"
    assert ep.n_tasks == 7, msg
    assert ep.support_x.dtype == ep.query_x.dtype == torch.float32, msg
    assert tuple(ep.support_x.shape[2:]) == spec.x_shape == tuple(ep.query_x.shape[2:]), msg
    if spec.is_classification:
        assert ep.num_classes == spec.num_classes, msg
        assert ep.support_y.dtype == torch.int64, msg
    else:
        assert ep.num_classes is None, msg
        assert ep.support_y.shape == (*ep.support_x.shape[:2], spec.y_dim), msg
        assert ep.query_y.shape == (*ep.query_x.shape[:2], spec.y_dim), msg
        assert ep.support_y.dtype == ep.query_y.dtype == torch.float32, msg
    if spec.x_range is not None:  # every input, padded ones included, lies in the plotting range
        lo, hi = spec.x_range
        for x in (ep.support_x, ep.query_x):
            assert float(x.min()) >= lo and float(x.max()) <= hi, msg
    assert (spec.oracle is not None) == family.has_oracle == (name in ORACLE_FAMILIES), msg


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_rejects_no_tasks(name):
    with pytest.raises(ValueError, match="n_tasks must be >= 1, got 0"):
        make(name).sample(0, generator=gen(SEED))


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_is_deterministic_in_the_generator(name):
    family = make(name)
    a = family.sample(5, generator=gen(SEED))
    b = family.sample(5, generator=gen(SEED))
    c = family.sample(5, generator=gen(SEED + 1))
    assert episodes_equal(a, b), f"{name}: seed {SEED} gave two different episodes"
    assert not torch.equal(a.support_x, c.support_x), f"{name}: seeds {SEED} and {SEED + 1} gave the same inputs"
    assert not torch.equal(a.query_y, c.query_y), f"{name}: seeds {SEED} and {SEED + 1} gave the same targets"


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_and_oracle_leave_the_global_rng_alone(name):
    family = make(name)
    torch.manual_seed(SEED)
    state = torch.get_rng_state()
    ep = family.sample(3, generator=gen(SEED))
    if family.has_oracle:
        family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    assert torch.equal(state, torch.get_rng_state()), f"{name} used the global RNG (seed {SEED})"


@pytest.mark.parametrize("name", FAMILIES)
def test_training_episode_depends_on_seed_and_step_only(name):
    family = make(name)
    a = family.episode(SEED, 3, 4)
    assert episodes_equal(a, family.episode(SEED, 3, 4)), f"{name}, seed {SEED}"
    assert not torch.equal(a.support_x, family.episode(SEED, 4, 4).support_x), f"{name}, seed {SEED}"
    assert torch.equal(
        a.support_x, family.sample(4, generator=rng.generator(SEED, rng.Stream.TRAIN, 3)).support_x
    ), f"{name}, seed {SEED}"


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_episodes_do_not_depend_on_how_many_are_asked_for(name):
    family = make(name)
    a = family.eval_episodes(SEED, 60)
    b = family.eval_episodes(SEED, 120)
    assert a.n_tasks == 60 and b.n_tasks == 120
    assert episodes_equal(a, b[:60]), f"{name}: task i of eval_episodes({SEED}, n) depends on n"
    other = family.eval_episodes(SEED + 1, 60)
    assert not torch.equal(a.query_x, other.query_x), f"{name}: seeds {SEED}, {SEED + 1}"
    train = family.episode(SEED, 0, 60)
    assert not torch.equal(a.query_x, train.query_x), f"{name}: evaluation tasks equal training tasks (seed {SEED})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ORACLE_FAMILIES)
def test_oracle_distribution_shape_and_finiteness(name, dtype):
    family = make(name)
    ep = family.sample(6, generator=gen(SEED)).to(dtype=dtype)
    d = family.spec.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    T, Q = ep.n_tasks, ep.n_query
    msg = f"{name}, seed {SEED}"
    lp = d.log_prob(ep.query_y)
    if ep.is_classification:
        assert tuple(d.batch_shape) == (T, Q), msg
        assert d.logits.shape == (T, Q, ep.num_classes) and d.logits.dtype == dtype, msg
        assert torch.allclose(d.probs.sum(-1), torch.ones((), dtype=dtype)), msg
        assert lp.shape == (T, Q), msg
    else:
        assert tuple(d.batch_shape) == (T, Q, 1), msg
        assert d.mean.shape == (T, Q, 1) and d.mean.dtype == dtype, msg
        assert bool(torch.isfinite(d.mean).all()), msg
        assert lp.shape == (T, Q, 1), msg
        assert bool((d.variance > 0).all()), msg
    assert bool(torch.isfinite(lp).all()), msg


def _pad_support(ep: Episode, extra: int, generator: torch.Generator):
    """Append ``extra`` junk support points per task, masked out."""
    T, S = ep.n_tasks, ep.n_support
    junk_x = ep.support_x[:, :1].expand(T, extra, *ep.support_x.shape[2:]).clone()
    junk_x += torch.rand(junk_x.shape, generator=generator) * 0.5  # nearby, different inputs
    if ep.is_classification:
        junk_y = torch.randint(0, ep.num_classes, (T, extra), generator=generator)
    else:
        junk_y = 100.0 + torch.rand(T, extra, ep.support_y.shape[2], generator=generator)  # absurd targets
    mask = ep.support_mask if ep.support_mask is not None else torch.ones(T, S, dtype=torch.bool)
    # put the junk first, so that a family that ignored the mask could not hide it in a suffix
    sx = torch.cat([junk_x, ep.support_x], 1)
    sy = torch.cat([junk_y, ep.support_y], 1)
    sm = torch.cat([torch.zeros(T, extra, dtype=torch.bool), mask], 1)
    return sx, sy, sm


@pytest.mark.parametrize("name", ORACLE_FAMILIES)
def test_oracle_ignores_masked_support_points(name):
    family = make(name)
    ep = family.sample(5, generator=gen(SEED)).to(dtype=torch.float64)
    sx, sy, sm = _pad_support(ep, 3, gen(SEED + 7))
    ref = family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    pad = family.oracle(sx, sy, ep.query_x, support_mask=sm)
    msg = f"{name}, seed {SEED}: masked support points changed the oracle"
    assert torch.allclose(ref.log_prob(ep.query_y), pad.log_prob(ep.query_y), atol=1e-6), msg
    if not ep.is_classification:
        assert torch.allclose(ref.mean, pad.mean, atol=1e-6), msg
    # and the junk does change the prediction when it is not masked
    unmasked = family.oracle(sx, sy, ep.query_x, support_mask=sm | True)
    assert not torch.allclose(ref.log_prob(ep.query_y), unmasked.log_prob(ep.query_y), atol=1e-3), (
        f"{name}, seed {SEED}: the junk points have no effect even unmasked; the test is vacuous")


@pytest.mark.parametrize("name", ORACLE_FAMILIES)
def test_oracle_of_a_task_does_not_depend_on_the_rest_of_the_batch(name):
    family = make(name)
    ep = family.sample(12, generator=gen(SEED))
    whole = family.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
    part = ep[3:5]
    alone = family.oracle(part.support_x, part.support_y, part.query_x, support_mask=part.support_mask)
    msg = f"{name}, seed {SEED}: tasks 3-4 predicted differently in a batch of 12 and of 2"
    assert torch.allclose(whole.log_prob(ep.query_y)[3:5], alone.log_prob(part.query_y), atol=1e-5), msg
    if not ep.is_classification:
        assert torch.allclose(whole.mean[3:5], alone.mean, atol=1e-5), msg


# -- configs ----------------------------------------------------------------------------------------


def _bad_value(tp, default, field=""):
    """A value of type ``tp`` that every range check should reject, or None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        return _bad_value(inner[0], default, field) if default is not None else (2.0, 1.0)
    if origin is typing.Literal:
        return "no-such-option"
    if tp is int:
        return -1 if field.endswith("seed") else 0
    if tp is float:
        return -1.0
    if origin is tuple:
        if args and args[0] is int:
            return tuple(0 for _ in args)
        return (default[1], default[0])  # a range, reversed
    return None


def _config_fields():
    for name in FAMILIES:
        cls = TASKS[name].cls.Config
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            bad = _bad_value(hints[f.name], getattr(default, f.name), f.name)
            if bad is not None:
                yield pytest.param(name, f.name, bad, id=f"{name}.{f.name}={bad!r}")


@pytest.mark.parametrize("name,field,bad", list(_config_fields()))
def test_config_rejects_bad_values_naming_the_field(name, field, bad):
    cls = TASKS[name].cls.Config
    with pytest.raises(ValueError, match=re.escape(field)):
        cls(**{field: bad})


@pytest.mark.parametrize("name", FAMILIES)
def test_config_zero_shots_message(name):
    cls = TASKS[name].cls.Config
    field = "shots" if "shots" in {f.name for f in dataclasses.fields(cls)} else "min_context"
    with pytest.raises(ValueError, match=rf"^{field} must be >= 1, got 0$"):
        cls(**{field: 0})


@pytest.mark.parametrize("name", FAMILIES)
def test_config_fields_are_documented_and_round_trip(name):
    cls = TASKS[name].cls.Config
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    config = cls()
    assert from_dict(cls, to_dict(config)) == config  # tuples survive JSON lists
    assert TASKS[name].summary, f"{name} has no one-line summary"
    assert make(name, config).config is config
    assert make(name, None).config == config
