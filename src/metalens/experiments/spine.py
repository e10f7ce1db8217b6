"""The spine every study (and the tour) runs on: declare the runs, score them, report.

A study is a class registered in :data:`~metalens.registry.STUDIES` with

- ``Config``: its options (an :class:`~metalens.config.Options` dataclass; ``study.*`` keys of
  ``--set``), and ``effective()``: the options actually run (``quick`` shrinks the budgets);
- :meth:`Study.runs`: the runs it needs, ``{label: RunConfig}``;
- :meth:`Study.analyse`: what it shows, written into a :class:`~metalens.report.Report` from the
  trained runs (tables, figures, evaluations and the **checks**: every claim the study tests).

The spine (:meth:`Study.run`) does the rest, once for every study: it trains each run into
``OUT/runs/<label>`` (a finished run with the same configuration is reused, an unfinished one
resumed, a larger budget continued; the device may change), keeps going past a run that
diverged with a checkpoint (scored at its last good checkpoint, and said so), hands
:meth:`Study.analyse` a :class:`Context` that loads and scores runs on the chosen device in
chunks, and writes ``report.md`` and ``report.json`` with the command that reproduces it and
the machine it ran on.
"""

from __future__ import annotations

import json
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.distributions import Distribution

from metalens import checkpoint, runfolder
from metalens.config import to_dict
from metalens.episode import Episode
from metalens.errors import RunFailed, RunFolderError, TrainingDiverged
from metalens.evaluate import Evaluation, evaluate, score_tasks
from metalens.learners.base import Learner
from metalens.report import Report
from metalens.run import Run, RunConfig, ensure_trained, load_run
from metalens.tasks.base import Split, TaskFamily

__all__ = ["Study", "Context", "toml_value", "set_arg", "seconds_per_step", "EVAL_BATCH"]

EVAL_BATCH = 100  # tasks scored at once by default (memory only: results do not depend on it)


def toml_value(v: Any) -> str:
    """``v`` as the TOML that ``--set study.KEY=...`` reads (tables inline).

    >>> toml_value({"cnp": 100, "lnp": 65}), toml_value(("rbf", "matern52")), toml_value(False)
    ('{cnp = 100, lnp = 65}', '["rbf", "matern52"]', 'false')
    """
    if v is None:
        return "null"  # not TOML, but what --set reads as "no value" for an option that may be null
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def set_arg(name: str, value: Any, section: str = "study") -> str:
    """``--set 'SECTION.NAME=VALUE'`` as one shell word (VALUE in TOML).

    >>> print(set_arg("kernels", ["rbf"]))
    --set 'study.kernels=["rbf"]'
    """
    arg = f"{section}.{name}={toml_value(value)}".replace("'", "'\\''")
    return f"--set '{arg}'"


class Study(ABC):
    """Base class of studies (see the module docstring)."""

    Config: ClassVar[type]
    registry_name: ClassVar[str]
    title: ClassVar[str] = ""

    def __init__(self, config: Any = None, *, device: str = "cpu") -> None:
        self.config = config if config is not None else self.Config()
        self.device = device  # where runs train and are scored

    # -- what a study declares ---------------------------------------------------------------------
    def effective(self) -> Any:
        """The options actually run (studies with a ``quick`` option shrink their budgets here)."""
        return self.config

    @abstractmethod
    def runs(self) -> dict[str, RunConfig]:
        """The runs the study needs: ``{label: configuration}``, trained into ``OUT/runs/<label>``."""

    @abstractmethod
    def analyse(self, ctx: Context, report: Report) -> None:
        """Score the trained runs (through ``ctx``) and fill ``report``: text, tables, figures, checks."""

    # -- what the spine derives ---------------------------------------------------------------------
    def command(self) -> str:
        """The command line that reproduces this study: its non-default options as ``--set``."""
        defaults = type(self.config)()
        sets = [f" {set_arg(f.name, getattr(self.config, f.name))}" for f in fields(self.config)
                if getattr(self.config, f.name) != getattr(defaults, f.name)]
        device = "" if self.device == "cpu" else f" --device {self.device}"
        return f"metalens study {self.registry_name}{device} --out OUT" + "".join(sets)

    def hardware(self) -> str:
        """Where this invocation computed: ``cuda (NVIDIA H100 ...)`` or ``1 CPU thread(s)``."""
        if self.device.startswith("cuda") and torch.cuda.is_available():
            return f"{self.device} ({torch.cuda.get_device_name(torch.device(self.device))})"
        return f"{torch.get_num_threads()} CPU thread(s)"

    def run(self, out: str | Path, *, progress: bool | None = None, echo: Callable[[str], None] = print) -> Path:
        """Train (or reuse) every declared run into ``out/runs``, analyse, write the report; returns its path."""
        out = Path(out)
        t0 = time.perf_counter()
        runs = self.runs()  # every option is checked before the folder is touched
        with runfolder.lock(out):  # one writer per study folder; each run's folder is locked while it trains
            ctx = Context(self, out, progress=progress, echo=echo)
            for label, cfg in runs.items():
                ctx.train(label, cfg)
            report = Report(self.title)
            self.analyse(ctx, report)
            if ctx.diverged:
                report.heading("Runs that diverged")
                report.text("\n".join(f"- `{label}`: {why}" for label, why in ctx.diverged.items()))
            seconds = time.perf_counter() - t0
            command, hardware = self.command(), self.hardware()
            path = self._write(report, out, command, hardware, seconds, ctx)
        echo(f"[{self.registry_name}] report: {path}")
        return path

    def _write(self, report: Report, out: Path, command: str, hardware: str, seconds: float, ctx: Context) -> Path:
        try:
            return report.write(
                out, preamble=[f"Command: `{command}` ({seconds / 60:.1f} min on {hardware}; finished runs found in "
                               "`OUT/runs` are reused, not trained again)."],
                command=command, hardware=hardware, seconds=round(seconds, 1), config=to_dict(self.effective()),
                train_seconds=ctx.train_seconds, diverged=ctx.diverged)
        except OSError as e:
            raise RunFailed(f"cannot write the report in {out}: {e.strerror or e}; the trained runs in {out}/runs "
                            "are intact: run the same command again once the disk has space") from None


class Context:
    """What :meth:`Study.analyse` works with: the trained runs, and scoring on the study's device."""

    def __init__(self, study: Study, out: Path, *, progress: bool | None, echo: Callable[[str], None]) -> None:
        self.study = study
        self.out = out
        self.device = study.device
        self.progress = progress
        self.echo = echo
        self.configs: dict[str, RunConfig] = {}
        self.train_seconds: dict[str, float] = {}
        self.diverged: dict[str, str] = {}  # label -> what happened (the run is scored at its last checkpoint)
        self._runs: dict[str, Run] = {}

    def say(self, text: str) -> None:
        """A progress line, prefixed with the study's name."""
        self.echo(f"[{self.study.registry_name}] {text}")

    def path(self, label: str) -> Path:
        """The run folder of ``label``."""
        return self.out / "runs" / label

    def train(self, label: str, cfg: RunConfig) -> None:
        """Train run ``label`` (or reuse / resume / continue it) on the study's device."""
        cfg = replace(cfg, train=replace(cfg.train, device=self.device))
        self.configs[label] = cfg
        folder = self.path(label)
        resuming = (folder / "config.json").exists()
        reached = _reached(folder) if resuming else 0
        what = (f"reusing the finished run (step {reached})" if resuming and reached >= cfg.train.steps
                else f"training to step {cfg.train.steps}" + (f" (resuming from step {reached})" if resuming else "")
                if _trainable(cfg) else "nothing to train")
        self.say(f"{label} ({cfg.learner} on {cfg.task}): {what}")
        t0 = time.perf_counter()
        try:
            ensure_trained(cfg, folder, progress=self.progress)
        except TrainingDiverged as e:
            try:
                step = checkpoint.load(checkpoint.latest(folder)).step
            except RunFolderError:
                raise e from None
            self.diverged[label] = f"{e}; scored at step {step}, its last good checkpoint"
            self.say(f"{label}: diverged; scoring its last good checkpoint (step {step})")
        self.train_seconds[label] = round(time.perf_counter() - t0, 1)

    def run(self, label: str, *, task: dict[str, Any] | None = None, learner: dict[str, Any] | None = None) -> Run:
        """Run ``label`` at its newest checkpoint, on the study's device; ``task`` / ``learner``: evaluation-time
        options changed (shots, ways, adaptation steps, ...)."""
        if task or learner:
            run = load_run(self.path(label), task_options=task, learner_options=learner)
            run.learner.to(self.device)
            return run
        if label not in self._runs:
            self._runs[label] = load_run(self.path(label))
            self._runs[label].learner.to(self.device)
        return self._runs[label]

    def learner(self, label: str, **changes: dict[str, Any] | None) -> Learner:
        """The trained learner of run ``label`` (see :meth:`run`)."""
        return self.run(label, **changes).learner

    def evaluate(self, what: str | Learner, family: TaskFamily | None = None, *, episodes: int | None = None,
                 seed: int = 0, split: Split = "test", with_oracle: bool = True, task: dict[str, Any] | None = None,
                 learner: dict[str, Any] | None = None, batch_tasks: int = EVAL_BATCH) -> Evaluation:
        """The evaluator on the study's device: run ``what`` (a label, with evaluation-time ``task`` / ``learner``
        options) or a learner, on ``family`` (default: the run's own)."""
        if isinstance(what, str):
            run = self.run(what, task=task, learner=learner)
            lrn, family = run.learner, family if family is not None else run.family
        else:
            lrn = what
            if family is None:
                raise ValueError("evaluating a learner needs its family")
        return evaluate(lrn, family, episodes=episodes, seed=seed, split=split, batch_tasks=batch_tasks,
                        with_oracle=with_oracle, device=self.device, progress=bool(self.progress))

    def score(self, predict: Callable[..., Distribution], episode: Episode, *, with_nll: bool,
              empty_support: bool = False, batch_tasks: int = EVAL_BATCH) -> dict[str, np.ndarray]:
        """Per-task metrics of a predict-like callable on every task of ``episode`` (see
        :func:`metalens.evaluate.score_tasks`), on the study's device."""
        return score_tasks(predict, episode, with_nll=with_nll, batch_tasks=batch_tasks, device=self.device,
                           empty_support=empty_support)

    def log(self, label: str) -> list[dict[str, Any]]:
        """The rows of run ``label``'s ``log.jsonl`` (the logged training steps); a torn line ends it."""
        path = self.path(label) / "log.jsonl"
        rows: list[dict[str, Any]] = []
        if not path.is_file() or path.is_symlink():
            return rows
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def figure(self, name: str) -> Path:
        """Where figure ``name`` (e.g. ``"curves.png"``) goes: ``OUT/figures/name``."""
        return self.out / "figures" / name


def seconds_per_step(log: list[dict[str, Any]]) -> float | None:
    """Median seconds per training step between logged rows (robust to resumed runs), or None."""
    rates = [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) for a, b in zip(log, log[1:])
             if isinstance(b.get("step"), int) and isinstance(a.get("step"), int) and b["step"] > a["step"]
             and b.get("seconds", 0) > a.get("seconds", 0)]
    return round(statistics.median_low(rates), 4) if rates else None


def _reached(folder: Path) -> int:
    """The step of a run folder's newest checkpoint (0 without one, or when it cannot be read: training says why)."""
    try:
        return int(checkpoint.latest(folder).name[len("step_"):])
    except RunFolderError:
        return 0


def _trainable(cfg: RunConfig) -> bool:
    from metalens.registry import LEARNERS

    return bool(LEARNERS[cfg.learner].cls.trainable)
