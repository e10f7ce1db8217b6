"""The fault sweep: many more probes of the error policy than tests/test_faults.py, in temporary folders.

Usage::

    .venv/bin/python benchmarks/fault_sweep.py [--quick] [--out DIR] [--kills N] [--seed S]

Probe classes: every command-line option of the trainer, of five task families and of every
learner given nan / inf / -1 / huge / a wrong type (and the command's own flags); every file of a
run folder truncated at several lengths and with random bytes flipped, plus the suite's table of
damages, each for ``eval`` and ``train --resume``; folders held by another writer and two
``train`` started at the same moment (10 trials); N random SIGKILLs during training, each resumed
and compared bit for bit with an uninterrupted run; SIGTERM / SIGHUP / SIGINT at random moments
(during start-up and during training) and second signals; full disks (tmpfs of several sizes when
this process may mount one; ENOSPC / EROFS / EIO injected at every write otherwise too); malicious
image data for ``train`` and ``eval``; numerical faults.

A probe is handled cleanly when its exit code is the policy's (2 bad input, 1 a run that failed,
128 + signal), stderr is one line without a traceback or "internal error", and the folders are as
expected (a refused command changes nothing; nothing outside the command's folder ever changes;
a resumed run ends as the uninterrupted one). Every probe runs in a case folder beside a sentinel
folder; "writes outside a run folder" counts probes that changed anything outside the command's
folder, the sweep's sentinel, its root listing or its working directory.

Prints a Markdown table (class, probes, handled cleanly, failing), the concurrency, kill and
outside-write counts, and one line per failing probe. Runs in about 11 minutes on 2 shared CPUs (--quick:
about 3.5).
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import faults_util as fu

MAX_DETAIL = 260


class ProbeTimeout(BaseException):
    """Raised by SIGALRM in a probe still running at its time limit."""


def _alarm(signum: int, frame: Any) -> None:
    raise ProbeTimeout()


def cli(argv: list[Any], timeout: float = 20, env: dict[str, str] | None = None) -> tuple[fu.Result, bool]:
    """``metalens ARGV`` in-process with a time limit; (result, timed out)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        res = fu.cli(argv, env=env)
    except ProbeTimeout:  # fired outside main(), as the captured output was being collected
        res = fu.Result(-1, "", "ProbeTimeout")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return res, "ProbeTimeout" in res.err


def short(text: str, n: int = MAX_DETAIL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def shown(argv: list[Any], case: Path | None = None) -> str:
    words = []
    for a in argv:
        s = str(a)
        if case is not None:
            s = s.replace(str(case), "CASE")
        words.append(s if s and all(c.isalnum() or c in "-_./=:,[]" for c in s) else repr(s))
    return short("metalens " + " ".join(words), 200)


class Sweep:
    def __init__(self, root: Path, quick: bool, seed: int, kills: int) -> None:
        self.root, self.quick, self.kills = root, quick, kills
        self.rng = random.Random(seed)
        self.work, self.sentinel, self.cwd = root / "work", root / "sentinel", root / "cwd"
        for d in (self.work, self.cwd, root / "base"):
            d.mkdir(parents=True, exist_ok=True)
        (self.sentinel / "sub").mkdir(parents=True, exist_ok=True)
        (self.sentinel / "notes.txt").write_text("a user's file beside the runs\n")
        (self.sentinel / "sub" / "data.bin").write_bytes(os.urandom(4096))
        self.sentinel_snap = fu.snapshot(self.sentinel)
        self.root_listing = sorted(os.listdir(root))
        self.rows: dict[str, list[int]] = {}
        self.failures: list[str] = []
        self.causes: list[str] = []
        self.outside = 0
        self.n = 0
        self.notes: list[str] = []
        self.concurrent = [0, 0]
        self.killed = [0, 0]
        self.base: dict[str, Path] = {}

    # -- bookkeeping ----------------------------------------------------------------------------------

    def case(self) -> Path:
        self.n += 1
        d = self.work / f"c{self.n:05d}"
        d.mkdir()
        (d / "sentinel").mkdir()
        (d / "sentinel" / "keep.txt").write_text("keep\n")
        return d

    def record(self, cls: str, what: str, problem: str | None, outside: list[str] = (), case: Path | None = None,
               keep: bool = False) -> bool:
        row = self.rows.setdefault(cls, [0, 0])
        row[0] += 1
        if outside:
            self.outside += 1
            problem = (problem + "; " if problem else "") + f"changed outside the command's folder: {outside[:4]}"
        if problem:
            detail = short(problem.replace(str(case), "CASE") if case else problem)
            full = f"{cls} {what} {problem}"
            self.causes.append(next((label for label, needle in CAUSES if needle in full), "other"))
            self.failures.append(f"[{cls}] `{what}` -> {detail}")
        else:
            row[1] += 1
        if case is not None and not keep:
            shutil.rmtree(case, ignore_errors=True)
        return problem is None

    @staticmethod
    def outside_changes(before: dict | None, after: dict | None, inside: str) -> list[str]:
        """Entries changed in a case folder that are not under ``inside`` (the command's folder, relative)."""
        return [c for c in fu.diff(before, after) if not (c.split(" ", 1)[1] + "/").startswith(inside + "/")]

    # -- base runs --------------------------------------------------------------------------------------

    def build_bases(self) -> None:
        b = self.root / "base"
        for name, argv in (("pretrain", fu.TINY), ("maml", fu.TINY_MAML)):
            res, _ = cli(["train", *argv, "--out", b / name], timeout=120)
            if res.code != 0:
                raise SystemExit(f"cannot build the base run {name}: {res}")
            self.base[name] = b / name
        d = b / "images"
        root = fu.write_folder(d / "data", fu.good_layout())
        res, _ = cli(fu.images_argv(root, d / "run"), timeout=120)
        if res.code != 0:
            raise SystemExit(f"cannot build the images run: {res}")
        self.base["images"] = d / "run"

    def copy(self, case: Path, which: str = "pretrain") -> Path:
        run = case / "run"
        shutil.copytree(self.base[which], run, symlinks=True)
        return run

    # =================================================================================================
    # 1. options
    # =================================================================================================

    def option_values(self, default: Any, section: str = "train") -> list[str]:
        vals = self._option_values(default)
        if section != "train":  # 1e30 and 10**20 meet the same checks; one is enough outside train.*
            vals = [v for v in vals if "100000000000000000000" not in v]
        return vals

    def _option_values(self, default: Any) -> list[str]:
        if isinstance(default, bool):
            vals = ["2", '"yes"', "[true]"]
        elif isinstance(default, int):
            vals = ["nan", "inf", "-1", "1e30", "100000000000000000000", '"word"', "1.5"]
        elif isinstance(default, float):
            vals = ["nan", "inf", "-inf", "-1", "1e30", "1e400", '"word"']
        elif isinstance(default, (list, tuple)):
            vals = ["[nan]", "[inf, 1]", "[-1]", "[1e30]", "[100000000000000000000]", '"word"', "[]", "{a=1}"]
        elif default is None:
            vals = ["nan", "-1", '"word"', "[1]"]
        else:  # strings and choices
            vals = ['""', "1", "[1]", '"../../etc/passwd"', '"\\u0000"']
        return vals[:4] if self.quick else vals

    def probe_options(self) -> None:
        from metalens.config import field_docs
        from metalens.registry import LEARNERS, TASKS
        from metalens.train import TrainConfig

        plans: list[tuple[str, list[str], Any]] = []  # (--set key, base argv, Config class)
        base = ["--steps", "2", "--set", "train.batch_tasks=2", "--set", "train.log_every=1", "--quiet"]
        plans.append(("train", ["--task", "sinusoid", "--learner", "pretrain", "--set", "learner.hidden=[4]",
                                "--set", "learner.finetune_steps=1", "--set", "train.batch_tasks=2", "--quiet"],
                      TrainConfig))
        families = ["sinusoid"] if self.quick else ["sinusoid", "gp", "linear", "clusters", "random_mlp"]
        learners = ["pretrain", "maml"] if self.quick else [e.name for e in LEARNERS]
        for fam in families:
            plans.append(("task", ["--task", fam, "--learner", "oracle" if fam != "random_mlp" else "pretrain",
                                   *base], TASKS[fam].cls.Config))
        for name in learners:
            for fam in ("sinusoid", "clusters"):  # the first family the learner trains on
                argv = ["--task", fam, "--learner", name, *base]
                case = self.case()
                res, _ = cli(["train", *argv, "--out", case / "out"], timeout=60)
                shutil.rmtree(case, ignore_errors=True)
                if res.code == 0:
                    plans.append(("learner", argv, LEARNERS[name].cls.Config))
                    break
            else:
                self.notes.append(f"learner {name}: no baseline run on sinusoid or clusters; its options not probed")
        for section, argv, config in plans:
            for field, (default, _help, _allowed) in field_docs(config).items():
                for value in self.option_values(default, section):
                    if section == "train" and field == "steps":
                        args = [a for a in argv]  # no --steps: the --set value is the one used
                    elif section == "train":
                        args = [*argv, "--steps", "2"]
                    else:
                        args = argv
                    self.option_probe(["train", *args, "--set", f"{section}.{field}={value}"], "options: --set")
        # the commands' own flags
        t = ["train", "--task", "sinusoid", "--learner", "pretrain", "--set", "learner.hidden=[4]", "--quiet"]
        flags = [("--steps", ["nan", "inf", "-1", "0", "1e30", "x"]), ("--seed", ["nan", "-1", "1e30", "x"]),
                 ("--threads", ["nan", "-1", "0", "1000000", "1e30", "x"]), ("--nproc", ["nan", "-1", "0", "1000000", "x"])]
        for flag, values in flags:
            for v in values[:3] if self.quick else values:
                self.option_probe([*t, *(["--steps", "2"] if flag != "--steps" else []), flag, v], "options: flags")
        self.option_probe([*t, "--steps", "2"], "options: flags", env={"METALENS_THREADS": "1000000"})
        self.option_probe([*t, "--steps", "2"], "options: flags", env={"METALENS_THREADS": "nan"})
        for flag, values in (("--episodes", ["nan", "-1", "1", "1e30", "x"]), ("--seed", ["nan", "-1", "x"]),
                             ("--batch-tasks", ["nan", "0", "-1", "1e30", "x"]), ("--threads", ["1000000", "0"])):
            for v in values[:3] if self.quick else values:
                self.option_probe(["eval", "RUN", flag, v], "options: flags", run=True)
        for v in ["nan", "inf", "-inf", "-1", "0", "x", "1e400"][: 4 if self.quick else None]:
            self.option_probe(["tour", "--out", "OUT", "--steps-scale", v, "--quiet"], "options: flags")
        for v in ["nan", "1", "-1", "x"]:
            self.option_probe(["tour", "--out", "OUT", "--episodes", v, "--quiet"], "options: flags")
        for item in ["study.nope=1", "study.seed=-1", "study.seed=nan", "study.episodes=1e30", "task.shots=1"]:
            self.option_probe(["study", "sinusoid-gradient", "--out", "OUT", "--set", item], "options: flags")
        self.option_probe(["study", "sinusoid-gradient", "--set", "study.nope=1"], "options: flags")  # default --out

    def option_probe(self, argv: list[str], cls: str, env: dict[str, str] | None = None, run: bool = False) -> None:
        case = self.case()
        out = case / "out"
        if run:
            target = self.copy(case)
            argv = [target if a == "RUN" else a for a in argv]
            inside = "run"
        else:
            argv = [out if a == "OUT" else a for a in argv]
            if argv[0] == "train":
                argv = [*argv, "--out", out]
            inside = "out"
        before = fu.snapshot(case)
        cwd_before = sorted(os.listdir(self.cwd))
        res, timed_out = cli(argv, timeout=5, env=env)
        after = fu.snapshot(case)
        problem = None
        if timed_out:
            self.notes.append(f"accepted, still running after 5 s (stopped by the sweep): {shown(argv, case)}")
        elif res.code == 2:
            problem = fu.verdict(res, code=2)
            changed = fu.diff(before, after)
            if changed and not problem:
                problem = f"refused (exit 2) but left {changed[:4]}"
        elif res.code == 0:
            problem = fu.verdict(res, code=0, lines=0)
        else:
            problem = fu.verdict(res, code=1)  # a run that failed while running: one line, no internal error
        if sorted(os.listdir(self.cwd)) != cwd_before:
            problem = (problem or "") + f"; wrote into the working folder: {sorted(os.listdir(self.cwd))}"
            for p in self.cwd.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        self.record(cls, shown(argv, case), problem, self.outside_changes(before, after, inside), case)

    # =================================================================================================
    # 2. damaged run folders
    # =================================================================================================

    def damaged(self, cls: str, name: str, damage, which: str = "pretrain", table: fu.Corruption | None = None) -> None:
        for cmd in ("eval", "resume"):
            case = self.case()
            run = self.copy(case, which)
            try:
                damage(run)
            except Exception as e:  # noqa: BLE001 - a damage that does not apply to this file
                self.notes.append(f"damage {name!r} could not be applied: {e}")
                shutil.rmtree(case, ignore_errors=True)
                return
            s4 = run / "checkpoints" / "step_00000004" / "model.safetensors"
            stamp = (s4.stat().st_ino, s4.stat().st_mtime_ns) if s4.is_file() and not s4.is_symlink() else None
            before = fu.snapshot(case)
            argv = (["eval", run, "--episodes", "4"] if cmd == "eval"
                    else ["train", "--resume", "--out", run, "--steps", "6", "--quiet"])
            res, timed_out = cli(argv, timeout=30)
            after = fu.snapshot(case)
            problems = []
            if timed_out:
                problems.append("still running after 30 s")
            if table is not None:  # the suite's expectation
                code, match = table.eval if cmd == "eval" else table.resume
                v = fu.verdict(res, code=code, match=match if res.code else "", lines=1 if res.code else (0, 1),
                               absent=[table.secret] if table.secret else ())
            else:
                v = fu.verdict(res, code=(0, 1, 2), lines=1 if res.code else (0, 1))
                if not v and res.code == 1 and "non-finite" not in res.err:
                    v = f"exit 1 for a damaged folder (expected 2): {short(res.err, 160)}"
            if v:
                problems.append(v)
            if "continuing from the newest complete checkpoint, step_00000002" in res.err:
                problems.append("fell back past the damaged newest checkpoint to step_00000002")
            if res.code != 0 or cmd == "eval":
                changed = fu.diff(before, after)
                if changed:
                    problems.append(f"{'refused' if res.code else 'eval'} but changed {changed[:4]}")
            else:
                if fu.latest_step(run) != 6:
                    problems.append(f"resumed, but latest is {fu.latest_step(run)} (expected 6)")
                steps = fu.log_steps(run)
                if len(steps) != len(set(steps)):
                    problems.append(f"duplicate steps in the log: {steps}")
                if stamp and s4.is_file() and (s4.stat().st_ino, s4.stat().st_mtime_ns) != stamp \
                        and "fell back" not in " ".join(problems):
                    problems.append("step_00000004 was rewritten: the resume did not continue from it")
                if list(run.rglob("*.tmp")):
                    problems.append("temporary entries left after the resume")
            self.record(cls, f"{cmd} after: {name}", "; ".join(problems) or None,
                        self.outside_changes(before, after, "run"), case)

    def probe_damage(self) -> None:
        for c in fu.CORRUPTIONS:
            self.damaged("run folders: the suite's table", c.name, c.damage, c.base, table=c)
        files = ["config.json", "log.jsonl", "checkpoints/latest", "checkpoints/step_00000004/state.json",
                 "checkpoints/step_00000004/model.safetensors", "checkpoints/step_00000004/optimizer.safetensors",
                 "checkpoints/step_00000002/model.safetensors"]
        for rel in files:
            size = (self.base["pretrain"] / rel).stat().st_size
            lengths = sorted({0, 1, 8, size // 2, size - 1}) if not self.quick else sorted({0, size // 2})
            for n in lengths:
                self.damaged("run folders: truncated", f"{rel} truncated to {n} of {size} bytes",
                             lambda r, rel=rel, n=n: fu._truncate(r / rel, n))
            for trial in range(1 if self.quick else 4):
                k = 1 if trial < 3 else 16
                seed = self.rng.randrange(1 << 30)
                self.damaged("run folders: bytes flipped", f"{rel}: {k} random byte(s) flipped (seed {seed})",
                             lambda r, rel=rel, k=k, seed=seed: flip(r / rel, k, seed))
        # the optimiser of a damaged checkpoint and the configuration, through the folder checks
        self.damaged("run folders: odd entries", "checkpoints/latest a FIFO", lambda r: (
            (r / "checkpoints" / "latest").unlink(), os.mkfifo(r / "checkpoints" / "latest")))
        self.damaged("run folders: odd entries", "config.json a FIFO", lambda r: (
            (r / "config.json").unlink(), os.mkfifo(r / "config.json")))
        self.damaged("run folders: odd entries", "state.json a FIFO", lambda r: (
            fu._state(r).unlink(), os.mkfifo(fu._state(r))))
        self.damaged("run folders: odd entries", "model.safetensors a folder", lambda r: (
            (fu.ckpt(r) / "model.safetensors").unlink(), (fu.ckpt(r) / "model.safetensors").mkdir()))
        self.damaged("run folders: odd entries", "a hard link to a file outside as model.safetensors", hardlink_out)
        self.damaged("run folders: odd entries", "model.safetensors with a 100 MB header claim", big_header)
        self.damaged("run folders: odd entries", "model.safetensors with inf weights",
                     lambda r: fu._tensors(r, inf_weights))
        self.damaged("run folders: odd entries", "model.safetensors as float64", lambda r: fu._tensors(
            r, lambda t: {k: v.double() for k, v in t.items()}))
        self.damaged("run folders: odd entries", "checkpoints holds step_99999999 (empty)", lambda r: (
            fu.ckpt(r, 99999999).mkdir()))
        self.damaged("run folders: odd entries", "checkpoints/step_00000006 an incomplete copy", lambda r: (
            shutil.copytree(fu.ckpt(r), fu.ckpt(r, 6)), (fu.ckpt(r, 6) / "optimizer.safetensors").unlink()))
        # refusals that must change nothing
        for name, damage, extra in (
                ("--steps 2 (below the step reached)", lambda r: None, ["--steps", "2"]),
                ("latest garbage and --steps 2", lambda r: (r / "checkpoints" / "latest").write_bytes(b"\0"), ["--steps", "2"]),
                ("latest deleted and --steps 3", lambda r: (r / "checkpoints" / "latest").unlink(), ["--steps", "3"]),
                ("a changed train.lr", lambda r: None, ["--steps", "6", "--set", "train.lr=0.5"]),
                ("a changed learner.hidden", lambda r: None, ["--steps", "6", "--set", "learner.hidden=[9]"]),
                ("another --task", lambda r: None, ["--task", "gp"]),
                ("optimizer other shapes", fu._other_optimizer_shapes, ["--steps", "6"]),
                ("train (no --resume) over the run", lambda r: None, None)):
            case = self.case()
            run = self.copy(case)
            damage(run)
            before = fu.snapshot(case)
            argv = (["train", *fu.TINY, "--out", run] if extra is None
                    else ["train", "--resume", "--out", run, "--quiet", *extra])
            res, _ = cli(argv)
            after = fu.snapshot(case)
            problem = fu.verdict(res, code=2)
            changed = fu.diff(before, after)
            if changed:
                problem = (problem + "; " if problem else "") + f"refused but changed {changed[:4]}"
            self.record("run folders: refused resumes", f"resume with {name}", problem,
                        self.outside_changes(before, after, "run"), case)

    # =================================================================================================
    # 3. concurrency
    # =================================================================================================

    def probe_concurrency(self) -> None:
        import fcntl

        # folders held by another process (an flock on a new open file description, as another process holds it)
        probes = [("train into an empty held folder", False, lambda run: ["train", *fu.TINY, "--out", run], 2),
                  ("train --resume of a held run", True, lambda run: ["train", "--resume", "--out", run, "--steps", "6",
                                                                      "--quiet"], 2),
                  ("a second train into a held run", True, lambda run: ["train", *fu.TINY, "--out", run], 2),
                  ("tour into a held folder", False, lambda run: ["tour", "--out", run, "--learner", "oracle",
                                                                   "--episodes", "4", "--quiet"], 2),
                  ("study into a held folder", False, lambda run: ["study", "sinusoid-gradient", "--out", run,
                                                                    "--set", "study.quick=true", "--quiet"], 2),
                  ("eval of a held run (reading is allowed)", True, lambda run: ["eval", run, "--episodes", "4"], 0)]
        for name, has_run, argv_of, code in probes:
            case = self.case()
            run = self.copy(case) if has_run else case / "run"
            run.mkdir(exist_ok=True)
            fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, b"pid 4242 on elsewhere, since 2020-01-01T00:00:00: metalens train\n")
            try:
                before = fu.snapshot(case, ignore_content=())
                res, _ = cli(argv_of(run), timeout=60)
                after = fu.snapshot(case, ignore_content=())
            finally:
                os.close(fd)
            problem = fu.verdict(res, code=code, match=["in use", "pid 4242"] if code else "",
                                 lines=1 if code else 0)
            changed = fu.diff(before, after)
            if changed:
                problem = (problem + "; " if problem else "") + f"changed {changed[:4]}"
            self.record("concurrency: held folders", f"{name}: {shown(argv_of(run), case)}", problem,
                        self.outside_changes(before, after, "run"), case)
        # a real second process: refused while it runs, free once it is killed
        case = self.case()
        run = case / "run"
        proc = fu.spawn(["train", *fu.SLOW, "--steps", "100000", "--set", "train.checkpoint_every=5", "--out", run])
        problem = None
        try:
            if not fu.wait_for(lambda: (fu.latest_step(run) or 0) >= 5 and len(fu.log_steps(run)) > 1, 120, proc):
                problem = f"the holder did not start: {fu.finish(proc, 5)}"
            else:
                for argv in (["train", "--resume", "--out", run, "--quiet"], ["train", *fu.TINY, "--out", run]):
                    res, _ = cli(argv)
                    v = fu.verdict(res, code=2, match=["in use", f"pid {proc.pid}"])
                    if v:
                        problem = (problem + "; " if problem else "") + f"{shown(argv, case)}: {v}"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        reached = fu.latest_step(run) or 0
        res, _ = cli(["train", "--resume", "--out", run, "--quiet", "--steps", str(reached + 2)], timeout=60)
        v = fu.verdict(res, code=0, lines=0)
        if v or fu.latest_step(run) != reached + 2:
            problem = (problem + "; " if problem else "") + f"resume after SIGKILL of the holder: {v}"
        self.record("concurrency: a live holder", "train and train --resume while another train runs, then "
                    "SIGKILL it and resume", problem, [], case)
        # two trains started at the same moment on one fresh folder
        trials = 3 if self.quick else 10
        for i in range(trials):
            case = self.case()
            run, sync = case / "run", case / "sync"
            argv = ["train", *fu.TINY, "--out", run]
            procs = [fu.spawn_synced(argv, sync) for _ in range(2)]
            fu.release(sync, 2)
            results = sorted((fu.finish(p, 120) for p in procs), key=lambda r: r.code)
            problems = []
            if [r.code for r in results] != [0, 2]:
                problems.append(f"exit codes {[r.code for r in results]} (expected one 0 and one 2): "
                                f"{[short(r.err, 120) for r in results]}")
            else:
                v = fu.verdict(results[1], code=2)
                if v:
                    problems.append(v)
                if not ("in use" in results[1].err or "holds a run" in results[1].err):
                    problems.append(f"the refusal names neither 'in use' nor 'holds a run': {short(results[1].err)}")
            steps = fu.log_steps(run)
            if steps != [4] or fu.latest_step(run) != 4:
                problems.append(f"log steps {steps}, latest {fu.latest_step(run)} (expected [4], 4)")
            self.concurrent[0] += 1
            self.concurrent[1] += not problems
            self.record("concurrency: simultaneous starts", f"two `{shown(argv, case)}` released together "
                        f"(trial {i + 1})", "; ".join(problems) or None, [], case)

    # =================================================================================================
    # 4. kills and signals
    # =================================================================================================

    M = 80  # steps of the runs that are killed or signalled

    def reference(self) -> dict:
        if not hasattr(self, "_ref"):
            run = self.root / "base" / "slow-ref"
            res, _ = cli(["train", *fu.SLOW, "--set", "train.checkpoint_every=5", "--steps", self.M, "--out", run],
                         timeout=300)
            assert res.code == 0, res
            self._ref = fu.model_tensors(run / "checkpoints" / f"step_{self.M:08d}")
        return self._ref

    def finish_and_compare(self, run: Path) -> str | None:
        """Resume ``run`` to M steps in-process; None if it ends bit for bit as the uninterrupted run."""
        if not (run / "config.json").exists():
            return None  # stopped before the run folder held a run: nothing to resume
        res, _ = cli(["train", "--resume", "--out", run, "--quiet", "--steps", self.M], timeout=300)
        v = fu.verdict(res, code=0, lines=(0, 1))
        if v:
            return f"resume: {v}"
        if list(run.rglob("*.tmp")):
            return "temporary entries left after the resume"
        steps = fu.log_steps(run)
        if len(steps) != len(set(steps)) or steps != sorted(steps):
            return f"log steps out of order or repeated after the resume: {steps[-12:]}"
        got = fu.model_tensors(run / "checkpoints" / f"step_{self.M:08d}")
        if not fu.same_tensors(got, self.reference()):
            return "the resumed run's weights differ from the uninterrupted run's"
        return None

    def probe_kills(self) -> None:
        self.reference()
        for i in range(self.kills):
            case = self.case()
            run = case / "run"
            proc = fu.spawn(["train", *fu.SLOW, "--set", "train.checkpoint_every=5", "--steps", self.M, "--out", run])
            fu.wait_for(lambda run=run: len(fu.log_steps(run)) >= 1, 120, proc)
            delay = self.rng.uniform(0, 1.2)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            at = fu.log_steps(run)[-1:] or ["-"]
            problem = self.finish_and_compare(run)
            self.killed[0] += 1
            self.killed[1] += problem is None
            self.record("kills: SIGKILL then resume", f"SIGKILL {delay:.2f}s after the first log line (near step "
                        f"{at[0]}, kill {i + 1}), resume to {self.M}, compare with the uninterrupted run", problem,
                        [], case)

    def probe_signals(self) -> None:
        sigs = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]
        for sig in sigs:
            for phase, n in (("start-up", 1), ("training", 1 if self.quick else 2)):
                for _ in range(n):
                    self.one_signal(sig, phase)
        for _ in range(2 if self.quick else 4):
            self.double_signal(self.rng.choice(sigs))

    def one_signal(self, sig: signal.Signals, phase: str) -> None:
        case = self.case()
        run = case / "run"
        proc = fu.spawn(["train", *fu.SLOW, "--set", "train.checkpoint_every=5", "--steps", self.M, "--out", run])
        if phase == "start-up":
            delay = self.rng.uniform(0.05, 2.0)
            time.sleep(delay)
            what = f"{sig.name} {delay:.2f}s after the start (imports, before training)"
        else:
            fu.wait_for(lambda: len(fu.log_steps(run)) >= 1, 120, proc)
            delay = self.rng.uniform(0, 1.0)
            time.sleep(delay)
            what = f"{sig.name} {delay:.2f}s after the first log line"
        os.kill(proc.pid, sig)
        res = fu.finish(proc, 60)
        problems = []
        if res.code == 0:
            what += " (the run had finished)"
        elif res.code == -sig and not res.lines:
            what += " (ended by the default action, before metalens handles signals)"
        else:
            v = fu.verdict(res, code=128 + sig, match=sig.name)
            if v:
                problems.append(v)
            elif "after step" in res.err:
                step = fu.latest_step(run)
                if f"after step {step}" not in res.err or fu.log_steps(run)[-1:] != [step]:
                    problems.append(f"the checkpoint (step {step}) is not the last logged step "
                                    f"({fu.log_steps(run)[-1:]}): {short(res.err, 120)}")
                if "--resume" not in res.err:
                    problems.append("no resume command on stderr")
        problem = "; ".join(problems) or self.finish_and_compare(run)
        self.record(f"signals: {phase}", f"train ..., {what}", problem,
                    [], case)

    def double_signal(self, sig: signal.Signals) -> None:
        from metalens import checkpoint

        case = self.case()
        run = case / "run"
        proc = fu.spawn(["train", *fu.SLOW, "--set", "train.checkpoint_every=5", "--set", "train.keep_checkpoints=0",
                         "--steps", self.M, "--out", run])
        fu.wait_for(lambda: (fu.latest_step(run) or 0) >= 5 and len(fu.log_steps(run)) > 5, 120, proc)
        time.sleep(self.rng.uniform(0, 0.3))
        snaps = {p.name: fu.snapshot(p) for p in checkpoint.complete(run)}
        gap = self.rng.choice([0.001, 0.003, 0.01, 0.03, 0.1, 0.3])
        os.kill(proc.pid, sig)
        time.sleep(gap)
        os.kill(proc.pid, sig)
        res = fu.finish(proc, 60)
        problems = []
        if res.code == -sig and res.lines and "after step" in res.lines[-1]:
            pass  # the second came after the graceful stop, while the process exited: killed by it, as asked
        elif res.code != 0:
            v = fu.verdict(res, code=128 + sig, match=sig.name)
            if v:
                problems.append(v)
        for name, snap in snaps.items():
            if fu.diff(snap, fu.snapshot(run / "checkpoints" / name)):
                problems.append(f"checkpoint {name} changed")
        try:
            checkpoint.load(checkpoint.latest(run))
        except Exception as e:  # noqa: BLE001
            problems.append(f"latest does not load: {short(e, 120)}")
        problem = "; ".join(problems) or self.finish_and_compare(run)
        self.record("signals: a second signal", f"{sig.name} twice, {gap * 1000:.0f} ms apart, during training "
                    f"(exit {res.code}: {short(' | '.join(res.lines), 90)})", problem, [], case)

    # =================================================================================================
    # 5. full and read-only disks
    # =================================================================================================

    DISK = ("--task", "sinusoid", "--learner", "pretrain", "--set", "train.checkpoint_every=1",
            "--set", "train.keep_checkpoints=0", "--set", "train.batch_tasks=4", "--set", "train.log_every=1",
            "--quiet")

    def after_disk_failure(self, res: fu.Result, run: Path, steps: int, allow_refusal: bool = True) -> list[str]:
        from metalens import checkpoint

        problems = []
        codes = (1, 2) if allow_refusal else (1,)
        v = fu.verdict(res, code=codes)
        if v:
            problems.append(v)
        if res.code == 2 and run.exists() and any(p.name != ".lock" for p in run.iterdir()) \
                and "config.json" not in res.err:
            problems.append(f"exit 2 but the run folder holds {sorted(p.name for p in run.iterdir())}")
        if fu.latest_step(run) is not None:
            try:
                checkpoint.load(checkpoint.latest(run))
            except Exception as e:  # noqa: BLE001
                problems.append(f"the previous checkpoint does not load: {short(e, 120)}")
        return problems

    def probe_disks(self) -> None:
        # injected: the Nth write of a checkpoint file or of `latest` fails
        targets = [("save_file", n) for n in (range(1, 7) if not self.quick else (1, 3, 5))]
        targets += [("write_text_atomic", n) for n in ((1, 2, 3) if not self.quick else (2,))]
        for target, nth in targets:
            for err in ((errno.ENOSPC, errno.EROFS, errno.EIO) if not self.quick else (errno.ENOSPC,)):
                case = self.case()
                run = case / "run"
                argv = ["train", *self.DISK, "--set", "learner.hidden=[8]", "--steps", "5", "--out", run]
                before = fu.snapshot(case)
                with fu.failing_writes(nth, err, target):
                    res, _ = cli(argv)
                problems = [] if res.code else ["the run did not stop on the failing write (exit 0)"]
                if res.code:
                    problems += self.after_disk_failure(res, run, 5, allow_refusal=False)
                    if os.strerror(err) not in res.err:
                        problems.append(f"stderr does not say {os.strerror(err)!r}")
                    if list(run.rglob("*.tmp")):
                        problems.append(f"temporary entries left: {[p.name for p in run.rglob('*.tmp')]}")
                res2, _ = cli(["train", "--resume", "--out", run, "--quiet"])
                v = fu.verdict(res2, code=0, lines=(0, 1))
                if v or fu.latest_step(run) != 5:
                    problems.append(f"resume once writable: {v or f'latest {fu.latest_step(run)}'}")
                after = fu.snapshot(case)
                self.record("disks: injected write errors", f"{errno.errorcode[err]} at call {nth} of "
                            f"checkpoint.{target}: {shown(argv, case)}", "; ".join(problems) or None,
                            self.outside_changes(before, after, "run"), case)
        # a real tmpfs that fills up
        sizes = ["8k", "24k", "48k", "96k", "160k", "256k"] if not self.quick else ["24k", "160k"]
        for size in sizes:
            case = self.case()
            mnt = case / "mnt"
            with fu.tmpfs(mnt, size) as disk:
                if disk is None:
                    self.notes.append("tmpfs probes skipped: this process cannot mount a tmpfs")
                    shutil.rmtree(case, ignore_errors=True)
                    break
                run = disk / "run"
                argv = ["train", *self.DISK, "--set", "learner.hidden=[40, 40]", "--steps", "30", "--out", run]
                res, _ = cli(argv, timeout=60)
                problems = [] if res.code else [f"a {size} disk did not fill (exit 0)"]
                if res.code:
                    problems += self.after_disk_failure(res, run, 30)
                    if list(run.rglob("*.tmp")):
                        problems.append(f"temporary entries left: {[str(p.relative_to(run)) for p in run.rglob('*.tmp')]}")
                reached = fu.latest_step(run)
                fu.resize_tmpfs(disk, "50m")
                if res.code == 2 and not (run / "config.json").exists():
                    res2, _ = cli(argv, timeout=60)  # refused before the run existed: start it again
                else:
                    res2, _ = cli(["train", "--resume", "--out", run, "--quiet"], timeout=60)
                v = fu.verdict(res2, code=0, lines=(0, 1))
                if v or fu.latest_step(run) != 30:
                    problems.append(f"once space is back: {v or f'latest {fu.latest_step(run)}'}")
                steps = fu.log_steps(run)
                if len(steps) != len(set(steps)):
                    problems.append(f"duplicate steps in the log: {steps}")
                self.record("disks: a tmpfs that fills", f"{shown(argv, case)} on a {size} tmpfs (stopped at "
                            f"{reached}; exit {res.code}: {short(' | '.join(res.lines), 100)})",
                            "; ".join(problems) or None, [], case)
        # a read-only --out
        case = self.case()
        ro = case / "ro"
        ro.mkdir()
        with fu.read_only(ro) as ok:
            if ok:
                for out in (ro / "run", ro, ro / "a" / "b"):
                    before = fu.snapshot(case)
                    res, _ = cli(["train", *fu.TINY, "--out", out])
                    v = fu.verdict(res, code=2)
                    changed = fu.diff(before, fu.snapshot(case))
                    self.record("disks: read-only --out", shown(["train", "...", "--out", out], case),
                                v or (f"changed {changed}" if changed else None), [], None)
            else:
                self.notes.append("read-only --out probes skipped: no read-only bind mount")
        shutil.rmtree(case, ignore_errors=True)

    # =================================================================================================
    # 6. malicious data
    # =================================================================================================

    def probe_data(self) -> None:
        extra = [
            fu.BadData("zip with a backslash ..\\ member", lambda d: fu.write_zip(
                d / "bad.zip", [*fu.good_layout(), ("top\\..\\..\\evil.png", fu.png_bytes())]), "evil.png"),
            fu.BadData("zip with a drive-letter member", lambda d: fu.write_zip(
                d / "bad.zip", [*fu.good_layout(), ("C:/evil.png", fu.png_bytes())]), "evil.png"),
            fu.BadData("folder with a FIFO as an image", fifo_image, "pipe.png"),
            fu.BadData("folder with a PNG declaring 60000x60000 pixels", lambda d: fu.write_folder(
                d / "data", [*fu.good_layout(), ("top/g0/c0/huge.png", fu._png_huge_header())]), "huge.png"),
            fu.BadData("folder with a 70 MB .png", lambda d: fu.write_folder(
                d / "data", [*fu.good_layout(), ("top/g0/c0/big.png", b"\0" * (70 << 20))]), "big.png"),
            fu.BadData("task.root a FIFO", lambda d: (os.mkfifo(d / "root.zip"), d / "root.zip")[1], "root.zip"),
            fu.BadData("task.root /dev/zero", lambda d: Path("/dev/zero"), "/dev/zero"),
            fu.BadData("task.sources naming ../", lambda d: fu.write_folder(d / "data", fu.good_layout()), "..",
                       ("--set", "task.sources=../../etc")),
            fu.BadData("task.size=0", lambda d: fu.write_folder(d / "data", fu.good_layout()), "task.size",
                       ("--set", "task.size=0")),
            fu.BadData("task.shots=10 with 4 images a class", lambda d: fu.write_folder(d / "data", fu.good_layout()),
                       "shots", ("--set", "task.shots=10")),
        ]
        for bad in [*fu.BAD_DATA, *extra]:
            for cmd in ("train", "eval"):
                if cmd == "eval" and (bad.options or self.quick and bad not in fu.BAD_DATA[:6]):
                    continue
                case = self.case()
                root = bad.make(case)
                if cmd == "train":
                    argv, inside = fu.images_argv(root, case / "out", *bad.options), "out"
                else:
                    run = case / "run"
                    shutil.copytree(self.base["images"], run, symlinks=True)
                    argv, inside = ["eval", run, "--episodes", "4", "--set", f"task.root={root}"], "run"
                before = fu.snapshot(case)
                res, timed_out = cli(argv, timeout=10)
                after = fu.snapshot(case)
                problem = "still running after 10 s" if timed_out else fu.verdict(res, code=2, match=bad.match)
                changed = fu.diff(before, after)
                if changed:
                    problem = (problem + "; " if problem else "") + f"changed {changed[:4]}"
                if Path("/tmp/evil.png").exists() or (case.parent / "evil.png").exists():
                    problem = (problem or "") + "; an archive member was written outside"
                self.record(f"data: {cmd}", f"{bad.name}: {shown(argv, case)}", problem,
                            self.outside_changes(before, after, inside), case)
        if fu.OMNIGLOT.is_dir():
            for ways, split in ((60, "test"), (30, "test"), (3, None)):
                case = self.case()
                argv = ["train", "--task", "images", "--learner", "protonet", "--steps", "2", "--out", case / "out",
                        "--quiet", "--set", "train.batch_tasks=2", *fu.OMNIGLOT_SPLIT, "--set", f"task.ways={ways}"]
                before = fu.snapshot(case)
                res, _ = cli(argv, timeout=120)
                after = fu.snapshot(case)
                if split:
                    problem = fu.verdict(res, code=2, match=[f"{split} split has", f"ways = {ways}"])
                    if fu.diff(before, after):
                        problem = (problem or "") + f"; changed {fu.diff(before, after)[:4]}"
                else:
                    problem = fu.verdict(res, code=0, lines=0)
                self.record("data: the shipped Omniglot", shown(argv, case), problem,
                            self.outside_changes(before, after, "out"), case)

    # =================================================================================================
    # 7. numerical faults
    # =================================================================================================

    def probe_numerical(self) -> None:
        from metalens import checkpoint

        runs = [("metasgd", ["train.lr=10", "learner.inner_lr=2"]), ("metasgd", ["train.lr=1e4", "learner.inner_lr=10"]),
                ("maml", ["train.lr=1e6", "learner.inner_lr=5"]), ("pretrain", ["train.lr=1e30"]),
                ("pretrain", ["train.lr=1e30", "train.optimizer=sgd"]), ("anil", ["train.lr=1e8", "learner.inner_lr=50"])]
        for learner, sets in runs[:3] if self.quick else runs:
            case = self.case()
            run = case / "run"
            argv = ["train", "--task", "sinusoid", "--learner", learner, "--steps", "30", "--set",
                    "train.checkpoint_every=1", "--set", "train.batch_tasks=4", "--set", "learner.hidden=[8]",
                    *[w for s in sets for w in ("--set", s)], "--out", run, "--quiet"]
            res, _ = cli(argv, timeout=60)
            problems = []
            if res.code == 0:
                what = "did not diverge (exit 0)"
            else:
                what = f"exit {res.code}"
                v = fu.verdict(res, code=1, match="non-finite")
                if v:
                    problems.append(v)
                if fu.latest_step(run) is not None:
                    try:
                        ck = checkpoint.load(checkpoint.latest(run))
                        if checkpoint.non_finite(ck.model):
                            problems.append("the last checkpoint holds non-finite weights")
                    except Exception as e:  # noqa: BLE001
                        problems.append(f"the last checkpoint does not load: {short(e, 100)}")
                    before = fu.snapshot(run)
                    ev, _ = cli(["eval", run, "--episodes", "4"], timeout=60)
                    v = fu.verdict(ev, code=(0, 1), lines=0 if ev.code == 0 else 1)
                    if v:
                        problems.append(f"eval of the last good checkpoint: {v}")
                    elif ev.code == 1:
                        what += f"; eval of its last checkpoint: {short(ev.err, 90)}"
                    if fu.diff(before, fu.snapshot(run)):
                        problems.append("eval changed the run folder")
            self.record("numerical: divergence", f"{shown(argv, case)} ({what})", "; ".join(problems) or None, [],
                        case)
        evals = [("maml", "learner.inner_lr=1e3"), ("maml", "learner.inner_lr=1e30"), ("maml", "learner.eval_inner_steps=10000"),
                 ("pretrain", "learner.finetune_lr=1e30"), ("pretrain", "learner.finetune_steps=0")]
        for which, item in evals[:3] if self.quick else evals:
            case = self.case()
            run = self.copy(case, which)
            before = fu.snapshot(case)
            argv = ["eval", run, "--episodes", "4", "--set", item]
            res, timed_out = cli(argv, timeout=30)
            problem = None if timed_out else fu.verdict(res, code=(0, 1), lines=0 if res.code == 0 else 1)
            if timed_out:
                self.notes.append(f"still evaluating after 30 s (stopped): {shown(argv, case)}")
            self.record("numerical: evaluation", shown(argv, case), problem,
                        self.outside_changes(before, fu.snapshot(case), "run"), case)
        for name, fn in (("NaN", fu._nan_weights), ("inf", inf_weights)):
            case = self.case()
            run = self.copy(case)
            for s in (2, 4):
                fu._tensors(run, fn, step=s)
            before = fu.snapshot(case)
            for argv, code in ((["eval", run, "--episodes", "4"], 1),
                               (["train", "--resume", "--out", run, "--steps", "6", "--quiet"], 1)):
                res, _ = cli(argv)
                problem = fu.verdict(res, code=code, match="non-finite")
                changed = fu.diff(before, fu.snapshot(case))
                self.record("numerical: non-finite weights", f"{shown(argv, case)} ({name} in every checkpoint)",
                            problem or (f"changed {changed[:4]}" if changed else None), [], case, keep=True)
            shutil.rmtree(case, ignore_errors=True)

    # =================================================================================================

    def finish(self) -> None:
        if fu.diff(self.sentinel_snap, fu.snapshot(self.sentinel)):
            self.outside += 1
            self.causes.append("a write outside the command's folder")
            self.failures.append(f"[global] the sweep's sentinel folder changed: "
                                 f"{fu.diff(self.sentinel_snap, fu.snapshot(self.sentinel))[:4]}")
        if sorted(os.listdir(self.root)) != self.root_listing:
            self.outside += 1
            self.causes.append("a write outside the command's folder")
            self.failures.append(f"[global] the sweep's root listing changed: {sorted(os.listdir(self.root))}")
        if os.listdir(self.cwd):
            self.outside += 1
            self.causes.append("a write outside the command's folder")
            self.failures.append(f"[global] files were written into the working folder: {os.listdir(self.cwd)}")

    def report(self, seconds: float) -> str:
        lines = ["| class of probe | probes tried | handled cleanly | failing |", "|---|---:|---:|---:|"]
        total = [0, 0]
        for cls, (n, ok) in self.rows.items():
            lines.append(f"| {cls} | {n} | {ok} | {n - ok} |")
            total[0] += n
            total[1] += ok
        lines.append(f"| **all** | **{total[0]}** | **{total[1]}** | **{total[0] - total[1]}** |")
        lines += ["", f"concurrent starts refused: {self.concurrent[1]} of {self.concurrent[0]}",
                  f"kills resumed bit for bit: {self.killed[1]} of {self.killed[0]}",
                  f"writes outside a run folder: {self.outside} (must be 0)",
                  f"({seconds / 60:.1f} minutes{', --quick' if self.quick else ''})"]
        if self.failures:
            causes: dict[str, int] = {}
            for label in self.causes:
                causes[label] = causes.get(label, 0) + 1
            lines += ["", "Failing probes by cause:", ""]
            lines += [f"- {n} x {label}" for label, n in sorted(causes.items(), key=lambda kv: -kv[1])]
            lines += ["", f"Failing probes ({len(self.failures)}):", ""]
            lines += [f"- {f}" for f in self.failures]
        if self.notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {n}" for n in dict.fromkeys(self.notes)]
        return "\n".join(lines)


CAUSES = [  # (label, a substring of the failing probe's line); the first that matches names the cause
    ("a damaged newest checkpoint is skipped: exit 0, continuing from step_00000002 (resume overwrites it)",
     "fell back past the damaged newest checkpoint"),
    ("a refused resume rewrote config.json", "changed ['changed run/config.json']"),
    ("a refused resume printed the latest-recovery note too (2 lines) and rewrote latest", "2 lines on stderr"),
    ("non-finite weights on resume: exit 2 instead of 1", "holds non-finite weights"),
    ("a second train into a folder in use says 'holds a run; pass --resume', not 'in use' with the pid",
     "holds a run; pass --resume"),
    ("an inner loop diverging in meta-training: 'internal error: ValueError: Expected parameter loc ... Normal'",
     "Expected parameter loc"),
    ("an integer option beyond int64: 'internal error' (Overflow ...) at the first step", "Overflow"),
    ("an option too large for memory: 'internal error' (can't allocate memory)", "allocate memory"),
    ("another 'internal error' (exit 1)", "internal error"),
    ("reading a FIFO or a device does not return", "still running after"),
    ("Ctrl-C during start-up (imports) prints a KeyboardInterrupt traceback", "a traceback"),
    ("checkpoints/latest a folder: exit 1 'Is a directory'", "Is a directory"),
    ("checkpoints a regular file: the resume restarts from step 0, then exit 1", "File exists"),
    ("eval follows the symbolic link 'checkpoints'", "checkpoints a symlink to a folder outside"),
    ("an optimizer.safetensors without tensors resumes with fresh Adam moments", "optimizer.safetensors without"),
    ("a 300-character --out: exit 1 'File name too long'", "File name too long"),
]


def flip(path: Path, k: int, seed: int) -> None:
    raw = bytearray(path.read_bytes())
    if not raw:
        raw = bytearray(b"\0")
    rng = random.Random(seed)
    for _ in range(k):
        i = rng.randrange(len(raw))
        raw[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(raw))


def inf_weights(t: dict) -> dict:
    out = {k: v.clone() for k, v in t.items()}
    out[max(out)].view(-1)[0] = float("inf")
    return out


def hardlink_out(run: Path) -> None:
    f = fu.ckpt(run) / "model.safetensors"
    target = run.parent / "outside.safetensors"
    shutil.copy(f, target)
    f.unlink()
    os.link(target, f)


def big_header(run: Path) -> None:
    import struct

    f = fu.ckpt(run) / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[:8] = struct.pack("<Q", 100 << 20)
    f.write_bytes(bytes(raw))


def fifo_image(d: Path) -> Path:
    root = fu.write_folder(d / "data", fu.good_layout())
    os.mkfifo(root / "top" / "g0" / "c0" / "pipe.png")
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer probes and trials (about 3.5 minutes)")
    ap.add_argument("--out", type=Path, help="folder for the probes' folders and report.md (default: a temporary "
                                             "folder, removed at the end)")
    ap.add_argument("--kills", type=int, default=None, help="random SIGKILLs (default 10; --quick 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random choices (kill moments, flipped bytes)")
    ap.add_argument("--only", nargs="*", default=None,
                    choices=["options", "damage", "concurrency", "kills", "signals", "disks", "data", "numerical"],
                    help="run only these classes")
    args = ap.parse_args(argv)
    # a probe's huge allocation must fail, not push the machine into swap or the OOM killer
    limit = 8 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.pop("METALENS_DEBUG", None)
    os.environ.pop("METALENS_THREADS", None)
    keep = args.out is not None
    root = args.out.resolve() if keep else Path(tempfile.mkdtemp(prefix="fault-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(root / "sweep", args.quick, args.seed, args.kills if args.kills is not None else (3 if args.quick else 10))
    old_cwd = os.getcwd()
    os.chdir(sweep.cwd)  # a command that writes into its working folder by default shows up here
    t0 = time.perf_counter()
    try:
        sweep.build_bases()
        steps = [("options", sweep.probe_options), ("damage", sweep.probe_damage),
                 ("concurrency", sweep.probe_concurrency), ("kills", sweep.probe_kills),
                 ("signals", sweep.probe_signals), ("disks", sweep.probe_disks), ("data", sweep.probe_data),
                 ("numerical", sweep.probe_numerical)]
        for name, fn in steps:
            if args.only is not None and name not in args.only:
                continue
            t = time.perf_counter()
            fn()
            print(f"[{name}: {time.perf_counter() - t:.0f}s]", file=sys.stderr, flush=True)
        sweep.finish()
    finally:
        os.chdir(old_cwd)
    text = sweep.report(time.perf_counter() - t0)
    print(text)
    if keep:
        (root / "report.md").write_text(text + "\n")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
