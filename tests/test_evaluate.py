"""The evaluator: same tasks for every learner, metrics against direct computation."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import metalens
from metalens.evaluate import evaluate, summarize
from metalens.learners.base import Learner


class Constant(Learner):
    """Predicts a constant: its metrics can be computed by hand."""

    registry_name = "constant"
    trainable = False

    class Config:
        pass

    def __init__(self, spec, value):
        super().__init__(spec, None)
        self.value = value

    def predict(self, support_x, support_y, query_x, *, support_mask=None):
        return Normal(torch.full(query_x.shape[:2] + (1,), self.value), torch.ones(query_x.shape[:2] + (1,)))


def test_metrics_match_direct_computation():
    fam = metalens.make_task("sinusoid")
    ev = evaluate(Constant(fam.spec, 0.5), fam, episodes=120, seed=3)
    tasks = fam.eval_episodes(3, 120)
    per_task = ((tasks.query_y - 0.5) ** 2).mean((1, 2)).double().numpy()
    assert ev.metrics["mse"].mean == pytest.approx(per_task.mean(), rel=1e-6)
    assert ev.metrics["mse"].ci95 == pytest.approx(1.96 * per_task.std(ddof=1) / math.sqrt(120), rel=1e-3)
    assert "nll" not in ev.metrics  # a non-probabilistic regressor reports no NLL
    assert set(ev.oracle) == {"mse", "nll"}
    assert ev.oracle["mse"].mean < ev.metrics["mse"].mean


def test_batch_size_does_not_change_results_and_oracle_learner_equals_oracle():
    fam = metalens.make_task("sinusoid", shots=5)
    oracle = metalens.make_learner("oracle", fam)
    a = evaluate(oracle, fam, episodes=70, seed=1, batch_tasks=70)
    b = evaluate(oracle, fam, episodes=70, seed=1, batch_tasks=16)
    np.testing.assert_allclose(a.per_task["mse"], b.per_task["mse"], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(a.per_task["nll"], a.oracle_per_task["nll"], rtol=1e-6)
    assert a.to_json()["metrics"]["mse"]["mean"] == pytest.approx(a.oracle["mse"].mean)


def test_masked_queries_do_not_count():
    fam = metalens.make_task("gp", min_target=3, max_target=20)
    ev = evaluate(Constant(fam.spec, 0.0), fam, episodes=50, seed=0, with_oracle=False)
    tasks = fam.eval_episodes(0, 50)
    m = tasks.query_mask.double()
    direct = ((tasks.query_y[..., 0].double() ** 2) * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(ev.per_task["mse"], direct.numpy(), rtol=1e-6)
    assert ev.oracle is None


def test_defaults_and_errors():
    reg, cls = metalens.make_task("sinusoid"), metalens.make_task("clusters")
    assert metalens.evaluate.__module__  # the function is exported
    from metalens.evaluate import default_episodes
    assert (default_episodes(reg), default_episodes(cls)) == (1000, 600)
    with pytest.raises(ValueError, match="episodes must be >= 2"):
        evaluate(Constant(reg.spec, 0.0), reg, episodes=1)


def test_summarize():
    m = summarize(np.array([1.0, 2.0, 3.0, 4.0]))
    assert m.mean == 2.5 and m.ci95 == pytest.approx(1.959964 * np.std([1, 2, 3, 4], ddof=1) / 2)
