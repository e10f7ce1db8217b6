"""The icl-linear study: a smoke run from the CLI, run reuse, its checks, and the closed-form baselines."""

from __future__ import annotations

import json
import math

import pytest
import torch

import metalens
from metalens.cli import main
from metalens.config import ConfigError
from metalens.evaluate import score_tasks
from metalens.experiments.icl_linear import ICLLinear, least_squares, ridge
from metalens.registry import STUDIES

torch.set_num_threads(1)


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
    at = report["at_2d"]["2"]
    assert at["n"] == 4 and at["ratio"] > 0 and at["transformer"]["mean"] == curve["transformer"][4]["mean"]
    assert (out / report["figures"][0]).stat().st_size > 0
    # the claims: near the oracle at n = 2d, below least squares at n = d
    checks = report["checks"]
    assert set(checks) == {"d2.near_oracle_at_2d", "d2.beats_least_squares_at_d"}
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    near = checks["d2.near_oracle_at_2d"]
    assert near["target"] == "<= 1.25" and near["value"] == pytest.approx(at["ratio"], abs=1e-4)
    assert near["holds"] == (near["value"] <= 1.25)
    ratio_at_d = curve["transformer"][2]["mean"] / curve["least squares"][2]["mean"]
    assert checks["d2.beats_least_squares_at_d"]["value"] == pytest.approx(ratio_at_d, abs=1e-4)
    md = (out / "report.md").read_text()
    assert "metalens study icl-linear --out OUT --set 'study.dims=[2]' --set 'study.quick=true'" in md
    assert "## Checks (" in md and "| `d2.near_oracle_at_2d` |" in md and "issue" not in md.lower()
    capsys.readouterr()
    assert main(argv) == 0
    assert "reusing the finished run" in capsys.readouterr().out


def test_registered_and_options_checked(capsys, tmp_path):
    assert STUDIES["icl-linear"].cls is ICLLinear
    with pytest.raises(ConfigError, match="heads must divide width"):
        ICLLinear.Config(width=10, heads=4)
    with pytest.raises(ConfigError, match="dims values must be >= 1"):
        ICLLinear.Config(dims=(0,))
    code = main(["study", "icl-linear", "--out", str(tmp_path / "lin"), "--set", "study.dims=[]"])
    err = capsys.readouterr().err
    assert code == 2 and "study.dims must hold at least 1 value" in err and len(err.strip().splitlines()) == 1


def test_least_squares_and_ridge_against_numpy_style_references():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 8, 1, generator=g, dtype=torch.float64)
    xq = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    w = torch.linalg.lstsq(X, y).solution
    torch.testing.assert_close(least_squares(X, y, xq).mean, xq @ w)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[:, 6:] = False  # padded rows are ignored
    torch.testing.assert_close(least_squares(X, y, xq, support_mask=mask).mean,
                               least_squares(X[:, :6], y[:, :6], xq).mean)
    # ridge with lambda = sigma^2 d is the oracle's posterior mean
    family = metalens.make_task("linear", dim=4, noise_std=0.5)
    oracle = family.oracle(X.float(), y.float(), xq.float()).mean
    torch.testing.assert_close(ridge(X, y, xq, lam=0.25 * 4).mean.float(), oracle, rtol=1e-4, atol=1e-5)


def test_baselines_score_as_predictors_and_predict_zero_from_no_example():
    family = metalens.make_task("linear", dim=3, shots=5, queries=4, noise_std=0.5)
    ep = family.eval_episodes(0, 6)
    ls = score_tasks(least_squares, ep, with_nll=False)["mse"]
    direct = ((least_squares(ep.support_x, ep.support_y, ep.query_x).mean - ep.query_y) ** 2).double().mean((1, 2))
    torch.testing.assert_close(torch.from_numpy(ls), direct)
    empty = score_tasks(least_squares, ep, with_nll=False, empty_support=True)["mse"]
    torch.testing.assert_close(torch.from_numpy(empty), (ep.query_y.double() ** 2).mean((1, 2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_baselines_run_on_the_gpu():
    g = torch.Generator().manual_seed(0)
    X, y, xq = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 1, generator=g), torch.randn(2, 4, 3, generator=g)
    for fn in (least_squares, lambda *a, **k: ridge(*a, lam=0.1, **k)):
        got = fn(X.cuda(), y.cuda(), xq.cuda(), support_mask=torch.ones(2, 6, dtype=torch.bool, device="cuda")).mean
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), fn(X, y, xq).mean, rtol=1e-4, atol=1e-5)
