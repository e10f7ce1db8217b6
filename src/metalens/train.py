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

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from metalens import checkpoint, distributed, rng
from metalens.config import opt
from metalens.errors import TrainingDiverged
from metalens.learners.base import Learner
from metalens.tasks.base import TaskFamily

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Options of meta-training (``train.*`` keys in configs and ``--set``)."""

    steps: int = opt(1000, "number of meta-training steps (optimiser updates)")
    batch_tasks: int = opt(25, "tasks per meta-training step (the meta-batch)")
    lr: float = opt(1e-3, "learning rate of the outer (meta) optimiser")
    lr_schedule: Literal["constant", "cosine"] = opt(
        "constant", "constant: lr at every step; cosine: lr until step lr_decay_start, then a half cosine down to 0 "
                    "at the last step")
    lr_decay_start: int = opt(0, "lr_schedule = cosine: the step at which the decay begins (0: from the start)")
    optimizer: Literal["adam", "sgd"] = opt("adam", "outer optimiser: adam or sgd")
    weight_decay: float = opt(0.0, "weight decay of the outer optimiser")
    grad_clip: float = opt(0.0, "clip the meta-gradient's global norm to this value (0: off)")
    seed: int = opt(0, "seed of the run: episodes, initial weights, the learner's randomness")
    log_every: int = opt(10, "write a line to log.jsonl every this many steps")
    checkpoint_every: int = opt(500, "write a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = opt(2, "how many of the newest checkpoints to keep (0: all)")
    device: str = opt("cpu", "torch device to train on, e.g. cpu or cuda")
    compile: bool = opt(False, "torch.compile the learner's meta-loss (gradient learners looping over tasks: one "
                               "task's function, reused for every task): the first step compiles it (seconds to a "
                               "minute; on CPU a C++ compiler is needed), later steps run faster (MAML on sinusoid: "
                               "about 2x; on Conv-4: about 1.4x)")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tasks", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.lr_decay_start < 0 or (self.lr_schedule == "cosine" and self.lr_decay_start >= self.steps):
            raise ValueError(f"lr_decay_start must be in [0, steps) = [0, {self.steps}), got {self.lr_decay_start}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:1, got {self.device!r}") \
                from None

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
    """Raise :class:`~metalens.config.ConfigError` unless ``device`` exists on this machine."""
    from metalens.config import ConfigError

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device must be a torch device such as cpu, cuda or cuda:1, got {device!r}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine "
                              "(torch.cuda.is_available() is False); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type not in ("cpu", "mps", "xpu", "meta"):
        raise ConfigError(f"device {device!r} is not supported; use cpu or cuda")


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
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn last line
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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

    With ``run_dir``, writes ``log.jsonl`` and atomic checkpoints there; with
    ``resume=True`` continues from the newest checkpoint in ``run_dir``. Raises
    :class:`TrainingDiverged` on a non-finite loss or gradient, leaving the last
    good checkpoint untouched. ``progress=None`` shows a bar when stderr is a terminal.
    """
    w = distributed.world()
    device = torch.device(distributed.local_device(config.device) if w.size > 1 else config.device)
    check_device(str(device))
    tasks = distributed.shard(config.batch_tasks, w)
    learner.to(device)
    learner.train()
    run_path = Path(run_dir) if run_dir is not None else None
    optimizer = make_optimizer(learner, config) if learner.trainable else None
    start = 0
    if resume:
        if run_path is None:
            raise ValueError("resume=True needs a run_dir")
        if (run_path / "checkpoints" / "latest").exists():
            ckpt = checkpoint.load(checkpoint.latest(run_path), map_location=device)
            learner.load_state_dict(ckpt.model)
            if optimizer is not None:
                optimizer.load_state_dict(ckpt.optimizer)
            start = ckpt.step
        # else: the run died before its first checkpoint; start again from step 0
        if w.is_writer:
            _truncate_log(run_path / "log.jsonl", start)
    state = {"seed": config.seed, **(extra_state or {})}
    # compiled lazily by the first step; the learner's parameters stay the module's own
    meta_loss = learner.compiled_meta_loss() if config.compile and learner.trainable else learner.meta_loss

    def save(step: int, metrics: dict[str, float]) -> Path | None:
        if run_path is None or not w.is_writer:
            return None
        return checkpoint.save(
            run_path, step=step, model=learner.state_dict(),
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            state={**state, "metrics": metrics}, keep=config.keep_checkpoints)

    writer = run_path is not None and w.is_writer
    log = open(run_path / "log.jsonl", "a", encoding="utf-8") if writer else None
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
            if w.size > 1:  # backward even if non-finite, so that every rank joins the all-reduce
                loss.backward()
                loss = distributed.average_gradients(
                    [p for g in optimizer.param_groups for p in g["params"]], loss, w)
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
            if log is not None and (done % config.log_every == 0 or done == config.steps):
                row = {"step": done, **metrics, "grad_norm": float(grad_norm), "lr": lr,
                       "seconds": round(time.perf_counter() - t0, 3)}
                log.write(json.dumps(row) + "\n")
                log.flush()
            if done % config.checkpoint_every == 0 or done == config.steps:
                last_ckpt = save(done, metrics)
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
            log.close()
    learner.eval()
    return TrainResult(step=config.steps, last_metrics=metrics, seconds=time.perf_counter() - t0,
                       checkpoint=last_ckpt)


def _diverged_message(what: str, value: float, step: int, run_path: Path | None, last: Path | None) -> str:
    msg = f"training stopped: non-finite {what} ({value}) at step {step + 1}"
    if run_path is not None:
        try:
            last = last or checkpoint.latest(run_path)
            msg += f"; the last good checkpoint is intact: {last}"
        except checkpoint.CheckpointError:
            msg += "; no checkpoint had been written yet"
    return msg + ". Try a lower train.lr or train.grad_clip > 0."
