"""The convergence study end to end on a tiny budget, and its options."""

from __future__ import annotations

import json

import torch

from metalens.cli import main
from metalens.experiments.convergence import Convergence
from metalens.registry import STUDIES

torch.set_num_threads(1)


def test_quick_study_reports_bias_smoothness_and_rate_with_their_checks(tmp_path):
    out = tmp_path / "conv"
    assert main(["study", "convergence", "--out", str(out), "--quiet", "--set", "study.quick=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    checks = report["checks"]
    expected = {"estimator.shared.learner_equals_closed_form", "estimator.independent.learner_equals_closed_form",
                "bias.independent.shrinks_like_n^-1/2", "bias.shared.error_tends_to_the_closed_form_bias",
                "bias.shared.does_not_shrink", "bias.shared.unbiased_for_F_K", "rate.slope_is_-1/2",
                "rate.within_the_bound"}
    expected |= {f"smoothness.alpha={a}.N={n}.within_lemma1" for a in ("0.05", "0.1") for n in (1, 2)}
    expected |= {f"smoothness.alpha={a}.N=1.matches_closed_form" for a in ("0.05", "0.1")}
    assert set(checks) == expected
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    # claims that hold whatever the sample size: the learner is the closed form; Lemma 1 bounds; the SGD bound
    assert checks["estimator.shared.learner_equals_closed_form"]["holds"]
    assert checks["estimator.independent.learner_equals_closed_form"]["holds"]
    assert all(c["holds"] for k, c in checks.items() if k.endswith("within_lemma1"))
    assert checks["rate.within_the_bound"]["holds"]
    assert report["bias"]["n"] == [10, 100] and len(report["rate"]["min_sq_grad"]) == 2
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())  # nothing is trained
    for f in report["figures"]:
        assert (out / f).stat().st_size > 0


def test_registered_and_bad_options_are_one_line(tmp_path, capsys):
    assert STUDIES["convergence"].cls is Convergence
    for setting, match in (("study.alpha=0.5", "study.alpha must be > 0 and < 0.5"),
                           ("study.bias_samples=[100]", "study.bias_samples must hold at least 2 value(s)"),
                           ("study.queries=1", "study.queries must be >= 2")):
        code = main(["study", "convergence", "--out", str(tmp_path / "c"), "--set", setting])
        err = capsys.readouterr().err
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()
