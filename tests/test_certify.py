"""metalens certify: certificates of tiny runs (pacbayes; maml and protonet softened), a family whose true risk is
known exactly, the command end to end, and its refusals (exit 2, one line)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metalens.certify import SIGMAS, TAUS, certificates, certify
from metalens.cli import main
from metalens.config import ConfigError
from metalens.errors import RunFolderError
from metalens.theory.pac_bayes import kl_inverse

torch.set_num_threads(1)

SEED = 20240611
CLUSTERS = ["--task", "clusters", "--set", "task.std=0.5", "--set", "task.shots=2"]
LINEAR = ["--task", "linear", "--set", "task.dim=3", "--set", "task.shots=8", "--set", "task.noise_std=0.5"]
PACBAYES = ["--learner", "pacbayes", "--set", "learner.hidden=[]", "--set", "learner.hyper_posterior_std=1.0",
            "--set", "learner.prior_std=1.0", "--set", "learner.eval_samples=4"]


def _train(folder: Path, *args: str, steps: int = 3) -> Path:
    assert main(["train", "--out", str(folder), "--steps", str(steps), "--seed", str(SEED), "--quiet",
                 "--set", "train.batch_tasks=10", *args]) == 0
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("certify")
    return {
        "pacbayes": _train(root / "pacbayes", *CLUSTERS, *PACBAYES, "--set", "learner.inner_steps=2"),
        "frozen": _train(root / "frozen", *CLUSTERS, *PACBAYES, "--set", "learner.inner_steps=0"),
        "maml": _train(root / "maml", *LINEAR, "--learner", "maml", "--set", "learner.hidden=[]",
                       "--set", "learner.inner_lr=0.1", "--set", "learner.eval_inner_steps=2"),
        "protonet": _train(root / "protonet", *CLUSTERS, "--learner", "protonet", "--set", "learner.backbone=mlp",
                           "--set", "learner.hidden=[8]", "--set", "learner.embedding_dim=4"),
        "oracle": _train(root / "oracle", *CLUSTERS, "--learner", "oracle", steps=1),
        "identity": _train(root / "identity", *CLUSTERS, "--learner", "protonet",
                           "--set", "learner.backbone=identity", steps=1),
    }


def _recomputed(t: dict) -> float:
    """The bound from the certificate's stated terms alone."""
    n, m = t["n"], t["m"]
    c_task = (t["log_ratio_hyper"] + n * t["kl_tasks_mean"]
              + math.log(2 * math.sqrt(n * m) / t["delta_task"])) / (n * m)
    c_env = (t["log_ratio_hyper"] + math.log(2 * math.sqrt(n) / t["delta_env"])) / n
    assert c_task == pytest.approx(t["c_task"], rel=1e-9) and c_env == pytest.approx(t["c_env"], rel=1e-9)
    return kl_inverse(kl_inverse(t["emp_risk_upper"], c_task), c_env)


def test_a_certificate_where_the_true_risk_is_known_exactly(runs):
    """Without inner steps the predictor never sees the support labels; the classes' means are exchangeable, so a
    query's label is uniform given everything it sees: its 5-way Gibbs risk is exactly 0.8."""
    cert = certify(runs["frozen"], tasks=50, episodes=400, samples=4000)
    m = cert.measured
    assert abs(m["mean"] - 0.8) <= 2.5 * m["ci95"] + 0.005, f"seed {SEED}: measured {m}"
    assert cert.bound >= 0.8, f"seed {SEED}: the bound {cert.bound} is below the exact risk 0.8"
    assert cert.terms["kl_tasks_mean"] == pytest.approx(0.0, abs=1e-9)  # the posterior is the prior
    assert cert.bound == pytest.approx(_recomputed(cert.terms), abs=1e-12)


def test_certificates_for_several_n_share_the_run_and_tighten_with_n(runs):
    certs = certificates(runs["pacbayes"], tasks=(10, 40), episodes=30, samples=800)
    assert [c.tasks for c in certs] == [10, 40] and {c.examples for c in certs} == {10}
    assert certs[0].measured == certs[1].measured  # the same fresh tasks, the same prior drawn from Q
    assert certs[0].terms["c_env"] > certs[1].terms["c_env"]
    for c in certs:
        t = c.terms
        assert 0 <= t["emp_risk"] <= t["emp_risk_upper"] <= t["task_bound"] <= c.bound <= 1
        assert (t["delta_env"], t["delta_task"], t["delta_mc"]) == pytest.approx((0.025, 0.0125, 0.0125))
        assert c.bound == pytest.approx(_recomputed(t), abs=1e-12) and c.softening is None
        assert "kl_hyper_expected" in t and set(c.forms) == {"amit_meir", "pentina_lampert"}
        assert c.forms["amit_meir"] >= c.bound - 1e-9  # the square-root form is the looser one here


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_softened_certificates_choose_on_the_grid_and_pay_for_it(runs, name):
    cert = certify(runs[name], tasks=20, episodes=20, samples=1000)
    s = cert.softening
    assert s["grid_size"] == len(SIGMAS) * len(TAUS) and s["delta_each"] == pytest.approx(0.05 / s["grid_size"])
    assert s["sigma"] in SIGMAS and s["tau"] in TAUS and len(s["pilot_bounds"]) == s["grid_size"]
    assert cert.terms["delta_env"] + cert.terms["delta_task"] + cert.terms["delta_mc"] == pytest.approx(s["delta_each"])
    assert 0 <= cert.measured["mean"] <= 1 and 0 < cert.bound <= 1
    assert cert.bound == pytest.approx(_recomputed(cert.terms), abs=1e-12)
    assert cert.loss == ("0-1 error" if name == "protonet" else "squared error clipped to [0, 4] and divided by 4")


def test_the_command_end_to_end(runs, capsys):
    args = ["certify", str(runs["pacbayes"]), "--tasks", "20", "--episodes", "20", "--samples", "500"]
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    data = json.loads(out)
    assert data["learner"] == "pacbayes" and data["tasks"] == 20 and data["examples"] == 10
    assert data["bound"] == pytest.approx(_recomputed(data["terms"]), abs=1e-12)
    assert set(data["measured"]) == {"mean", "ci95"} and data["episodes"] == 20
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "with probability >= 0.95 over n = 20 tasks of m = 10 examples" in text and "c_task = " in text


@pytest.mark.parametrize("args, message", [
    (["--delta", "0"], "delta must be in (0, 1), got 0.0"),
    (["--delta", "1.5"], "delta must be in (0, 1), got 1.5"),
    (["--tasks", "1"], "tasks must be an integer >= 2"),
    (["--episodes", "1"], "episodes must be an integer >= 2"),
    (["--clip", "-1"], "clip must be a number > 0"),
])
def test_bad_options_exit_2_with_one_line(runs, capsys, args, message):
    assert main(["certify", str(runs["pacbayes"]), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("which, message", [
    ("oracle", "holds a run of learner 'oracle'; metalens certify applies to runs of pacbayes, maml, protonet"),
    ("identity", "certify needs an MLP network"),
    ("missing", "is not a metalens run folder"),
])
def test_runs_it_does_not_apply_to_exit_2_with_one_line(runs, capsys, which, message, tmp_path):
    folder = runs.get(which, tmp_path / "nothing-here")
    assert main(["certify", str(folder), "--tasks", "10", "--episodes", "10"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_options_are_checked_before_the_folder_is_read(tmp_path):
    with pytest.raises(ConfigError, match="delta"):
        certify(tmp_path / "nothing-here", delta=2.0)
    with pytest.raises(RunFolderError):
        certify(tmp_path / "nothing-here")


def test_a_hyper_prior_moved_after_training_is_refused(runs, tmp_path):
    import shutil

    from metalens import checkpoint

    folder = tmp_path / "moved"
    shutil.copytree(runs["pacbayes"], folder)
    ckpt = checkpoint.load(checkpoint.latest(folder))
    model = dict(ckpt.model)
    model["hyper_prior_mean"] = model["prior_mean"].clone()  # a data-dependent hyper-prior: KL(Q || P) = 0
    checkpoint.save(folder, step=ckpt.step + 1, model=model, optimizer=ckpt.optimizer, state=ckpt.state)
    with pytest.raises(RunFolderError, match="hyper-prior is not the run's initial weights"):
        certify(folder, tasks=10, episodes=10)
