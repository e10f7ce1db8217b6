"""The icl-transfer study: a smoke run from the CLI and its checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metalens.cli import main
from metalens.config import ConfigError
from metalens.experiments.icl_transfer import ICLTransfer
from metalens.registry import STUDIES

torch.set_num_threads(1)


def test_quick_transfer_scores_every_target_beside_scratch_and_the_oracle(tmp_path):
    out = tmp_path / "tr"
    argv = ["study", "icl-transfer", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", "study.sinusoid_shots=[5]", "--set", "study.sequence_length=12"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["task"] for r in report["rows"]] == ["sinusoid", "gp", "random_mlp"]
    for r in report["rows"]:
        assert math.isfinite(r["transformer"]["mean"]) and math.isfinite(r["scratch"]["mean"])
        assert (r["oracle"] is None) == (r["task"] == "random_mlp")
    assert len(report["figures"]) == 2
    # in distribution, and each target never seen in training: does the transformer beat scratch?
    checks = report["checks"]
    assert set(checks) == {"sinusoid-K5.beats_scratch", "gp.beats_scratch", "random_mlp.beats_scratch"}
    for key, r in zip(["sinusoid-K5", "gp", "random_mlp"], report["rows"]):
        c = checks[f"{key}.beats_scratch"]
        assert set(c) == {"value", "target", "holds"} and c["target"] == "<= 1"
        assert c["value"] == pytest.approx(r["transformer"]["mean"] / r["scratch"]["mean"], abs=1e-4)
        assert c["holds"] == (c["value"] <= 1)
    md = (out / "report.md").read_text()
    assert "## Checks (" in md and "| `gp.beats_scratch` |" in md and "issue" not in md.lower()


def test_registered_and_options_checked():
    assert STUDIES["icl-transfer"].cls is ICLTransfer
    with pytest.raises(ConfigError, match="sinusoid_shots must be less than sequence_length"):
        ICLTransfer.Config(sequence_length=10, sinusoid_shots=(5, 10))
    with pytest.raises(ConfigError, match="output_std_range must be .low, high. with low <= high"):
        ICLTransfer.Config(output_std_range=(2.0, 1.0))
    ICLTransfer.Config(output_std_range=(1.0, 1.0))  # a fixed scale
    with pytest.raises(ConfigError, match="x_range must be increasing"):
        ICLTransfer.Config(x_range=(1.0, 1.0))
