"""The lens-agnostic meta-training loop.

At step ``t`` the trainer draws the episode ``family.episode(seed, t, batch_tasks)``
and hands the learner a generator derived from ``(seed, LEARNER, t)`` for its own
randomness, computes ``learner.meta_loss``, and takes one optimiser step. Nothing
random depends on anything but ``(seed, t)``, so a run resumed from a checkpoint
(parameters + optimiser state + step) ends with the same parameters, bit for bit,
as the same run done in one go.

The trainer never asks which lens it runs: anything satisfying the learner
contract trains the same way, in one process or data-parallel over tasks in
several (see :mod:`metalens.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from metalens import checkpoint, distributed, rng, runfolder
from metalens.config import ConfigError, Options, opt
from metalens.errors import (CheckpointError, Interrupted, NumericalError, RunFailed, RunFolderError,
                             TrainingDiverged)
from metalens.files import write_text_atomic
from metalens.learners.base import Learner
from metalens.tasks.base import TaskFamily

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "make_optimizer", "check_optimizer_state"]


# The devices metalens trains on; whether one exists on this machine is checked when a run starts (check_device).
_DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]+)?")


def _supported_device(device: str) -> None:
    """The declared check of ``train.device``: raise ``ValueError`` unless metalens trains on ``device``."""
    if not _DEVICE.fullmatch(device) or len(device) > 12:
        raise ValueError("must be cpu, cuda, cuda:N (N a device index) or mps")


@dataclass(frozen=True)
class TrainConfig(Options):
    """Options of meta-training (``train.*`` keys in configs and ``--set``)."""

    steps: int = opt(1000, "number of meta-training steps (optimiser updates)", ge=1)
    batch_tasks: int = opt(25, "tasks per meta-training step (the meta-batch)", ge=1)
    lr: float = opt(1e-3, "learning rate of the outer (meta) optimiser", gt=0)
    lr_schedule: Literal["constant", "cosine"] = opt(
        "constant", "constant: lr at every step; cosine: lr until step lr_decay_start, then a half cosine down to 0 "
                    "at the last step")
    lr_decay_start: int = opt(0, "lr_schedule = cosine: the step at which the decay begins, below steps (0: from the "
                                 "start)", ge=0)
    optimizer: Literal["adam", "sgd"] = opt("adam", "outer optimiser")
    weight_decay: float = opt(0.0, "weight decay of the outer optimiser", ge=0)
    grad_clip: float = opt(0.0, "clip the meta-gradient's global norm to this value (0: off)", ge=0)
    seed: int = opt(0, "seed of the run: episodes, initial weights, the learner's randomness", ge=0)
    log_every: int = opt(10, "write a line to log.jsonl every this many steps", ge=1)
    checkpoint_every: int = opt(500, "write a checkpoint every this many steps (and at the end)", ge=1)
    keep_checkpoints: int = opt(2, "how many of the newest checkpoints to keep (0: all)", ge=0)
    device: str = opt("cpu", "torch device to train on: cpu, cuda, cuda:N or mps (that it exists is checked when the "
                             "run starts)", check=_supported_device)
    compile: bool = opt(False, "torch.compile the learner's meta-loss (gradient learners looping over tasks: one "
                               "task's function, reused for every task): the first step compiles it (seconds to a "
                               "minute; on CPU a C++ compiler is needed), later steps run faster (MAML on sinusoid: "
                               "about 2x; on Conv-4: about 1.4x)")

    def check(self) -> None:
        if self.lr_schedule == "cosine" and self.lr_decay_start >= self.steps:
            raise ValueError(f"lr_decay_start must be in [0, steps) = [0, {self.steps}) with lr_schedule = cosine, "
                             f"got {self.lr_decay_start}")

    def lr_at(self, step: int) -> float:
        """The outer learning rate of step ``step`` (0-based), a function of the step alone (so resuming needs no
        scheduler state)."""
        if self.lr_schedule == "constant" or step < self.lr_decay_start:
            return self.lr
        progress = (step - self.lr_decay_start) / (self.steps - self.lr_decay_start)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def constant_through(self, steps: int) -> bool:
        """Whether the learning rate is ``lr`` at every one of the first ``steps`` steps."""
        return self.lr_schedule == "constant" or self.lr_decay_start >= steps


def check_device(device: str) -> None:
    """Raise :class:`~metalens.config.ConfigError` unless metalens trains on ``device`` (``cpu``, ``cuda``,
    ``cuda:N``, ``mps``) and it exists on this machine."""
    try:
        _supported_device(device)
    except ValueError as e:
        raise ConfigError(f"device {e}, got {device!r}") from None
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine "
                              "(torch.cuda.is_available() is False); use the cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available on this machine "
                          "(torch.backends.mps.is_available() is False); use the cpu")


@dataclass
class TrainResult:
    step: int  # steps completed
    last_metrics: dict[str, float]
    seconds: float
    checkpoint: Path | None


def make_optimizer(learner: Learner, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in learner.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` (by a run that died before its next checkpoint)."""
    if not path.exists():
        return
    if path.is_symlink() or not path.is_file():
        raise RunFolderError(f"{path} is not a regular file; a run folder holds only its own files")
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn last line
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class _StopOnSignals:
    """SIGINT, SIGTERM and SIGHUP during training: the first asks the loop to stop after the current step
    (which then writes a checkpoint), a second one stops at once (the previous checkpoint stays intact)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for s in distributed.STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Interrupted(f"stopped at once by a second signal ({signal.Signals(signum).name}); the last "
                              "checkpoint is intact", signum)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def _resume(run_path: Path, learner: Learner, optimizer: torch.optim.Optimizer | None, device: torch.device,
            config: TrainConfig, writer: bool) -> int:
    """Load the checkpoint a run continues from (checked against the learner and the optimiser); its step."""
    if writer:
        runfolder.check_no_links(run_path)
        checkpoint.remove_leftovers(run_path)
    found, note = checkpoint.recover_latest(run_path, rewrite=writer)
    if note and writer:
        print(f"metalens: note: {note}", file=sys.stderr)
    if found is None:
        return 0  # the run stopped before its first checkpoint: nothing to overwrite, start from step 0
    ckpt = checkpoint.load(found, map_location=device)
    problems = checkpoint.mismatches(ckpt.model, learner.state_dict())
    if problems:
        raise CheckpointError(f"the checkpoint {found} does not fit the learner ({'; '.join(problems)[:200]})")
    bad = checkpoint.non_finite(ckpt.model)
    if bad:
        raise NumericalError(f"the checkpoint {found} holds non-finite weights ({', '.join(bad[:3])})")
    if ckpt.step > config.steps:
        raise RunFolderError(f"the run in {run_path} has reached step {ckpt.step}; train.steps = {config.steps} "
                             f"would go back: give --steps {ckpt.step} or more")
    learner.load_state_dict(ckpt.model)
    if optimizer is not None:
        _load_optimizer(optimizer, ckpt)
    return ckpt.step


def check_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: checkpoint.Checkpoint) -> None:
    """Refuse a checkpoint whose optimiser state does not fit ``optimizer`` (its parameters, their shapes, and
    a state for every parameter where a stateful optimiser has taken steps)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = ckpt.optimizer
    n_saved = sum(len(g["params"]) for g in saved["param_groups"])
    shapes = [f"{i}.{k}: {list(v.shape)} vs {list(params[i].shape)}" for i, st in saved["state"].items()
              if i < len(params) for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0
              and tuple(v.shape) != tuple(params[i].shape)]
    stateful = isinstance(optimizer, torch.optim.Adam)
    missing = stateful and ckpt.step > 0 and not saved["state"]
    if n_saved != len(params) or any(i >= len(params) for i in saved["state"]) or shapes or missing:
        why = "; ".join(shapes)[:160] or ("no optimiser state after training steps" if missing else f"{n_saved} saved")
        raise CheckpointError(f"the optimiser state in {ckpt.path} does not fit the learner's {len(params)} "
                              f"parameters ({why})")


def _load_optimizer(optimizer: torch.optim.Optimizer, ckpt: checkpoint.Checkpoint) -> None:
    check_optimizer_state(optimizer, ckpt)
    try:
        optimizer.load_state_dict(ckpt.optimizer)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the optimiser state in {ckpt.path} cannot be loaded: {str(e)[:160]}") from None


def train(
    learner: Learner,
    family: TaskFamily,
    config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    extra_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Meta-train ``learner`` on ``family`` for ``config.steps`` steps.

    With ``run_dir``, writes ``log.jsonl`` and atomic checkpoints there, holding the folder's lock
    (:mod:`metalens.runfolder`); with ``resume=True`` continues from the newest checkpoint in
    ``run_dir`` (checked first: see :func:`metalens.run.check_resumable`), never from step 0 over
    existing checkpoints. Raises :class:`~metalens.errors.TrainingDiverged` on a non-finite loss or
    gradient and :class:`~metalens.errors.RunFailed` when a checkpoint or the log cannot be written
    (a full disk), leaving the last good checkpoint untouched; on SIGINT, SIGTERM or SIGHUP it
    stops after the current step, writes a checkpoint and raises :class:`~metalens.errors.Interrupted`.
    ``progress=None`` shows a bar when stderr is a terminal.
    """
    w = distributed.world()
    run_path = Path(run_dir) if run_dir is not None else None
    writer = run_path is not None and w.is_writer
    # one writer per run folder: here, unless the launcher of a multi-process run holds the lock for all ranks
    held = runfolder.lock(run_path) if writer and w.size == 1 else contextlib.nullcontext()
    with held, _StopOnSignals() as stop:
        return _train(learner, family, config, run_path, writer, resume, progress, extra_state, stop)


def _train(learner: Learner, family: TaskFamily, config: TrainConfig, run_path: Path | None, writer: bool,
           resume: bool, progress: bool | None, extra_state: dict[str, Any] | None,
           stop: _StopOnSignals) -> TrainResult:
    w = distributed.world()
    device = torch.device(distributed.local_device(config.device) if w.size > 1 else config.device)
    check_device(str(device))
    tasks = distributed.shard(config.batch_tasks, w)
    learner.to(device)
    learner.train()
    optimizer = make_optimizer(learner, config) if learner.trainable else None
    start = 0
    if resume:
        if run_path is None:
            raise ValueError("resume=True needs a run_dir")
        start = _resume(run_path, learner, optimizer, device, config, writer)
        if writer:
            _truncate_log(run_path / "log.jsonl", start)
    elif writer and checkpoint.complete_names(run_path / "checkpoints"):
        raise RunFolderError(f"{run_path} already holds checkpoints; pass resume=True (--resume) to continue the run")
    state = {"seed": config.seed, **(extra_state or {})}
    # compiled lazily by the first step; the learner's parameters stay the module's own
    meta_loss = learner.compiled_meta_loss() if config.compile and learner.trainable else learner.meta_loss
    resume_hint = f"metalens train --resume --out {run_path}"

    def save(step: int, metrics: dict[str, float]) -> Path | None:
        if not writer:
            return None
        try:
            return checkpoint.save(
                run_path, step=step, model=learner.state_dict(),
                optimizer=optimizer.state_dict() if optimizer is not None else None,
                state={**state, "metrics": metrics}, keep=config.keep_checkpoints)
        except RunFailed as e:
            raise RunFailed(f"training stopped: {e}; once the disk has space (or is writable) again, continue "
                            f"with: {resume_hint}") from None

    def write_log(row: dict[str, Any]) -> None:
        try:
            log.write(json.dumps(row) + "\n")
            log.flush()
        except OSError as e:
            raise RunFailed(f"training stopped: cannot write {run_path / 'log.jsonl'}: {e.strerror or e}; "
                            f"{_kept(run_path, last_ckpt)}; once the disk has space again, continue with: "
                            f"{resume_hint}") from None

    try:
        log = open(run_path / "log.jsonl", "a", encoding="utf-8") if writer else None
    except OSError as e:
        raise RunFolderError(f"cannot write {run_path / 'log.jsonl'}: {e.strerror or e}") from None
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and w.is_writer
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc=f"train {learner.registry_name}",
               unit="step", dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    last_ckpt: Path | None = None
    running = None
    try:
        if not learner.trainable:  # nothing to meta-train: record the run and stop
            start = config.steps
        for step in range(start, config.steps):
            episode = family.episode(config.seed, step, config.batch_tasks)
            if w.size > 1:
                episode = episode[tasks]  # this rank's share of the step's batch
            episode = episode.to(device)
            # the learner's own randomness: per rank when distributed (see README)
            gen = rng.generator(config.seed, rng.Stream.LEARNER, step, *((w.rank,) if w.size > 1 else ()),
                                device=device)
            if config.compile and step == start:  # the first step compiles: say so, it can take minutes
                bar.set_postfix_str("compiling the meta-loss (train.compile)", refresh=True)
            loss, metrics = meta_loss(episode, generator=gen)
            optimizer.zero_grad(set_to_none=True)
            stopping = stop.signum is not None
            if w.size > 1:  # backward even if non-finite, so that every rank joins the all-reduce
                loss.backward()
                # the loss and whether any rank was asked to stop travel with the gradients: one all-reduce
                loss, any_stop = distributed.average_gradients(
                    [p for g in optimizer.param_groups for p in g["params"]], loss, w, flag=stopping)
                stopping = any_stop
                metrics = {**metrics, "loss": float(loss)}
            if not torch.isfinite(loss):
                raise TrainingDiverged(_diverged_message("loss", float(loss.detach()), step, run_path, last_ckpt))
            if w.size == 1:
                loss.backward()
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, config.grad_clip if config.grad_clip > 0 else math.inf)
            if not torch.isfinite(grad_norm):
                raise TrainingDiverged(_diverged_message("meta-gradient", float(grad_norm), step, run_path, last_ckpt))
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            done = step + 1
            running = metrics["loss"] if running is None else 0.95 * running + 0.05 * metrics["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            if log is not None and (done % config.log_every == 0 or done == config.steps or stopping):
                write_log({"step": done, **metrics, "grad_norm": float(grad_norm), "lr": lr,
                           "seconds": round(time.perf_counter() - t0, 3)})
            if done % config.checkpoint_every == 0 or done == config.steps or stopping:
                last_ckpt = save(done, metrics)
            if stopping:
                signum = stop.signum or signal.SIGTERM
                where = (f"; checkpoint written: {last_ckpt}; continue with: {resume_hint}" if run_path is not None
                         else "")
                raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {done}{where}", signum)
        if writer and (last_ckpt is None and (start == config.steps)):
            # untrainable learner, or a resume of a finished run: make sure a checkpoint exists
            try:
                last_ckpt = checkpoint.latest(run_path)
            except checkpoint.CheckpointError:
                last_ckpt = save(config.steps, metrics)
        if w.size > 1:  # every rank (rank 0 with its last checkpoint written) ends together
            torch.distributed.barrier()
    finally:
        bar.close()
        if log is not None:
            try:
                log.close()
            except OSError:
                pass
    learner.eval()
    return TrainResult(step=config.steps, last_metrics=metrics, seconds=time.perf_counter() - t0,
                       checkpoint=last_ckpt)


def _kept(run_path: Path | None, last: Path | None) -> str:
    try:
        return f"the last good checkpoint is intact: {last or checkpoint.latest(run_path)}"
    except (checkpoint.CheckpointError, TypeError):
        return "no checkpoint had been written yet"


def _diverged_message(what: str, value: float, step: int, run_path: Path | None, last: Path | None) -> str:
    msg = f"training stopped: non-finite {what} ({value}) at step {step + 1}"
    if run_path is not None:
        msg += f"; {_kept(run_path, last)}"
    return msg + ". Try a lower train.lr or train.grad_clip > 0."
