"""The icl-state-size study: a smoke run from the CLI with its checks, a bad option, and the parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

import metalens
from metalens.cli import main
from metalens.experiments.icl_state_size import ICLStateSize, lstm_parameters, rank_for

torch.set_num_threads(1)


def test_quick_study_writes_its_checks_and_both_sweeps(tmp_path):
    out = tmp_path / "ss"
    assert main(["study", "icl-state-size", "--out", str(out), "--quiet", "--set", "study.quick=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["checks"]) == {"state.helps", "state_not_parameters"}
    for c in report["checks"].values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    rows, state, params = report["rows"], report["state_sweep"], report["parameter_sweep"]
    assert [rows[k]["hidden"] for k in state] == [4, 8, 12, 16, 20]
    assert len({rows[k]["hidden"] for k in params}) == 1 and len(params) == 3
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(set(state) | set(params))
    spread = max(rows[k]["params"] for k in state) / min(rows[k]["params"] for k in state)
    assert spread < 1.3, "the state sweep's parameter counts are not held near one another"
    assert report["figures"] == ["figures/state-size.png"]


def test_a_bad_option_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["study", "icl-state-size", "--out", str(tmp_path / "bad"), "--quiet", "--set", "study.hiddens=[8]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "study.hiddens" in err, err


def test_the_parameter_formula_is_the_learners_count():
    family = metalens.make_task("projected", ways=3, dim=16)
    in_w, out_w = 16 + 3 + 1, 3
    for hidden, target in ((8, 12000), (128, 12000), (32, 3000)):
        rank = rank_for(hidden, target, in_w, out_w)
        lstm = metalens.make_learner("lstm", family, hidden=hidden, rank=rank)
        assert sum(p.numel() for p in lstm.parameters()) == lstm_parameters(hidden, rank, in_w, out_w)
        assert abs(lstm_parameters(hidden, rank, in_w, out_w) - target) <= (5 * hidden + in_w) / 2 + 1


def test_options_are_checked():
    with pytest.raises(metalens.ConfigError, match="hiddens must be increasing"):
        ICLStateSize.Config(hiddens=(32, 8))
