"""The omniglot study: a smoke run from the CLI (tiny budget) and its option checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metalens.cli import main
from metalens.config import ConfigError, from_dict
from metalens.experiments.omniglot import OmniglotStudy
from metalens.registry import STUDIES

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()


@pytest.mark.skipif(not DATA.exists(), reason=f"Omniglot minimal sets not found at {DATA}")
def test_quick_study_from_the_cli_writes_its_report(capsys, tmp_path):
    out = tmp_path / "omniglot"
    argv = ["study", "omniglot", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", f"study.root={json.dumps(str(DATA))}", "--set", 'study.learners=["protonet", "scratch", "nope"]',
            "--set", "study.ways=[5, 20]", "--set", "study.shots=[1]"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    grid = report["accuracy"]
    assert set(grid) == {"protonet", "scratch"} and set(grid["protonet"]) == {"5-way 1-shot", "20-way 1-shot"}
    # one protonet, trained 20-way, serves both ways; scratch (its head has N outputs) has one run per way
    assert {v["trained"] for v in grid["protonet"].values()} == {"protonet-20w1s"}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["protonet-20w1s", "scratch-20w1s", "scratch-5w1s"]
    assert report["skipped"] == {"nope": "not registered"}
    assert [e["task"] for e in report["evaluations"]] == ["omniglot 5-way 1-shot", "omniglot 20-way 1-shot"] * 2
    assert all(e["episodes"] == 4 for e in report["evaluations"])
    assert set(report["timings"]) == {"protonet-20w1s", "scratch-5w1s", "scratch-20w1s"}
    assert report["timings"]["protonet-20w1s"]["steps"] == 2 and report["timings"]["scratch-5w1s"]["steps"] == 0
    # every claim is a check: above chance everywhere, protonet's published figures (references), protonet vs scratch
    checks = report["checks"]
    assert set(checks) == {*(f"{n}.{w}w1s.above_chance" for n in ("protonet", "scratch") for w in (5, 20)),
                           *(f"protonet.{w}w1s.{c}" for w in (5, 20) for c in ("reaches_published", "beats_scratch"))}
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    assert checks["protonet.5w1s.reaches_published"]["target"].startswith(">= 98.8 (Snell et al. 2017")
    for fig in report["figures"]:
        assert (out / fig).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| `protonet` |" in md and "protonet, published (Snell et al. 2017)" in md
    assert "## Checks (" in md and "| `protonet.20w1s.above_chance` |" in md
    assert "references, not results this study is expected to reach" in md
    assert (f"`metalens study omniglot --out OUT --set 'study.learners=[\"protonet\", \"scratch\", \"nope\"]' --set "
            f"'study.shots=[1]' --set 'study.root={json.dumps(str(DATA))}' --set 'study.quick=true'`") in md
    capsys.readouterr()
    assert main(argv) == 0  # a second run reuses the finished runs
    assert "reusing the finished run" in capsys.readouterr().out


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
    with pytest.raises(ConfigError, match="steps values must be >= 1"):
        from_dict(OmniglotStudy.Config, {"steps": {"protonet": 0}})
    with pytest.raises(ConfigError, match="ways values must be >= 2"):
        from_dict(OmniglotStudy.Config, {"ways": [1]})


def test_runs_are_one_per_shot_for_way_independent_learners():
    study = OmniglotStudy(from_dict(OmniglotStudy.Config, {"learners": ["protonet", "maml", "nope"], "seed": 2}))
    runs = study.runs()
    assert list(runs) == ["protonet-20w1s", "protonet-20w5s", "maml-5w1s", "maml-20w1s", "maml-5w5s", "maml-20w5s"]
    assert runs["protonet-20w1s"].train.steps == 2500 and runs["protonet-20w1s"].train.seed == 2
    assert runs["maml-20w5s"].learner_config.inner_lr == 0.1 and runs["maml-5w1s"].learner_config.inner_lr == 0.4
    assert runs["maml-5w1s"].task_config.queries == 5 and runs["maml-5w1s"].train.checkpoint_every == 500


@pytest.mark.parametrize("setting, match", [
    ("study.episodes=1", "study.episodes must be >= 2, got 1"),
    ("study.learners=[]", "study.learners must hold at least 1 value(s)"),
    ("study.learners=['nope']", "learners must name at least one registered learner"),
    ("study.lr=0", "study.lr must be > 0"),
    ("study.test_queries=19", "shots + queries must be <= 20"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, setting, match):
    code = main(["study", "omniglot", "--out", str(tmp_path / "o"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
