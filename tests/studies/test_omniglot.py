"""The omniglot study: a smoke run from the CLI (tiny budget) and its option checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metalens.cli import main
from metalens.config import ConfigError, from_dict
from metalens.registry import STUDIES
from metalens.studies.omniglot import OmniglotStudy

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()


@pytest.mark.skipif(not DATA.exists(), reason=f"Omniglot minimal sets not found at {DATA}")
def test_quick_study_from_the_cli_writes_its_report(capsys, tmp_path):
    out = tmp_path / "omniglot"
    argv = ["study", "omniglot", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", f"study.root={json.dumps(str(DATA))}", "--set", 'study.learners=["protonet", "nope"]',
            "--set", "study.ways=[5, 20]", "--set", "study.shots=[1]"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    grid = report["accuracy"]
    assert set(grid) == {"protonet"} and set(grid["protonet"]) == {"5-way 1-shot", "20-way 1-shot"}
    # one model, trained 20-way, serves both ways
    assert {v["trained"] for v in grid["protonet"].values()} == {"protonet-20w1s"}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["protonet-20w1s"]
    assert report["skipped"] == {"nope": "not registered"}
    assert [e["task"] for e in report["evaluations"]] == ["omniglot 5-way 1-shot", "omniglot 20-way 1-shot"]
    assert all(e["episodes"] == 4 for e in report["evaluations"])
    for fig in report["figures"]:
        assert (out / fig).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| `protonet` |" in md
    assert (f"`metalens study omniglot --out OUT --set 'study.learners=[\"protonet\", \"nope\"]' --set "
            f"'study.shots=[1]' --set 'study.root={json.dumps(str(DATA))}' --set 'study.quick=true'`") in md
    capsys.readouterr()
    assert main(argv) == 0  # a second run reuses the finished run
    assert "(resuming)" in capsys.readouterr().out


def test_study_is_registered_and_checks_its_options():
    assert STUDIES["omniglot"].cls is OmniglotStudy
    c = from_dict(OmniglotStudy.Config, {"steps": {"protonet": 5}, "learners": ["protonet"]})
    assert c.steps_for("protonet") == 5 and c.learners == ("protonet",)
    assert c.steps_for("maml") == 400  # left out of the table: its default
    assert from_dict(OmniglotStudy.Config, {"learners": ["protonet"]}).steps_for("protonet") == 2500
    with pytest.raises(ConfigError, match="shots \\+ queries must be <= 20"):
        from_dict(OmniglotStudy.Config, {"shots": [5], "test_queries": 16})
    with pytest.raises(ConfigError, match="not in learners"):
        from_dict(OmniglotStudy.Config, {"steps": {"maml": 5}, "learners": ["protonet"]})
    with pytest.raises(ConfigError, match="episodes must be >= 2"):
        from_dict(OmniglotStudy.Config, {"episodes": 1})
