"""The sinusoid study end to end on a tiny budget, and its option checks."""

import json

import pytest

from metalens.cli import main
from metalens.config import ConfigError, from_dict
from metalens.experiments.sinusoid import BUDGETS, SinusoidGradient
from metalens.registry import STUDIES


def test_sinusoid_study_smoke(tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["study", "sinusoid-gradient", "--out", str(out), "--quiet", "--set", "study.quick=true",
                 "--set", 'study.learners=["maml", "pretrain", "oracle"]', "--set", "study.adapt_steps=[1, 10]",
                 "--set", "study.test_shots=[5]"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    cells = report["cells"]
    assert set(cells) == {"maml", "pretrain", "oracle"}
    assert set(cells["maml"]) == {"K=5,steps=1", "K=5,steps=10"}
    # the oracle is far better than a barely trained MAML on the same tasks
    assert cells["oracle"]["K=5,steps=None"]["mean"] < 0.1 * cells["maml"]["K=5,steps=1"]["mean"]
    assert report["published"]["maml"] == {"1": 0.67, "5": 0.38, "10": 0.35}
    # every claim is a check; those of learners not in the study (metasgd) are left out
    checks = report["checks"]
    assert set(checks) == {
        *(f"{n}.K=5,steps={s}.no_better_than_oracle" for n in ("maml", "pretrain") for s in (1, 10)),
        *(f"{n}.K=5,steps={s}.within_published" for n in ("maml", "pretrain") for s in (1, 10)),
        "maml.K=5,steps=10.beats_pretrain"}
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    assert all(checks[f"maml.K=5,steps={s}.no_better_than_oracle"]["holds"] for s in (1, 10))
    assert checks["maml.K=5,steps=10.within_published"]["target"] == "<= 0.35"
    assert [e["learner"] for e in report["evaluations"]] == ["maml", "pretrain", "oracle"]
    assert report["config"]["episodes"] == 50 and all(e["episodes"] == 50 for e in report["evaluations"])
    md = (out / "report.md").read_text()
    assert "| `maml` |" in md and "maml, published" in md
    assert "## Checks (" in md and "| `maml.K=5,steps=10.beats_pretrain` |" in md
    assert (out / "figures" / "mse_vs_steps.png").exists() and (out / "figures" / "predictions.png").exists()


def test_runs_keep_their_budgets_and_seeds():
    study = SinusoidGradient(from_dict(SinusoidGradient.Config, {"learners": ["maml", "scratch"], "seed": 3,
                                                                  "steps_multiplier": 0.5}))
    runs = study.runs()
    assert STUDIES["sinusoid-gradient"].cls is SinusoidGradient
    assert list(runs) == ["maml", "scratch"]
    assert runs["maml"].train.steps == BUDGETS["maml"] // 2 and runs["maml"].train.seed == 3
    assert runs["maml"].learner_config.inner_lr == 0.01 and runs["maml"].task_config.shots == 10
    assert runs["scratch"].train.steps == 1  # nothing to train: no budget
    quick = SinusoidGradient(from_dict(SinusoidGradient.Config, {"learners": ["maml"], "quick": True}))
    assert quick.runs()["maml"].train.steps == 300 and quick.effective().episodes == 50


@pytest.mark.parametrize("setting, match", [
    ("study.learners=['nope']", "study.learners must name registered learners"),
    ("study.learners=[]", "study.learners must hold at least 1 value(s)"),
    ("study.episodes=1", "study.episodes must be >= 2, got 1"),
    ("study.adapt_steps=[-1]", "study.adapt_steps values must be >= 0"),
    ("study.steps_multiplier=0", "study.steps_multiplier must be > 0"),
    ("study.bogus=1", "unknown option 'study.bogus'"),
])
def test_sinusoid_study_rejects_bad_options(tmp_path, capsys, setting, match):
    code = main(["study", "sinusoid-gradient", "--out", str(tmp_path / "s"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_options_are_checked_where_they_are_built():
    with pytest.raises(ConfigError, match="'nope' is not one"):
        from_dict(SinusoidGradient.Config, {"learners": ["maml", "nope"]})
    with pytest.raises(ConfigError, match="test_shots values must be >= 1"):
        from_dict(SinusoidGradient.Config, {"test_shots": [5, 0]})
