"""The Python API behind the CLI: build by name, train into a run folder, load it back.

A run folder holds::

    config.json      the resolved configuration (task, learner, train), enough to repeat the run
    log.jsonl        one JSON object per logged training step
    checkpoints/     atomic safetensors + JSON checkpoints (see metalens.checkpoint)

>>> import metalens
>>> family = metalens.make_task("sinusoid", shots=5)
>>> learner = metalens.make_learner("oracle", family)
>>> learner.predict(*(lambda e: (e.support_x, e.support_y, e.query_x))(family.eval_episodes(0, 2))).mean.shape
torch.Size([2, 10, 1])
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from metalens import __version__, checkpoint, distributed, errors, runfolder
from metalens.config import ConfigError, from_dict, to_dict
from metalens.episode import TaskSpec
from metalens.errors import CheckpointError, MetalensError, NumericalError, RunFolderBusy, RunFolderError, excerpt
from metalens.evaluate import Evaluation, evaluate
from metalens.files import write_json_atomic
from metalens.learners.base import Learner
from metalens.registry import LEARNERS, TASKS
from metalens.rng import seeded_init
from metalens.tasks.base import TaskFamily
from metalens.train import TrainConfig, TrainResult, check_optimizer_state, make_optimizer, train

__all__ = ["RunConfig", "Run", "RunFolderError", "make_task", "make_learner", "start_run", "load_run",
           "family_train_defaults", "ensure_trained", "open_run", "resume_config", "check_resumable", "check_fits"]


def family_train_defaults(task: str, task_config: Any) -> dict[str, Any]:
    """The trainer options family ``task`` proposes for its options ``task_config``
    (:meth:`metalens.tasks.base.TaskFamily.train_defaults`)."""
    return dict(TASKS[task].cls.train_defaults(task_config))


def make_task(name: str, **options: Any) -> TaskFamily:
    """Build the task family ``name`` with ``options`` (its ``Config`` fields)."""
    entry = TASKS[name]
    return entry.cls(from_dict(entry.cls.Config, options, prefix="task.", where=f"task {name!r}"))


def make_learner(name: str, task: TaskFamily | TaskSpec, *, seed: int = 0, **options: Any) -> Learner:
    """Build learner ``name`` for a task family (or its spec); initial weights depend on ``seed`` only."""
    entry = LEARNERS[name]
    return _build_learner(name, task.spec if isinstance(task, TaskFamily) else task,
                          from_dict(entry.cls.Config, options, prefix="learner.", where=f"learner {name!r}"), seed)


def _build_learner(name: str, spec: TaskSpec, config: Any, seed: int) -> Learner:
    with seeded_init(seed):
        try:
            return LEARNERS[name].cls(spec, config)
        except ConfigError:
            raise
        except ValueError as e:  # an option that does not fit the family (e.g. conv4 on vector inputs)
            raise ConfigError(f"learner {name!r}: {e}") from None


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run, typed: the family's and the learner's options and the trainer's.

    Built once from untrusted dicts by :meth:`resolve` (or :meth:`from_json`), serialised only at
    the edges (``config.json``, the command line) by :meth:`to_json`.
    """

    task: str
    learner: str
    task_config: Any  # an instance of TASKS[task].cls.Config
    learner_config: Any  # an instance of LEARNERS[learner].cls.Config
    train: TrainConfig

    @classmethod
    def resolve(cls, task: str, learner: str, task_options: dict[str, Any] | None = None,
                learner_options: dict[str, Any] | None = None,
                train_options: dict[str, Any] | None = None) -> RunConfig:
        """Validate names and options and fill in every default.

        A trainer option the given ``train_options`` leave out takes the value the family proposes for its
        options (:func:`family_train_defaults`, e.g. one task per step on image families), else the trainer's
        default; one that is given always wins.
        """
        t_cls, l_cls = TASKS[task].cls.Config, LEARNERS[learner].cls.Config
        task_config = from_dict(t_cls, task_options, prefix="task.", where=f"task {task!r}")
        train: Any = train_options  # not a table: from_dict says so
        if train_options is None or isinstance(train_options, dict):
            train = {**family_train_defaults(task, task_config), **(train_options or {})}
        return cls(task, learner, task_config,
                   from_dict(l_cls, learner_options, prefix="learner.", where=f"learner {learner!r}"),
                   from_dict(TrainConfig, train, prefix="train.", where="train"))

    @property
    def task_options(self) -> dict[str, Any]:
        """The family's options as a JSON-ready dict."""
        return to_dict(self.task_config)

    @property
    def learner_options(self) -> dict[str, Any]:
        """The learner's options as a JSON-ready dict."""
        return to_dict(self.learner_config)

    def updated(self, *, task: dict[str, Any] | None = None, learner: dict[str, Any] | None = None,
                train: dict[str, Any] | None = None) -> RunConfig:
        """This configuration with some options changed (each dict: option -> new value), validated again."""
        return self.resolve(self.task, self.learner, {**self.task_options, **(task or {})},
                            {**self.learner_options, **(learner or {})}, {**to_dict(self.train), **(train or {})})

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must have been trained as: the family and the learner with their options (the
        trainer's options may change on resume). Saved in every checkpoint's ``state.json``."""
        return {"task": {"name": self.task, **self.task_options}, "learner": {"name": self.learner,
                                                                               **self.learner_options}}

    def to_json(self) -> dict[str, Any]:
        return {"metalens": __version__,
                "task": {"name": self.task, **self.task_options},
                "learner": {"name": self.learner, **self.learner_options},
                "train": to_dict(self.train)}

    @classmethod
    def from_json(cls, data: Any) -> RunConfig:
        """The configuration saved in a ``config.json`` (refused with a :class:`ConfigError` if malformed)."""
        if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("task", "learner", "train")):
            raise ConfigError("config.json must hold the tables task, learner and train")
        t, l_, tr = dict(data["task"]), dict(data["learner"]), dict(data["train"])
        task, learner = t.pop("name", None), l_.pop("name", None)
        if not isinstance(task, str) or not isinstance(learner, str):
            raise ConfigError("config.json must name the task family (task.name) and the learner (learner.name)")
        return cls.resolve(task, learner, t, l_, tr)

    def build(self) -> tuple[TaskFamily, Learner]:
        """The family and the learner (initial weights from ``train.seed``)."""
        family = TASKS[self.task].cls(self.task_config)
        return family, _build_learner(self.learner, family.spec, self.learner_config, self.train.seed)


@dataclass
class Run:
    """A configured run: its family, its learner and (optionally) its folder."""

    config: RunConfig
    family: TaskFamily
    learner: Learner
    path: Path | None = None
    step: int = 0

    def train(self, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
        """Meta-train into the run folder (``resume``: from its newest checkpoint)."""
        res = train(self.learner, self.family, self.config.train, run_dir=self.path, resume=resume,
                    progress=progress, extra_state={"run": self.config.identity()})
        self.step = res.step
        return res

    def evaluate(self, **kwargs: Any) -> Evaluation:
        """:func:`metalens.evaluate.evaluate` of this run's learner on its family."""
        return evaluate(self.learner, self.family, **kwargs)


def _read_config(path: Path) -> RunConfig:
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise RunFolderError(f"{path} is not a metalens run folder (no such folder)")
    try:
        raw = checkpoint.read_small(cfg_file, what="the run configuration")
    except FileNotFoundError:
        raise RunFolderError(f"{path} is not a metalens run folder (no config.json)") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RunFolderError(f"{cfg_file} is not valid JSON (it starts {excerpt(raw, 30)})") from None
    try:
        return RunConfig.from_json(data)
    except ConfigError as e:
        raise RunFolderError(f"{cfg_file}: {e}") from None


def resume_config(path: str | Path, *, task: str | None = None, learner: str | None = None,
                  task_options: dict[str, Any] | None = None, learner_options: dict[str, Any] | None = None,
                  train_options: dict[str, Any] | None = None) -> RunConfig:
    """The configuration the run in ``path`` continues with: the saved one, with the options given changed.

    :func:`start_run` (``resume=True``) then refuses changes other than those a resumed run may make.
    """
    saved = _read_config(Path(path))
    for what, given, have in (("task family", task, saved.task), ("learner", learner, saved.learner)):
        if given is not None and given != have:
            raise RunFolderError(f"{path} holds a run of {what} {have!r}, not {given!r}; a run continues as it "
                                 "was configured: choose another --out folder for a new run")
    return saved.updated(task=task_options, learner=learner_options, train=train_options)


def start_run(config: RunConfig, out: str | Path | None, *, resume: bool = False) -> Run:
    """Prepare a run (and its folder) without training it yet.

    A new run refuses a folder that is not empty. ``resume=True`` needs the folder to hold a
    sound run (see :func:`check_resumable`) with the same configuration: only ``train.steps``
    (never below the step reached), ``train.device`` and ``train.compile`` may change, and the
    learning-rate schedule while every step the saved run was configured for keeps its rate (a
    constant run may go on with a decay that starts at or after its saved ``train.steps``). The
    family and learner are built, and every check made, before the folder is touched, so a refused
    command leaves no trace. The folder's lock is held while it is prepared (and by the trainer).
    """
    path = Path(out) if out is not None else None
    w = distributed.world()
    # build first: an option that only the learner or family can refuse (e.g. a backbone that does not
    # fit the family's inputs) must fail before the folder is touched
    family, learner = config.build()
    _draw_first_episode(config, family)
    error = None
    if path is not None and w.is_writer:
        try:
            _precheck(path, resume)
            with runfolder.lock(path):
                _prepare_folder(config, learner, path, resume)
        except MetalensError as e:
            if w.size == 1:
                raise
            error = (type(e).__name__, str(e))
    if w.size > 1:  # rank 0 checked the folder; every rank learns the verdict
        verdict = [error]
        torch.distributed.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error is not None:
        kind = getattr(errors, error[0], RunFolderError)
        raise kind(error[1]) if issubclass(kind, MetalensError) and kind is not errors.Interrupted \
            else RunFolderError(error[1])
    return Run(config, family, learner, path)


def _draw_first_episode(config: RunConfig, family: TaskFamily) -> None:
    """Draw step 0's training episode before anything is written: options whose tasks cannot fit in this
    machine's memory are refused as bad input, not discovered at the first step."""
    try:
        family.episode(config.train.seed, 0, config.train.batch_tasks)
    except MemoryError:
        raise ConfigError(f"one training episode ({config.train.batch_tasks} tasks of {config.task!r} as "
                          "configured) does not fit in this machine's memory; lower train.batch_tasks or the "
                          "task's sizes") from None
    except RuntimeError as e:
        if "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        raise ConfigError(f"one training episode ({config.train.batch_tasks} tasks of {config.task!r} as "
                          f"configured) cannot be allocated ({errors.reason(e)}); lower train.batch_tasks or the "
                          "task's sizes") from None


def _precheck(path: Path, resume: bool) -> None:
    """What can be refused before the folder is locked (so that a refused command writes nothing in it)."""
    try:
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a run folder; choose another --out folder")
        holder = runfolder.holder(path)
        if holder is not None:
            raise RunFolderBusy(f"{path} is in use by another metalens process ({holder}); wait for it to "
                                "finish, or choose another --out folder")
        if resume:
            if not (path / "config.json").exists():
                raise RunFolderError(f"{path} is not a metalens run folder (no config.json); nothing to resume")
        elif path.is_dir() and any(p.name != runfolder.LOCK_NAME for p in path.iterdir()):
            what = "holds a run" if (path / "config.json").exists() else "is not empty"
            hint = "pass --resume to continue it, or " if what == "holds a run" else ""
            raise RunFolderError(f"{path} {what}; {hint}choose another --out folder")
    except OSError as e:  # a name too long, a parent that is a file, no permission
        raise RunFolderError(f"cannot use {path} as a run folder: {e.strerror or e}") from None


@contextlib.contextmanager
def open_run(config: RunConfig, out: str | Path, *, resume: bool = False) -> Iterator[Run]:
    """:func:`start_run` with the folder's lock held for the whole ``with`` block (what a command that trains
    does: one writer per run folder, from the first check to the last checkpoint)."""
    path = Path(out)
    if not distributed.world().is_writer:
        yield start_run(config, path, resume=resume)
        return
    _precheck(path, resume)
    with runfolder.lock(path):
        yield start_run(config, path, resume=resume)


def _prepare_folder(config: RunConfig, learner: Learner, path: Path, resume: bool) -> None:
    """Check that ``path`` (locked by the caller) may hold this run, and write its ``config.json``."""
    if not resume:
        others = [p.name for p in path.iterdir() if p.name != runfolder.LOCK_NAME]
        if others:
            what = "holds a run" if "config.json" in others else "is not empty"
            hint = "pass --resume to continue it, or " if what == "holds a run" else ""
            raise RunFolderError(f"{path} {what}; {hint}choose another --out folder")
        _write_config(path, config)
        return
    saved, reached = check_resumable(path, learner, config)
    new = config.train
    free = {"device": new.device, "compile": new.compile}
    # steps and the schedule may change while every step the saved run was configured for keeps its lr
    if saved.train.constant_through(saved.train.steps) and new.constant_through(saved.train.steps):
        free.update(steps=new.steps, lr_schedule=new.lr_schedule, lr_decay_start=new.lr_decay_start)
    if replace(saved.train, **free) != new or saved.identity() != config.identity():
        may = ("train.steps, train.device and train.compile, and a constant learning rate may turn into a decay "
               "that starts at or after the saved train.steps" if "steps" in free else
               "train.device and train.compile (its learning rate decays over its configured train.steps, so they "
               "stay)")
        raise RunFolderError(f"{path} holds a run with a different configuration; a run continues as it was "
                             f"configured (only {may} may change): choose another --out folder for a new run")
    if new.steps < reached:
        raise RunFolderError(f"the run in {path} has reached step {reached}; train.steps = {new.steps} would "
                             f"go back: give --steps {reached} or more")
    if saved != config:
        _write_config(path, config)


def _write_config(path: Path, config: RunConfig) -> None:
    try:
        write_json_atomic(path / "config.json", config.to_json())
    except OSError as e:
        raise RunFolderError(f"cannot write {path / 'config.json'}: {e.strerror or e}") from None


def check_resumable(path: Path, learner: Learner, config: RunConfig | None = None) -> tuple[RunConfig, int]:
    """Everything a resume needs, checked before anything in the folder changes; returns the saved config
    and the step reached.

    No symbolic link inside the folder; a sound ``config.json``, ``checkpoints`` folder and ``log.jsonl``;
    the checkpoint to continue from (see :func:`metalens.checkpoint.recover_latest`) fits ``learner``
    (names, shapes, dtypes), holds finite numbers, was trained with this ``config.json``, and its
    optimiser state fits the optimiser ``config`` (default: the saved one) makes. Temporary entries left
    by a crash are removed; nothing else changes.
    """
    runfolder.check_no_links(path)
    for name, kind in (("checkpoints", "a folder"), ("log.jsonl", "a file")):
        p = path / name
        if p.exists() and (p.is_dir() if kind == "a file" else not p.is_dir()):
            raise RunFolderError(f"{p} is not {kind} as a run folder's {name} is; move it away")
    checkpoint.remove_leftovers(path)
    saved = _read_config(path)
    found, _ = checkpoint.recover_latest(path, rewrite=False)  # the trainer recovers, and says so
    if found is None:
        return saved, 0
    ckpt = checkpoint.load(found)
    check_fits(ckpt, learner, saved, path)
    if learner.trainable:
        check_optimizer_state(make_optimizer(learner, (config or saved).train), ckpt)
    return saved, ckpt.step


def check_fits(ckpt: checkpoint.Checkpoint, learner: Learner, config: RunConfig, path: Path,
               changed: list[str] | None = None) -> None:
    """Refuse a checkpoint that was not trained as ``config`` says or does not fit ``learner``."""
    trained = ckpt.state.get("run")
    if trained is not None and _normalised(trained) != config.identity():
        t = trained if isinstance(trained, dict) else {}
        names = [excerpt(str((t.get(k) if isinstance(t.get(k), dict) else {}).get("name"))) for k in ("learner", "task")]
        was = f"learner {names[0]} on {names[1]}"
        raise CheckpointError(f"{path / 'config.json'} does not match the checkpoint {ckpt.path.name}, which was "
                              f"trained as {was} with other options; restore the run's config.json")
    problems = checkpoint.mismatches(ckpt.model, learner.state_dict())
    if problems:
        because = (f"; the options {', '.join(changed)} change the parameters' shapes and cannot be changed at "
                   "evaluation") if changed else ""
        raise CheckpointError(f"the checkpoint {ckpt.path} does not fit the learner {config.learner!r} as "
                              f"configured ({'; '.join(problems)[:200]}){because}")
    bad = checkpoint.non_finite(ckpt.model)
    if bad:
        raise NumericalError(f"the checkpoint {ckpt.path} holds non-finite weights ({', '.join(bad[:3])}); the run "
                             "diverged before it was written: use an earlier checkpoint or train again")


def _normalised(identity: Any) -> dict[str, Any] | None:
    """A checkpoint's training identity with every option this metalens knows filled in (options added since
    it was written take their defaults, which leave the algorithm as it was); None if it does not resolve."""
    try:
        t, l_ = dict(identity["task"]), dict(identity["learner"])
        return RunConfig.resolve(t.pop("name"), l_.pop("name"), t, l_, {}).identity()
    except (ConfigError, KeyError, TypeError, AttributeError, ValueError):
        return None


def _warn(text: str) -> None:
    print(f"metalens: note: {text}", file=sys.stderr)


def ensure_trained(config: RunConfig, out: str | Path, *, progress: bool | None = None) -> Run:
    """Train ``config`` into folder ``out``, or finish / reuse the run already there.

    A folder holding the same configuration is resumed (a finished run is reused
    as it is); one holding a different run is refused, as by :func:`start_run`.
    """
    out = Path(out)
    resume = (out / "config.json").exists()
    with open_run(config, out, resume=resume) as run:
        run.train(resume=resume, progress=progress)
    return run


def train_worker(cfg: RunConfig, out: str | None, resume: bool, progress: bool | None) -> None:
    """One process of a multi-process run (the target of :func:`metalens.distributed.launch`)."""
    family, learner = cfg.build()
    train(learner, family, cfg.train, run_dir=out, resume=resume, progress=progress,
          extra_state={"run": cfg.identity()})


def load_run(path: str | Path, *, task_options: dict[str, Any] | None = None,
             learner_options: dict[str, Any] | None = None) -> Run:
    """Load a trained run from its folder, at its newest checkpoint (read only: nothing is written).

    ``task_options`` / ``learner_options`` change evaluation-time settings (e.g.
    shots, adaptation steps) without touching the trained parameters; an option
    that would change the parameters' shapes is refused.
    """
    path = Path(path)
    saved = _read_config(path)
    if (path / "checkpoints").is_symlink():  # every file read below refuses a link itself
        raise RunFolderError(f"{path / 'checkpoints'} is a symbolic link; a run folder holds only its own files "
                             "(remove the link)")
    cfg = saved.updated(task=task_options, learner=learner_options)
    family, learner = cfg.build()
    found, note = checkpoint.recover_latest(path, rewrite=False)
    if found is None:
        raise CheckpointError(f"{path} has no checkpoint yet; train it first (metalens train --resume --out {path})")
    if note:
        _warn(note)
    ckpt = checkpoint.load(found)
    check_fits(ckpt, learner, saved, path, changed=sorted(set(learner_options or {}) | set(task_options or {})))
    learner.load_state_dict(ckpt.model)
    learner.eval()
    return Run(cfg, family, learner, path, step=ckpt.step)
