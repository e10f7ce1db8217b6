"""The tabular-incontext study: a smoke run from the CLI, its table and checks, and its draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metalens import rng
from metalens.cli import main
from metalens.config import ConfigError
from metalens.experiments.tabular import _DRAW_KEY, CLASSICAL, DATASETS, TabularInContext, draw_support, load_dataset
from metalens.registry import STUDIES

torch.set_num_threads(1)


def test_quick_study_scores_every_data_set_and_method_on_the_same_draws(tmp_path):
    out = tmp_path / "tab"
    argv = ["study", "tabular-incontext", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", "study.shots_eval=[1, 5]", "--set", "study.datasets=[\"iris\", \"breast_cancer\"]"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    methods = ["transformer", "protonet", *CLASSICAL]
    assert [(r["dataset"], r["shots"]) for r in report["rows"]] == [("iris", 1), ("iris", 5), ("breast_cancer", 1),
                                                                    ("breast_cancer", 5)]
    for r in report["rows"]:
        for m in methods:
            assert 0.0 <= r[m]["mean"] <= 1.0 and r[m]["ci95"] >= 0, (r["dataset"], m)
    checks = report["checks"]
    assert set(checks) == {"synthetic.transformer_above_chance", "K1.transformer_above_best_classical",
                           "K5.transformer_above_best_classical"}
    for K in (1, 5):
        avg = report["averages"][str(K)]
        best = max(CLASSICAL, key=avg.__getitem__)
        c = checks[f"K{K}.transformer_above_best_classical"]
        assert c["value"] == pytest.approx(avg["transformer"] - avg[best], abs=1e-4)
        assert c["holds"] == (c["value"] > 0) and best in c["target"]
    md = (out / "report.md").read_text()
    assert "| iris | 1 |" in md and "*average of 2*" in md and "`random_forest`" in md
    assert len(report["evaluations"]) == 2  # held-out synthetic tables, both learners


def test_draws_are_deterministic_balanced_and_disjoint():
    _, y = load_dataset("wine")
    a = draw_support(y, 5, rng.generator(0, _DRAW_KEY, 1, 5, 7))
    b = draw_support(y, 5, rng.generator(0, _DRAW_KEY, 1, 5, 7))
    c = draw_support(y, 5, rng.generator(0, _DRAW_KEY, 1, 5, 8))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert np.bincount(y[a[0]]).tolist() == [5, 5, 5]
    assert not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == len(y)


def test_registered_and_options_checked():
    assert STUDIES["tabular-incontext"].cls is TabularInContext
    assert DATASETS == ("iris", "wine", "breast_cancer", "digits")
    with pytest.raises(ConfigError, match="datasets must name iris"):
        TabularInContext.Config(datasets=("mnist",))
    with pytest.raises(ConfigError, match="min_classes must be <= max_classes"):
        TabularInContext.Config(min_classes=5, max_classes=3)
    with pytest.raises(ConfigError, match="heads must divide width"):
        TabularInContext.Config(width=10, heads=4)
    runs = TabularInContext(TabularInContext.Config(protonet=False)).runs()
    assert list(runs) == ["transformer-synthetic_tables"] and runs["transformer-synthetic_tables"].train.steps > 1000
