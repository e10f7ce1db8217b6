"""Model files: export and load give the same predictions as the run folder; damaged, truncated, foreign and
future files are refused with one line (exit code 2); nothing is overwritten."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import metalens
from metalens.cli import main
from metalens.errors import CheckpointError
from metalens.model_file import FORMAT_VERSION, load_model, read_model
from metalens.run import RunConfig, start_run
from metalens.use import classify, prepare

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mf") / "run"
    cfg = RunConfig.resolve("synthetic_tables", "transformer", {"max_features": 6, "max_classes": 4, "min_classes": 2,
                                                                 "shots": 3, "queries": 2},
                            {"dim": 16, "layers": 1, "heads": 2}, {"steps": 4, "batch_tasks": 4, "seed": 3})
    start_run(cfg, out).train(progress=False)
    return out


@pytest.fixture(scope="module")
def model_path(run_dir):
    path = run_dir.parent / "model.safetensors"
    assert main(["export", str(run_dir), str(path)]) == 0
    return path


def header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n])


def rewrite(data: bytes, **changes: str) -> bytes:
    """The same tensors with some metadata changed (the checksum kept: the tensor bytes do not change)."""
    meta = {**header(data)[1]["__metadata__"], **changes}
    return st_save(st_load(data), metadata=meta)


def test_export_then_load_gives_identical_predictions(run_dir, model_path, capsys):
    from_run, from_file = load_model(run_dir), load_model(model_path)
    assert from_file.spec == from_run.spec and from_file.inputs == from_run.inputs
    assert from_file.config == from_run.config and from_file.step == from_run.step == 4
    for k, v in from_run.learner.state_dict().items():
        assert torch.equal(v, from_file.learner.state_dict()[k]), k
    r = np.random.default_rng(0)
    xs, xq = r.normal(size=(9, 5)), r.normal(size=(7, 5))  # 5 columns: zero-padded to 6
    ys = torch.tensor([0, 1, 2] * 3)
    a = classify(from_run, prepare(from_run, xs), ys, 3, prepare(from_run, xq))
    b = classify(from_file, prepare(from_file, xs), ys, 3, prepare(from_file, xq))
    assert torch.equal(a, b)
    # a plain safetensors file: its metadata says what it is, and pickle is nowhere
    with safe_open(str(model_path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "metalens-model" and meta["format_version"] == str(FORMAT_VERSION)
    assert meta["metalens_version"] == metalens.__version__
    assert json.loads(meta["config"]) == json.loads((run_dir / "config.json").read_text())
    data = model_path.read_bytes()
    assert hashlib.sha256(data[8 + header(data)[0]:]).hexdigest() == meta["sha256"]
    # the CLI reads the file as it reads the run folder
    sup, qry = run_dir.parent / "s.csv", run_dir.parent / "q.csv"
    sup.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{'xyz'[i % 3]}\n" for i in range(9)))
    qry.write_text("a,b\n1,2\n5,0\n")
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--support", str(sup), "--query", str(qry)]) == 0
    out_run = capsys.readouterr().out
    assert main(["predict", str(model_path), "--support", str(sup), "--query", str(qry)]) == 0
    assert capsys.readouterr().out == out_run and out_run.startswith("query,label,p_x,p_y,p_z\n")


def test_export_never_overwrites_and_says_what_it_wrote(run_dir, model_path, capsys, tmp_path):
    target = tmp_path / "m.safetensors"
    assert main(["export", str(run_dir), str(target)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {target}" in out and "transformer trained on synthetic_tables, step 4" in out
    before = target.read_bytes()
    assert main(["export", str(run_dir), str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; metalens never overwrites a file" in err
    assert target.read_bytes() == before
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))


def _bad_files(data: bytes) -> dict[str, tuple[bytes, str]]:
    n, head = header(data)
    meta = head["__metadata__"]
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # a bit of a weight
    config = json.loads(meta["config"])
    config["learner"]["dim"] = 32
    config["learner"]["heads"] = 2
    return {
        "truncated": (data[: len(data) - 40], "is truncated: it holds"),
        "half header": (data[: 8 + n // 2], "is truncated or not a metalens model file"),
        "corrupted weights": (bytes(flipped), "is corrupted: its tensors do not match their checksum"),
        "future version": (rewrite(data, format_version="2", metalens_version="9.0"),
                           "is a model file of format 2 (written by metalens '9.0'); this metalens"),
        "tensors do not fit": (rewrite(data, config=json.dumps(config)),
                               "its tensors do not fit the configuration it carries"),
        "unknown learner option": (rewrite(data, config=json.dumps({**config, "learner": {**config["learner"],
                                                                                          "depth": 3}})),
                                   "holds a configuration this metalens 0.1.0 cannot build"),
        "foreign safetensors": (st_save({"w": torch.ones(2)}, metadata={"format": "pt"}),
                                "is not a metalens model file"),
        "text": (b"hello, this is not a model file at all\n", "is truncated or not a metalens model file"),
        "empty": (b"", "is not a metalens model file (make one with: metalens export RUN FILE): it is 0 bytes long"),
    }


@pytest.mark.parametrize("case", ["truncated", "half header", "corrupted weights", "future version",
                                  "tensors do not fit", "unknown learner option", "foreign safetensors", "text",
                                  "empty"])
def test_bad_model_files_are_refused_with_one_line(model_path, tmp_path, capsys, case):
    data, message = _bad_files(model_path.read_bytes())[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        read_model(bad)
    assert message in str(e.value), str(e.value)
    q = tmp_path / "q.csv"
    q.write_text("a,label\n1,x\n2,y\n")
    capsys.readouterr()
    assert main(["predict", str(bad), "--support", str(q), "--query", str(q)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metalens: error: ") and message in err


def test_model_files_keep_learner_options_and_refuse_shape_changes(model_path):
    assert load_model(model_path, min_scale=0.2).learner.config.min_scale == 0.2
    with pytest.raises(metalens.ConfigError, match="the options dim change the shapes"):
        load_model(model_path, dim=32)
