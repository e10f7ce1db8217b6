"""The pac-bayes study: a smoke run from the CLI (report, checks, figure, run reuse) and its options' refusals."""

from __future__ import annotations

import json

import pytest
import torch

from metalens.cli import main
from metalens.config import ConfigError
from metalens.experiments.pac_bayes import PACBayesStudy
from metalens.registry import STUDIES

torch.set_num_threads(1)

CHECKS = {"clusters.sound", "clusters.nonvacuous", "clusters.below_chance", "clusters.gap_shrinks_with_n",
          "clusters.gap_shrinks_with_m", "linear.sound", "linear.nonvacuous", "linear.gap_shrinks_with_n",
          "linear.gap_shrinks_with_m"}


def test_quick_study_certifies_every_cell_checks_its_claims_and_reuses_its_runs(capsys, tmp_path):
    out = tmp_path / "pb"
    argv = ["study", "pac-bayes", "--out", str(out), "--quiet", "--set", "study.quick=true"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["checks"]) == CHECKS
    for c in report["checks"].values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    for family, comparisons in (("clusters", {"maml", "protonet", "oracle"}), ("linear", {"maml", "oracle", "zero"})):
        rows = report["cells"][family]
        assert sorted((r["m"], r["n"]) for r in rows) == [(5, 10), (5, 20), (10, 10), (10, 20)]
        for r in rows:
            assert 0 <= r["measured"]["mean"] <= 1 and 0 < r["bound"] <= 1
            assert r["gap"] == pytest.approx(r["bound"] - r["measured"]["mean"])
            assert comparisons <= set(r) and r["terms"]["n"] == r["n"] and r["terms"]["m"] == r["m"]
        margin = min(r["bound"] - r["measured"]["mean"] for r in rows)
        assert report["checks"][f"{family}.sound"]["value"] == pytest.approx(margin, abs=1e-4)
    assert (out / report["figures"][0]).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "metalens study pac-bayes --out OUT --set 'study.quick=true'" in md and "## Checks (" in md
    assert "| `clusters.sound` |" in md and "## linear" in md
    capsys.readouterr()
    assert main(argv) == 0
    assert "reusing the finished run" in capsys.readouterr().out


def test_registered_and_options_checked(capsys, tmp_path):
    assert STUDIES["pac-bayes"].cls is PACBayesStudy
    with pytest.raises(ConfigError, match="multiples of 5"):
        PACBayesStudy.Config(examples=(5, 12))
    PACBayesStudy.Config(families=("linear",), examples=(3, 7))  # linear takes any m
    with pytest.raises(ConfigError, match="must not repeat"):
        PACBayesStudy.Config(families=("linear", "linear"))
    code = main(["study", "pac-bayes", "--out", str(tmp_path / "pb"), "--set", "study.tasks=[100, 10]"])
    err = capsys.readouterr().err
    assert code == 2 and "study.tasks must be increasing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pb").exists()
