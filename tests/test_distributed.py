"""Data parallelism over tasks: 2 processes (gloo, CPU) against one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import metalens
from metalens import checkpoint
from metalens.cli import main
from metalens.distributed import World, shard

SEED = 3

# one learner of each lens present: (learner, task, learner options, task options)
CASES = [
    ("pretrain", "sinusoid", {"hidden": [16, 16]}, {}),
    ("maml", "sinusoid", {"hidden": [16, 16]}, {}),
    ("cnp", "gp", {}, {"max_context": 10, "max_target": 10}),
    ("protonet", "clusters", {}, {}),
    ("transformer", "linear", {}, {}),
]


def _train(tmp: Path, name: str, learner, task, lopts, topts, *extra, steps=4):
    out = tmp / name
    args = ["train", "--task", task, "--learner", learner, "--steps", str(steps), "--seed", str(SEED),
            "--out", str(out), "--quiet", "--set", "train.batch_tasks=4", "--set", "train.checkpoint_every=2",
            "--set", "train.lr=0.01", "--set", "train.optimizer=sgd"]
    # SGD: Adam would turn float-rounding noise in near-zero gradients into full-size steps
    for k, v in lopts.items():
        args += ["--set", f"learner.{k}={v}"]
    for k, v in topts.items():
        args += ["--set", f"task.{k}={v}"]
    assert main(args + list(extra)) == 0
    return load_file(checkpoint.latest(out) / "model.safetensors")


@pytest.mark.parametrize("learner, task, lopts, topts", CASES, ids=[c[0] for c in CASES])
def test_two_processes_equal_one_process(tmp_path, learner, task, lopts, topts):
    if learner not in metalens.LEARNERS:
        pytest.skip(f"{learner} is not in this build")
    single = _train(tmp_path, "one", learner, task, lopts, topts)
    double = _train(tmp_path, "two", learner, task, lopts, topts, "--nproc", "2")
    for k in single:
        torch.testing.assert_close(double[k], single[k], rtol=1e-5, atol=1e-6, msg=f"{learner} {k} seed {SEED}")


def test_distributed_resume_is_bit_exact(tmp_path):
    lopts = {"hidden": [8]}
    full = _train(tmp_path, "full", "pretrain", "sinusoid", lopts, {}, "--nproc", "2", steps=6)
    _train(tmp_path, "part", "pretrain", "sinusoid", lopts, {}, "--nproc", "2", steps=2)
    assert main(["train", "--resume", "--out", str(tmp_path / "part"), "--steps", "6", "--nproc", "2", "--quiet"]) == 0
    resumed = load_file(checkpoint.latest(tmp_path / "part") / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    log = [json.loads(line)["step"] for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert log == [2, 6]  # only rank 0 writes (log_every=10: the last step of each invocation)


def test_batch_must_divide(capsys, tmp_path):
    code = main(["train", "--task", "sinusoid", "--learner", "pretrain", "--out", str(tmp_path / "r"),
                 "--nproc", "2", "--set", "train.batch_tasks=5"])
    assert code == 2 and "must be divisible by the number of processes (2)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_shards_cover_the_batch():
    parts = [shard(12, World(r, 3)) for r in range(3)]
    assert [list(range(12))[p] for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_dying_rank_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metalens", "train", "--task", "sinusoid", "--learner", "pretrain", "--steps",
         "1000000", "--out", str(out), "--nproc", "2", "--quiet", "--set", "train.batch_tasks=4",
         "--set", "train.checkpoint_every=50", "--set", "learner.hidden=[8]"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "METALENS_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").exists():
            assert time.time() < deadline and proc.poll() is None, "no checkpoint was written"
            time.sleep(0.2)
        workers = [c for c in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "died (signal SIGKILL)" in err and "the last checkpoint is intact" in err, err
    ck = checkpoint.load(checkpoint.latest(out))
    assert ck.step % 50 == 0 and all(torch.isfinite(v).all() for v in ck.model.values())
