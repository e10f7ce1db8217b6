"""The meta-gradient-variance study: a quick run from the CLI, its checks and figure, and its option checks."""

from __future__ import annotations

import json

import pytest
import torch

from metalens.cli import main
from metalens.experiments.meta_gradient_variance import MetaGradientVariance
from metalens.registry import STUDIES

torch.set_num_threads(1)


def test_quick_study_writes_its_checks_and_curves(tmp_path, capsys):
    out = tmp_path / "mgv"
    code = main(["study", "meta-gradient-variance", "--out", str(out), "--quiet", "--set", "study.quick=true"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    checks = report["checks"]
    assert set(checks) == {"maml.variance_slope", "fomaml.variance_slope"}
    for name, c in checks.items():
        assert set(c) == {"value", "target", "holds"} and c["holds"] == (abs(c["value"] + 1) <= 0.05)
        curve = report["curves"][name.split(".")[0]]
        assert curve["batch"] == [1, 2, 4, 8, 16] and c["value"] == pytest.approx(curve["slope"], abs=1e-4)
        assert curve["variance"][0] == pytest.approx(curve["trace_cov"])
        assert all(a > b > 0 for a, b in zip(curve["variance"], curve["variance"][1:]))
    assert report["config"]["tasks"] == 512
    assert (out / "figures" / "variance-vs-batch.png").stat().st_size > 0


def test_registered_and_a_bad_option_is_one_line(tmp_path, capsys):
    assert STUDIES["meta-gradient-variance"].cls is MetaGradientVariance
    code = main(["study", "meta-gradient-variance", "--out", str(tmp_path / "v"), "--set", "study.tasks=100"])
    err = capsys.readouterr().err
    assert code == 2 and "study.tasks must be >= 512" in err and len(err.strip().splitlines()) == 1, err
    code = main(["study", "meta-gradient-variance", "--out", str(tmp_path / "v"), "--set", "study.tasks=600",
                 "--set", "study.max_batch=512"])
    err = capsys.readouterr().err
    assert code == 2 and "at least 2 disjoint batches" in err and len(err.strip().splitlines()) == 1, err
