"""``metalens study omniglot``: Omniglot few-shot classification with the field's protocol.

Meta-train on the characters of ``images_background_small1`` and their rotations by 90,
180 and 270 degrees (544 classes), then report accuracy on held-out tasks built from the
alphabets of ``images_background_small2`` that are not in small1 (Japanese (katakana),
Sanskrit and Tagalog: 106 characters, never rotated), the ``omniglot`` family's ``small``
protocol. Evaluation follows the field: ``episodes`` (600) held-out tasks per setting,
mean accuracy and 95% confidence interval, 5-way and 20-way, 1-shot and 5-shot, the
same tasks for every learner.

Learners and what they train on (the settings are :func:`learner_options`):

- ``protonet`` and ``matching`` (Conv-4, 64 channels): none of their parameters depends
  on the number of classes, so one model per shot count is meta-trained on
  ``train_ways``-way tasks (Snell et al. train with more ways than they test) and
  evaluated at every way;
- ``maml`` (Conv-4): one model per setting, Finn et al.'s inner loop (5-way: 1 step of
  0.4, 3 at test; 20-way: 5 steps of 0.1);
- ``pretrain`` (Conv-4): a classifier over all 544 training classes, trained like the metric
  learners (one model per shot count, on ``train_ways``-way tasks, which only set which
  images a step sees); at test a fresh N-way linear head is fitted to the support features
  (100 SGD steps of 0.1, body frozen; Chen et al. 2019's "Baseline");
- ``scratch``: an MLP (256-128) on the flattened pixels fitted to each support set from a
  fresh initialisation, one per setting (its head has N outputs).

Learners that are not registered, or cannot be built with these options, are skipped
with a note. Runs live in ``OUT/runs/<learner>-<ways>w<shots>s`` (protonet, matching,
pretrain: ``<learner>-<train_ways>w<shots>s``).

Checks: every learner is above chance (1/N) by more than its 95% CI in every setting;
``protonet`` beats ``scratch`` in every setting; and, as references only, the accuracies
published for ``protonet`` (Snell et al. 2017), ``matching`` (Vinyals et al. 2016) and
``maml`` (Finn et al. 2017), which were measured after meta-training on 1200 characters of
the full dataset, not on small1's 136.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple


from metalens.config import ConfigError, Options, opt
from metalens.episode import TaskSpec
from metalens.evaluate import Evaluation
from metalens.experiments.spine import Context, Study, seconds_per_step
from metalens.plots import plot_image_task, plot_training_curves
from metalens.registry import LEARNERS, STUDIES
from metalens.report import Check, Report, Table, fmt
from metalens.run import RunConfig, make_learner

__all__ = ["OmniglotStudy", "learner_options", "PUBLISHED"]

DEFAULT_LEARNERS = ("protonet", "matching", "maml", "pretrain", "scratch")
# Steps per run: each learner within about 30 minutes (training and scoring) on one quiet CPU thread,
# from the per-step times of the runs in the README (maml's 20-way 5-shot runs take 2.4 s a step).
DEFAULT_STEPS = {"protonet": 2500, "matching": 2500, "maml": 400, "pretrain": 2000}
# the family's specs carry the number of training classes (global ids for pretrain); any number will do
# to build a learner and see which of its parameters depend on N
_SPEC_CLASSES = 10
_EVAL_BATCH = 4  # tasks per predict call when scoring (memory only; results do not depend on it)
# Published test accuracies (%) by (ways, shots), each after meta-training on 1200 characters of the full
# Omniglot set (Vinyals et al.'s split, with rotations), not on small1.
PUBLISHED: dict[str, tuple[str, dict[tuple[int, int], float]]] = {
    "protonet": ("Snell et al. 2017", {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9}),
    "matching": ("Vinyals et al. 2016", {(5, 1): 98.1, (5, 5): 98.9, (20, 1): 93.8, (20, 5): 98.5}),
    "maml": ("Finn et al. 2017", {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9}),
}


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
    # the black-box learners read Conv-4 features of each image and one-hot labels (Santoro et al. 2016); their
    # output heads have N classes, so they train at the test way
    if name == "lstm":
        return {"backbone": "conv4", "channels": channels, "hidden": 200}
    if name == "transformer":
        return {"backbone": "conv4", "channels": channels, "dim": 64, "layers": 2, "heads": 4}
    if name == "mann":  # Santoro et al.'s controller and memory: 200 units, 128 slots of 40, 4 read heads
        return {"backbone": "conv4", "channels": channels, "hidden": 200, "slots": 128, "width": 40, "heads": 4}
    return {}

def check_steps(steps: int | dict[str, int], learners: Any, defaults: dict[str, int]) -> None:
    """A ``steps`` table may name only learners the study runs (its defaults excepted)."""
    if isinstance(steps, dict) and steps != defaults:
        unknown = sorted(set(steps) - set(learners))
        if unknown:
            raise ValueError(f"steps names {unknown[0]!r}, which is not in learners")


def steps_of(steps: int | dict[str, int], name: str, defaults: dict[str, int], fallback: int) -> int:
    """The meta-training steps of learner ``name``: one number for all, or its entry of the table (else its
    default, else ``fallback``)."""
    if isinstance(steps, dict):
        return steps.get(name, defaults.get(name, fallback))
    return steps


def quick(c: Any) -> Any:
    """Options ``c`` as run: with ``quick``, 2 steps, at most 4 held-out tasks and 8 channels (a smoke test)."""
    return replace(c, steps=2, episodes=min(c.episodes, 4), channels=min(c.channels, 8)) if c.quick else c


class _Planned(NamedTuple):
    """One run of the study: its learner, shots, the ways it trains at and the ways it is scored at."""

    name: str
    shots: int
    train_ways: int
    ways: tuple[int, ...]
    config: RunConfig


@STUDIES.register("omniglot")
class OmniglotStudy(Study):
    """Omniglot 5/20-way 1/5-shot: meta-train on small1 (+rotations), test on the small2-only alphabets."""

    title = "Omniglot: few-shot classification on held-out alphabets"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the omniglot study (``--set study.KEY=VALUE``)."""

        learners: tuple[str, ...] = opt(DEFAULT_LEARNERS, "learners to train and score (unregistered ones are "
                                                          "skipped with a note)", min_len=1)
        ways: tuple[int, ...] = opt((5, 20), "test ways (N)", min_len=1, ge=2)
        shots: tuple[int, ...] = opt((1, 5), "shots (K), in training and test", min_len=1, ge=1)
        train_ways: int = opt(20, "ways of the meta-training tasks of the learners with no parameter that depends "
                                  "on N (protonet, matching, pretrain: one model per shot count, evaluated at "
                                  "every way); the others train at the test way", ge=2)
        train_queries: int = opt(5, "query images per class in meta-training tasks", ge=1)
        test_queries: int = opt(15, "query images per class in held-out tasks (shots + queries <= 20)", ge=1)
        steps: int | dict[str, int] = opt(
            dict(DEFAULT_STEPS), "meta-training steps per run: one number for every learner, or a table "
            "{protonet = N, ...} (learners it leaves out keep their default; 2000 for those without one)", ge=1)
        batch_tasks: int = opt(1, "tasks per meta-training step", ge=1)
        lr: float = opt(1e-3, "Adam learning rate", gt=0)
        channels: int = opt(64, "Conv-4 channels", ge=1)
        episodes: int = opt(600, "held-out tasks per setting (the field's 600)", ge=2)
        seed: int = opt(0, "training seed of every run", ge=0)
        eval_seed: int = opt(0, "seed of the held-out tasks", ge=0)
        root: str = opt("", "folder with the Omniglot minimal zips ('': the omniglot family's default)")
        quick: bool = opt(False, "smoke test: 2 steps, 4 held-out tasks, 8 channels (numbers meaningless)")

        def check(self) -> None:
            if not any(n in LEARNERS for n in self.learners):
                raise ValueError(f"learners must name at least one registered learner ({', '.join(LEARNERS.names())})"
                                 f", got {list(self.learners)}")
            queries = max(self.train_queries, self.test_queries)
            if max(self.shots) + queries > 20:
                raise ValueError(f"Omniglot has 20 images per character: shots + queries must be <= 20, got "
                                 f"{max(self.shots)} + {queries}")
            check_steps(self.steps, self.learners, DEFAULT_STEPS)

        def steps_for(self, name: str) -> int:
            """Meta-training steps of each run of learner ``name``."""
            return steps_of(self.steps, name, DEFAULT_STEPS, 2000)

    def effective(self) -> OmniglotStudy.Config:
        """The options actually run: ``quick`` shrinks every budget."""
        return quick(self.config)

    # -- the runs -------------------------------------------------------------------------------------
    @cached_property
    def _plan(self) -> tuple[dict[str, _Planned], dict[str, str]]:
        """``({label: run}, {learner: why it is skipped})``."""
        c = self.effective()
        plan: dict[str, _Planned] = {}
        skipped: dict[str, str] = {}
        for name in c.learners:
            why = self._skip_reason(name)
            if why:
                skipped[name] = why
                continue
            shared = self._way_independent(name)
            steps = c.steps_for(name)
            train = {"steps": steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "seed": c.seed, "log_every": 10,
                     "checkpoint_every": max(500, steps // 4)}
            for shots in c.shots:
                for tw in ([c.train_ways] if shared else list(c.ways)):
                    task = {"root": c.root, "protocol": "small", "ways": tw, "shots": shots,
                            "queries": c.train_queries}
                    cfg = RunConfig.resolve("omniglot", name, task, learner_options(name, tw, c.channels), train)
                    plan[f"{name}-{tw}w{shots}s"] = _Planned(name, shots, tw, c.ways if shared else (tw,), cfg)
        return plan, skipped

    def runs(self) -> dict[str, RunConfig]:
        return {label: p.config for label, p in self._plan[0].items()}

    def _skip_reason(self, name: str) -> str:
        c = self.effective()
        if name not in LEARNERS:
            return "not registered"
        spec = TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=min(c.ways),
                        train_classes=_SPEC_CLASSES)
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

    # -- the analysis ---------------------------------------------------------------------------------
    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        plan, skipped = self._plan
        for name, why in skipped.items():
            ctx.say(f"skipping {name}: {why}")
        evals: dict[tuple[str, int, int], Evaluation] = {}  # (learner, ways, shots) -> its evaluation
        grid: dict[str, dict[str, dict[str, Any]]] = {}  # learner -> "5-way 1-shot" -> accuracy
        timings: dict[str, dict[str, Any]] = {}
        curves: dict[str, list[tuple[int, float]]] = {}
        for label, p in plan.items():
            log = ctx.log(label)
            trainable = LEARNERS[p.name].cls.trainable
            timings[label] = {"train_seconds": ctx.train_seconds[label], "steps": p.config.train.steps if trainable
                              else 0, "seconds_per_step": seconds_per_step(log)}
            curves[label] = [(r["step"], r["loss"]) for r in log if "loss" in r]
            for ways in p.ways:
                t0 = time.perf_counter()
                ev = ctx.evaluate(label, episodes=c.episodes, seed=c.eval_seed, with_oracle=False,
                                  task={"ways": ways, "queries": c.test_queries}, batch_tasks=_EVAL_BATCH)
                setting = f"{ways}-way {p.shots}-shot"
                ev.task = f"omniglot {setting}"
                report.evaluations.append(ev)
                evals[(p.name, ways, p.shots)] = ev
                acc = ev.metrics["accuracy"]
                grid.setdefault(p.name, {})[setting] = {"mean": acc.mean, "ci95": acc.ci95, "trained": label}
                timings[label][f"eval_seconds_{ways}w"] = round(time.perf_counter() - t0, 1)
                ctx.say(f"{p.name} {setting} (trained {p.train_ways}-way): accuracy {fmt(acc, percent=True)}  "
                        f"({time.perf_counter() - t0:.0f}s)")
        self._text(ctx, report, grid, timings, skipped)
        self._checks(report, evals)
        report.data.update(accuracy=grid, timings=timings, skipped=skipped, published={
            name: {"source": src, **{f"{w}-way {k}-shot": v for (w, k), v in pub.items()}}
            for name, (src, pub) in PUBLISHED.items()})
        report.figure(plot_training_curves(ctx.figure("training.png"), curves))
        report.figure(self._plot_episode(ctx, plan))

    def _text(self, ctx: Context, report: Report, grid: dict[str, dict[str, dict[str, Any]]],
              timings: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
        c = self.effective()
        report.text(
            "Meta-trained on the 136 characters of `images_background_small1` and their rotations by 90, 180 "
            "and 270 degrees (544 classes); tested on the 106 characters of the alphabets of "
            "`images_background_small2` that small1 lacks (Japanese (katakana), Sanskrit, Tagalog), "
            f"never seen in training. Accuracy on {c.episodes} held-out tasks per setting (the same tasks "
            f"for every learner, seed {c.eval_seed}), {c.test_queries} queries per class, mean ± 95% CI.")
        settings = [(w, k) for w in c.ways for k in c.shots]
        table = Table(["learner"] + [f"{w}-way {k}-shot" for w, k in settings])
        for name, row in grid.items():
            table.rows.append([f"`{name}`"] + [fmt(row.get(f"{w}-way {k}-shot"), percent=True) for w, k in settings])
        for name, (source, pub) in PUBLISHED.items():
            if name in grid:
                table.rows.append([f"{name}, published ({source})"] + [
                    f"{pub[(w, k)]:.1f}%" if (w, k) in pub else "–" for w, k in settings])
        report.table(table)
        step_times = ", ".join(f"{k} {v['seconds_per_step']:.3f}s" for k, v in timings.items()
                               if v.get("seconds_per_step"))
        report.text(
            "The published rows (and the `reaches_published` checks) are references, not results this study is "
            "expected to reach: Snell et al. (2017), Vinyals et al. (2016) and Finn et al. (2017) meta-trained on "
            "1200 characters of the full Omniglot set (with rotations, 4800 classes) and tested on the other 423, "
            "while this study meta-trains on the 136 characters of small1 (the full background set alone has "
            "964).")
        report.text(
            f"Budget: {_describe_steps(c)} per run, {c.batch_tasks} task(s) per step, Adam lr {c.lr}, "
            f"{c.train_queries} queries per class in training; protonet, matching and pretrain train "
            f"{c.train_ways}-way (one model per shot count, evaluated at every way), the others at the test way. "
            f"Conv-4 with {c.channels} channels for the metric and gradient learners; `pretrain` is a Conv-4 "
            "classifier over the 544 training classes, trained like the metric learners, then a fresh N-way "
            "linear head on its frozen features (100 SGD steps of 0.1 on each support set); `scratch` is an MLP "
            "(256-128 hidden units) on the flattened pixels fitted to each support set.\n\n"
            f"Seconds per training step ({self.hardware()}): {step_times or '–'}. Seconds spent training each run "
            f"in this invocation (finished runs being reused): "
            + ", ".join(f"{k} {v['train_seconds']}" for k, v in timings.items()) + ".")
        if skipped:
            report.text("Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".")

    def _checks(self, report: Report, evals: dict[tuple[str, int, int], Evaluation]) -> None:
        for (name, ways, shots), ev in evals.items():
            acc, chance = ev.metrics["accuracy"], 1 / ways
            report.check(f"{name}.{ways}w{shots}s.above_chance", Check(
                round(100 * acc.mean, 2), f"> {100 * chance:.3g} + {100 * acc.ci95:.2g} (% accuracy: chance, "
                f"1/{ways}, plus the 95% CI)", bool(acc.mean - chance > acc.ci95)))
            if name in PUBLISHED and (ways, shots) in PUBLISHED[name][1]:
                source, target = PUBLISHED[name][0], PUBLISHED[name][1][(ways, shots)]
                report.check(f"{name}.{ways}w{shots}s.reaches_published", Check(
                    round(100 * acc.mean, 2), f">= {target:g} ({source}, 1200 training characters: a reference)",
                    bool(100 * acc.mean >= target)))
        for (name, ways, shots), ev in evals.items():
            scratch = evals.get(("scratch", ways, shots))
            if name == "protonet" and scratch is not None:
                lead = ev.metrics["accuracy"].mean - scratch.metrics["accuracy"].mean
                report.check(f"protonet.{ways}w{shots}s.beats_scratch", Check(
                    round(100 * lead, 2), "> 0 (accuracy points over scratch on the same tasks)", bool(lead > 0)))

    def _plot_episode(self, ctx: Context, plan: dict[str, _Planned]) -> Path | None:
        """A held-out 5-way 1-shot task with the predictions of a trained 1-shot protonet (or matching)."""
        label = next((label for name in ("protonet", "matching") for label, p in plan.items()
                      if p.name == name and p.shots == 1), None)
        if label is None:
            return None
        run = ctx.run(label, task={"ways": 5, "queries": 4})
        learner = run.learner.to("cpu")
        return plot_image_task(ctx.figure("episode.png"), run.family.eval_episodes(self.effective().eval_seed, 1),
                                learner.predict, title=f"{run.config.learner}: a held-out 5-way 1-shot task "
                                                       "(top: support)")


def _describe_steps(c: OmniglotStudy.Config) -> str:
    if isinstance(c.steps, dict):
        return ", ".join(f"{k} {c.steps_for(k)} steps" for k in c.learners)
    return f"{c.steps} steps"
