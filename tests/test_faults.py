"""Fault injection end to end, judged against the error policy (metalens.errors, metalens.cli.main).

Every user-facing failure is one line on stderr with no traceback: exit 2 for bad input (options,
config files, run folders, data), 1 for a run that fails while running, 128 + signal after a signal.
A refused command leaves nothing on disk, nothing outside the folder a command was given changes,
and no symbolic link inside a run folder is followed. Each case here gives a command or a damage,
the exit code, the one stderr line's substring and the state of every folder afterwards.

Classes: 1 bad command-line input; 2 damaged run folders (eval and train --resume); 3 concurrent
writers; 4 signals; 5 full and read-only disks; 6 malicious data; 7 numerical faults. The broader
sweep is benchmarks/fault_sweep.py; the helpers (corruption and bad-data tables) are in
tests/faults_util.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults_util as fu

# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """Tiny trained runs (checkpoints at steps 2 and 4, latest = 4), built once; every case copies one."""
    root = tmp_path_factory.mktemp("base")
    runs = {}
    for name, argv in (("pretrain", fu.TINY), ("maml", fu.TINY_MAML)):
        res = fu.cli(["train", *argv, "--out", root / name])
        assert res.code == 0, res
        assert fu.latest_step(root / name) == 4
        runs[name] = root / name
    return runs


def _sentinel(tmp_path: Path) -> Path:
    """A folder beside every command's folder: nothing a command does may change it."""
    s = tmp_path / "sentinel"
    (s / "sub").mkdir(parents=True, exist_ok=True)
    (s / "keep.txt").write_text("a user's file\n")
    (s / "sub" / "keep.bin").write_bytes(bytes(range(256)))
    return s


def _copy(base_runs, tmp_path: Path, which: str = "pretrain") -> Path:
    run = tmp_path / "run"
    shutil.copytree(base_runs[which], run, symlinks=True)
    _sentinel(tmp_path)
    return run


def _assert(res: fu.Result, **expected) -> None:
    wrong = fu.verdict(res, **expected)
    assert wrong is None, wrong


def _unchanged(before, after) -> None:
    changes = fu.diff(before, after)
    assert not changes, f"changed: {changes[:10]}"


def _changed_only_under(before, after, prefix: str) -> None:
    outside = [c for c in fu.diff(before, after) if not c.split(" ", 1)[1].startswith(prefix + "/")]
    assert not outside, f"changed outside {prefix}/: {outside[:10]}"


# ------------------------------------------------------------------------------------------------
# 1. Bad command-line input: exit 2, one line, nothing created or changed
# ------------------------------------------------------------------------------------------------

T0 = ["train", "--task", "sinusoid", "--learner", "pretrain", "--quiet", "--out", "{out}"]
T = [*T0, "--steps", "2"]


def S(item: str) -> list[str]:
    return [*T, "--set", item]


def _inputs(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    (d / "file").write_text("a file\n")
    (d / "garbage.toml").write_text("this is = = not toml [[[\n")
    (d / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (d / "bom.toml").write_bytes(b"\xef\xbb\xbfthis is = garbage\n")
    (d / "bom_bad_value.toml").write_bytes(b"\xef\xbb\xbf[train]\nsteps = -1\n")
    (d / "huge.toml").write_bytes(b"# padding\n" * 120_000)
    (d / "toplevel.toml").write_text("steps = 3\n")
    (d / "types.toml").write_text('[train]\nbatch_tasks = "many"\n')
    (d / "cfgdir").mkdir()
    (d / "empty").mkdir()
    (d / "nonempty").mkdir()
    (d / "nonempty" / "notes.txt").write_text("the user's notes\n")
    return d


BAD_INPUT = [
    # unknown names and options
    ("unknown task", ["train", "--task", "nope", "--learner", "pretrain", "--out", "{out}"], "unknown task family 'nope'"),
    ("unknown learner", ["train", "--task", "sinusoid", "--learner", "nope", "--out", "{out}"], "unknown learner 'nope'"),
    ("unknown option", [*T, "--bogus"], "No such option"),
    ("unknown command", ["frobnicate"], "No such command"),
    ("unknown --set key", S("task.shot=3"), "unknown option 'task.shot'"),
    ("unknown --set section", S("x.y=1"), "--set section must be one of"),
    ("--set without =", S("train.lr"), "--set expects section.key=value"),
    ("--set empty key", S("=1"), "--set key must be section.key"),
    ("list unknown", ["list", "nope"], "unknown task family or learner 'nope'"),
    ("study unknown", ["study", "nope", "--out", "{out}"], "unknown study 'nope'"),
    ("study unknown option, default --out", ["study", "sinusoid-gradient", "--set", "study.nope=1"],
     "unknown option 'study.nope'"),
    ("study --device meta", ["study", "sinusoid-gradient", "--out", "{out}", "--device", "meta"], "got 'meta'"),
    ("tour unknown learner", ["tour", "--out", "{out}", "--learner", "nope"], "unknown learner 'nope'"),
    # bad values: nan, inf, negative, wrong types
    ("train.lr=nan", S("train.lr=nan"), "train.lr must be finite, got nan"),
    ("train.lr=inf", S("train.lr=inf"), "train.lr must be finite, got inf"),
    ("train.lr=1e400", S("train.lr=1e400"), "train.lr must be finite"),
    ("train.lr=-1", S("train.lr=-1"), "train.lr must be > 0"),
    ("train.lr=0", S("train.lr=0"), "train.lr must be > 0"),
    ("train.lr a word", S("train.lr=fast"), "train.lr must be a number"),
    ("train.lr a table", S("train.lr={a=1}"), "train.lr must be a number"),
    ("train.lr a broken list", S("train.lr=[1,"), "train.lr must be a number"),
    ("train.steps=-1", [*T0, "--set", "train.steps=-1"], "train.steps must be >= 1"),
    ("--steps -1", [*T0, "--steps", "-1"], "--steps"),
    ("--steps nan", [*T0, "--steps", "nan"], "--steps"),
    ("--steps inf", [*T0, "--steps", "inf"], "--steps"),
    ("--seed -1", [*T, "--seed", "-1"], "--seed"),
    ("--seed nan", [*T, "--seed", "nan"], "--seed"),
    ("train.seed=-1", S("train.seed=-1"), "train.seed must be >= 0"),
    ("train.batch_tasks=2.5", S("train.batch_tasks=2.5"), "train.batch_tasks must be an integer"),
    ("train.batch_tasks=true", S("train.batch_tasks=true"), "train.batch_tasks must be an integer"),
    ("train.batch_tasks=0", S("train.batch_tasks=0"), "train.batch_tasks must be >= 1"),
    pytest.param("train.batch_tasks=1e30", S("train.batch_tasks=1e30"), "train.batch_tasks", id="train.batch_tasks=1e30"),
    ("train.grad_clip=nan", S("train.grad_clip=nan"), "train.grad_clip must be finite, got nan"),
    ("train.grad_clip=-1", S("train.grad_clip=-1"), "train.grad_clip must be >= 0"),
    ("train.weight_decay=inf", S("train.weight_decay=inf"), "train.weight_decay must be finite"),
    ("train.log_every=0", S("train.log_every=0"), "train.log_every must be >= 1"),
    ("train.checkpoint_every=nan", S("train.checkpoint_every=nan"), "train.checkpoint_every must be an integer"),
    ("train.keep_checkpoints=-1", S("train.keep_checkpoints=-1"), "train.keep_checkpoints must be >= 0"),
    ("train.optimizer=rmsprop", S("train.optimizer=rmsprop"), "train.optimizer must be one of"),
    ("train.compile=maybe", S("train.compile=maybe"), "train.compile must be true or false"),
    ("train.device=meta", S("train.device=meta"), "train.device must be cpu, cuda, cuda:N (N a device index) or mps"),
    ("train.device=cpu:0x", S("train.device=cpu:0x"), "train.device must be"),
    pytest.param("train.device=cuda:huge", S("train.device=cuda:99999999999999999999"), "train.device", id="train.device=cuda:huge"),
    ("lr_decay_start >= steps", [*T, "--set", "train.lr_schedule=cosine", "--set", "train.lr_decay_start=2"],
     "lr_decay_start must be in"),
    ("task.amplitude_range=[0.1, inf]", S("task.amplitude_range=[0.1, inf]"),
     "task.amplitude_range must be finite, got (0.1, inf)"),
    ("task.x_range reversed", S("task.x_range=[5, -5]"), "task.x_range must be increasing"),
    ("task.x_range nan", S("task.x_range=[nan, 1]"), "task.x_range"),
    ("task.shots=0", S("task.shots=0"), "task.shots must be >= 1"),
    ("task.shots=nan", S("task.shots=nan"), "task.shots must be an integer"),
    pytest.param("task.shots=1e9", S("task.shots=1e9"), "lower train.batch_tasks or the task's sizes", id="task.shots=1e9"),
    ("task.noise_std=-1", S("task.noise_std=-1"), "task.noise_std must be >= 0"),
    ("learner.hidden=[nan]", S("learner.hidden=[nan]"), "learner.hidden must be a list of integers"),
    ("learner.hidden=[-1]", S("learner.hidden=[-1]"), "learner.hidden values must be >= 1"),
    ("learner.hidden=[]", S("learner.hidden=[]"), "learner.hidden must hold at least 1"),
    ("learner.hidden a string", S('learner.hidden="8"'), "learner.hidden must be a list of integers"),
    ("learner.finetune_lr=nan", S("learner.finetune_lr=nan"), "learner.finetune_lr must be finite"),
    ("learner.activation=nope", S("learner.activation=nope"), "learner.activation must be one of"),
    ("learner.backbone=conv4 on vectors", S("learner.backbone=conv4"), "needs image inputs"),
    ("tour --steps-scale nan", ["tour", "--out", "{out}", "--steps-scale", "nan"], "--steps-scale must be finite"),
    ("tour --steps-scale inf", ["tour", "--out", "{out}", "--steps-scale", "inf"], "--steps-scale must be finite"),
    ("tour --steps-scale -1", ["tour", "--out", "{out}", "--steps-scale", "-1"], "--steps-scale must be > 0"),
    ("tour --steps-scale 0", ["tour", "--out", "{out}", "--steps-scale", "0"], "--steps-scale must be > 0"),
    ("tour --episodes 1", ["tour", "--out", "{out}", "--episodes", "1"], "--episodes"),
    # threads and processes
    ("--threads 1000000", [*T, "--threads", "1000000"], "--threads"),
    ("--threads 0", [*T, "--threads", "0"], "--threads"),
    ("--threads nan", [*T, "--threads", "nan"], "--threads"),
    ("eval --threads 1000000", ["eval", "{out}", "--threads", "1000000"], "--threads"),
    ("--nproc 0", [*T, "--nproc", "0"], "--nproc"),
    ("--nproc 3 with 25 tasks", [*T, "--nproc", "3"], "must be divisible by the number of processes"),
    # config files
    ("--config garbage", [*T, "--config", "{in}/garbage.toml"], "is not valid TOML"),
    ("--config binary", [*T, "--config", "{in}/binary.toml"], "is not UTF-8 text"),
    ("--config BOM + garbage", [*T, "--config", "{in}/bom.toml"], "is not valid TOML"),
    ("--config BOM + bad value", [*T0, "--config", "{in}/bom_bad_value.toml"], "train.steps must be >= 1"),
    ("--config huge", [*T, "--config", "{in}/huge.toml"], "bytes, more than the 1048576 expected"),
    ("--config /dev/zero", [*T, "--config", "/dev/zero"], "is not a regular file"),
    ("--config a folder", [*T, "--config", "{in}/cfgdir"], "is a directory"),
    ("--config missing", [*T, "--config", "{in}/missing.toml"], "cannot read config file"),
    ("--config top-level key", [*T, "--config", "{in}/toplevel.toml"], "unexpected top-level key 'steps'"),
    ("--config wrong type", [*T, "--config", "{in}/types.toml"], "train.batch_tasks must be an integer"),
    # folders
    ("--out under a file", [*T0[:-1], "{in}/file/sub", "--steps", "2"], "a file of that name exists"),
    ("--out a file", [*T0[:-1], "{in}/file", "--steps", "2"], "is a file"),
    pytest.param("--out a 300-character name", [*T0[:-1], "{in}/" + "x" * 300, "--steps", "2"], "x" * 40, id="--out a 300-character name"),
    ("train into a non-empty folder", [*T0[:-1], "{in}/nonempty", "--steps", "2"], "is not empty"),
    ("--resume on an empty folder", ["train", "--resume", "--out", "{in}/empty"], "not a metalens run folder"),
    ("--resume on a non-run folder", ["train", "--resume", "--out", "{in}/nonempty"], "not a metalens run folder"),
    ("--resume on a missing folder", ["train", "--resume", "--out", "{out}"], "not a metalens run folder"),
    ("--resume of another task", ["train", "--resume", "--task", "gp", "--out", "{in}/nonempty"],
     "not a metalens run folder"),
    ("eval a missing folder", ["eval", "{out}"], "not a metalens run folder"),
    ("eval a non-run folder", ["eval", "{in}/nonempty"], "not a metalens run folder"),
    ("eval a file", ["eval", "{in}/file"], "is a file"),
    ("eval --episodes 1", ["eval", "{in}/empty", "--episodes", "1"], "--episodes"),
    ("eval --episodes nan", ["eval", "{in}/empty", "--episodes", "nan"], "--episodes"),
    ("eval --batch-tasks 0", ["eval", "{in}/empty", "--batch-tasks", "0"], "--batch-tasks"),
    ("eval --set train.*", ["eval", "{in}/empty", "--set", "train.lr=1"], "task.* and learner.*"),
]


def _ids(table):
    return [p.id if hasattr(p, "marks") else p[0] for p in table]


@pytest.mark.parametrize("name, argv, match", BAD_INPUT, ids=_ids(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, name, argv, match):
    monkeypatch.chdir(tmp_path)  # a command that writes to its working folder by default would show here
    inputs = _inputs(tmp_path)
    _sentinel(tmp_path)
    out = tmp_path / "out"
    before = fu.snapshot(tmp_path)
    res = fu.cli([a.replace("{out}", str(out)).replace("{in}", str(inputs)) for a in argv])
    _assert(res, code=2, match=match)
    assert not out.exists()
    _unchanged(before, fu.snapshot(tmp_path))


def test_threads_from_the_environment_are_checked_too(tmp_path):
    _sentinel(tmp_path)
    before = fu.snapshot(tmp_path)
    res = fu.cli([*T[:-3], str(tmp_path / "out"), "--steps", "2"], env={"METALENS_THREADS": "1000000"})
    _assert(res, code=2, match="--threads")
    _unchanged(before, fu.snapshot(tmp_path))


def test_config_that_is_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    done, hung = threading.Event(), []

    def unblock() -> None:  # if main() is still blocked in open() after 3 s, give it a writer and record the hang
        if not done.wait(3):
            hung.append(True)
            with open(fifo, "w") as f:
                f.write("[train]\nsteps = -1\n")

    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    res = fu.cli([*T0[:-1], str(tmp_path / "out"), "--config", str(fifo)])
    done.set()
    t.join(10)
    assert not hung, f"main() blocked on the FIFO for 3 s (then: exit {res.code}, {res.lines})"
    _assert(res, code=2, match="config")
    assert not (tmp_path / "out").exists()


def test_out_on_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    _sentinel(tmp_path)
    with fu.read_only(ro) as ok:
        if not ok:
            pytest.skip("cannot make a folder read-only here (root without a read-only bind mount)")
        before = fu.snapshot(tmp_path)
        for out in (ro / "run", ro):
            res = fu.cli(["train", *fu.TINY, "--out", out])
            _assert(res, code=2, match="Read-only file system" if fu.IS_ROOT else "Permission denied")
            _unchanged(before, fu.snapshot(tmp_path))


# ------------------------------------------------------------------------------------------------
# 2. Damaged run folders, for eval and for train --resume
# ------------------------------------------------------------------------------------------------

DAMAGE_CASES = [pytest.param(c, cmd, id=f"{cmd}: {c.name}") for c in fu.CORRUPTIONS for cmd in ("eval", "resume")]


@pytest.mark.parametrize("case, cmd", DAMAGE_CASES)
def test_damaged_run_folder(base_runs, tmp_path, case, cmd):
    run = _copy(base_runs, tmp_path, case.base)
    case.damage(run)
    before = fu.snapshot(tmp_path)
    code, match = case.eval if cmd == "eval" else case.resume
    argv = (["eval", run, "--episodes", "4"] if cmd == "eval"
            else ["train", "--resume", "--out", run, "--steps", "6", "--quiet"])
    res = fu.cli(argv)
    codes = (code,) if isinstance(code, int) else code
    _assert(res, code=codes, match=match if res.code else "", lines=1 if res.code else (0, 1),
            absent=[case.secret] if case.secret else ())
    after = fu.snapshot(tmp_path)
    if res.code != 0 or cmd == "eval":  # refused, or read only: nothing anywhere changed
        _unchanged(before, after)
        return
    # resumed: from step 4 to 6, never from step 0; leftovers removed; nothing outside the run changed
    _changed_only_under(before, after, "run")
    assert fu.latest_step(run) == 6
    assert fu.log_steps(run) == [4, 6], "the resume did not continue from step 4"
    assert not [p for p in run.rglob("*.tmp")], "temporary entries left after the resume"
    if match:
        assert match in res.err


def test_resume_refuses_steps_below_the_step_reached(base_runs, tmp_path):
    run = _copy(base_runs, tmp_path)
    before = fu.snapshot(tmp_path)
    res = fu.cli(["train", "--resume", "--out", run, "--steps", "2", "--quiet"])
    _assert(res, code=2, match="has reached step 4")
    _unchanged(before, fu.snapshot(tmp_path))


def test_refused_resume_with_a_damaged_latest_changes_nothing(base_runs, tmp_path):
    run = _copy(base_runs, tmp_path)
    (run / "checkpoints" / "latest").write_bytes(b"\x00\x01garbage")
    before = fu.snapshot(tmp_path)
    res = fu.cli(["train", "--resume", "--out", run, "--steps", "2", "--quiet"])
    _assert(res, code=2, match="has reached step 4")
    _unchanged(before, fu.snapshot(tmp_path))


def test_resume_changing_the_configuration_is_refused(base_runs, tmp_path):
    run = _copy(base_runs, tmp_path)
    before = fu.snapshot(tmp_path)
    for extra, match in ((["--set", "train.lr=0.5"], "different configuration"),
                         (["--learner", "maml"], "holds a run of learner 'pretrain'"),
                         (["--set", "learner.hidden=[9]"], "pretrain")):
        res = fu.cli(["train", "--resume", "--out", run, "--steps", "6", "--quiet", *extra])
        _assert(res, code=2, match=match)
        _unchanged(before, fu.snapshot(tmp_path))


# ------------------------------------------------------------------------------------------------
# 3. Concurrent writers: one writer per run folder
# ------------------------------------------------------------------------------------------------

LONG = [*fu.SLOW, "--steps", "100000", "--set", "train.checkpoint_every=5"]


def test_a_folder_in_use_is_refused_and_freed_when_its_holder_dies(tmp_path):
    run = tmp_path / "run"
    proc = fu.spawn(["train", *LONG, "--out", run])
    try:
        assert fu.wait_for(lambda: (run / ".lock").exists() and fu.log_steps(run) and (fu.latest_step(run) or 0) >= 5,
                           120, proc), fu.finish(proc, 5)
        res = fu.cli(["train", "--resume", "--out", run, "--quiet"])
        _assert(res, code=2, match=["in use", f"pid {proc.pid}"])
        res = fu.cli(["train", "--resume", "--out", run, "--quiet", "--steps", "200000"])
        _assert(res, code=2, match=["in use", f"pid {proc.pid}"])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    reached = fu.latest_step(run)
    res = fu.cli(["train", "--resume", "--out", run, "--quiet", "--steps", str(reached + 2)])
    _assert(res, code=0, lines=0)
    assert fu.latest_step(run) == reached + 2
    steps = fu.log_steps(run)
    assert len(steps) == len(set(steps)) and steps[-1] == reached + 2, steps[-8:]


def _hold_lock(folder: Path, pid: int = 4242):
    """Hold ``folder``'s lock as another process would: an flock on a new open file description."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"pid {pid} on elsewhere, since 2020-01-01T00:00:00: metalens train ...\n".encode())
    return fd


@pytest.mark.parametrize("what", ["train into an empty folder", "resume", "tour"])
def test_a_folder_held_by_another_process_is_refused_naming_it(base_runs, tmp_path, what):
    run = _copy(base_runs, tmp_path) if what == "resume" else tmp_path / "run"
    fd = _hold_lock(run)
    try:
        before = fu.snapshot(tmp_path, ignore_content=())
        argv = {"train into an empty folder": ["train", *fu.TINY, "--out", run],
                "resume": ["train", "--resume", "--out", run, "--steps", "6", "--quiet"],
                "tour": ["tour", "--out", run, "--learner", "oracle", "--episodes", "4", "--quiet"]}[what]
        res = fu.cli(argv)
        _assert(res, code=2, match=["in use", "pid 4242"])
        _unchanged(before, fu.snapshot(tmp_path, ignore_content=()))
    finally:
        os.close(fd)


def test_a_second_train_into_a_folder_in_use_names_the_holder(base_runs, tmp_path):
    run = _copy(base_runs, tmp_path)
    fd = _hold_lock(run)
    try:
        res = fu.cli(["train", *fu.TINY, "--out", run])
        _assert(res, code=2, match=["in use", "pid 4242"])
    finally:
        os.close(fd)


@pytest.mark.parametrize("trial", [*range(3), *(pytest.param(i, marks=pytest.mark.slow) for i in range(3, 10))])
def test_two_trains_started_at_once_one_runs(tmp_path, trial):  # 3 trials by default, 10 with -m slow
    run, sync = tmp_path / "run", tmp_path / "sync"
    argv = ["train", *fu.TINY, "--out", run]
    procs = [fu.spawn_synced(argv, sync) for _ in range(2)]
    assert fu.release(sync, 2)
    results = sorted((fu.finish(p, 120) for p in procs), key=lambda r: r.code)
    assert [r.code for r in results] == [0, 2], results
    _assert(results[1], code=2, match="")
    assert "in use" in results[1].err or "holds a run" in results[1].err, results[1].err
    assert fu.latest_step(run) == 4
    steps = fu.log_steps(run)
    assert steps == [4], steps  # log_every 10: one line, at the last step, written once


# ------------------------------------------------------------------------------------------------
# 4. Signals: stop after the current step with a checkpoint; a second signal stops at once
# ------------------------------------------------------------------------------------------------

N_SIG = 60


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    res = fu.cli(["train", *fu.SLOW, "--steps", N_SIG, "--out", run])
    assert res.code == 0, res
    return fu.model_tensors(run / "checkpoints" / f"step_{N_SIG:08d}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_after_the_step_and_the_run_resumes_bit_for_bit(tmp_path, uninterrupted, sig):
    run = tmp_path / "run"
    proc = fu.spawn(["train", *fu.SLOW, "--steps", N_SIG, "--out", run])
    assert fu.wait_for(lambda: len(fu.log_steps(run)) >= 3, 120, proc), fu.finish(proc, 5)
    os.kill(proc.pid, sig)
    res = fu.finish(proc, 60)
    _assert(res, code=128 + sig, match=[sig.name, "--resume"])
    step = fu.latest_step(run)
    assert step is not None and step < N_SIG and f"after step {step}" in res.err, (step, res.err)
    assert fu.log_steps(run)[-1] == step
    res = fu.cli(["train", "--resume", "--out", run, "--quiet"])
    _assert(res, code=0, lines=0)
    assert fu.latest_step(run) == N_SIG
    assert fu.same_tensors(fu.model_tensors(run / "checkpoints" / f"step_{N_SIG:08d}"), uninterrupted)


def test_a_second_signal_stops_at_once_and_keeps_the_checkpoints(tmp_path):
    from metalens import checkpoint

    run = tmp_path / "run"
    proc = fu.spawn(["train", *LONG, "--set", "train.keep_checkpoints=0", "--out", run])
    assert fu.wait_for(lambda: (fu.latest_step(run) or 0) >= 5 and len(fu.log_steps(run)) > 6, 120, proc), \
        fu.finish(proc, 5)
    ckpts = {p.name: fu.snapshot(p) for p in checkpoint.complete(run)}
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.005)  # the first is handled (standard signals do not queue), then the second
    os.kill(proc.pid, signal.SIGTERM)
    res = fu.finish(proc, 60)
    # 143: stopped by the handler; -15: the second signal came after the graceful stop, as the process exited
    _assert(res, code=(143, -15), match="SIGTERM")
    for name, snap in ckpts.items():
        _unchanged(snap, fu.snapshot(run / "checkpoints" / name))
    checkpoint.load(checkpoint.latest(run))
    reached = fu.latest_step(run)
    res = fu.cli(["train", "--resume", "--out", run, "--quiet", "--steps", str(reached + 1)])
    _assert(res, code=0, lines=0)
    assert not list(run.rglob("*.tmp"))  # whatever the second signal interrupted, the resume cleared


# ------------------------------------------------------------------------------------------------
# 5. Full and read-only disks: exit 1, one line, the previous checkpoint intact, resume once fixed
# ------------------------------------------------------------------------------------------------

DISK = ["--task", "sinusoid", "--learner", "pretrain", "--set", "train.checkpoint_every=2",
        "--set", "train.keep_checkpoints=0", "--set", "learner.hidden=[8]", "--set", "train.batch_tasks=4", "--quiet"]


@pytest.mark.parametrize("nth, err, kept", [(1, errno.ENOSPC, None), (3, errno.ENOSPC, 2), (4, errno.ENOSPC, 2),
                                            (5, errno.ENOSPC, 4), (3, errno.EROFS, 2)],
                         ids=["ENOSPC first write", "ENOSPC 2nd checkpoint model", "ENOSPC 2nd checkpoint optimizer",
                              "ENOSPC 3rd checkpoint", "EROFS 2nd checkpoint"])
def test_a_full_disk_stops_the_run_and_it_resumes(tmp_path, nth, err, kept):
    run = tmp_path / "run"
    _sentinel(tmp_path)
    with fu.failing_writes(nth, err):
        res = fu.cli(["train", *DISK, "--steps", "6", "--out", run])
    _assert(res, code=1, match=[os.strerror(err), "--resume"])
    assert fu.latest_step(run) == kept
    assert not list(run.rglob("*.tmp"))
    if kept:
        from metalens import checkpoint

        assert f"intact: {run / 'checkpoints' / f'step_{kept:08d}'}" in res.err
        checkpoint.load(checkpoint.latest(run))
    before = fu.snapshot(tmp_path)
    res = fu.cli(["train", "--resume", "--out", run, "--quiet"])
    _assert(res, code=0, lines=0)
    assert fu.latest_step(run) == 6 and fu.log_steps(run) == [6]
    _changed_only_under(before, fu.snapshot(tmp_path), "run")


def test_a_real_full_disk(tmp_path):
    mnt = tmp_path / "mnt"
    with fu.tmpfs(mnt, "160k") as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
        run = disk / "run"
        res = fu.cli(["train", *DISK, "--steps", "40", "--set", "train.checkpoint_every=1",
                      "--set", "learner.hidden=[40, 40]", "--out", run])
        _assert(res, code=1, match=["No space left on device", "--resume"])
        reached = fu.latest_step(run)
        assert reached is not None and 0 < reached < 40
        from metalens import checkpoint

        checkpoint.load(checkpoint.latest(run))
        assert not list(run.rglob("*.tmp"))
        assert fu.resize_tmpfs(disk, "20m")
        res = fu.cli(["train", "--resume", "--out", run, "--quiet"])
        _assert(res, code=0, lines=0)
        assert fu.latest_step(run) == 40


# ------------------------------------------------------------------------------------------------
# 6. Malicious data: exit 2, one line naming the file or the split, nothing created
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", fu.BAD_DATA, ids=[b.name for b in fu.BAD_DATA])
def test_malicious_data_is_refused(tmp_path, bad):
    root = bad.make(tmp_path)
    _sentinel(tmp_path)
    before = fu.snapshot(tmp_path)
    res = fu.cli(fu.images_argv(root, tmp_path / "out", *bad.options))
    _assert(res, code=2, match=bad.match)
    assert not (tmp_path / "out").exists()
    _unchanged(before, fu.snapshot(tmp_path))
    assert not (tmp_path.parent / "evil.png").exists() and not Path("/tmp/evil.png").exists()


@pytest.mark.skipif(not fu.OMNIGLOT.is_dir(), reason="the shipped Omniglot data (../shared/data/omniglot) is absent")
def test_omniglot_named_split_too_small_for_the_ways(tmp_path):
    _sentinel(tmp_path)
    before = fu.snapshot(tmp_path)
    res = fu.cli(["train", "--task", "images", "--learner", "protonet", "--steps", "2", "--out", tmp_path / "out",
                  "--quiet", *fu.OMNIGLOT_SPLIT, "--set", "task.ways=60"])
    _assert(res, code=2, match=["split has", "ways = 60"])
    _unchanged(before, fu.snapshot(tmp_path))


@pytest.fixture(scope="module")
def images_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    root = fu.write_folder(d / "data", fu.good_layout())
    res = fu.cli(fu.images_argv(root, d / "run"))
    assert res.code == 0, res
    return d / "run"


EVAL_BAD_DATA = [b for b in fu.BAD_DATA if b.name.startswith(("zip with a", "folder with a", "a missing"))][:8]


@pytest.mark.parametrize("bad", EVAL_BAD_DATA, ids=[b.name for b in EVAL_BAD_DATA])
def test_eval_on_malicious_data_is_refused(images_run, tmp_path, bad):
    run = tmp_path / "run"
    shutil.copytree(images_run, run, symlinks=True)
    root = bad.make(tmp_path)
    _sentinel(tmp_path)
    before = fu.snapshot(tmp_path)
    res = fu.cli(["eval", run, "--episodes", "4", "--set", f"task.root={root}"])
    _assert(res, code=2, match=bad.match)
    _unchanged(before, fu.snapshot(tmp_path))


# ------------------------------------------------------------------------------------------------
# 7. Numerical faults: exit 1, "non-finite", the last good checkpoint intact and usable
# ------------------------------------------------------------------------------------------------

def test_a_diverging_run_stops_and_its_last_good_checkpoint_evaluates(tmp_path):
    run = tmp_path / "run"
    res = fu.cli(["train", "--task", "sinusoid", "--learner", "metasgd", "--steps", "30", "--set", "train.lr=10",
                  "--set", "learner.inner_lr=2", "--set", "train.checkpoint_every=1", "--set", "train.batch_tasks=4",
                  "--set", "learner.hidden=[8]", "--out", run, "--quiet"])
    _assert(res, code=1, match=["non-finite", "intact"])
    good = fu.latest_step(run)
    assert good is not None and f"step_{good:08d}" in res.err
    before = fu.snapshot(run)
    res = fu.cli(["eval", run, "--episodes", "4"])
    _assert(res, code=0, lines=0)
    assert "metasgd" in res.out
    _unchanged(before, fu.snapshot(run))


def test_eval_of_non_finite_weights_is_exit_1(base_runs, tmp_path):
    run = _copy(base_runs, tmp_path)
    fu._tensors(run, fu._nan_weights, step=4)
    fu._tensors(run, fu._nan_weights, step=2)
    before = fu.snapshot(tmp_path)
    res = fu.cli(["eval", run, "--episodes", "4"])
    _assert(res, code=1, match="non-finite")
    _unchanged(before, fu.snapshot(tmp_path))


@pytest.mark.parametrize("inner_lr", ["1e3", "1e30"])
def test_eval_whose_inner_loop_diverges_is_exit_1(base_runs, tmp_path, inner_lr):
    run = _copy(base_runs, tmp_path, "maml")
    before = fu.snapshot(tmp_path)
    res = fu.cli(["eval", run, "--episodes", "4", "--set", f"learner.inner_lr={inner_lr}"])
    _assert(res, code=1, match="diverged")
    _unchanged(before, fu.snapshot(tmp_path))


def test_an_inner_loop_diverging_in_meta_training_is_one_clear_line(tmp_path):
    run = tmp_path / "run"
    res = fu.cli(["train", "--task", "sinusoid", "--learner", "maml", "--steps", "2", "--set", "train.batch_tasks=2",
                  "--set", "learner.inner_lr=1e30", "--out", run, "--quiet"])
    _assert(res, code=1, match="non-finite")
