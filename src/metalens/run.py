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

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from metalens import __version__, checkpoint, distributed
from metalens.config import ConfigError, from_dict, to_dict
from metalens.errors import RunFolderError
from metalens.episode import TaskSpec
from metalens.evaluate import Evaluation, evaluate
from metalens.learners.base import Learner
from metalens.rng import seeded_init
from metalens.registry import LEARNERS, TASKS
from metalens.tasks.base import TaskFamily
from metalens.train import TrainConfig, TrainResult, train

__all__ = ["RunConfig", "Run", "RunFolderError", "make_task", "make_learner", "start_run", "load_run",
           "ensure_trained", "resume_config"]


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
        """Validate names and options and fill in every default."""
        t_cls, l_cls = TASKS[task].cls.Config, LEARNERS[learner].cls.Config
        return cls(task, learner,
                   from_dict(t_cls, task_options, prefix="task.", where=f"task {task!r}"),
                   from_dict(l_cls, learner_options, prefix="learner.", where=f"learner {learner!r}"),
                   from_dict(TrainConfig, train_options, prefix="train.", where="train"))

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
        res = train(self.learner, self.family, self.config.train, run_dir=self.path, resume=resume,
                    progress=progress)
        self.step = res.step
        return res

    def evaluate(self, **kwargs: Any) -> Evaluation:
        """:func:`metalens.evaluate.evaluate` of this run's learner on its family."""
        return evaluate(self.learner, self.family, **kwargs)


def _read_config(path: Path) -> RunConfig:
    cfg_file = path / "config.json"
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path} is not a metalens run folder (no config.json)") from None
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{cfg_file} is not valid JSON: {e}") from None
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

    A new run refuses a folder that is not empty. ``resume=True`` needs the folder
    to hold a run with the same configuration (only ``train.steps``, ``train.device`` and
    ``train.compile`` may change, and the learning-rate schedule while every step the saved
    run was configured for keeps its rate: a constant run may go on with a decay that starts
    at or after its saved ``train.steps``). The family and learner are built before the folder is
    touched, so options they refuse leave no trace.
    """
    path = Path(out) if out is not None else None
    w = distributed.world()
    # build first: an option that only the learner or family can refuse (e.g. a backbone that does not
    # fit the family's inputs) must fail before the folder is touched
    family, learner = config.build()
    error = None
    if path is not None and w.is_writer:
        try:
            _prepare_folder(config, path, resume)
        except RunFolderError as e:
            error = str(e)
    if w.size > 1:  # rank 0 checked the folder; every rank learns the verdict
        verdict = [error]
        torch.distributed.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error is not None:
        raise RunFolderError(error)
    return Run(config, family, learner, path)


def _prepare_folder(config: RunConfig, path: Path, resume: bool) -> None:
    """Check that ``path`` may hold this run, and write its ``config.json``."""
    if resume:
        saved = _read_config(path)
        new = config.train
        free = {"device": new.device, "compile": new.compile}
        # steps and the schedule may change while every step the saved run was configured for keeps its lr
        if saved.train.constant_through(saved.train.steps) and new.constant_through(saved.train.steps):
            free.update(steps=new.steps, lr_schedule=new.lr_schedule, lr_decay_start=new.lr_decay_start)
        if replace(saved.train, **free) != new or (
                saved.task, saved.learner, saved.task_config, saved.learner_config) != (
                config.task, config.learner, config.task_config, config.learner_config):
            raise RunFolderError(
                f"{path} holds a run with a different configuration; a run continues as it was configured "
                "(only train.steps, train.device and train.compile may change, and a constant learning rate "
                "may turn into a decay that starts at or after the saved train.steps): choose another --out "
                "folder for a new run")
    elif path.exists() and any(path.iterdir()):
        what = "holds a run" if (path / "config.json").exists() else "is not empty"
        hint = "pass --resume to continue it, or " if what == "holds a run" else ""
        raise RunFolderError(f"{path} {what}; {hint}choose another --out folder")
    path.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json_atomic(path / "config.json", config.to_json())


def ensure_trained(config: RunConfig, out: str | Path, *, progress: bool | None = None) -> Run:
    """Train ``config`` into folder ``out``, or finish / reuse the run already there.

    A folder holding the same configuration is resumed (a finished run is reused
    as it is); one holding a different run is refused, as by :func:`start_run`.
    """
    out = Path(out)
    resume = (out / "config.json").exists()
    run = start_run(config, out, resume=resume)
    run.train(resume=resume, progress=progress)
    return run


def train_worker(cfg: RunConfig, out: str | None, resume: bool, progress: bool | None) -> None:
    """One process of a multi-process run (the target of :func:`metalens.distributed.launch`)."""
    family, learner = cfg.build()
    train(learner, family, cfg.train, run_dir=out, resume=resume, progress=progress)


def load_run(path: str | Path, *, task_options: dict[str, Any] | None = None,
             learner_options: dict[str, Any] | None = None) -> Run:
    """Load a trained run from its folder, at its newest checkpoint.

    ``task_options`` / ``learner_options`` change evaluation-time settings (e.g.
    shots, adaptation steps) without touching the trained parameters; an option
    that would change the parameters' shapes is refused.
    """
    path = Path(path)
    cfg = _read_config(path).updated(task=task_options, learner=learner_options)
    family, learner = cfg.build()
    ckpt = checkpoint.load(checkpoint.latest(path))
    missing, unexpected = _compare_state(learner, ckpt.model)
    if missing or unexpected:
        changed = sorted(set(learner_options or {}) | set(task_options or {}))
        raise ConfigError(
            f"the checkpoint in {path} does not fit the learner as configured "
            f"({'; '.join(missing + unexpected)[:200]}); "
            f"the options {', '.join(changed) or '(none)'} change the parameters' shapes and cannot be "
            "changed at evaluation")
    learner.load_state_dict(ckpt.model)
    learner.eval()
    return Run(cfg, family, learner, path, step=ckpt.step)


def _compare_state(learner: Learner, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    own = learner.state_dict()
    missing = [f"missing {k}" for k in own if k not in state]
    unexpected = [f"unexpected {k}" for k in state if k not in own]
    shapes = [f"{k}: {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing + shapes, unexpected
