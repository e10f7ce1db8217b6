"""The neural-processes study: a smoke run from the CLI, run reuse, its checks, and the exact GP joint likelihood."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import metalens
from metalens.cli import main
from metalens.config import ConfigError
from metalens.experiments.neural_processes import NeuralProcesses
from metalens.registry import STUDIES
from metalens.tasks.gp import kernel_matrix

torch.set_num_threads(1)


def test_quick_study_from_the_cli_writes_its_report_and_reuses_its_runs(capsys, tmp_path):
    out = tmp_path / "np"
    argv = ["study", "neural-processes", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", 'study.kernels=["rbf", "rbf-random"]']
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(r["kernel"], r["model"]) for r in report["loglik"]] == [
        (k, m) for k in ("rbf", "rbf-random") for m in ("oracle", "cnp", "lnp", "anp")]
    for r in report["loglik"]:
        assert all(math.isfinite(r[k]["mean"]) for k in ("ll", "oracle_ll", "gap", "joint_ll", "oracle_joint_ll"))
    oracle = report["loglik"][0]
    assert oracle["gap"]["mean"] == 0.0 and oracle["ll"] == report["loglik"][1]["oracle_ll"]
    # the CNP's predictive factorises: its joint LL per target is its per-point LL
    assert report["loglik"][1]["joint_ll"] == report["loglik"][1]["ll"]
    assert [(o["kernel"], o["pair"]) for o in report["ordering"]] == [
        (k, p) for k in ("rbf", "rbf-random") for p in ("anp - lnp", "lnp - cnp", "anp - cnp")]
    lls = {r["model"]: r["ll"]["mean"] for r in report["loglik"][:4]}
    assert report["ordering"][0]["difference"]["mean"] == pytest.approx(lls["anp"] - lls["lnp"])
    curve = report["curves"]["rbf"]
    assert set(curve) == {"oracle", "cnp", "lnp", "anp"} and [p[0] for p in curve["oracle"]] == [0, 3, 10]
    # n = 0 is the GP prior for the oracle: N(0, 1 + 0.05^2) per point
    assert curve["oracle"][0][1] < curve["oracle"][1][1] < curve["oracle"][2][1]
    assert [r["learner"] for r in report["sinusoid"]][:3] == ["cnp", "lnp", "anp"]
    assert ("maml" in metalens.LEARNERS) == ("maml" in [r["learner"] for r in report["sinusoid"]])
    for fig in report["figures"]:
        assert (out / fig).stat().st_size > 0
    # every claim is a check: the oracle bound per kernel and model, the literature's ordering, sinusoid's bound
    checks = report["checks"]
    expected = {f"{k}.{m}.no_better_than_oracle" for k in ("rbf", "rbf-random") for m in ("cnp", "lnp", "anp")}
    expected |= {f"{k}.{c}" for k in ("rbf", "rbf-random") for c in ("anp_beats_lnp", "lnp_no_worse_than_cnp")}
    expected |= {f"sinusoid.{r['learner']}.no_better_than_oracle" for r in report["sinusoid"]}
    assert set(checks) == expected
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    gap = next(r for r in report["loglik"] if (r["kernel"], r["model"]) == ("rbf", "lnp"))["gap"]
    assert checks["rbf.lnp.no_better_than_oracle"]["value"] == pytest.approx(gap["mean"], abs=1e-6)
    assert checks["rbf.lnp.no_better_than_oracle"]["holds"] == (gap["mean"] >= -gap["ci95"])
    md = (out / "report.md").read_text()
    assert "--out OUT --set 'study.kernels=[\"rbf\", \"rbf-random\"]' --set 'study.quick=true'" in md
    assert "| rbf-random | `anp` |" in md and "## Checks (" in md and "| `rbf.anp_beats_lnp` |" in md
    assert "issue" not in md.lower()
    assert sorted(p.name for p in (out / "runs").iterdir())[:3] == ["anp-rbf", "anp-rbf-random", "anp-sinusoid"]
    # a second run reuses the finished runs (and refuses nothing)
    capsys.readouterr()
    assert main(argv) == 0
    assert "reusing the finished run" in capsys.readouterr().out


def test_study_is_registered_and_checks_its_options():
    assert STUDIES["neural-processes"].cls is NeuralProcesses
    with pytest.raises(ConfigError, match="kernels must be a list of one of 'rbf'"):
        NeuralProcesses.Config(kernels=("rbf", "cosine"))
    with pytest.raises(ConfigError, match="models must be a list of one of 'cnp'"):
        NeuralProcesses.Config(models=("maml",))
    with pytest.raises(ConfigError, match="objective must be one of 'elbo', 'ml'"):
        NeuralProcesses.Config(objective="iwae")
    with pytest.raises(ConfigError, match="steps must name models among cnp, lnp, anp"):
        NeuralProcesses.Config(steps={"cnp": 5, "maml": 3})
    with pytest.raises(ConfigError, match="lr_decay must be >= 0 and < 1"):
        NeuralProcesses.Config(lr_decay=1.0)
    assert NeuralProcesses.Config(steps={"lnp": 7}).steps_for("lnp") == 7


def test_bad_option_is_one_line_and_exit_2(capsys, tmp_path):
    code = main(["study", "neural-processes", "--out", str(tmp_path / "np"), "--set", "study.episodes=1"])
    err = capsys.readouterr().err
    assert code == 2 and "study.episodes must be >= 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "np").exists()


def test_ml_objective_trains_the_latent_models_apart_and_lr_decay_reaches_every_run(capsys, tmp_path):
    out = tmp_path / "np"
    assert main(["study", "neural-processes", "--out", str(out), "--quiet", "--set", "study.quick=true",
                 "--set", 'study.kernels=["rbf"]', "--set", "study.sinusoid=false", "--set", "study.objective=ml",
                 "--set", "study.ml_samples=3", "--set", "study.lr_decay=0.5"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["anp-ml-rbf", "cnp-rbf", "lnp-ml-rbf"]
    saved = json.loads((out / "runs" / "lnp-ml-rbf" / "config.json").read_text())
    assert saved["learner"]["objective"] == "ml" and saved["learner"]["train_samples"] == 3
    assert "latent models on NP-ML (3 z samples per task)" in (out / "report.md").read_text()
    for run in ("cnp-rbf", "lnp-ml-rbf"):  # quick runs take 3 steps: the decay covers the last 2 (round(1.5))
        train = json.loads((out / "runs" / run / "config.json").read_text())["train"]
        assert (train["lr_schedule"], train["lr_decay_start"]) == ("cosine", 2)
    assert "decaying to 0 by a half cosine over the last 50% of each run's steps" in (out / "report.md").read_text()


def test_maml_on_sinusoid_takes_its_tour_recipe():
    from metalens.experiments.recipes import TOUR

    runs = NeuralProcesses(NeuralProcesses.Config(kernels=("rbf",), models=("cnp",))).runs()
    assert list(runs) == ["cnp-rbf", "cnp-sinusoid", "maml-sinusoid"]
    maml, recipe = runs["maml-sinusoid"], TOUR["maml"]
    expected = metalens.RunConfig.resolve("sinusoid", "maml", {}, recipe.learner_options)
    assert maml.learner_config == expected.learner_config
    assert (maml.train.batch_tasks, maml.train.lr, maml.train.steps) == (
        recipe.train["batch_tasks"], recipe.train["lr"], 20000)


@pytest.mark.parametrize("options", [{"kernel": "matern52"}, {"kernel": "rbf", "lengthscale_range": (0.2, 0.8)}])
def test_gp_joint_log_likelihood_matches_a_direct_computation(options):
    seed = 11
    family = metalens.make_task("gp", max_context=7, max_target=5, oracle_nodes=12, **options)
    ep = family.eval_episodes(seed, 3)
    got = family.joint_log_likelihood(ep)
    ls, log_w = family.quadrature()
    for t in range(3):
        sm, qm = ep.support_mask[t], ep.query_mask[t]
        sx, sy = ep.support_x[t, sm, 0].double(), ep.support_y[t, sm, 0].double()
        qx, qy = ep.query_x[t, qm, 0].double(), ep.query_y[t, qm, 0].double()
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])

        def log_ml(x, y, l):
            K = kernel_matrix(family.config.kernel, x, x, l) + family.noise_var * torch.eye(len(x), dtype=torch.float64)
            return MultivariateNormal(torch.zeros_like(y), K).log_prob(y)

        joint = torch.logsumexp(torch.stack([log_ml(x, y, l) for l in ls]) + log_w, 0)
        context = torch.logsumexp(torch.stack([log_ml(sx, sy, l) for l in ls]) + log_w, 0)
        assert float(got[t]) == pytest.approx(float(joint - context), abs=1e-6), f"seed {seed}, task {t}"
    # one target: the joint is the oracle's per-point predictive
    one = metalens.make_task("gp", max_context=7, min_target=1, max_target=1, oracle_nodes=12, **options)
    ep = one.eval_episodes(seed, 4)
    lp = one.oracle(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask).log_prob(ep.query_y)
    torch.testing.assert_close(one.joint_log_likelihood(ep), lp[:, 0, 0].double(), rtol=1e-5, atol=1e-5)
