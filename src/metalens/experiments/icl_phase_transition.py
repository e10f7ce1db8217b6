"""Memorisation vs learning-to-learn (``metalens study icl-phase-transition``; Kirsch et al. 2022, fig. 3).

With the model and the budget fixed, an in-context learner is meta-trained on pools of
``2^k`` distinct tasks (``projected`` digits by default, or ``random_mlp``) for each ``k``
in a grid (and on an unbounded stream), then scored on tasks of the pool (fresh examples)
and on unseen tasks (new projections and label maps on held-out examples). The report
gives the first ``k`` at which the unseen-task score departs from chance (see
:func:`departure`), and the gap between training and unseen tasks for every ``k``;
``model_dims`` adds a second axis, the model's width.

Checks, per width (Kirsch et al. 2022): with ``2^0`` training tasks the learner memorises,
its unseen-task score at chance; and the grid holds a transition, a ``k`` whose unseen-task
score departs from chance after one at chance.

Runs live in ``OUT/runs/<learner><width>-k<k>`` (``-kinf`` for the unbounded stream);
running the study again with the same options reuses them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Normal

from metalens.config import Options, opt
from metalens.experiments.recipes import in_context_quick, in_context_train
from metalens.experiments.spine import Context, Study
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, fmt
from metalens.run import RunConfig

__all__ = ["ICLPhaseTransition", "departure"]

# How far above chance a score must be, beyond its 95% CI, to count as learning: accuracy points
# (classification) or a fraction of the zero predictor's MSE (regression).
MARGIN = {True: 0.05, False: 0.1}


def _above_chance(score: dict[str, float], chance: float, *, lower_is_better: bool,
                  margin: float) -> tuple[float, float]:
    """``(gain, needed)``: how far ``score`` beats ``chance``, and by how much it must to depart from it
    (its 95% CI half-width and ``margin``: absolute, or relative to the chance loss when ``lower_is_better``)."""
    gain = (chance - score["mean"]) if lower_is_better else (score["mean"] - chance)
    return gain, max(score["ci95"], margin * chance if lower_is_better else margin)


def departure(unseen: list[dict[str, float]], chance: list[float], *, lower_is_better: bool,
              margin: float) -> int | None:
    """Index of the first point whose unseen-task score beats chance by more than its 95% CI
    half-width and by ``margin`` (absolute: accuracy points; relative: a fraction of the
    chance loss when ``lower_is_better``); None if none does.

    >>> departure([{"mean": 0.1, "ci95": 0.01}, {"mean": 0.2, "ci95": 0.01}], [0.1, 0.1],
    ...           lower_is_better=False, margin=0.05)
    1
    """
    for i, (u, ch) in enumerate(zip(unseen, chance)):
        gain, needed = _above_chance(u, ch, lower_is_better=lower_is_better, margin=margin)
        if gain > needed:
            return i
    return None


def _zero(support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None) -> Normal:
    """The zero predictor (regression's chance level), as ``Normal(0, 1)`` over the queries."""
    mean = query_x.new_zeros(*query_x.shape[:2], support_y.shape[-1])
    return Normal(mean, torch.ones_like(mean))


@STUDIES.register("icl-phase-transition")
class ICLPhaseTransition(Study):
    """Memorisation vs learning-to-learn against the number of training tasks (Kirsch et al. 2022)."""

    title = "Memorisation vs learning-to-learn (Kirsch et al. 2022)"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the icl-phase-transition study (``--set study.KEY=VALUE``)."""

        task: Literal["projected", "random_mlp"] = opt("projected", "task family: projected digits or random_mlp")
        log2_tasks: tuple[int, ...] = opt((0, 3, 6, 9, 12), "k: pools of 2^k training tasks", ge=0, le=40)
        unbounded: bool = opt(True, "also train on an unbounded stream of tasks")
        learner: Literal["transformer", "lstm"] = opt("transformer", "the in-context learner")
        mode: Literal["set", "sequence"] = opt("set", "transformer mode")
        model_dims: tuple[int, ...] = opt((32,), "model widths (transformer dim or lstm hidden): a second axis",
                                          ge=1, min_len=1)
        layers: int = opt(2, "transformer blocks (the lstm has one layer)", ge=1)
        heads: int = opt(2, "attention heads (at most the width; must divide each width)", ge=1)
        shots: int = opt(5, "support examples per class (projected) or support points (random_mlp)", ge=1)
        queries: int = opt(5, "query examples per class (projected) or query points (random_mlp)", ge=1)
        steps: int = opt(1500, "meta-training steps of every run (the defaults: ~12 min on one CPU thread)", ge=1)
        batch_tasks: int = opt(32, "tasks per step", ge=1)
        lr: float = opt(1e-3, "Adam learning rate", gt=0)
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)", ge=0)
        seed: int = opt(0, "training seed (episodes and initial weights; the pools are fixed by pool_seed 0)",
                        ge=0)
        episodes: int = opt(200, "held-out tasks per split (training tasks, unseen tasks)", ge=2)
        eval_seed: int = opt(0, "seed of the scored tasks", ge=0)
        quick: bool = opt(False, "smoke test: tiny models, 3 steps, few tasks (overrides the budgets)")

        def check(self) -> None:
            if not self.log2_tasks and not self.unbounded:
                raise ValueError("log2_tasks must hold a k, or unbounded be true: there is nothing to train")
            if self.learner == "transformer":
                for width in self.model_dims:
                    if width % min(self.heads, width):
                        raise ValueError(f"heads must divide every width of model_dims, got width={width} and "
                                         f"heads={self.heads}")

    def effective(self) -> ICLPhaseTransition.Config:
        """The configuration actually run: ``quick`` shrinks every budget and every width (to 16 at most)."""
        c = self.config
        if not c.quick:
            return c
        return in_context_quick(c, model_dims=tuple(min(m, 16) for m in c.model_dims), layers=1, heads=2)

    @property
    def classification(self) -> bool:
        return self.config.task == "projected"

    def grid(self) -> list[int | None]:
        """The pool sizes ``k`` trained (``None``: the unbounded stream), in order."""
        c = self.effective()
        return [*sorted(set(c.log2_tasks)), *([None] if c.unbounded else [])]

    def label(self, width: int, k: int | None) -> str:
        return f"{self.effective().learner}{width}-k{'inf' if k is None else k}"

    def task_options(self, k: int | None) -> dict[str, Any]:
        c = self.effective()
        opts: dict[str, Any] = {"shots": c.shots, "queries": c.queries, "pool_log2": k}
        if c.quick and c.task == "projected":
            opts.update(ways=3, dim=16)
        return opts

    def learner_options(self, width: int) -> dict[str, Any]:
        c = self.effective()
        if c.learner == "lstm":
            return {"hidden": width}
        return {"mode": c.mode, "dim": width, "layers": c.layers, "heads": min(c.heads, width)}

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        return {self.label(width, k): RunConfig.resolve(c.task, c.learner, self.task_options(k),
                                                        self.learner_options(width), in_context_train(c))
                for width in c.model_dims for k in self.grid()}

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        key = "accuracy" if self.classification else "mse"
        rows = [self._score(ctx, report, width, k) for width in c.model_dims for k in self.grid()]
        transitions: dict[str, Any] = {}
        for width in c.model_dims:
            mine = [r for r in rows if r["width"] == width]
            transitions[str(width)] = self._check_width(report, width, mine)
        report.figure(_plot(ctx.figure("phase-transition.png"), rows, self.classification))
        rule = ("unseen-task accuracy above chance (1/ways) by more than its 95% CI and by 5 points"
                if self.classification else
                "unseen-task MSE below the zero predictor's by more than its 95% CI and by 10%")
        report.text(
            f"Every run: `{c.learner}` ({self._describe()}) on `{c.task}` with a pool of 2^k tasks (pool seed 0), "
            f"{c.steps} steps of {c.batch_tasks} tasks, Adam lr {c.lr}, grad clip {c.grad_clip}, seed {c.seed}. "
            f"Scored on {c.episodes} tasks of the pool with fresh examples (\"training tasks\") and {c.episodes} "
            f"unseen tasks on held-out examples (evaluation seed {c.eval_seed}).")
        report.text(f"**Transition** (first k with {rule}): "
                    + ", ".join(f"width {w}: k = {t if t is not None else 'none in the grid'}"
                                for w, t in transitions.items())
                    + ". Kirsch et al. (2022) report memorisation with few training tasks (unseen tasks at chance) "
                      "and a transition to general-purpose in-context learning as their number grows: the checks "
                      "`width<w>.memorises_at_k0` and `width<w>.transition_in_grid` test both.")
        report.table(Table(["width", "k", f"{key}: training tasks", f"{key}: unseen tasks", "chance",
                            "train seconds"],
                           [[r["width"], "∞" if r["log2_tasks"] is None else r["log2_tasks"],
                             fmt(r[f"training_{key}"], 3), fmt(r[f"unseen_{key}"], 3), fmt(r["unseen_chance"], 3),
                             r["train_seconds"]] for r in rows]))
        report.data.update(rows=rows, transition_log2_tasks=transitions)

    def _score(self, ctx: Context, report: Report, width: int, k: int | None) -> dict[str, Any]:
        """One row: run ``(width, k)`` on tasks of its pool and on unseen tasks, each beside chance."""
        c = self.effective()
        label = self.label(width, k)
        family = ctx.run(label).family
        row: dict[str, Any] = {"width": width, "log2_tasks": k, "train_seconds": ctx.train_seconds[label]}
        for split, name in (("train", "training"), ("test", "unseen")):
            ev = ctx.evaluate(label, episodes=c.episodes, seed=c.eval_seed, split=split, with_oracle=False)
            ev.task = f"{c.task} 2^{k if k is not None else 'inf'} tasks, {name} tasks"
            report.evaluations.append(ev)
            for metric, m in ev.metrics.items():
                row[f"{name}_{metric}"] = asdict(m)
            if self.classification:
                row[f"{name}_chance"] = 1.0 / family.spec.num_classes
            else:
                tasks = family.eval_episodes(c.eval_seed, c.episodes, split=split)
                row[f"{name}_chance"] = float(ctx.score(_zero, tasks, with_nll=False)["mse"].mean())
        key = "accuracy" if self.classification else "mse"
        ctx.say(f"{label}: {key} training tasks {fmt(row[f'training_{key}'], 3)}, unseen "
                f"{fmt(row[f'unseen_{key}'], 3)} (chance {row['unseen_chance']:.3f})")
        return row

    def _check_width(self, report: Report, width: int, rows: list[dict[str, Any]]) -> int | str | None:
        """Record the checks of one width; returns the first k departing from chance ("inf", None: none)."""
        key = "accuracy" if self.classification else "mse"
        rule = {"lower_is_better": not self.classification, "margin": MARGIN[self.classification]}
        unseen, chance = [r[f"unseen_{key}"] for r in rows], [r["unseen_chance"] for r in rows]
        i = departure(unseen, chance, **rule)
        first = None if i is None else ("inf" if rows[i]["log2_tasks"] is None else rows[i]["log2_tasks"])
        if rows[0]["log2_tasks"] == 0:
            gain, needed = _above_chance(unseen[0], chance[0], **rule)
            report.check(f"width{width}.memorises_at_k0", Check(
                round(unseen[0]["mean"], 4), f"chance {chance[0]:.3g}, not beaten by more than {needed:.2g} "
                                             f"(95% CI or margin)", bool(gain <= needed)))
        report.check(f"width{width}.transition_in_grid", Check(
            first, "a k whose unseen-task score departs from chance, after one at chance",
            bool(i is not None and i > 0)))
        return first

    def _describe(self) -> str:
        c = self.effective()
        if c.learner == "lstm":
            return "hidden = width"
        return f"mode {c.mode}, width = dim, {c.layers} blocks, {c.heads} heads"


def _plot(path: Path, rows: list[dict[str, Any]], classification: bool) -> Path:
    """Training- and unseen-task scores against log2 of the number of training tasks, per width."""
    plt = pyplot()
    metrics = ["accuracy", "nll"] if classification else ["mse"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    finite = [r["log2_tasks"] for r in rows if r["log2_tasks"] is not None]
    inf_x = (max(finite) + 2) if finite else 0
    for ax, metric in zip(axes[0], metrics):
        for width in sorted({r["width"] for r in rows}):
            mine = [r for r in rows if r["width"] == width]
            x = [r["log2_tasks"] if r["log2_tasks"] is not None else inf_x for r in mine]
            for name, ls in (("training", "-"), ("unseen", "--")):
                m = np.array([r[f"{name}_{metric}"]["mean"] for r in mine])
                ci = np.array([r[f"{name}_{metric}"]["ci95"] for r in mine])
                ax.errorbar(x, m, yerr=ci, ls=ls, marker="o", ms=3, capsize=2, label=f"width {width}, {name} tasks")
        if metric == "accuracy" or not classification:
            chance = [r["unseen_chance"] for r in rows]
            ax.axhline(float(np.mean(chance)), color="k", lw=0.8, ls=":", label="chance")
        elif metric == "nll":
            ax.axhline(math.log(1.0 / rows[0]["unseen_chance"]), color="k", lw=0.8, ls=":", label="chance")
        ticks = sorted({r["log2_tasks"] for r in rows if r["log2_tasks"] is not None})
        labels = [str(t) for t in ticks]
        if len(finite) < len(rows):
            ticks, labels = [*ticks, inf_x], [*labels, "∞"]
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("log2(number of training tasks)")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
