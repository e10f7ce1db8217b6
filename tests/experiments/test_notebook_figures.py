"""The notebook-figures study end to end on a tiny budget, and its options."""

from __future__ import annotations

import json

import torch

from metalens.cli import main
from metalens.experiments.notebook_figures import NotebookFigures
from metalens.registry import STUDIES

torch.set_num_threads(1)


def test_quick_study_draws_every_figure_and_records_its_checks(tmp_path):
    out = tmp_path / "nb"
    assert main(["study", "notebook-figures", "--out", str(out), "--quiet", "--set", "study.quick=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [f.split("/")[-1] for f in report["figures"]] == [
        "adaptation.png", "grid.png", "lenses.png", "sample_efficiency.png", "sensitivity.png"]
    for f in report["figures"]:
        assert (out / f).stat().st_size > 0
    checks = report["checks"]
    expected = {"adaptation.mse_falls.0->1_steps", "adaptation.mse_falls.1->2_steps",
                "grid.alpha=0.003.N=1.loss_falls", "grid.alpha=0.003.N=2.loss_falls"}
    expected |= {f"sample_efficiency.{f}.{n}.no_better_than_oracle" for f, n in (
        ("sinusoid", "maml"), ("sinusoid", "lstm"), ("sinusoid", "pretrain"), ("gp", "cnp"), ("clusters", "protonet"))}
    expected |= {f"sensitivity.{n}.{c}" for n in ("maml", "fomaml", "reptile")
                 for c in ("improves_from_0_to_10_steps", "no_better_than_oracle")}
    assert set(checks) == expected
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    # the oracle bound holds at every point, whatever the budget
    assert all(c["holds"] for k, c in checks.items() if k.endswith("no_better_than_oracle"))
    assert set(report["adaptation"]) == {"0", "1", "2"}
    assert "21/21" not in json.dumps(checks) and checks["sensitivity.maml.no_better_than_oracle"]["value"] == "5/5"
    runs = {p.name for p in (out / "runs").iterdir()}
    assert {"maml", "cnp", "protonet", "maml-a0.003-n1", "maml-a0.003-n2"} <= runs


def test_runs_follow_the_tour_recipes_and_bad_options_are_one_line(tmp_path, capsys):
    assert STUDIES["notebook-figures"].cls is NotebookFigures
    runs = NotebookFigures(NotebookFigures.Config(steps_scale=0.5)).runs()
    assert runs["maml"].train.steps == 1000 and runs["cnp"].task == "gp" and runs["protonet"].task == "clusters"
    grid = runs["maml-a0.03-n5"]
    assert (grid.learner_config.inner_lr, grid.learner_config.inner_steps, grid.train.steps) == (0.03, 5, 1000)
    code = main(["study", "notebook-figures", "--out", str(tmp_path / "n"), "--set", "study.grid_rates=[0]"])
    err = capsys.readouterr().err
    assert code == 2 and "study.grid_rates values must be > 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n").exists()
