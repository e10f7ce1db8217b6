"""The omniglot-within study: a smoke run from the CLI (tiny budget), its options, and its held-out tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metalens.cli import main
from metalens.config import ConfigError, from_dict
from metalens.data.images import to_float
from metalens.experiments.omniglot_within import OmniglotWithin, tta_predict
from metalens.registry import STUDIES
from metalens.tasks.omniglot import Omniglot

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"Omniglot minimal sets not found at {DATA}")
SEED = 0


@needs_data
def test_quick_study_from_the_cli_writes_its_report(capsys, tmp_path):
    out = tmp_path / "within"
    argv = ["study", "omniglot-within", "--out", str(out), "--quiet", "--set", "study.quick=true",
            "--set", f"study.root={json.dumps(str(DATA))}", "--set", 'study.learners=["protonet", "maml", "nope"]',
            "--set", "study.sizes=[28, 32]", "--set", 'study.augment=["none", "handwriting"]', "--set", "study.tta=2",
            "--set", "study.train_ways=50"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    labels = [f"{n}-{s}px-{v}" for n in ("protonet", "maml") for s in (28, 32) for v in ("none", "handwriting")]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(labels)
    acc = report["accuracy"]
    assert set(acc) == set(labels)  # (report.json sorts its keys)
    assert acc["protonet-28px-none"]["train_ways"] == 50 and acc["maml-28px-none"]["train_ways"] == 20
    for row in acc.values():
        assert 0 <= row["mean"] <= 1 and row["ci95"] >= 0 and 0 <= row["tta_mean"] <= 1
    assert report["skipped"] == {"nope": "not registered"} and report["target"] == 0.95
    assert [e["learner"] for e in report["evaluations"]] == labels
    assert all(e["episodes"] == 4 and e["task"] == "omniglot within-alphabet 20-way 1-shot"
               for e in report["evaluations"])
    assert all(report["timings"][k]["steps"] == 2 for k in labels)
    # the runs' configurations: the protocol, the size and the variant reach the family
    cfg = json.loads((out / "runs" / "protonet-32px-handwriting" / "config.json").read_text())
    assert cfg["task"]["protocol"] == "small" and cfg["task"]["size"] == 32  # scored on small_within
    assert cfg["task"]["augment"] == "handwriting" and cfg["task"]["ways"] == 50
    checks = report["checks"]
    assert set(checks) == {
        *(f"{k}.above_chance" for k in labels), *(f"{k}.tta_helps" for k in labels), "best.reaches_95",
        *(f"{n}.{s}px.handwriting_helps" for n in ("protonet", "maml") for s in (28, 32)),
        *(f"{n}.{v}.32px_beats_28px" for n in ("protonet", "maml") for v in ("none", "handwriting"))}
    for c in checks.values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    best = max([r["mean"] for r in acc.values()] + [r["tta_mean"] for r in acc.values()])
    assert checks["best.reaches_95"]["value"] == round(100 * best, 2)
    assert checks["best.reaches_95"]["holds"] == (best >= 0.95)
    assert checks["best.reaches_95"]["target"].startswith(">= 95 (% accuracy of the best run, ")
    assert len(report["figures"]) == 3
    for fig in report["figures"]:
        assert (out / fig).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| `protonet` | 50-way, 2 steps |" in md and "| learner | trained | 28 px, none | 28 px, handwriting |" in md
    assert "## Checks (" in md and "| `best.reaches_95` |" in md
    capsys.readouterr()
    assert main(argv) == 0  # a second run reuses the finished runs
    assert "reusing the finished run" in capsys.readouterr().out


def test_study_is_registered_and_checks_its_options():
    assert STUDIES["omniglot-within"].cls is OmniglotWithin
    c = from_dict(OmniglotWithin.Config, {"steps": {"protonet": 5}, "learners": ["protonet", "maml"]})
    assert c.steps_for("protonet") == 5 and c.steps_for("maml") == OmniglotWithin.Config().steps_for("maml")
    with pytest.raises(ConfigError, match="1 \\+ queries must be <= 20"):
        from_dict(OmniglotWithin.Config, {"test_queries": 20})
    with pytest.raises(ConfigError, match="not in learners"):
        from_dict(OmniglotWithin.Config, {"steps": {"maml": 5}, "learners": ["protonet"]})
    with pytest.raises(ConfigError, match="sizes lists a value twice"):
        from_dict(OmniglotWithin.Config, {"sizes": [28, 28]})
    with pytest.raises(ConfigError, match="augment"):
        from_dict(OmniglotWithin.Config, {"augment": ["rotate"]})
    with pytest.raises(ConfigError, match="must name at least one registered learner"):
        from_dict(OmniglotWithin.Config, {"learners": ["nope"]})


def test_runs_cover_learners_sizes_and_variants():
    study = OmniglotWithin(from_dict(OmniglotWithin.Config, {
        "learners": ["protonet", "maml"], "sizes": [28, 56], "augment": ["none", "strokes", "both"],
        "train_ways": 60, "train_episodes": "within_group"}))
    runs = study.runs()
    assert list(runs)[:3] == ["protonet-28px-none", "protonet-28px-strokes", "protonet-28px-both"] and len(runs) == 12
    both = runs["protonet-56px-both"].task_config
    assert both.strokes == "perturb" and both.augment == "handwriting" and both.size == 56
    assert runs["protonet-28px-none"].task_config.ways == 60 and runs["maml-28px-none"].task_config.ways == 20
    assert all(r.task_config.episodes == "within_group" and r.task_config.protocol == "small"
               for r in runs.values())


def test_tta_repeats_the_support_set_with_its_labels_and_is_seeded():
    calls = []

    def predict(sx, sy, qx, *, support_mask=None):
        calls.append((sx.clone(), sy, support_mask))
        return torch.distributions.Categorical(logits=torch.zeros(qx.shape[0], qx.shape[1], 3))

    sx = torch.rand(2, 3, 1, 12, 12, generator=torch.Generator().manual_seed(SEED))
    sy = torch.tensor([[0, 1, 2], [2, 0, 1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for _ in range(2):
        tta_predict(predict, 3, seed=SEED)(sx, sy, torch.rand(2, 4, 1, 12, 12), support_mask=mask)
    (x1, y1, m1), (x2, _, _) = calls
    assert x1.shape == (2, 12, 1, 12, 12) and torch.equal(x1[:, :3], sx), f"seed {SEED}"
    assert torch.equal(y1, sy.repeat(1, 4)) and torch.equal(m1, mask.repeat(1, 4))
    assert not torch.allclose(x1[:, 3:6], sx) and torch.equal(x1, x2), f"seed {SEED}: copies differ, same seed"
    with pytest.raises(ValueError, match="copies must be >= 1"):
        tta_predict(predict, 0, seed=SEED)


@needs_data
def test_small_within_test_tasks_draw_every_character_from_one_alphabet():
    """On the real minimal sets: 20-way held-out tasks hold 20 distinct characters of Japanese (katakana) or
    Sanskrit, never of Tagalog (17 characters) and never of small1's alphabets; both alphabets are drawn."""
    f = Omniglot(Omniglot.Config(root=str(DATA), protocol="small_within", ways=20, queries=2))
    alphabet_of, character_of = {}, {}  # image bytes (as the family returns them) -> alphabet, character
    base, names = f._split_base["test"], f.classes("test")
    for i, name in enumerate(names):
        rows = f._class_images[base[i], : int(f._counts[base[i]])]
        for x in to_float(f._images[rows]):
            alphabet_of[x.numpy().tobytes()] = name.split("/")[-2]
            character_of[x.numpy().tobytes()] = name
    assert {a for a in alphabet_of.values()} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    ep = f.eval_episodes(SEED, 30)
    seen = set()
    for t in range(30):
        xs = torch.cat([ep.support_x[t], ep.query_x[t]])[:, 0]
        alphabets = {alphabet_of[x.numpy().tobytes()] for x in xs}
        assert len(alphabets) == 1, f"seed {SEED}, task {t}: {alphabets}"
        assert len({character_of[x.numpy().tobytes()] for x in ep.support_x[t, :, 0]}) == 20, f"seed {SEED}"
        seen |= alphabets
    assert seen == {"Japanese_(katakana)", "Sanskrit"}, f"seed {SEED}: {seen}"
