"""The icl-plateaus study: a smoke run from the CLI with its checks, a bad option, the plateau rule and the biased
training distribution."""

from __future__ import annotations

import json

import pytest
import torch

import metalens
from metalens.cli import main
from metalens.experiments.icl_plateaus import ICLPlateaus, ProjectedBiased, plateau_length
from metalens.tasks.projected import Projected

torch.set_num_threads(1)

SEED = 3


def test_quick_study_writes_its_checks_and_curves(tmp_path):
    out = tmp_path / "pl"
    assert main(["study", "icl-plateaus", "--out", str(out), "--quiet", "--set", "study.quick=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["checks"]) == {"batch.larger_shortens_plateau", "bias0.1.shortens_plateau",
                                     "bias0.1.keeps_accuracy", "bias0.25.shortens_plateau", "bias0.25.keeps_accuracy",
                                     "bias0.5.shortens_plateau", "bias0.5.keeps_accuracy"}
    for c in report["checks"].values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    assert set(report["rows"]) == {"batch2", "batch4", "batch6", "batch4-bias0.1", "batch4-bias0.25",
                                   "batch4-bias0.5"}
    # quick: 6 steps; the meta-test loss at step 0 and every 2 steps, the training loss logged at every step
    assert all([p[0] for p in curve] == [0, 2, 4, 6] for curve in report["curves"].values())
    assert all(len(curve) == 6 for curve in report["training_curves"].values())
    config = json.loads((out / "runs" / "batch4-bias0.25" / "config.json").read_text())
    assert config["task"]["name"] == "projected_biased" and config["task"]["bias_fraction"] == 0.25
    assert report["figures"] == ["figures/plateaus.png"]


def test_a_bad_option_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["study", "icl-plateaus", "--out", str(tmp_path / "bad"), "--quiet",
                 "--set", "study.batch_sizes=[32, 8]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "study.batch_sizes" in err, err


def test_plateau_length_is_the_first_smoothed_drop_below_the_threshold():
    flat = [(s, 1.6) for s in range(5, 101, 5)]
    assert plateau_length(flat) is None
    drop = [(s, 1.6 if s < 50 else 1.0) for s in range(5, 101, 5)]
    # trailing mean of 5 logs: at step 50 + 5k it holds k + 1 low values; below 0.9 * 1.6 = 1.44 once
    # (5 - n) * 1.6 + n * 1.0 < 7.2, i.e. n >= 2: step 55
    assert plateau_length(drop, window=5, threshold=0.9) == 55
    assert plateau_length(drop, window=1, threshold=0.9) == 50
    with pytest.raises(metalens.ConfigError, match="heads must divide width"):
        ICLPlateaus.Config(width=30, heads=4)


def test_the_biased_family_replaces_a_fraction_of_training_tasks_by_one_fixed_task():
    opts = {"ways": 3, "shots": 2, "queries": 2, "dim": 8}
    base = Projected(Projected.Config(**opts))
    fixed = Projected(Projected.Config(**opts, pool_log2=0))
    biased = ProjectedBiased(ProjectedBiased.Config(**opts, bias_fraction=0.5))
    g, ref = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
    ep = biased.sample(40, generator=g)
    a = base.sample(40, generator=ref)
    replaced = torch.rand(40, generator=ref) < 0.5
    b = fixed.sample(40, generator=ref)
    assert 5 < int(replaced.sum()) < 35, f"seed {SEED}"
    for k in ("support_x", "support_y", "query_x", "query_y"):
        want = torch.where(replaced.view(-1, *([1] * (getattr(a, k).dim() - 1))), getattr(b, k), getattr(a, k))
        assert torch.equal(getattr(ep, k), want), f"{k}, seed {SEED}"
    # held-out tasks are never biased; with no bias the family is the projected family
    test_a = biased.sample(5, generator=torch.Generator().manual_seed(SEED), split="test")
    test_b = base.sample(5, generator=torch.Generator().manual_seed(SEED), split="test")
    assert torch.equal(test_a.support_x, test_b.support_x)
    plain = ProjectedBiased(ProjectedBiased.Config(**opts)).sample(5, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(plain.query_x, base.sample(5, generator=torch.Generator().manual_seed(SEED)).query_x)
