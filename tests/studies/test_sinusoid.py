"""The sinusoid study end to end on a tiny budget."""

import json

import pytest

from metalens.cli import main


def test_sinusoid_study_smoke(tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["study", "sinusoid-gradient", "--out", str(out), "--quiet", "--set", "study.quick=true",
                 "--set", 'study.learners=["maml", "oracle"]', "--set", "study.adapt_steps=[1, 2]",
                 "--set", "study.test_shots=[5]"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    cells = report["cells"]
    assert set(cells) == {"maml", "oracle"}
    assert set(cells["maml"]) == {"K=5,steps=1", "K=5,steps=2"}
    # the oracle is far better than a barely trained MAML on the same tasks
    assert cells["oracle"]["K=5,steps=None"]["mean"] < 0.1 * cells["maml"]["K=5,steps=1"]["mean"]
    md = (out / "report.md").read_text()
    assert "| `maml` |" in md and "maml, published" in md
    assert (out / "figures" / "mse_vs_steps.png").exists()


@pytest.mark.parametrize("setting, match", [
    ("study.learners=['nope']", "unknown learner 'nope'"),
    ("study.episodes=1", "episodes >= 2"),
    ("study.bogus=1", "unknown option 'bogus'"),
])
def test_sinusoid_study_rejects_bad_options(tmp_path, capsys, setting, match):
    code = main(["study", "sinusoid-gradient", "--out", str(tmp_path / "s"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
