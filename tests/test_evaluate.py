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


# -- tasks whose predictions diverge ------------------------------------------------------------------
class DivergesWhere(Learner):
    """Predicts 0.5, except non-finite predictions on the tasks whose first support target is above ``cut``."""

    registry_name = "diverges-where"
    trainable = False

    class Config:
        pass

    def __init__(self, spec, cut):
        super().__init__(spec, None)
        self.cut = cut

    def predict(self, support_x, support_y, query_x, *, support_mask=None):
        mean = torch.full(query_x.shape[:2] + (1,), 0.5)
        bad = support_y[:, 0, 0] > self.cut  # [T]
        mean[bad] = float("nan")
        mean[bad & (support_y[:, 0, 0] > 2 * self.cut + 1)] = float("inf")
        return Normal(mean, torch.ones_like(mean), validate_args=False)


def test_diverged_tasks_are_counted_and_the_metrics_summarise_the_others():
    fam = metalens.make_task("sinusoid")
    tasks = fam.eval_episodes(4, 150)
    bad = (tasks.support_y[:, 0, 0] > 1.0).numpy()
    assert 0 < bad.sum() < 150
    ev = evaluate(DivergesWhere(fam.spec, 1.0), fam, episodes=150, seed=4, batch_tasks=40)
    assert ev.diverged == int(bad.sum()) and ev.scored == 150 - int(bad.sum())
    np.testing.assert_array_equal(ev.diverged_tasks, bad)
    direct = ((tasks.query_y[~torch.from_numpy(bad)] - 0.5) ** 2).mean((1, 2)).double().numpy()
    np.testing.assert_allclose(ev.per_task["mse"], direct, rtol=1e-6)
    assert ev.metrics["mse"].mean == pytest.approx(direct.mean(), rel=1e-6)
    # the oracle is summarised on the very same tasks, aligned with the learner's per-task values
    full_oracle = evaluate(DivergesWhere(fam.spec, 100.0), fam, episodes=150, seed=4, batch_tasks=40)
    assert full_oracle.diverged == 0
    np.testing.assert_allclose(ev.oracle_per_task["mse"], full_oracle.oracle_per_task["mse"][~bad], rtol=1e-9)
    assert len(ev.oracle_per_task["nll"]) == len(ev.per_task["mse"])
    js = ev.to_json()
    assert js["diverged"] == int(bad.sum()) and js["diverged_tasks"] == np.flatnonzero(bad).tolist()
    assert full_oracle.to_json()["diverged"] == 0 and full_oracle.to_json()["diverged_tasks"] == []


def test_every_task_diverging_is_a_numerical_error():
    from metalens.errors import NumericalError

    fam = metalens.make_task("sinusoid")
    with pytest.raises(NumericalError, match="diverged .* on every one of the 30 held-out tasks"):
        evaluate(DivergesWhere(fam.spec, -100.0), fam, episodes=30)


def test_eval_command_reports_diverged_tasks_and_fails_when_all_diverge(tmp_path, capsys):
    import json

    from metalens.cli import main

    run = tmp_path / "maml"
    assert main(["train", "--task", "sinusoid", "--learner", "maml", "--steps", "1", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    # an untrained network with a 30x rate: the inner loop diverges on some tasks only
    assert main(["eval", str(run), "--episodes", "20", "--set", "learner.inner_lr=0.3", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    print(f"diverged {js['diverged']} of 20: {js['diverged_tasks']}")
    assert 0 < js["diverged"] < 20 and len(js["diverged_tasks"]) == js["diverged"]
    assert js["metrics"]["mse"]["mean"] == js["metrics"]["mse"]["mean"]  # finite: over the other tasks
    assert main(["eval", str(run), "--episodes", "20", "--set", "learner.inner_lr=0.3"]) == 0
    out = capsys.readouterr().out
    assert f"diverged: {js['diverged']} of 20 held-out tasks" in out
    code = main(["eval", str(run), "--episodes", "20", "--set", "learner.inner_lr=1e3"])
    err = capsys.readouterr().err
    assert code == 1 and "every one of the 20 held-out tasks" in err and len(err.strip().splitlines()) == 1
