"""Helpers shared by the fault-injection suite (tests/test_faults.py) and sweep (benchmarks/fault_sweep.py).

Run the command line in-process (:func:`cli`, capturing stdout and stderr at the file-descriptor
level as well) or as a subprocess (:func:`spawn`); take byte-for-byte snapshots of folders
(:func:`snapshot`, :func:`diff`); damage run folders the ways a crash, a full disk or a hostile
user would (:data:`CORRUPTIONS`); build malicious image data (:data:`BAD_DATA`); judge an outcome
against the error policy (:func:`verdict`: the exit code, exactly one line on stderr, no traceback).

>>> judged = verdict(Result(2, "", "metalens: error: bad\\n"), code=2, match="bad")
>>> judged is None
True
>>> verdict(Result(1, "", "Traceback (most recent call last):\\n  boom\\n"), code=2)
"exit 1 (expected 2); 2 lines on stderr (expected 1); a traceback; stderr: 'Traceback (most recent call last): | ...'"
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = (ROOT / ".." / "shared" / "data" / "omniglot").resolve()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# The tiny run every corruption starts from: two checkpoints (steps 2 and 4), latest = step 4.
TINY = ["--task", "sinusoid", "--learner", "pretrain", "--steps", "4", "--set", "train.checkpoint_every=2",
        "--set", "train.keep_checkpoints=0", "--set", "train.batch_tasks=4", "--set", "learner.hidden=[8]",
        "--set", "learner.finetune_steps=2", "--quiet"]
# maml and fomaml have parameters of the same names and shapes: only the checkpoint's record tells them apart
TINY_MAML = ["--task", "sinusoid", "--learner", "maml", "--steps", "4", "--set", "train.checkpoint_every=2",
             "--set", "train.keep_checkpoints=0", "--set", "train.batch_tasks=4", "--set", "learner.hidden=[8]",
             "--quiet"]
# a run whose steps take ~10-50 ms on one CPU thread: long enough to signal it mid-step, short enough to finish
SLOW = ["--task", "sinusoid", "--learner", "maml", "--set", "train.batch_tasks=100", "--set", "learner.inner_steps=3",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=100000", "--quiet"]


# ------------------------------------------------------------------------------------------------
# Running the command line
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@contextlib.contextmanager
def _captured_fds() -> Iterator[dict[str, Any]]:
    """Redirect fd 1 and 2 (what C code writes) and sys.stdout / sys.stderr (what Python writes)."""
    got: dict[str, Any] = {}
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}  # noqa: SIM115 - closed in the finally below
    py = {"out": io.StringIO(), "err": io.StringIO()}
    old = sys.stdout, sys.stderr
    try:
        for fd in (1, 2):
            sys.__stdout__.flush() if fd == 1 else sys.__stderr__.flush()
            os.dup2(files[fd].fileno(), fd)
        sys.stdout, sys.stderr = py["out"], py["err"]
        yield got
    finally:
        sys.stdout, sys.stderr = old
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        native = {}
        for fd in (1, 2):
            files[fd].seek(0)
            native[fd] = files[fd].read().decode("utf-8", errors="replace")
            files[fd].close()
        got["out"] = py["out"].getvalue() + native[1]
        got["err"] = py["err"].getvalue() + native[2]


def cli(argv: Sequence[str], env: dict[str, str] | None = None) -> Result:
    """``metalens ARGV`` in this process (``metalens.cli.main``); stdout and stderr captured."""
    from metalens.cli import main

    old_env = {k: os.environ.get(k) for k in ("METALENS_DEBUG", *(env or {}))}
    os.environ.pop("METALENS_DEBUG", None)
    os.environ.update(env or {})
    try:
        with _captured_fds() as got:
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # never expected: main returns its code
                code = e.code if isinstance(e.code, int) else 1
                print(f"SystemExit escaped main(): {e.code!r}", file=sys.stderr)
            except BaseException as e:  # noqa: BLE001 - record what escaped main() as a failing probe
                import traceback

                code = -1
                sys.stderr.write("Traceback (escaped main()):\n" + traceback.format_exc())
                if isinstance(e, KeyboardInterrupt):
                    code = -2
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(code, got["out"], got["err"])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("METALENS_DEBUG", "PYTEST_CURRENT_TEST")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(argv: Sequence[str], **kw: Any) -> subprocess.Popen:
    """``python -m metalens ARGV`` as a subprocess in its own session (so signals reach it alone)."""
    return subprocess.Popen([sys.executable, "-m", "metalens", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True, **kw)


_SYNCED = """
import os, sys, time
import metalens.cli, metalens.run, metalens.train, metalens.checkpoint, metalens.runfolder
sync = sys.argv[1]
open(os.path.join(sync, f"ready.{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(sync, "go")):
    time.sleep(0.0002)
sys.exit(metalens.cli.main(sys.argv[2:]))
"""


def spawn_synced(argv: Sequence[str], sync: Path) -> subprocess.Popen:
    """Like :func:`spawn`, but the process imports metalens, then waits for :func:`release` to run ``main``:
    processes released together start their commands within a millisecond of each other."""
    sync.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", _SYNCED, str(sync), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)


def release(sync: Path, n: int, timeout: float = 120) -> bool:
    """Start the ``n`` processes waiting in ``sync`` at once (False if they were not all ready in time)."""
    ready = wait_for(lambda: len(list(sync.glob("ready.*"))) >= n, timeout)
    (sync / "go").touch()
    return ready


def finish(proc: subprocess.Popen, timeout: float = 120) -> Result:
    """Wait for a :func:`spawn` ed process; its exit code (negative: killed by a signal) and output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[probe: killed after {timeout}s]"
    return Result(proc.returncode, out, err)


def wait_for(pred: Callable[[], bool], timeout: float = 60, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``pred`` every 5 ms until it holds (True), ``proc`` exits or ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(0.005)
    return False


def log_steps(run: Path) -> list[int]:
    """The steps logged in ``run/log.jsonl`` (a torn last line ignored)."""
    try:
        text = (run / "log.jsonl").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    steps = []
    for line in text.splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return steps


def latest_step(run: Path) -> int | None:
    try:
        name = (run / "checkpoints" / "latest").read_text().strip()
        return int(name[5:])
    except (OSError, ValueError):
        return None


def model_tensors(ckpt_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(ckpt_dir / "model.safetensors"))


def same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Judging an outcome
# ------------------------------------------------------------------------------------------------

def verdict(res: Result, *, code: int | Sequence[int], match: str | Sequence[str] = (),
            lines: int | Sequence[int] = 1, absent: Sequence[str] = ()) -> str | None:
    """None if ``res`` follows the error policy; else what is wrong, in one line.

    ``code``: the exit code (or the codes allowed); ``lines``: how many lines on stderr (or the counts allowed);
    ``match``: substrings the stderr must hold; ``absent``: substrings it must not hold. A traceback is always
    wrong, and so is an "internal error".
    """
    codes = (code,) if isinstance(code, int) else tuple(code)
    counts = (lines,) if isinstance(lines, int) else tuple(lines)
    wrong = []
    if res.code not in codes:
        wrong.append(f"exit {res.code} (expected {'/'.join(map(str, codes))})")
    if len(res.lines) not in counts:
        wrong.append(f"{len(res.lines)} lines on stderr (expected {'/'.join(map(str, counts))})")
    if "internal error" in res.err:
        wrong.append("an internal error")
    if "Traceback" in res.err:
        wrong.append("a traceback")
    for m in [match] if isinstance(match, str) else match:
        if m and m not in res.err:
            wrong.append(f"no {m!r} on stderr")
    for m in absent:
        if m in res.err:
            wrong.append(f"{m!r} on stderr")
    if not wrong:
        return None
    shown = " | ".join(res.lines[:3])[:300] or "(empty)"
    return "; ".join(wrong) + f"; stderr: {shown!r}"


# ------------------------------------------------------------------------------------------------
# Snapshots
# ------------------------------------------------------------------------------------------------

def snapshot(path: str | Path, *, ignore_content: Sequence[str] = (".lock",)) -> dict[str, tuple] | None:
    """Every entry under ``path`` (never following a link): kind, mode and content hash. None if absent.

    Entries named in ``ignore_content`` are recorded without their content (the lock file names its holder).
    """
    path = Path(path)
    if not os.path.lexists(path):
        return None
    out: dict[str, tuple] = {}

    def entry(p: Path) -> tuple:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            return ("link", os.readlink(p))
        if stat.S_ISDIR(st.st_mode):
            return ("dir", stat.S_IMODE(st.st_mode))
        if stat.S_ISREG(st.st_mode):
            if p.name in ignore_content:
                return ("file", stat.S_IMODE(st.st_mode), "(content ignored)")
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return ("file", stat.S_IMODE(st.st_mode), st.st_size, h.hexdigest())
        return ("other", stat.S_IFMT(st.st_mode))

    out["."] = entry(path)
    if out["."][0] == "dir":
        for dirpath, dirnames, filenames in os.walk(path):  # does not descend into linked folders
            for name in sorted(dirnames + filenames):
                p = Path(dirpath) / name
                out[str(p.relative_to(path))] = entry(p)
    return out


def diff(before: dict[str, tuple] | None, after: dict[str, tuple] | None) -> list[str]:
    """What changed between two snapshots, one short line per entry."""
    if before is None or after is None:
        return [] if before == after else [f"{'created' if before is None else 'removed'} (the folder itself)"]
    out = []
    for k in sorted(set(before) | set(after)):
        if k not in before:
            out.append(f"new {k}")
        elif k not in after:
            out.append(f"removed {k}")
        elif before[k] != after[k]:
            out.append(f"changed {k}")
    return out


# ------------------------------------------------------------------------------------------------
# Damaging run folders
# ------------------------------------------------------------------------------------------------

def ckpt(run: Path, step: int = 4) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _edit_json(path: Path, fn: Callable[[dict], Any]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def _truncate(path: Path, keep: float = 0.5) -> None:
    """Keep a fraction (a float) or a number of bytes (an int) of the file."""
    raw = path.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    path.write_bytes(raw[:n])


def _reseal(folder: Path, name: str) -> None:
    """Refresh the checksum state.json holds for a rewritten tensor file: the damage then reaches the checks
    behind the checksum (shapes, names, finiteness), as from a tool that wrote a consistent checkpoint."""
    import hashlib

    state = json.loads((folder / "state.json").read_text())
    state.setdefault("sha256", {})[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))


def _tensors(run: Path, fn: Callable[[dict], dict], step: int = 4) -> None:
    from safetensors.torch import load_file, save_file

    f = ckpt(run, step) / "model.safetensors"
    save_file(fn(load_file(str(f))), str(f), metadata={"format": "metalens-checkpoint"})
    _reseal(f.parent, f.name)


def _nan_weights(t: dict) -> dict:
    out = {k: v.clone() for k, v in t.items()}
    out[min(out)].view(-1)[0] = float("nan")
    return out


def _other_shapes(t: dict) -> dict:
    import torch

    return {k: torch.zeros(*(s + 1 for s in v.shape)) if v.dim() else v for k, v in t.items()}


def _move_checkpoints_out(run: Path) -> None:
    """``checkpoints`` becomes a link to a folder beside the run (that folder must never change)."""
    elsewhere = run.parent / "elsewhere"
    shutil.move(str(run / "checkpoints"), str(elsewhere))
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)


def _link_model_out(run: Path) -> None:
    """A checkpoint's model.safetensors becomes a link to a (valid) file beside the run."""
    target = run.parent / "elsewhere.safetensors"
    shutil.move(str(ckpt(run) / "model.safetensors"), str(target))
    (ckpt(run) / "model.safetensors").symlink_to(target)


def _link_log_out(run: Path) -> None:
    target = run.parent / "elsewhere.jsonl"
    shutil.move(str(run / "log.jsonl"), str(target))
    (run / "log.jsonl").symlink_to(target)


def _leftovers(run: Path) -> None:
    tmp = run / "checkpoints" / ".step_00000006.x1y2z3.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 100)
    (run / "checkpoints" / ".latest.a1b2c3.tmp").write_text("step_00000006\n")
    (run / ".config.json.q9w8e7.tmp").write_text("{")


def _latest_dir(run: Path) -> None:
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").mkdir()


def _latest_passwd(run: Path) -> None:
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").symlink_to("/etc/passwd")


def _set_key(path_of: Callable[[Path], Path], dotted: str, value: Any) -> Callable[[Path], None]:
    def fn(run: Path) -> None:
        def edit(d: dict) -> None:
            *parents, last = dotted.split(".")
            for p in parents:
                d = d[p]
            d[last] = value
        _edit_json(path_of(run), edit)
    return fn


def _del_key(path_of: Callable[[Path], Path], dotted: str) -> Callable[[Path], None]:
    def fn(run: Path) -> None:
        def edit(d: dict) -> None:
            *parents, last = dotted.split(".")
            for p in parents:
                d = d[p]
            del d[last]
        _edit_json(path_of(run), edit)
    return fn


def _cfg(run: Path) -> Path:
    return run / "config.json"


def _state(run: Path) -> Path:
    return ckpt(run) / "state.json"


@dataclasses.dataclass(frozen=True)
class Corruption:
    """A way to damage a copy of the tiny run, and what ``eval`` and ``train --resume --steps 6`` must do.

    ``eval``/``resume``: (exit code or codes allowed, a substring of the one stderr line). Exit 0 means the
    command works (with at most one note on stderr): ``eval`` changes nothing, ``resume`` continues from step 4
    (never from step 0) to step 6. Any other code: exactly one line, and nothing anywhere changed.
    ``base``: the tiny run it starts from ("pretrain" or "maml"); ``secret``: text of a file outside the run
    that the damage points at, which must never be printed.
    """

    name: str
    damage: Callable[[Path], None]
    eval: tuple[int | tuple[int, ...], str]
    resume: tuple[int | tuple[int, ...], str]
    base: str = "pretrain"
    secret: str = ""


def _other_optimizer_shapes(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = ckpt(run) / "optimizer.safetensors"
    save_file(_other_shapes(load_file(str(f))), str(f), metadata={"format": "metalens-checkpoint"})
    _reseal(f.parent, f.name)


def _no_optimizer_tensors(run: Path) -> None:
    from safetensors.torch import save_file

    save_file({}, str(ckpt(run) / "optimizer.safetensors"), metadata={"format": "metalens-checkpoint"})
    _reseal(ckpt(run), "optimizer.safetensors")


def _link_config_out(run: Path) -> None:
    target = run.parent / "elsewhere.json"
    shutil.move(str(run / "config.json"), str(target))
    (run / "config.json").symlink_to(target)


def _link_lock_out(run: Path) -> None:
    target = run.parent / "victim.txt"
    target.write_text("not metalens' file\n")
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(target)


def _link_step_out(run: Path) -> None:
    target = run.parent / "elsewhere_step"
    shutil.move(str(ckpt(run)), str(target))
    ckpt(run).symlink_to(target, target_is_directory=True)


def _checkpoints_a_file(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder\n")


def _log_a_folder(run: Path) -> None:
    (run / "log.jsonl").unlink()
    (run / "log.jsonl").mkdir()


BINARY = bytes(range(256)) * 4
STATE_FALLBACK = (2, "state.json")

CORRUPTIONS: list[Corruption] = [
    # config.json
    Corruption("config.json truncated", lambda r: _truncate(_cfg(r)), (2, "config.json"), (2, "config.json")),
    Corruption("config.json garbage", lambda r: _cfg(r).write_bytes(b"this is not json {]"),
               (2, "config.json"), (2, "config.json")),
    Corruption("config.json binary", lambda r: _cfg(r).write_bytes(BINARY), (2, "config.json"), (2, "config.json")),
    Corruption("config.json empty", lambda r: _cfg(r).write_bytes(b""), (2, "config.json"), (2, "config.json")),
    Corruption("config.json a list", lambda r: _cfg(r).write_text("[1, 2]"), (2, "config.json"), (2, "config.json")),
    Corruption("config.json wrong types", _set_key(_cfg, "train.batch_tasks", "four"),
               (2, "train.batch_tasks"), (2, "train.batch_tasks")),
    Corruption("config.json hidden a string", _set_key(_cfg, "learner.hidden", "8"), (2, "learner.hidden"),
               (2, "learner.hidden")),
    Corruption("config.json learner.name a number", _set_key(_cfg, "learner.name", 7), (2, "config.json"),
               (2, "config.json")),
    Corruption("config.json missing train", _del_key(_cfg, "train"), (2, "config.json"), (2, "config.json")),
    Corruption("config.json missing learner.name", _del_key(_cfg, "learner.name"), (2, "config.json"),
               (2, "config.json")),
    Corruption("config.json unknown option", _set_key(_cfg, "task.shotz", 3), (2, "task.shotz"), (2, "task.shotz")),
    Corruption("config.json another learner", _set_key(_cfg, "learner.name", "scratch"), (2, "config.json"),
               (2, "config.json")),
    Corruption("config.json another option value", _set_key(_cfg, "learner.finetune_lr", 0.5),
               (2, "does not match the checkpoint"), (2, "does not match the checkpoint")),
    Corruption("config.json fomaml over a maml run", _set_key(_cfg, "learner.name", "fomaml"),
               (2, "does not match the checkpoint"), (2, "does not match the checkpoint"), base="maml"),
    Corruption("config.json a 2 MB file", lambda r: _cfg(r).write_bytes(b" " * (2 << 20) + b"{}"),
               (2, "config.json"), (2, "config.json")),
    Corruption("config.json a symlink to a file outside", _link_config_out, (2, "symbolic link"),
               (2, "symbolic link")),
    # state.json of the newest checkpoint
    Corruption("state.json truncated", lambda r: _truncate(_state(r)), STATE_FALLBACK, STATE_FALLBACK),
    Corruption("state.json garbage", lambda r: _state(r).write_bytes(b"garbage"), STATE_FALLBACK, STATE_FALLBACK),
    Corruption("state.json binary", lambda r: _state(r).write_bytes(BINARY), STATE_FALLBACK, STATE_FALLBACK),
    Corruption("state.json step a string", _set_key(_state, "step", "4"), (2, "step"), (2, "step")),
    Corruption("state.json step 12.7", _set_key(_state, "step", 12.7), (2, "step"), (2, "step")),
    Corruption("state.json step 1e30", _set_key(_state, "step", 1e30), (2, "step"), (2, "step")),
    Corruption("state.json step 2 in step_00000004", _set_key(_state, "step", 2), (2, "step"), (2, "step")),
    Corruption("state.json step -4", _set_key(_state, "step", -4), (2, "step"), (2, "step")),
    Corruption("state.json missing step", _del_key(_state, "step"), (2, "step"), (2, "step")),
    Corruption("state.json missing format", _del_key(_state, "format"), (2, "checkpoint"), (2, "checkpoint")),
    Corruption("state.json missing optimizer", _del_key(_state, "optimizer"), (2, "optimizer"), (2, "optimizer")),
    Corruption("state.json seed a string", _set_key(_state, "seed", "zero"), (2, "seed"), (2, "seed")),
    Corruption("state.json a newer format", _set_key(_state, "version", 99), (2, "newer"), (2, "newer")),
    Corruption("state.json a 3 MB file", lambda r: _state(r).write_bytes(b" " * (3 << 20)), STATE_FALLBACK,
               STATE_FALLBACK),
    Corruption("state.json run names another learner", _set_key(_state, "run.learner.name", "scratch"),
               (2, "does not match the checkpoint"), (2, "does not match the checkpoint")),
    # the tensors
    Corruption("model.safetensors truncated", lambda r: _truncate(ckpt(r) / "model.safetensors"),
               (2, "step_00000004"), (2, "step_00000004")),
    Corruption("model.safetensors garbage", lambda r: (ckpt(r) / "model.safetensors").write_bytes(b"garbage" * 50),
               (2, "step_00000004"), (2, "step_00000004")),
    Corruption("model.safetensors empty", lambda r: (ckpt(r) / "model.safetensors").write_bytes(b""),
               (2, "step_00000004"), (2, "step_00000004")),
    Corruption("model.safetensors missing", lambda r: (ckpt(r) / "model.safetensors").unlink(),
               (2, "model.safetensors"), (2, "model.safetensors")),
    Corruption("model.safetensors other shapes", lambda r: _tensors(r, _other_shapes), (2, "does not fit"),
               (2, "does not fit")),
    Corruption("model.safetensors a tensor missing", lambda r: _tensors(r, lambda t: dict(sorted(t.items())[1:])),
               (2, "missing"), (2, "missing")),
    Corruption("model.safetensors NaN weights", lambda r: _tensors(r, _nan_weights), (1, "non-finite"),
               (1, "non-finite")),
    Corruption("optimizer.safetensors garbage", lambda r: (ckpt(r) / "optimizer.safetensors").write_bytes(b"x" * 64),
               (2, "step_00000004"), (2, "step_00000004")),
    Corruption("optimizer.safetensors truncated", lambda r: _truncate(ckpt(r) / "optimizer.safetensors"),
               (2, "step_00000004"), (2, "step_00000004")),
    Corruption("optimizer.safetensors other shapes", _other_optimizer_shapes, ((0, 2), ""), (2, "optimi")),
    Corruption("optimizer.safetensors without tensors", _no_optimizer_tensors, ((0, 2), ""), (2, "optimi")),
    # latest: a lost or damaged pointer is recovered from the newest complete checkpoint (or refused)
    Corruption("latest binary", lambda r: (r / "checkpoints" / "latest").write_bytes(BINARY[:60]),
               ((0, 2), "latest"), ((0, 2), "latest")),
    Corruption("latest a directory", _latest_dir, ((0, 2), "latest"), ((0, 2), "latest")),
    Corruption("latest names a missing folder", lambda r: (r / "checkpoints" / "latest").write_text("step_00000009\n"),
               ((0, 2), "latest"), ((0, 2), "latest")),
    Corruption("latest names ../../etc", lambda r: (r / "checkpoints" / "latest").write_text("../../etc\n"),
               ((0, 2), "latest"), ((0, 2), "latest")),
    Corruption("latest a symlink to /etc/passwd", _latest_passwd, ((0, 2), "symbolic link"), (2, "symbolic link"),
               secret="root:"),
    Corruption("latest deleted", lambda r: (r / "checkpoints" / "latest").unlink(), (0, "step_00000004"),
               (0, "step_00000004")),
    # links, odd entries and leftovers
    Corruption("checkpoints a symlink to a folder outside", _move_checkpoints_out, (2, "symbolic link"),
               (2, "symbolic link")),
    Corruption("checkpoints a regular file", _checkpoints_a_file, (2, "checkpoint"), (2, "checkpoints")),
    Corruption("step_00000004 a symlink to a folder outside", _link_step_out, (2, "symbolic link"),
               (2, "symbolic link")),
    Corruption("model.safetensors a symlink to a file outside", _link_model_out, (2, "symbolic link"),
               (2, "symbolic link")),
    Corruption("log.jsonl a symlink to a file outside", _link_log_out, (0, ""), (2, "symbolic link")),
    Corruption("log.jsonl a folder", _log_a_folder, (0, ""), (2, "log.jsonl")),
    Corruption(".lock a symlink to a file outside", _link_lock_out, (0, ""), (2, "symbolic link")),
    Corruption("leftover .step_*.tmp and .latest.*.tmp", _leftovers, (0, ""), (0, "")),
    # every checkpoint damaged: nothing to continue from, and never a restart from step 0
    Corruption("every state.json garbage",
               lambda r: [(ckpt(r, s) / "state.json").write_bytes(b"garbage") for s in (2, 4)] and None,
               (2, "state.json"), (2, "the newest checkpoint is damaged")),
]


# ------------------------------------------------------------------------------------------------
# Malicious image data
# ------------------------------------------------------------------------------------------------

def png_bytes(i: int = 0, size: int = 28) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size), 255)
    ImageDraw.Draw(im).line([(2, 2 + i % (size - 4)), (size - 3, size - 3 - i % (size - 4))], fill=0, width=3)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def good_layout(groups: int = 2, classes: int = 5, images: int = 4) -> list[tuple[str, bytes]]:
    """Members of a small, sound data set laid out as ``top/g<i>/c<j>/<k>.png``."""
    return [(f"top/g{g}/c{c}/{k}.png", png_bytes(7 * c + k + 3 * g)) for g in range(groups) for c in range(classes)
            for k in range(images)]


def write_zip(path: Path, members: Sequence[tuple[str, bytes]], *, link: tuple[str, str] | None = None,
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members:
            z.writestr(name, data)
        if link is not None:  # a symbolic-link member: name -> target
            info = zipfile.ZipInfo(link[0])
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, link[1])
    return path


def write_folder(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    for name, data in members:
        p = path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return path


def _truncated_zip(path: Path) -> Path:
    write_zip(path, good_layout())
    _truncate(path, 0.6)
    return path


def _bomb_zip(path: Path) -> Path:
    """A zip whose one bad member inflates to 200 MB (from ~200 KB): the reader must refuse it by its size."""
    members = good_layout()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
        with z.open("top/g0/c0/bomb.png", "w", force_zip64=True) as f:
            block = b"\0" * (1 << 20)
            for _ in range(200):
                f.write(block)
    return path


def _lying_size_zip(path: Path) -> Path:
    """A one-bad-member zip whose headers declare a size smaller than the member inflates to."""
    write_zip(path, [*good_layout(), ("top/g0/c0/liar.png", b"\0" * (4 << 20))])
    raw = bytearray(path.read_bytes())
    # patch the central directory entry of the last member (liar.png): uncompressed size -> 100
    at = raw.rindex(b"PK\x01\x02")
    raw[at + 24: at + 28] = struct.pack("<I", 100)
    path.write_bytes(bytes(raw))
    return path


def _png_huge_header(w: int = 60000, h: int = 60000) -> bytes:
    """A PNG whose header declares w x h pixels (a decompression bomb by its header)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


@dataclasses.dataclass(frozen=True)
class BadData:
    """Malicious data for ``--task images``: ``make(folder) -> root`` builds it; the one line must name ``match``."""

    name: str
    make: Callable[[Path], Path]
    match: str
    options: tuple[str, ...] = ()


def _w(data: bytes) -> Callable[[Path], None]:
    def fn(path: Path) -> None:
        path.write_bytes(data)
    return fn


def _folder_with(extra: Sequence[tuple[str, bytes]]) -> Callable[[Path], Path]:
    return lambda d: write_folder(d / "data", [*good_layout(), *extra])


def _folder_with_link(d: Path) -> Path:
    root = write_folder(d / "data", good_layout())
    secret = d / "secret.png"
    secret.write_bytes(png_bytes(1))
    (root / "top" / "g0" / "c0" / "linked.png").symlink_to(secret)
    return root


def _folder_with_linked_class(d: Path) -> Path:
    root = write_folder(d / "data", good_layout())
    other = write_folder(d / "other", [(f"c9/{k}.png", png_bytes(k)) for k in range(4)])
    (root / "top" / "g0" / "c9").symlink_to(other / "c9", target_is_directory=True)
    return root


BAD_DATA: list[BadData] = [
    BadData("zip with a ../ member", lambda d: write_zip(d / "bad.zip", [*good_layout(), ("../evil.png", png_bytes())]),
            "'../evil.png'"),
    BadData("zip with a nested ../ member",
            lambda d: write_zip(d / "bad.zip", [*good_layout(), ("top/g0/../../../evil.png", png_bytes())]), "'..'"),
    BadData("zip with an absolute member", lambda d: write_zip(d / "bad.zip", [*good_layout(), ("/tmp/evil.png",
                                                                                              png_bytes())]),
            "absolute"),
    BadData("zip with a symlink member",
            lambda d: write_zip(d / "bad.zip", good_layout(), link=("top/g0/c0/link.png", "/etc/passwd")),
            "symbolic link"),
    BadData("zip with a bomb-sized member", lambda d: _bomb_zip(d / "bad.zip"), "bomb.png"),
    BadData("zip whose header lies about a member's size", lambda d: _lying_size_zip(d / "bad.zip"), "liar.png"),
    BadData("zip with a non-image .png", lambda d: write_zip(d / "bad.zip", [*good_layout(),
                                                                            ("top/g0/c0/fake.png", b"hello")]),
            "fake.png"),
    BadData("zip with a truncated PNG",
            lambda d: write_zip(d / "bad.zip", [*good_layout(), ("top/g0/c0/cut.png", png_bytes()[:60])]), "cut.png"),
    BadData("zip with a PNG declaring 60000x60000 pixels",
            lambda d: write_zip(d / "bad.zip", [*good_layout(), ("top/g0/c0/huge.png", _png_huge_header())]),
            "huge.png"),
    BadData("not a zip (.zip of text)", lambda d: _w(b"hello, world")(d / "bad.zip") or d / "bad.zip", "bad.zip"),
    BadData("an empty .zip", lambda d: _w(b"")(d / "bad.zip") or d / "bad.zip", "bad.zip"),
    BadData("a truncated zip", lambda d: _truncated_zip(d / "bad.zip"), "bad.zip"),
    BadData("folder with a non-image .png", _folder_with([("top/g0/c0/fake.png", b"hello")]), "fake.png"),
    BadData("folder with a truncated PNG", _folder_with([("top/g0/c0/cut.png", png_bytes()[:60])]), "cut.png"),
    BadData("folder with a symlinked image", _folder_with_link, "linked.png"),
    BadData("folder with a symlinked class folder", _folder_with_linked_class, "c9"),
    BadData("folder with an image outside <group>/<class>/", _folder_with([("stray.png", png_bytes())]), "stray.png"),
    BadData("a missing root", lambda d: d / "no-such-data", "no-such-data"),
    BadData("task.size=100000", lambda d: write_folder(d / "data", good_layout()), "task.size",
            ("--set", "task.size=100000")),
    BadData("task.ways=60 on a 5-class split", lambda d: write_folder(d / "data", good_layout()), "ways",
            ("--set", "task.ways=60")),
]

# The shipped Omniglot data with a named split: 60 ways is more than the test alphabet (Tagalog) has classes.
OMNIGLOT_SPLIT = ["--set", f"task.root={OMNIGLOT}", "--set", "task.split=named",
                  "--set", "task.train_groups=images_background_small1/*", "--set", "task.test_groups=Tagalog"]


def images_argv(root: Path, out: Path, *options: str) -> list[str]:
    """``train --task images`` on ``root`` with a named split (group g0 trains, g1 tests), a tiny budget."""
    return ["train", "--task", "images", "--learner", "protonet", "--steps", "2", "--out", str(out),
            "--set", f"task.root={root}", "--set", "task.split=named", "--set", "task.train_groups=g0",
            "--set", "task.test_groups=g1", "--set", "task.ways=2", "--set", "task.queries=2",
            "--set", "train.batch_tasks=2", "--quiet", *options]


# ------------------------------------------------------------------------------------------------
# Full and read-only disks
# ------------------------------------------------------------------------------------------------

def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def umount(path: Path) -> None:
    for _ in range(5):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.2)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path | None]:
    """A tmpfs of ``size`` mounted on ``path`` (None when this process may not mount one)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (IS_ROOT and _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))):
        yield None
        return
    try:
        yield path
    finally:
        umount(path)


def resize_tmpfs(path: Path, size: str) -> bool:
    return _mount("-o", f"remount,size={size}", str(path))


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[bool]:
    """Make the folder ``path`` read-only for this process: chmod 0o500 (not root) or a read-only bind mount
    (root); yields False when neither is possible."""
    if not IS_ROOT:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(path, 0o500)
        try:
            yield True
        finally:
            os.chmod(path, mode)
        return
    if not _mount("--bind", str(path), str(path)):
        yield False
        return
    try:
        yield _mount("-o", "remount,bind,ro", str(path))
    finally:
        umount(path)


@contextlib.contextmanager
def failing_writes(nth: int, err: int = errno.ENOSPC, target: str = "save_file") -> Iterator[list[int]]:
    """Make the ``nth`` call (1-based) of ``metalens.checkpoint.<target>`` and every later one raise
    ``OSError(err)``, as a full (ENOSPC) or read-only (EROFS) disk would; yields the call counter."""
    import metalens.checkpoint as ck

    calls = [0]
    real = getattr(ck, target)

    def fake(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] >= nth:
            raise OSError(err, os.strerror(err))
        return real(*args, **kw)

    setattr(ck, target, fake)
    try:
        yield calls
    finally:
        setattr(ck, target, real)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
