"""The CLI end to end on tiny budgets, and its errors: one line on stderr, exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from metalens.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in ("sinusoid", "gp", "linear", "clusters", "oracle", "scratch", "pretrain"):
        assert f"  {name} " in out
    code, out, _ = run(capsys, "list", "sinusoid")
    assert code == 0 and "--set 'task.shots=10'  support points per task [an integer >= 1]" in out
    code, out, _ = run(capsys, "list", "train")
    assert code == 0 and "--set 'train.lr=0.001'" in out and "[a number > 0]" in out


def test_train_eval_resume_end_to_end(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--task", "sinusoid", "--learner", "pretrain", "--steps", "6",
                         "--seed", "1", "--out", str(out_dir), "--set", "train.batch_tasks=4",
                         "--set", "learner.hidden=[8]", "--set", "train.checkpoint_every=3", "--quiet")
    assert code == 0, err
    assert "trained pretrain on sinusoid: 6 steps" in out
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["train"]["seed"] == 1 and cfg["learner"]["hidden"] == [8] and cfg["task"]["name"] == "sinusoid"

    code, out, err = run(capsys, "eval", str(out_dir), "--episodes", "20", "--json")
    assert code == 0, err
    res = json.loads(out)  # exactly one JSON object
    assert set(res) == {"task", "learner", "episodes", "metrics", "oracle", "diverged", "diverged_tasks"}
    assert res["diverged"] == 0 and res["diverged_tasks"] == []
    assert res["episodes"] == 20 and res["task"] == "sinusoid" and res["learner"] == "pretrain"
    assert set(res["metrics"]["mse"]) == {"mean", "ci95"} and res["oracle"]["mse"]["mean"] < res["metrics"]["mse"]["mean"]

    code, out2, _ = run(capsys, "eval", str(out_dir), "--episodes", "20", "--json",
                        "--set", "learner.finetune_steps=0", "--set", "task.shots=3")
    assert code == 0 and json.loads(out2)["metrics"] != res["metrics"]

    # resume with more steps from the folder alone
    code, out, err = run(capsys, "train", "--resume", "--out", str(out_dir), "--steps", "9", "--quiet")
    assert code == 0, err
    assert "9 steps" in out


def test_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('task = "sinusoid"\n[learner]\nname = "pretrain"\nhidden = [4]\n[train]\nsteps = 2\nbatch_tasks = 2\n')
    code, out, err = run(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["learner"]["hidden"] == [4]


@pytest.mark.parametrize("argv, match", [
    (["train", "--task", "nope", "--learner", "pretrain", "--out", "{tmp}/a"], "unknown task family 'nope'; known: sinusoid"),
    (["train", "--task", "sinusoid", "--learner", "nope", "--out", "{tmp}/a"], "unknown learner 'nope'"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "task.shots=0"],
     "task.shots must be >= 1, got 0"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "task.shot=3"],
     "unknown option 'task.shot'"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "shots=3"],
     "--set key must be section.key"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "train.lr=fast"],
     "train.lr must be a number"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--steps", "0"], "--steps"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--config", "{tmp}/missing.toml"],
     "cannot read config file"),
    (["train", "--learner", "pretrain", "--out", "{tmp}/a"], "--task and --learner are required"),
    (["train", "--bogus"], "No such option"),
    (["train", "--resume", "--out", "{tmp}/nothing"], "not a metalens run folder"),
    (["eval", "{tmp}/nothing"], "not a metalens run folder"),
    (["eval", "{tmp}/nothing", "--episodes", "1"], "--episodes"),
    (["tour", "--learner", "nope"], "unknown learner 'nope'"),
    (["list", "nope"], "unknown task family or learner 'nope'"),
    (["frobnicate"], "No such command"),
    (["study", "nope"], "unknown study 'nope'"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "study.steps=3"],
     "train --set accepts task.*, learner.* and train.* options only"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--threads", "0"], "--threads"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "train.device=banana"],
     "train.device must be cpu, cuda, cuda:N (N a device index) or mps, got 'banana'"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "train.device=meta"],
     "train.device must be cpu, cuda, cuda:N (N a device index) or mps, got 'meta'"),
    (["study", "omniglot", "--out", "{tmp}/a", "--device", "banana"],
     "device must be cpu, cuda, cuda:N (N a device index) or mps, got 'banana'"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "train.compile=maybe"],
     "train.compile must be true or false, got 'maybe'"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "learner.backbone=conv5"],
     "learner.backbone must be one of 'mlp', 'conv4', 'resnet12', got 'conv5'"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set",
      "learner.finetune_optimizer=rmsprop"], "learner.finetune_optimizer must be one of 'sgd', 'adam', got 'rmsprop'"),
    # refused by the learner's constructor (inputs that do not fit the backbone): still before the folder
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "learner.backbone=conv4"],
     "backbone 'conv4' needs image inputs [channels, height, width], got x_shape (1,)"),
    (["train", "--task", "gp", "--learner", "lnp", "--out", "{tmp}/a", "--set", "learner.objective=vi"],
     "learner.objective must be one of 'elbo', 'ml', got 'vi'"),
    (["study", "neural-processes", "--out", "{tmp}/a", "--set", "study.ml_samples=0"], "ml_samples must be >= 1"),
    (["study", "neural-processes", "--out", "{tmp}/a", "--set", "study.lr_decay=1"],
     "study.lr_decay must be >= 0 and < 1, got 1.0"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "train.lr_schedule=step"],
     "train.lr_schedule must be one of 'constant', 'cosine', got 'step'"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--steps", "10", "--set",
      "train.lr_schedule=cosine", "--set", "train.lr_decay_start=10"],
     "train.lr_decay_start must be in [0, steps) = [0, 10) with lr_schedule = cosine, got 10"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set", "train.grad_clip=nan"],
     "train.grad_clip must be finite, got nan"),
    (["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set",
      "task.amplitude_range=[0.1, inf]"], "task.amplitude_range must be finite, got (0.1, inf)"),
    pytest.param(["train", "--task", "sinusoid", "--learner", "pretrain", "--out", "{tmp}/a", "--set",
                  "train.device=cuda"], "CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param(["study", "sinusoid-gradient", "--out", "{tmp}/a", "--device", "cuda"],
                 "CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_errors_are_one_line_and_exit_2(capsys, tmp_path, argv, match):
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "a").exists()  # nothing written for a rejected command


def test_existing_run_is_not_overwritten(capsys, tmp_path):
    args = ["train", "--task", "sinusoid", "--learner", "oracle", "--out", str(tmp_path / "r"), "--quiet"]
    assert run(capsys, *args)[0] == 0
    before = (tmp_path / "r" / "config.json").read_text()
    code, _, err = run(capsys, *args[:-1], "--set", "task.shots=3")
    assert code == 2 and "holds a run" in err
    assert (tmp_path / "r" / "config.json").read_text() == before


def test_eval_rejects_train_options_and_shape_changes(capsys, tmp_path):
    run(capsys, "train", "--task", "sinusoid", "--learner", "pretrain", "--steps", "2", "--out", str(tmp_path / "r"),
        "--set", "learner.hidden=[4]", "--quiet")
    code, _, err = run(capsys, "eval", str(tmp_path / "r"), "--set", "train.lr=1")
    assert code == 2 and "task.* and learner.*" in err
    code, _, err = run(capsys, "eval", str(tmp_path / "r"), "--set", "learner.hidden=[5]")
    assert code == 2 and "cannot be changed at evaluation" in err


def test_tour_smoke(capsys, tmp_path):
    code, out, err = run(capsys, "tour", "--out", str(tmp_path / "t"), "--learner", "oracle", "--learner", "pretrain",
                         "--episodes", "20", "--steps-scale", "0.005", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert [e["learner"] for e in report["evaluations"]] == ["oracle", "pretrain"]
    assert (tmp_path / "t" / "figures" / "sinusoid.png").stat().st_size > 1000
    assert "| `pretrain` | `sinusoid` | 20 |" in (tmp_path / "t" / "report.md").read_text()
    # a second tour reuses the finished runs
    code, out, err = run(capsys, "tour", "--out", str(tmp_path / "t"), "--learner", "pretrain", "--episodes", "20",
                         "--steps-scale", "0.005", "--quiet")
    assert code == 0, err
    assert "checks" in json.loads((tmp_path / "t" / "report.json").read_text())
    # a run made with other options in the tour's folder is refused, with what to do
    other = tmp_path / "o"
    assert run(capsys, "train", "--task", "sinusoid", "--learner", "pretrain", "--steps", "2", "--quiet",
               "--set", "learner.finetune_lr=0.5", "--out", str(other / "runs" / "pretrain"))[0] == 0
    code, out, err = run(capsys, "tour", "--out", str(other), "--learner", "pretrain", "--episodes", "20",
                         "--steps-scale", "0.005", "--quiet")
    assert code == 2 and "holds a run with a different configuration" in err and "choose another --out" in err
    # a config.json edited by hand no longer matches its checkpoint: refused, not run as the other options
    cfg_file = tmp_path / "t" / "runs" / "pretrain" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["learner"]["finetune_lr"] = 0.5
    cfg_file.write_text(json.dumps(cfg))
    code, out, err = run(capsys, "eval", str(tmp_path / "t" / "runs" / "pretrain"), "--episodes", "4")
    assert code == 2 and "does not match the checkpoint" in err and "restore the run's config.json" in err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "metalens", "eval", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("metalens: error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "metalens", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "metalens" in proc.stdout


def test_study_help_options_print_values_that_set_accepts(capsys):
    import re

    from metalens.config import from_dict, parse_set
    from metalens.registry import STUDIES

    code, out, _ = run(capsys, "study", "omniglot", "--help-options")
    assert code == 0
    options = {}
    for line in out.splitlines()[1:]:
        item = re.match(r"\s*--set '([^']*)'  ", line).group(1)  # --set 'study.KEY=VALUE'  help
        section, key, value = parse_set(item)
        assert section == "study"
        options[key] = value
    config = from_dict(STUDIES["omniglot"].cls.Config, options)  # the defaults, read back as --set reads them
    assert config == STUDIES["omniglot"].cls.Config()
    assert options["steps"]["protonet"] == 2500


# -- image families: the effective settings before the first step, family train defaults, bad image options ------
def _colour_data(root):
    import numpy as np
    from PIL import Image

    for g in range(2):
        for c in range(3):
            d = root / f"g{g}" / f"c{c}"
            d.mkdir(parents=True)
            for i in range(3):
                a = np.random.RandomState(100 * g + 10 * c + i).randint(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _images_argv(tmp_path, out, *extra):
    return ["train", "--task", "images", "--learner", "protonet", "--steps", "2", "--out", str(tmp_path / out),
            "--set", f"task.root={tmp_path / 'data'}", "--set", "task.channels=3", "--set", "task.size=16",
            "--set", "task.ways=2", "--set", "task.queries=1", "--set", "task.split=group", "--set",
            "task.val_size=0", "--set", "task.test_size=1", "--set", "learner.channels=4", *extra]


def test_train_prints_the_effective_settings_and_records_the_family_s_train_defaults(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("METALENS_CACHE", str(tmp_path / "cache"))
    _colour_data(tmp_path / "data")
    code, out, err = run(capsys, *_images_argv(tmp_path, "a", "--set", "task.augment=natural"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("metalens: ")]
    assert [line.split(":")[1] for line in lines[:3]] == [" task images", " learner protonet", " train"], err
    assert "channels=3" in lines[0] and 'augment="natural"' in lines[0] and 'backbone="auto"' in lines[1]
    assert "batch_tasks=1 (proposed by images)" in lines[2] and "steps=2" in lines[2]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["train"]["batch_tasks"] == 1 and cfg["task"]["augment"] == "natural"
    # the user's setting wins, and --quiet stays quiet
    code, out, err = run(capsys, *_images_argv(tmp_path, "b", "--set", "train.batch_tasks=2", "--quiet"))
    assert code == 0 and err == "", err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["batch_tasks"] == 2
    code, out, err = run(capsys, *_images_argv(tmp_path, "c", "--set", "train.batch_tasks=2"))
    assert code == 0 and "batch_tasks=2 " in err and "proposed by" not in err
    # resumed: the saved settings, as they are
    code, out, err = run(capsys, "train", "--resume", "--out", str(tmp_path / "a"), "--steps", "3")
    assert code == 0 and "batch_tasks=1 " in err and "proposed by" not in err, err


@pytest.mark.parametrize("setting, match", [
    ("task.channels=2", "task.channels must be one of 1, 3, got 2"),
    ("task.augment=strong", "task.augment must be one of 'none', 'natural', 'handwriting', got 'strong'"),
    ("task.aug_flip=2", "task.aug_flip must be >= 0 and <= 1, got 2.0"),
    ("task.height=0", "task.height must be >= 1, got 0"),
    ("learner.backbone=resnet18", "learner.backbone must be one of 'auto', 'conv4', 'resnet12', 'mlp', 'identity'"),
    ("learner.dropblock=0.1", "dropblock applies to the resnet12 backbone, not conv4"),
])
def test_bad_image_options_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, setting, match):
    monkeypatch.setenv("METALENS_CACHE", str(tmp_path / "cache"))
    _colour_data(tmp_path / "data")
    code, out, err = run(capsys, *_images_argv(tmp_path, "a", "--set", setting))
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "a").exists()
