"""The reptile-objective study: a quick run from the CLI, its checks and figures, and its option checks."""

from __future__ import annotations

import json
import math

import torch

from metalens.cli import main
from metalens.experiments.reptile_objective import ReptileObjective
from metalens.registry import STUDIES

torch.set_num_threads(1)


def test_quick_study_checks_the_expansion_and_logs_the_alignment(tmp_path, capsys):
    out = tmp_path / "ro"
    code = main(["study", "reptile-objective", "--out", str(out), "--quiet", "--set", "study.quick=true",
                 "--set", 'study.schedules=["alternate", "fresh"]', "--set", "study.inner_steps=[2, 3]"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    checks = report["checks"]
    assert set(checks) == {f"{s}.{c}" for s in ("alternate", "fresh")
                           for c in ("k2.exact", "k2.first_order_slope", "k3.residual_slope", "k3.first_order_slope")
                           } | {"sinusoid.alignment_finite"}
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    # exact arithmetic on quadratics: these hold whatever the budget
    assert all(c["holds"] for c in checks.values())
    assert report["quadratics"]["fresh.k3"]["n_cross"] == 3 and report["quadratics"]["alternate.k3"]["n_same"] == 1
    points = report["sinusoid"]["alignment"]
    assert [p["step"] for p in points] == [0, 3, 6] and all(math.isfinite(p["alignment"]) for p in points)
    assert {p.rsplit("/", 1)[-1] for p in report["figures"]} == {"residual-vs-alpha.png", "sinusoid-alignment.png"}


def test_registered_and_a_bad_option_is_one_line(tmp_path, capsys):
    assert STUDIES["reptile-objective"].cls is ReptileObjective
    run = ReptileObjective().runs()["reptile"]
    assert run.learner_config.inner_steps == 5 and run.train.keep_checkpoints == 0
    code = main(["study", "reptile-objective", "--out", str(tmp_path / "r"), "--set", "study.inner_steps=[2, 8]"])
    err = capsys.readouterr().err
    assert code == 2 and "study.inner_steps must be at most 7" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
