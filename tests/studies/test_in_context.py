"""The in-context studies: smoke runs from the CLI, run reuse, and the closed-form baselines."""

from __future__ import annotations

import json
import math

import pytest
import torch

import metalens
from metalens.cli import main
from metalens.registry import STUDIES
from metalens.studies.in_context import ICLLinear, ICLPhaseTransition, ICLTransfer, departure, least_squares, ridge

torch.set_num_threads(1)


def test_the_three_studies_are_registered():
    assert STUDIES["icl-linear"].cls is ICLLinear
    assert STUDIES["icl-phase-transition"].cls is ICLPhaseTransition
    assert STUDIES["icl-transfer"].cls is ICLTransfer


def test_quick_linear_study_writes_curves_for_every_method_and_reuses_its_run(capsys, tmp_path):
    out = tmp_path / "lin"
    argv = ["study", "icl-linear", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", "study.dims=[2]"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    curve = report["curves"]["2"]
    assert set(curve) == {"transformer", "least squares", "ridge (lambda=0.1)", "oracle"}
    for pts in curve.values():
        assert [p["n"] for p in pts] == list(range(0, 7)) and all(math.isfinite(p["mean"]) for p in pts)
    # with no example every baseline predicts 0, the prior mean
    assert curve["oracle"][0]["mean"] == curve["least squares"][0]["mean"] == curve["ridge (lambda=0.1)"][0]["mean"]
    assert report["at_2d"]["2"]["n"] == 4 and report["at_2d"]["2"]["ratio"] > 0
    assert (out / report["figures"][0]).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "metalens study icl-linear --out OUT --set 'study.dims=[2]' --set 'study.quick=true'" in md
    capsys.readouterr()
    assert main(argv) == 0
    assert "(resuming)" in capsys.readouterr().out


def test_quick_phase_transition_reports_both_splits_and_the_transition(tmp_path):
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


def test_quick_transfer_scores_every_target_beside_scratch_and_the_oracle(tmp_path):
    out = tmp_path / "tr"
    argv = ["study", "icl-transfer", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", "study.sinusoid_shots=[5]", "--set", "study.sequence_length=12"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["task"] for r in report["rows"]] == ["sinusoid", "gp", "random_mlp"]
    for r in report["rows"]:
        assert math.isfinite(r["transformer"]["mean"]) and math.isfinite(r["scratch"]["mean"])
        assert (r["oracle"] is None) == (r["task"] == "random_mlp")
    assert len(report["figures"]) == 2


def test_least_squares_and_ridge_against_numpy_style_references():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 8, 1, generator=g, dtype=torch.float64)
    xq = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    w = torch.linalg.lstsq(X, y).solution
    torch.testing.assert_close(least_squares(X, y, xq), xq @ w)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[:, 6:] = False  # padded rows are ignored
    torch.testing.assert_close(least_squares(X, y, xq, support_mask=mask), least_squares(X[:, :6], y[:, :6], xq))
    # ridge with lambda = sigma^2 d is the oracle's posterior mean
    family = metalens.make_task("linear", dim=4, noise_std=0.5)
    oracle = family.oracle(X.float(), y.float(), xq.float()).mean
    torch.testing.assert_close(ridge(X, y, xq, lam=0.25 * 4).float(), oracle, rtol=1e-4, atol=1e-5)


def test_departure_needs_both_the_ci_and_the_margin():
    flat = [{"mean": 0.12, "ci95": 0.05}, {"mean": 0.2, "ci95": 0.01}]
    assert departure(flat, [0.1, 0.1], lower_is_better=False, margin=0.05) == 1
    assert departure(flat[:1], [0.1], lower_is_better=False, margin=0.05) is None
    losses = [{"mean": 0.95, "ci95": 0.01}, {"mean": 0.5, "ci95": 0.1}]
    assert departure(losses, [1.0, 1.0], lower_is_better=True, margin=0.1) == 1
