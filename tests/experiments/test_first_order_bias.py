"""The first-order-bias study: a quick run from the CLI, its checks and figures, and its option checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metalens.cli import main
from metalens.config import ConfigError
from metalens.experiments.first_order_bias import FirstOrderBias
from metalens.registry import STUDIES

torch.set_num_threads(1)


def test_quick_study_writes_its_checks_and_sweeps(tmp_path, capsys):
    out = tmp_path / "fob"
    code = main(["study", "first-order-bias", "--out", str(out), "--quiet", "--set", "study.quick=true"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    checks = report["checks"]
    assert set(checks) == {"fomaml.bias_slope", "fomaml.per_task_bias_slope"}
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
        assert c["holds"] == (abs(c["value"] - 1) <= 0.1)
    assert checks["fomaml.bias_slope"]["value"] == pytest.approx(report["slope"], abs=1e-4)
    assert [r["alpha"] for r in report["by_alpha"]] == [1e-5, 1e-4, 1e-3, 1e-1]
    assert [r["N"] for r in report["by_steps"]] == [1, 2]
    small = report["by_alpha"][0]
    # at alpha = 1e-5 FOMAML's meta-gradient is MAML's to about 1e-5 times the curvature
    assert 0 < small["fo_rel_error"] < 0.05 and small["fo_cosine"] > 0.99
    assert all(math.isfinite(r["fo_rel_error"]) for r in report["by_alpha"])
    assert {p.rsplit("/", 1)[-1] for p in report["figures"]} == {"bias-vs-alpha.png", "bias-vs-steps.png"}
    assert "| `fomaml.bias_slope` |" in (out / "report.md").read_text()


def test_registered_and_options_checked(tmp_path, capsys):
    assert STUDIES["first-order-bias"].cls is FirstOrderBias
    assert FirstOrderBias().runs()["maml"].learner_config.inner_lr == 0.01  # the tour's recipe
    with pytest.raises(ConfigError, match="at least 2 alphas must be <= small_alpha_max"):
        FirstOrderBias.Config(small_alpha_max=1e-9)
    code = main(["study", "first-order-bias", "--out", str(tmp_path / "f"), "--set", "study.alphas=[0.1, 0.01]"])
    err = capsys.readouterr().err
    assert code == 2 and "study.alphas must be increasing" in err and len(err.strip().splitlines()) == 1, err
