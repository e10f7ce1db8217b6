"""Omniglot few-shot classification with the field's protocol (``metalens study omniglot``).

Meta-train on the characters of ``images_background_small1`` and their rotations by 90,
180 and 270 degrees (544 classes), then report accuracy on held-out tasks built from the
alphabets of ``images_background_small2`` that are not in small1 (Japanese (katakana),
Sanskrit and Tagalog: 106 characters, never rotated), the ``omniglot`` family's ``small``
protocol. Evaluation follows the field: ``episodes`` (600) held-out tasks per setting,
mean accuracy and 95% confidence interval, 5-way and 20-way, 1-shot and 5-shot, the
same tasks for every learner.

Learners and what they train on:

- ``protonet`` and ``matching`` (Conv-4, 64 channels): none of their parameters depends
  on the number of classes, so one model per shot count is meta-trained on
  ``train_ways``-way tasks (Snell et al. train with more ways than they test) and
  evaluated at every way;
- ``maml`` (Conv-4), when registered: one model per setting, Finn et al.'s inner loop
  (5-way: 1 step of 0.4, 3 at test; 20-way: 5 steps of 0.1);
- ``pretrain`` (Conv-4): a classifier over all 544 training classes, trained like the metric
  learners (one model per shot count, on ``train_ways``-way tasks, which only set which
  images a step sees); at test a fresh N-way linear head is fitted to the support features
  (100 SGD steps of 0.1, body frozen; Chen et al. 2019's "Baseline");
- ``scratch``: an MLP (256-128) on the flattened pixels fitted to each support set from a
  fresh initialisation, one per setting (its head has N outputs).

Learners that are not registered, or cannot be built with these options, are skipped
with a note. Runs live in ``OUT/runs/<learner>-<ways>w<shots>s`` (protonet, matching,
pretrain: ``<learner>-<train_ways>w<shots>s``); running the study again reuses finished runs and a
larger ``steps`` continues them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from metalens.config import ConfigError, check_min, check_positive, check_step_counts, opt, to_dict
from metalens.episode import TaskSpec
from metalens.evaluate import Evaluation, evaluate
from metalens.registry import LEARNERS, STUDIES
from metalens.report import save_figure, write_report
from metalens.run import Run, RunConfig, load_run, make_learner, start_run
from metalens.studies import Study

__all__ = ["OmniglotStudy", "learner_options"]

DEFAULT_LEARNERS = ("protonet", "matching", "maml", "pretrain", "scratch")
# Steps per run: each learner within about 30 minutes (training and scoring) on one quiet CPU thread,
# from the per-step times of the runs in the README (maml's 20-way 5-shot runs take 2.4 s a step).
DEFAULT_STEPS = {"protonet": 2500, "matching": 2500, "maml": 400, "pretrain": 2000}
# the family's specs carry the number of training classes (global ids for pretrain); any number will do
# to build a learner and see which of its parameters depend on N
_SPEC_CLASSES = 10
_EVAL_BATCH = 4  # tasks per predict call when scoring (memory only; results do not depend on it)


def learner_options(name: str, ways: int, channels: int) -> dict[str, Any]:
    """The study's options of learner ``name`` for ``ways``-way Omniglot."""
    if name in ("protonet", "matching"):
        return {"backbone": "conv4", "channels": channels}
    if name in ("maml", "fomaml", "anil", "metasgd"):
        inner = {"inner_lr": 0.4, "inner_steps": 1, "eval_inner_steps": 3} if ways <= 5 else \
            {"inner_lr": 0.1, "inner_steps": 5, "eval_inner_steps": 5}
        return {"backbone": "conv4", "channels": channels, **inner}
    if name == "pretrain":
        return {"backbone": "conv4", "channels": channels, "finetune_steps": 100, "finetune_lr": 0.1}
    if name == "scratch":
        return {"hidden": [256, 128]}
    return {}


@STUDIES.register("omniglot")
class OmniglotStudy(Study):
    """Omniglot 5/20-way 1/5-shot: meta-train on small1 (+rotations), test on the small2-only alphabets."""

    @dataclass(frozen=True)
    class Config:
        """Options of the omniglot study (``--set study.KEY=VALUE``)."""

        learners: tuple[str, ...] = opt(DEFAULT_LEARNERS, "learners to train and score (unregistered ones are "
                                                          "skipped with a note)")
        ways: tuple[int, ...] = opt((5, 20), "test ways (N)")
        shots: tuple[int, ...] = opt((1, 5), "shots (K), in training and test")
        train_ways: int = opt(20, "ways of the meta-training tasks of the learners with no parameter that depends "
                                  "on N (protonet, matching, pretrain: one model per shot count, evaluated at "
                                  "every way); the others train at the test way")
        train_queries: int = opt(5, "query images per class in meta-training tasks")
        test_queries: int = opt(15, "query images per class in held-out tasks (shots + queries <= 20)")
        steps: int | dict[str, int] = opt(
            dict(DEFAULT_STEPS), "meta-training steps per run: one number for every learner, or a table "
            "{protonet = N, ...} (learners it leaves out keep their default; 2000 for those without one)")
        batch_tasks: int = opt(1, "tasks per meta-training step")
        lr: float = opt(1e-3, "Adam learning rate")
        channels: int = opt(64, "Conv-4 channels")
        episodes: int = opt(600, "held-out tasks per setting (the field's 600)")
        seed: int = opt(0, "training seed of every run")
        eval_seed: int = opt(0, "seed of the held-out tasks")
        root: str = opt("", "folder with the Omniglot minimal zips ('': the omniglot family's default)")
        quick: bool = opt(False, "smoke test: 2 steps, 4 held-out tasks, 8 channels (numbers meaningless)")

        def __post_init__(self) -> None:
            if not self.learners:
                raise ValueError("learners must name at least one learner")
            for name in ("ways", "shots"):
                v = getattr(self, name)
                if not v or any(not isinstance(n, int) or n < 1 for n in v):
                    raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {list(v)}")
            if any(w < 2 for w in self.ways) or self.train_ways < 2:
                raise ValueError(f"ways and train_ways must be >= 2, got {list(self.ways)} and {self.train_ways}")
            check_min(self, 1, "train_queries", "test_queries", "batch_tasks", "channels")
            if max(self.shots) + max(self.train_queries, self.test_queries) > 20:
                raise ValueError(f"Omniglot has 20 images per character: shots + queries must be <= 20, got "
                                 f"{max(self.shots)} + {max(self.train_queries, self.test_queries)}")
            check_step_counts(self.steps)
            if isinstance(self.steps, dict) and self.steps != DEFAULT_STEPS:
                unknown = sorted(set(self.steps) - set(self.learners))
                if unknown:
                    raise ValueError(f"steps names {unknown[0]!r}, which is not in learners")
            check_min(self, 2, "episodes", why="for a confidence interval")
            check_positive(self, "lr")

        def steps_for(self, name: str) -> int:
            if isinstance(self.steps, dict):
                return self.steps.get(name, DEFAULT_STEPS.get(name, 2000))
            return self.steps

    def effective(self) -> OmniglotStudy.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=2, episodes=min(c.episodes, 4), channels=min(c.channels, 8))

    # -- running ------------------------------------------------------------------------------------
    def run(self, out: Path, *, progress: bool | None = None, echo: Callable[[str], None] = print) -> Path:
        c = self.effective()
        out = Path(out)
        t_start = time.perf_counter()
        evaluations: list[Evaluation] = []
        grid: dict[str, dict[str, dict[str, float]]] = {}  # learner -> "5-way 1-shot" -> metric
        timings: dict[str, dict[str, float]] = {}
        skipped: dict[str, str] = {}
        curves: dict[str, list[tuple[int, float]]] = {}
        for name in c.learners:
            why = self._skip_reason(name)
            if why:
                skipped[name] = why
                echo(f"[study] skipping {name}: {why}")
                continue
            shared = self._way_independent(name)
            for shots in c.shots:
                train_ways = [c.train_ways] if shared else list(c.ways)
                for tw in train_ways:
                    label = f"{name}-{tw}w{shots}s"
                    run_dir, seconds, steps = self._train(out, name, tw, shots, progress, echo)
                    timings[label] = {"train_seconds": round(seconds, 1), "steps": steps,
                                      "seconds_per_step": _seconds_per_step(run_dir)}
                    curves[label] = _read_curve(run_dir)
                    for ways in (c.ways if shared else [tw]):
                        t0 = time.perf_counter()
                        run = load_run(run_dir, task_options={"ways": ways, "queries": c.test_queries})
                        ev = evaluate(run.learner, run.family, episodes=c.episodes, seed=c.eval_seed,
                                      split="test", batch_tasks=_EVAL_BATCH, with_oracle=False, device=self.device,
                                      progress=bool(progress))
                        setting = f"{ways}-way {shots}-shot"
                        ev.task = f"omniglot {setting}"
                        evaluations.append(ev)
                        acc = ev.metrics["accuracy"]
                        grid.setdefault(name, {})[setting] = {"mean": acc.mean, "ci95": acc.ci95,
                                                              "trained": label}
                        timings[label][f"eval_seconds_{ways}w"] = round(time.perf_counter() - t0, 1)
                        echo(f"[study] {name} {setting} (trained {tw}-way): accuracy "
                             f"{100 * acc.mean:.2f}% ± {100 * acc.ci95:.2f}  ({time.perf_counter() - t0:.0f}s)")
        figures = [_plot_curves(out / "figures" / "training.png", curves),
                   self._plot_episode(out / "figures" / "episode.png", out)]
        notes = self._notes(c, grid, timings, skipped, time.perf_counter() - t_start)
        path = write_report(out, title="Omniglot: few-shot classification on held-out alphabets",
                            evaluations=evaluations, figures=[f for f in figures if f is not None], notes=notes,
                            extra={"config": to_dict(c), "accuracy": grid, "timings": timings,
                                   "skipped": skipped})
        echo(f"[study] report: {path}")
        return path

    def _skip_reason(self, name: str) -> str:
        c = self.effective()
        if name not in LEARNERS:
            return "not registered"
        spec = TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=min(c.ways), train_classes=_SPEC_CLASSES)
        try:
            make_learner(name, spec, **learner_options(name, min(c.ways), c.channels))
        except (ConfigError, ValueError, TypeError) as e:
            return f"cannot be built for 28x28 images with the study's options ({e})"
        return ""

    def _way_independent(self, name: str) -> bool:
        """True when no parameter of the learner depends on N: one model serves every way."""
        c = self.effective()
        shapes = []
        for n in (2, 3):
            spec = TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=n, train_classes=_SPEC_CLASSES)
            learner = make_learner(name, spec, **learner_options(name, c.train_ways, c.channels))
            shapes.append({k: tuple(v.shape) for k, v in learner.state_dict().items()})
        return shapes[0] == shapes[1]

    def _train(self, out: Path, name: str, ways: int, shots: int, progress: bool | None,
               echo: Callable[[str], None]) -> tuple[Path, float, int]:
        c = self.effective()
        task = {"root": c.root, "protocol": "small", "ways": ways, "shots": shots, "queries": c.train_queries}
        steps = c.steps_for(name)
        train = {"steps": steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "seed": c.seed, "log_every": 10,
                 "device": self.device,
                 "checkpoint_every": max(500, steps // 4)}
        cfg = RunConfig.resolve("omniglot", name, task, learner_options(name, ways, c.channels), train)
        run_dir = out / "runs" / f"{name}-{ways}w{shots}s"
        resume = (run_dir / "config.json").exists()
        run: Run = start_run(cfg, run_dir, resume=resume)
        what = f"training {steps} steps" if run.learner.trainable else "nothing to train"
        echo(f"[study] {name} {ways}-way {shots}-shot: {what}" + (" (resuming)" if resume else ""))
        t0 = time.perf_counter()
        run.train(resume=resume, progress=progress)
        return run_dir, time.perf_counter() - t0, steps if run.learner.trainable else 0

    def _plot_episode(self, path: Path, out: Path) -> Path | None:
        """A held-out 5-way 1-shot task with the predictions of a trained 1-shot protonet (or matching)."""
        c = self.effective()
        runs = [r for name in ("protonet", "matching") for r in sorted((out / "runs").glob(f"{name}-*w1s"))
                if name in c.learners]
        if not runs:
            return None
        run = load_run(runs[0], task_options={"ways": 5, "queries": 4})
        return _plot_task(path, run, seed=c.eval_seed)

    def _notes(self, c: Config, grid: dict[str, dict[str, dict[str, float]]], timings: dict[str, Any],
               skipped: dict[str, str], seconds: float) -> str:
        settings = [f"{w}-way {k}-shot" for w in c.ways for k in c.shots]
        head = "| learner | " + " | ".join(settings) + " |"
        lines = [head, "|" + "---|" * (len(settings) + 1)]
        for name, row in grid.items():
            cells = [f"{100 * row[s]['mean']:.2f}% ± {100 * row[s]['ci95']:.2f}" if s in row else "–"
                     for s in settings]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        cmd = self.command()
        step_times = ", ".join(f"{k} {v['seconds_per_step']:.3f}s" for k, v in timings.items()
                               if v.get("seconds_per_step"))
        text = [
            "Meta-trained on the 136 characters of `images_background_small1` and their rotations by 90, 180 "
            "and 270 degrees (544 classes); tested on the 106 characters of the alphabets of "
            "`images_background_small2` that small1 lacks (Japanese (katakana), Sanskrit, Tagalog), "
            f"never seen in training. Accuracy on {c.episodes} held-out tasks per setting (the same tasks "
            f"for every learner, seed {c.eval_seed}), {c.test_queries} queries per class, mean ± 95% CI.",
            "",
            *lines,
            "",
            f"Command: `{cmd}` ({seconds / 60:.1f} minutes in all on {self.hardware()}).",
            "",
            f"Budget: {_describe_steps(c)} per run, {c.batch_tasks} task(s) per step, Adam lr {c.lr}, "
            f"{c.train_queries} queries per class in training; protonet, matching and pretrain train "
            f"{c.train_ways}-way (one model per shot count, evaluated at every way), the others at the test way. "
            f"Conv-4 with {c.channels} channels for the metric and gradient learners; `pretrain` is a Conv-4 "
            "classifier over the 544 training classes, trained like the metric learners, then a fresh N-way "
            "linear head on its frozen features (100 SGD steps of 0.1 on each support set); `scratch` is an MLP "
            "(256-128 hidden units) on the flattened pixels fitted to each support set.",
            "",
            f"Seconds per training step ({self.hardware()}): {step_times or '–'}.",
        ]
        if skipped:
            text += ["", "Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + "."]
        return "\n".join(text)


def _describe_steps(c: OmniglotStudy.Config) -> str:
    if isinstance(c.steps, dict):
        return ", ".join(f"{k} {c.steps_for(k)} steps" for k in c.learners)
    return f"{c.steps} steps"


def _read_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _seconds_per_step(run_dir: Path) -> float | None:
    """Median seconds per training step from ``log.jsonl`` (robust to resumed runs), or None."""
    path = run_dir / "log.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rates = [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) for a, b in zip(rows, rows[1:])
             if b["step"] > a["step"] and b.get("seconds", 0) > a.get("seconds", 0)]
    return round(float(torch.tensor(rates).median()), 4) if rates else None


def _plot_curves(path: Path, curves: dict[str, list[tuple[int, float]]]) -> Path | None:
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        steps, losses = zip(*points)
        k = max(1, len(losses) // 10)  # a running mean over a tenth of the run (one logged step each)
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(-1).tolist() if len(losses) >= k else list(losses)
        ax.plot(steps[k - 1:], smooth, label=label, lw=1.2)
    ax.set_xlabel("meta-training step")
    ax.set_ylabel("query cross-entropy (training tasks)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _plot_task(path: Path, run: Run, *, seed: int) -> Path:
    """One held-out task: the support images on top, the queries below, coloured by correctness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = run.family.eval_episodes(seed, 1)
    with torch.no_grad():
        pred = run.learner.predict(ep.support_x, ep.support_y, ep.query_x).probs[0].argmax(-1)
    N = ep.num_classes
    order = ep.support_y[0].argsort()
    q_order = ep.query_y[0].argsort()
    per = ep.n_query // N
    fig, axes = plt.subplots(1 + per, N, figsize=(1.3 * N, 1.3 * (1 + per)))
    for n in range(N):
        ax = axes[0, n]
        ax.imshow(ep.support_x[0, order[n], 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"class {n}", fontsize=8)
        for j in range(per):
            i = q_order[n * per + j]
            ok = bool(pred[i] == ep.query_y[0, i])
            ax = axes[1 + j, n]
            ax.imshow(ep.query_x[0, i, 0].numpy(), cmap="Greens" if ok else "Reds", vmin=0, vmax=1)
            ax.set_title(f"-> {int(pred[i])}", fontsize=7, color="green" if ok else "red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{run.config.learner}: a held-out 5-way 1-shot task (top: support)", fontsize=9)
    return save_figure(fig, path)
