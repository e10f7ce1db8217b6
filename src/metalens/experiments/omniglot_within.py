"""``metalens study omniglot-within``: Omniglot's one-shot task as Lake et al. (2015) ran it, within one alphabet.

Every held-out task is 20-way 1-shot with its 20 characters drawn from **one** alphabet (Lake et al.'s
within-alphabet classification, harder than tasks mixing alphabets: the characters of one alphabet share
their strokes and style). On the shipped minimal sets (the ``omniglot`` family's ``small_within``
protocol): meta-train on the 136 characters of ``images_background_small1`` and their rotations by 90, 180
and 270 degrees (544 classes), test on the alphabets of ``images_background_small2`` that small1 lacks and
that have at least 20 characters (Japanese (katakana), 47, and Sanskrit, 42; Tagalog, 17, is too small),
never seen in training and never rotated. ``episodes`` held-out tasks, the same for every run (``eval_seed``),
``test_queries`` queries per class, accuracy as mean and 95% CI over tasks.

Every learner in ``learners`` is meta-trained once per image size in ``sizes`` and per training-data
variant in ``augment``:

- ``none``: the scanned images (resized to ``size``, box filter, from the 105 px scans);
- ``handwriting``: small random affine maps of every meta-training image (the family's
  ``augment = handwriting``: rotation, shear, scale, translation);
- ``strokes``: every meta-training image drawn anew from perturbed pen trajectories (the family's
  ``strokes = perturb``, :mod:`metalens.data.strokes`), as if someone else had drawn the character;
- ``both``: ``strokes``, then ``handwriting`` on top.

Learners and their options are the ``omniglot`` study's (:func:`metalens.experiments.omniglot.learner_options`):
``protonet``, ``matching`` and ``pretrain`` (no parameter depends on the number of classes) meta-train on
``train_ways``-way tasks (Snell et al. train with more ways than they test); ``maml`` trains 20-way with
Finn et al.'s 20-way inner loop (5 steps of 0.1). ``train_episodes = within_group`` draws meta-training tasks
within one alphabet too. ``tta`` > 0 also scores every run with test-time augmentation: each support image
joins ``tta`` randomly transformed copies of itself (the ``handwriting`` maps), all labelled as it is.

Runs live in ``OUT/runs/<learner>-<size>px-<augment>``; running the study again reuses them. They train on the
``small`` protocol (the same meta-training split and tasks as ``small_within``, which would refuse ``train_ways``
above the 47 characters of its largest test alphabet) and are scored on ``small_within``.

Checks: ``<run>.above_chance`` (accuracy above 1/20 by more than its 95% CI); ``best.reaches_95``: the
best run reaches 95% (Lake et al.'s humans make 4.5% errors; the target of this study), honest when it
does not; and, with paired differences on the same held-out tasks (mean above its 95% CI),
``<learner>.<size>px.<variant>_helps`` (a training-data variant against ``none``),
``<learner>.<variant>.<size>px_beats_<smallest>px`` (resolution) and ``<run>.tta_helps``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from metalens.config import ConfigError, Options, opt
from metalens.data import augment as aug
from metalens.episode import TaskSpec
from metalens.evaluate import Evaluation, summarize
from metalens.experiments.omniglot import check_steps, learner_options, quick, steps_of
from metalens.experiments.spine import Context, Study, seconds_per_step
from metalens.plots import plot_image_task, plot_training_curves, pyplot, save_figure
from metalens.registry import LEARNERS, STUDIES
from metalens.report import Check, Report, Table, above, fmt
from metalens.run import RunConfig, make_learner

__all__ = ["DEFAULT_STEPS", "TARGET", "OmniglotWithin", "tta_predict"]

Variant = Literal["none", "handwriting", "strokes", "both"]
DEFAULT_LEARNERS = ("protonet", "matching", "maml", "pretrain")
# Steps per run (each run at 28 px): the default study (8 runs, training and scoring) within about 20 minutes
# on one CPU thread of a 2-core machine shared with other work; see docs/results/omniglot-within.md.
DEFAULT_STEPS = {"protonet": 400, "matching": 400, "maml": 60, "pretrain": 400}
TARGET = 0.95  # Lake et al. (2015): people err on 4.5% of within-alphabet 20-way 1-shot tasks
_VARIANT_TASK: dict[str, dict[str, Any]] = {
    "none": {}, "handwriting": {"augment": "handwriting"}, "strokes": {"strokes": "perturb"},
    "both": {"strokes": "perturb", "augment": "handwriting"}}
_VARIANT_TEXT = {"none": "the scans", "handwriting": "random affine maps of the training images",
                 "strokes": "training images redrawn from perturbed pen strokes",
                 "both": "strokes, then handwriting"}
_SPEC_CLASSES = 10  # any number builds a learner to see which parameters depend on N
_EVAL_BATCH = 10  # tasks per predict call when scoring (memory only)


class _Planned(NamedTuple):
    """One run: its learner, image size, training-data variant and the ways it trains at."""

    name: str
    size: int
    variant: str
    train_ways: int
    config: RunConfig


def tta_predict(predict: Any, copies: int, *, seed: int, rotation: float = 10.0, shear: float = 10.0,
                scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.1) -> Any:
    """``predict`` with test-time augmentation of the support set: every support image ``[C, H, W]`` joins
    ``copies`` random affine transforms of itself (:func:`metalens.data.augment.handwriting`), with its label.

    The transforms of each batch are drawn from a generator seeded with ``seed`` (scores are reproducible for a
    given batch size).

    >>> import torch
    >>> from torch.distributions import Categorical
    >>> seen = []
    >>> def predict(sx, sy, qx, *, support_mask=None):
    ...     seen.append((sx.shape, sy.tolist(), support_mask.shape))
    ...     return Categorical(logits=torch.zeros(qx.shape[0], qx.shape[1], 2))
    >>> _ = tta_predict(predict, 2, seed=0)(torch.rand(1, 2, 1, 8, 8), torch.tensor([[0, 1]]), torch.rand(1, 3, 1, 8, 8))
    >>> seen
    [(torch.Size([1, 6, 1, 8, 8]), [[0, 1, 0, 1, 0, 1]], torch.Size([1, 6]))]
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")

    def wrapped(support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        T, S = support_y.shape
        g = torch.Generator(device=support_x.device).manual_seed(seed)
        views = [support_x] + [
            aug.handwriting(support_x.flatten(0, 1), generator=g, rotation=rotation, shear=shear, scale=scale,
                            translate=translate).reshape(support_x.shape) for _ in range(copies)]
        mask = torch.ones(T, S, dtype=torch.bool, device=support_x.device) if support_mask is None else support_mask
        return predict(torch.cat(views, 1), support_y.repeat(1, copies + 1), query_x,
                       support_mask=mask.repeat(1, copies + 1))  # [T, S (copies + 1), ...]

    return wrapped


@STUDIES.register("omniglot-within")
class OmniglotWithin(Study):
    """Omniglot 20-way 1-shot within one alphabet (Lake et al. 2015): small1 (+rotations) against small2's alphabets."""

    title = "Omniglot within alphabets: Lake et al.'s 20-way 1-shot task"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the omniglot-within study (``--set study.KEY=VALUE``)."""

        learners: tuple[str, ...] = opt(DEFAULT_LEARNERS, "learners to train and score (unregistered ones are "
                                                          "skipped with a note)", min_len=1)
        sizes: tuple[int, ...] = opt((28,), "image sizes in pixels (the scans are 105 px); one run per size",
                                     min_len=1, ge=8)
        augment: tuple[Variant, ...] = opt(
            ("none", "handwriting"), "training-data variants, one run each: none, handwriting (random affine maps), "
                                     "strokes (redrawn from perturbed pen strokes), both", min_len=1)
        ways: int = opt(20, "test ways (N): characters of one alphabet per held-out task", ge=2)
        train_ways: int = opt(20, "ways of the meta-training tasks of protonet, matching and pretrain (no parameter "
                                  "depends on N); the others train at the test way", ge=2)
        train_episodes: Literal["any", "within_group"] = opt(
            "any", "which characters a meta-training task draws: any of small1, or all from one alphabet")
        train_queries: int = opt(5, "query images per class in meta-training tasks", ge=1)
        test_queries: int = opt(1, "query images per class in held-out tasks (1 + queries <= 20; 1: Lake et al.'s "
                                   "task, every test image of the 20 characters matched against one drawing of each)",
                                ge=1)
        steps: int | dict[str, int] = opt(
            dict(DEFAULT_STEPS), "meta-training steps per run: one number for every learner, or a table "
            "{protonet = N, ...} (learners it leaves out keep their default; 400 for those without one)", ge=1)
        lr: float = opt(1e-3, "Adam learning rate", gt=0)
        channels: int = opt(64, "Conv-4 channels", ge=1)
        episodes: int = opt(400, "held-out tasks, the same for every run", ge=2)
        tta: int = opt(0, "test-time augmentation: also score every run with this many transformed copies of each "
                          "support image (0: off)", ge=0)
        seed: int = opt(0, "training seed of every run", ge=0)
        eval_seed: int = opt(0, "seed of the held-out tasks and of the test-time transforms", ge=0)
        root: str = opt("", "folder with the Omniglot minimal zips and strokes ('': the omniglot family's default)")
        quick: bool = opt(False, "smoke test: 2 steps, 4 held-out tasks, 8 channels (numbers meaningless)")

        def check(self) -> None:
            if not any(n in LEARNERS for n in self.learners):
                raise ValueError(f"learners must name at least one registered learner ({', '.join(LEARNERS.names())})"
                                 f", got {list(self.learners)}")
            if 1 + max(self.train_queries, self.test_queries) > 20:
                raise ValueError("Omniglot has 20 images per character: 1 + queries must be <= 20, got 1 + "
                                 f"{max(self.train_queries, self.test_queries)}")
            for key in ("sizes", "augment"):
                values = getattr(self, key)
                if len(set(values)) != len(values):
                    raise ValueError(f"{key} lists a value twice: {list(values)}")
            check_steps(self.steps, self.learners, DEFAULT_STEPS)

        def steps_for(self, name: str) -> int:
            """Meta-training steps of each run of learner ``name``."""
            return steps_of(self.steps, name, DEFAULT_STEPS, 400)

    def effective(self) -> OmniglotWithin.Config:
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
            tw = c.train_ways if self._way_independent(name) else c.ways
            steps = c.steps_for(name)
            train = {"steps": steps, "batch_tasks": 1, "lr": c.lr, "seed": c.seed, "log_every": 10,
                     "checkpoint_every": max(500, steps // 4)}
            for size in c.sizes:
                for variant in c.augment:
                    # the small protocol has small_within's training split and tasks, and refuses no train_ways for
                    # want of a test alphabet with that many characters; scoring switches to small_within
                    task = {"root": c.root, "protocol": "small", "ways": tw, "shots": 1,
                            "queries": c.train_queries, "size": size, "episodes": c.train_episodes,
                            **_VARIANT_TASK[variant]}
                    cfg = RunConfig.resolve("omniglot", name, task, learner_options(name, tw, c.channels), train)
                    plan[f"{name}-{size}px-{variant}"] = _Planned(name, size, variant, tw, cfg)
        return plan, skipped

    def runs(self) -> dict[str, RunConfig]:
        return {label: p.config for label, p in self._plan[0].items()}

    def _skip_reason(self, name: str) -> str:
        c = self.effective()
        if name not in LEARNERS:
            return "not registered"
        if not LEARNERS[name].cls.trainable:
            return "not meta-trained (this study compares meta-trained learners)"
        for size in c.sizes:
            spec = TaskSpec(kind="classification", x_shape=(1, size, size), num_classes=c.ways,
                            train_classes=_SPEC_CLASSES)
            try:
                make_learner(name, spec, **learner_options(name, c.ways, c.channels))
            except (ConfigError, ValueError, TypeError) as e:
                return f"cannot be built for {size}x{size} images with the study's options ({e})"
        return ""

    def _way_independent(self, name: str) -> bool:
        """True when no parameter of the learner depends on N: it may train at ``train_ways``."""
        c = self.effective()
        shapes = []
        for n in (2, 3):
            spec = TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=n, train_classes=_SPEC_CLASSES)
            learner = make_learner(name, spec, **learner_options(name, c.ways, c.channels))
            shapes.append({k: tuple(v.shape) for k, v in learner.state_dict().items()})
        return shapes[0] == shapes[1]

    # -- the analysis ---------------------------------------------------------------------------------
    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        plan, skipped = self._plan
        for name, why in skipped.items():
            ctx.say(f"skipping {name}: {why}")
        test = {"protocol": "small_within", "episodes": "any", "ways": c.ways, "queries": c.test_queries,
                "strokes": "none", "augment": "none"}
        evals: dict[str, Evaluation] = {}
        tta: dict[str, Evaluation] = {}
        timings: dict[str, dict[str, Any]] = {}
        curves: dict[str, list[tuple[int, float]]] = {}
        for label, p in plan.items():
            log = ctx.log(label)
            timings[label] = {"train_seconds": ctx.train_seconds[label], "steps": p.config.train.steps,
                              "seconds_per_step": seconds_per_step(log)}
            curves[label] = [(r["step"], r["loss"]) for r in log if "loss" in r]
            t0 = time.perf_counter()
            ev = ctx.evaluate(label, episodes=c.episodes, seed=c.eval_seed, with_oracle=False, task=test,
                              batch_tasks=_EVAL_BATCH)
            ev.task = f"omniglot within-alphabet {c.ways}-way 1-shot"
            ev.learner = label
            report.evaluations.append(ev)
            evals[label] = ev
            timings[label]["eval_seconds"] = round(time.perf_counter() - t0, 1)
            ctx.say(f"{label}: accuracy {fmt(ev.metrics['accuracy'], percent=True)}  "
                    f"({time.perf_counter() - t0:.0f}s)")
            if c.tta:
                t0 = time.perf_counter()
                tta[label] = self._evaluate_tta(ctx, label, test)
                timings[label]["tta_eval_seconds"] = round(time.perf_counter() - t0, 1)
                ctx.say(f"{label} with {c.tta} transformed copies of each support image: accuracy "
                        f"{fmt(tta[label].metrics['accuracy'], percent=True)}")
        self._text(report, plan, evals, tta, timings, skipped)
        self._checks(report, plan, evals, tta)
        report.data.update(
            accuracy={label: {"learner": p.name, "size": p.size, "augment": p.variant, "train_ways": p.train_ways,
                              "mean": evals[label].metrics["accuracy"].mean,
                              "ci95": evals[label].metrics["accuracy"].ci95,
                              **({"tta_mean": tta[label].metrics["accuracy"].mean,
                                  "tta_ci95": tta[label].metrics["accuracy"].ci95} if label in tta else {})}
                      for label, p in plan.items()},
            target=TARGET, timings=timings, skipped=skipped)
        report.figure(self._plot_accuracy(ctx, plan, evals, tta))
        report.figure(plot_training_curves(ctx.figure("training.png"), curves))
        report.figure(self._plot_episode(ctx, plan, evals))

    def _evaluate_tta(self, ctx: Context, label: str, test: dict[str, Any]) -> Evaluation:
        c = self.effective()
        run = ctx.run(label, task=test)
        episode = run.family.eval_episodes(c.eval_seed, c.episodes, split="test")
        per_task = ctx.score(tta_predict(run.learner.predict, c.tta, seed=c.eval_seed), episode, with_nll=False,
                             batch_tasks=_EVAL_BATCH)
        acc = per_task["accuracy"]
        return Evaluation(task=f"omniglot within-alphabet {c.ways}-way 1-shot, {c.tta} support copies",
                          learner=label, episodes=c.episodes, seed=c.eval_seed,
                          metrics={"accuracy": summarize(acc)}, oracle=None, per_task={"accuracy": acc})

    def _text(self, report: Report, plan: dict[str, _Planned], evals: dict[str, Evaluation],
              tta: dict[str, Evaluation], timings: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
        c = self.effective()
        report.text(
            f"Meta-trained on the 136 characters of `images_background_small1` and their rotations (544 classes); "
            f"tested on {c.ways}-way 1-shot tasks whose characters all come from one alphabet of "
            "`images_background_small2` that small1 lacks and that has at least "
            f"{c.ways} characters (Japanese (katakana), Sanskrit), never seen in training. Accuracy on {c.episodes} "
            f"held-out tasks (the same tasks for every run, seed {c.eval_seed}), {c.test_queries} "
            f"quer{'y' if c.test_queries == 1 else 'ies'} per class, "
            f"mean ± 95% CI; chance is {100 / c.ways:.3g}%, the target {100 * TARGET:g}%.")
        columns = [(s, v) for s in c.sizes for v in c.augment]
        table = Table(["learner", "trained"] + [f"{s} px, {v}" for s, v in columns])
        names = list(dict.fromkeys(p.name for p in plan.values()))
        for name in names:
            tw = next(p.train_ways for p in plan.values() if p.name == name)
            cells = []
            for s, v in columns:
                label = f"{name}-{s}px-{v}"
                cell = fmt(evals[label].metrics["accuracy"], percent=True) if label in evals else "–"
                if label in tta:
                    cell += f" (TTA {fmt(tta[label].metrics['accuracy'], percent=True)})"
                cells.append(cell)
            table.rows.append([f"`{name}`", f"{tw}-way, {c.steps_for(name)} steps"] + cells)
        report.table(table)
        if tta:
            report.text(f"TTA: the same model scored with {c.tta} random affine copies of every support image "
                        "(handwriting maps: rotation and shear up to 10 degrees, scale 0.9-1.1, shift up to 10%).")
        report.text(
            f"Budget: one task per step, Adam lr {c.lr}, {c.train_queries} queries per class in training, "
            f"meta-training tasks drawn from {'one alphabet each' if c.train_episodes == 'within_group' else 'any alphabet of small1'}"
            f". Conv-4 with {c.channels} channels for every learner (the omniglot study's options: maml 5 inner "
            "steps of 0.1; pretrain a classifier over the 544 training classes, then a fresh linear head fitted to "
            "each support set's frozen features, 100 SGD steps of 0.1). Variants: "
            + "; ".join(f"`{v}` = {_VARIANT_TEXT[v]}" for v in c.augment) + ".\n\n"
            f"Seconds per training step ({self.hardware()}): "
            + (", ".join(f"{k} {v['seconds_per_step']:.3f}" for k, v in timings.items() if v.get("seconds_per_step"))
               or "–")
            + ". Seconds spent training each run in this invocation (finished runs being reused) and scoring it: "
            + ", ".join(f"{k} {v['train_seconds']} + {v['eval_seconds']}" for k, v in timings.items()) + ".")
        if skipped:
            report.text("Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".")

    def _checks(self, report: Report, plan: dict[str, _Planned], evals: dict[str, Evaluation],
                tta: dict[str, Evaluation]) -> None:
        c = self.effective()
        chance = 1 / c.ways
        for label, ev in evals.items():
            acc = ev.metrics["accuracy"]
            report.check(f"{label}.above_chance", Check(
                round(100 * acc.mean, 2), f"> {100 * chance:.3g} + {100 * acc.ci95:.2g} (% accuracy: chance, "
                f"1/{c.ways}, plus the 95% CI)", bool(acc.mean - chance > acc.ci95)))
        scored = {**{k: v.metrics["accuracy"].mean for k, v in evals.items()},
                  **{f"{k} (TTA)": v.metrics["accuracy"].mean for k, v in tta.items()}}
        if scored:
            best = max(scored, key=scored.__getitem__)
            report.check("best.reaches_95", Check(
                round(100 * scored[best], 2), f">= {100 * TARGET:g} (% accuracy of the best run, {best})",
                bool(scored[best] >= TARGET)))
        # levers, each a paired difference on the same held-out tasks
        sizes = sorted(c.sizes)
        for label, p in plan.items():
            acc = evals[label].per_task["accuracy"]
            plain = f"{p.name}-{p.size}px-none"
            if p.variant != "none" and plain in evals:
                report.check(f"{p.name}.{p.size}px.{p.variant}_helps", _paired(
                    acc - evals[plain].per_task["accuracy"], f"accuracy gain of {p.variant} over none"))
            small = f"{p.name}-{sizes[0]}px-{p.variant}"
            if p.size != sizes[0] and small in evals:
                report.check(f"{p.name}.{p.variant}.{p.size}px_beats_{sizes[0]}px", _paired(
                    acc - evals[small].per_task["accuracy"], f"accuracy gain of {p.size} px over {sizes[0]} px"))
            if label in tta:
                report.check(f"{label}.tta_helps", _paired(
                    tta[label].per_task["accuracy"] - acc, f"accuracy gain of {c.tta} support copies"))

    def _plot_accuracy(self, ctx: Context, plan: dict[str, _Planned], evals: dict[str, Evaluation],
                       tta: dict[str, Evaluation]) -> Path | None:
        """Accuracy (± 95% CI) of every run, grouped by learner, with chance and the 95% target."""
        if not evals:
            return None
        c = self.effective()
        plt = pyplot()
        names = list(dict.fromkeys(p.name for p in plan.values()))
        columns = [(s, v) for s in c.sizes for v in c.augment]
        width = 0.8 / len(columns)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 0.3 * len(columns)), 4))
        for j, (s, v) in enumerate(columns):
            xs, means, cis = [], [], []
            for i, name in enumerate(names):
                ev = evals.get(f"{name}-{s}px-{v}")
                if ev is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    means.append(100 * ev.metrics["accuracy"].mean)
                    cis.append(100 * ev.metrics["accuracy"].ci95)
            ax.bar(xs, means, width, yerr=cis, capsize=2, label=f"{s} px, {v}")
        ax.axhline(100 * TARGET, color="k", ls="--", lw=1, label=f"target {100 * TARGET:g}%")
        ax.axhline(100 / c.ways, color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(f"accuracy (%), {c.ways}-way 1-shot within an alphabet")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
        return save_figure(fig, ctx.figure("accuracy.png"))

    def _plot_episode(self, ctx: Context, plan: dict[str, _Planned], evals: dict[str, Evaluation]) -> Path | None:
        """A held-out within-alphabet task (one query per class) with the predictions of the best protonet (or the
        best run)."""
        if not evals:
            return None
        c = self.effective()
        protonets = [label for label, p in plan.items() if p.name == "protonet"]
        label = max(protonets or list(evals), key=lambda k: evals[k].metrics["accuracy"].mean)
        run = ctx.run(label, task={"protocol": "small_within", "episodes": "any", "ways": c.ways, "queries": 1,
                                   "strokes": "none", "augment": "none"})
        learner = run.learner.to("cpu")
        return plot_image_task(ctx.figure("episode.png"), run.family.eval_episodes(c.eval_seed, 1), learner.predict,
                               title=f"{label}: a held-out {c.ways}-way 1-shot task within one alphabet "
                                     "(top: support)")


def _paired(diff: np.ndarray, what: str) -> Check:
    """The claim that a per-task paired accuracy difference is above zero beyond its 95% CI (in % points)."""
    check = above(100 * diff, f"paired {what}, % points")
    return Check(round(check.value, 2), check.target, check.holds)
