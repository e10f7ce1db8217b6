"""The maml-map study: a quick run from the CLI, its checks and figures, and its option checks."""

from __future__ import annotations

import json

import pytest
import torch

from metalens.cli import main
from metalens.config import ConfigError
from metalens.experiments.maml_map import MAMLMap
from metalens.registry import STUDIES

torch.set_num_threads(1)

CHECKS = {"gd_equals_map", "precision_limit", "theta_near_prior_mean", "grid.best_is_matched",
          "grid.best_near_oracle"}


def test_quick_study_writes_every_check_and_figure(tmp_path, capsys):
    out = tmp_path / "mm"
    code = main(["study", "maml-map", "--out", str(out), "--quiet", "--set", "study.quick=true"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    checks = report["checks"]
    assert set(checks) == CHECKS
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    # exact identities hold whatever the training budget
    assert checks["gd_equals_map"]["holds"] and checks["gd_equals_map"]["value"] < 1e-12
    assert checks["precision_limit"]["holds"]
    theta = checks["theta_near_prior_mean"]
    assert theta["value"] == pytest.approx(report["theta"]["norm"], abs=1e-5)
    assert theta["holds"] == (theta["value"] <= 0.05)
    grid = report["grid"]
    assert len(grid["mse"]) == 3 and len(grid["mse"][0]) == 3 and grid["p_star"] == pytest.approx(1.0)
    best = min((v, (i, j)) for i, row in enumerate(grid["mse"]) for j, v in enumerate(row))[1]
    assert list(best) == grid["best"]
    assert {p.rsplit("/", 1)[-1] for p in report["figures"]} == {"precision-limit.png", "grid.png", "shrinkage.png"}
    assert all((out / p).stat().st_size > 0 for p in report["figures"])
    md = (out / "report.md").read_text()
    assert "metalens study maml-map --out OUT --set 'study.quick=true'" in md and "| `gd_equals_map` |" in md


def test_its_run_is_linear_maml():
    run = MAMLMap().runs()["maml-linear"]
    assert (run.task, run.learner) == ("linear", "maml") and run.learner_config.hidden == ()
    assert run.task_config.dim == 8 and run.task_config.noise_std == 1.0 and run.train.steps == 2000
    assert STUDIES["maml-map"].cls is MAMLMap
    with pytest.raises(ConfigError, match="alphas must be increasing"):
        MAMLMap.Config(alphas=(0.1, 0.05))


def test_a_bad_option_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["study", "maml-map", "--out", str(tmp_path / "mm"), "--set", "study.noise_std=0"])
    err = capsys.readouterr().err
    assert code == 2 and "study.noise_std must be > 0" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "mm").exists()
