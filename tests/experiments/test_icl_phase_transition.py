"""The icl-phase-transition study: a smoke run from the CLI, its checks, and the departure rule."""

from __future__ import annotations

import json

import pytest
import torch

from metalens.cli import main
from metalens.config import ConfigError
from metalens.experiments.icl_phase_transition import ICLPhaseTransition, departure
from metalens.registry import STUDIES

torch.set_num_threads(1)


def test_quick_phase_transition_reports_both_splits_the_transition_and_its_checks(tmp_path):
    out = tmp_path / "pt"
    argv = ["study", "icl-phase-transition", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", "study.log2_tasks=[0, 3]", "--set", "study.learner=lstm"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["log2_tasks"] for r in report["rows"]] == [0, 3, None]
    for r in report["rows"]:
        for split in ("training", "unseen"):
            assert 0 <= r[f"{split}_accuracy"]["mean"] <= 1 and r[f"{split}_chance"] == pytest.approx(1 / 3)
    assert set(report["transition_log2_tasks"]) == {"16"}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["lstm16-k0", "lstm16-k3", "lstm16-kinf"]
    checks = report["checks"]
    assert set(checks) == {"width16.memorises_at_k0", "width16.transition_in_grid"}
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    assert checks["width16.memorises_at_k0"]["value"] == pytest.approx(report["rows"][0]["unseen_accuracy"]["mean"],
                                                                       abs=1e-4)
    transition = report["transition_log2_tasks"]["16"]
    assert checks["width16.transition_in_grid"]["value"] == transition
    assert checks["width16.transition_in_grid"]["holds"] == (transition not in (None, 0))
    md = (out / "report.md").read_text()
    assert "## Checks (" in md and "| `width16.transition_in_grid` |" in md and "issue" not in md.lower()


def test_regression_chance_is_the_zero_predictor(tmp_path):
    out = tmp_path / "pt"
    assert main(["study", "icl-phase-transition", "--out", str(out), "--quiet", "--set", "study.quick=true",
                 "--set", "study.task=random_mlp", "--set", "study.log2_tasks=[0]", "--set", "study.unbounded=false",
                 "--set", "study.learner=lstm"]) == 0
    (row,) = json.loads((out / "report.json").read_text())["rows"]
    assert row["unseen_chance"] > 0 and "unseen_mse" in row and "unseen_accuracy" not in row


def test_registered_and_options_checked():
    assert STUDIES["icl-phase-transition"].cls is ICLPhaseTransition
    with pytest.raises(ConfigError, match="log2_tasks must hold a k, or unbounded be true"):
        ICLPhaseTransition.Config(log2_tasks=(), unbounded=False)
    with pytest.raises(ConfigError, match="log2_tasks values must be >= 0 and <= 40"):
        ICLPhaseTransition.Config(log2_tasks=(41,))
    with pytest.raises(ConfigError, match="heads must divide every width"):
        ICLPhaseTransition.Config(model_dims=(30,), heads=4)
    ICLPhaseTransition.Config(model_dims=(30,), heads=4, learner="lstm")  # an lstm has no heads


def test_departure_needs_both_the_ci_and_the_margin():
    flat = [{"mean": 0.12, "ci95": 0.05}, {"mean": 0.2, "ci95": 0.01}]
    assert departure(flat, [0.1, 0.1], lower_is_better=False, margin=0.05) == 1
    assert departure(flat[:1], [0.1], lower_is_better=False, margin=0.05) is None
    losses = [{"mean": 0.95, "ci95": 0.01}, {"mean": 0.5, "ci95": 0.1}]
    assert departure(losses, [1.0, 1.0], lower_is_better=True, margin=0.1) == 1
