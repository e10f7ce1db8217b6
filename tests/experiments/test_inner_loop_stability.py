"""The inner-loop-stability study end to end on a tiny budget, its spectrum against a dense Hessian, its options."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import hessian

import metalens
from metalens.cli import main
from metalens.experiments.inner_loop_stability import InnerLoopStability, task_spectrum
from metalens.learners.gradient import support_loss
from metalens.registry import STUDIES
from metalens.theory.curvature import flatten, unflatten

torch.set_num_threads(1)


def test_quick_study_writes_the_spectrum_the_failure_table_and_every_check(tmp_path, capsys):
    out = tmp_path / "ils"
    assert main(["study", "inner-loop-stability", "--out", str(out), "--quiet", "--set", "study.quick=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    checks = report["checks"]
    assert set(checks) == {
        "spectrum.K=5.sharpens_with_training", "spectrum.fewer_shots_sharper",
        "rate_x1.steps=1.unstable_fraction_predicts_divergence", "rate_x1.steps=20.unstable_fraction_predicts_divergence",
        "rate_x4.steps=20.unstable_fraction_predicts_divergence", "diverged_only_where_alpha_lambda_max_above_2",
        "rose_only_where_alpha_lambda_max_above_2", "cap.no_task_diverges"}
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    assert checks["cap.no_task_diverges"]["holds"]
    # a checkpoint every 30 of 60 steps, spectra at K = 5 and 10
    assert set(report["spectrum"]) == {f"step={s},K={k}" for s in (30, 60) for k in (5, 10)}
    cells = report["cells"]
    assert set(cells) == {f"rate_x{m},steps={n},cap={cap}" for m in (1, 4) for n in (1, 20) for cap in (True, False)}
    assert all(0 <= v["diverged"] <= 40 and v["unstable_fraction"] <= 1 for v in cells.values())
    assert "c=1.5,rate_x4" in report["cap_sweep"]
    md = (out / "report.md").read_text()
    assert "## Lemma 1's smoothness terms" in md and "| `cap.no_task_diverges` |" in md
    for f in report["figures"]:
        assert (out / f).stat().st_size > 0
    assert (out / "runs" / "maml" / "checkpoints" / "step_00000030").is_dir()  # every checkpoint is kept


def test_task_spectrum_matches_the_dense_hessian():
    fam = metalens.make_task("sinusoid", shots=4)
    learner = metalens.make_learner("maml", fam, hidden=[6, 6])
    tasks = fam.eval_episodes(0, 3)
    spec = task_spectrum(learner, tasks, steps=40)
    theta = {k: v.detach() for k, v in learner.theta().items()}
    for t in range(3):
        x, y = tasks.support_x[t], tasks.support_y[t]
        H = hessian(lambda v, x=x, y=y: support_loss(learner.net, unflatten(v, theta), x, y, None,
                                                     classification=False))(flatten(theta))
        ev = torch.linalg.eigvalsh(H.double())
        assert spec["lam_max"][t] == pytest.approx(float(ev[-1]), rel=1e-4)
        assert spec["lam_min"][t] == pytest.approx(float(ev[0]), rel=1e-3, abs=1e-4)


def test_runs_keep_every_checkpoint_and_options_are_checked(tmp_path, capsys):
    assert STUDIES["inner-loop-stability"].cls is InnerLoopStability
    run = InnerLoopStability(InnerLoopStability.Config(steps=500, checkpoint_every=100)).runs()["maml"]
    assert (run.train.steps, run.train.checkpoint_every, run.train.keep_checkpoints) == (500, 100, 0)
    assert run.learner_config.inner_lr == 0.01 and run.task_config.shots == 10
    code = main(["study", "inner-loop-stability", "--out", str(tmp_path / "s"), "--set", "study.adapt_steps=[5, 1]"])
    err = capsys.readouterr().err
    assert code == 2 and "study.adapt_steps must be increasing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
