"""``metalens tour`` (also ``metalens study tour``): every learner on its canonical family, beside the oracle.

Each learner is meta-trained with the small budget of its :data:`~metalens.experiments.recipes.TOUR`
recipe (the learners on sinusoid, the Neural Processes on GP functions, the metric learners
on 2-D clusters) and scored on held-out tasks drawn from evaluation seed 0, the oracle on the
very same tasks. Runs live in ``OUT/runs/<learner>``; running the tour again reuses them.

Checks: the oracle is Bayes-optimal, so no learner may beat it beyond chance (the paired
difference on the same tasks, against its 95% CI); every trained learner on sinusoid beats
``scratch`` (a network fitted to each support set alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from metalens.config import Options, opt
from metalens.evaluate import Evaluation
from metalens.experiments.recipes import TOUR
from metalens.experiments.spine import Context, Study
from metalens.plots import plot_decision_regions, plot_regression_tasks
from metalens.registry import LEARNERS, STUDIES
from metalens.report import Report, at_most, oracle_bound
from metalens.run import RunConfig

__all__ = ["Tour"]


def _known(names: tuple[str, ...]) -> None:
    for n in names:
        if n not in TOUR:
            raise ValueError(f"must name learners the tour has a recipe for ({', '.join(TOUR)}); {n!r} is not one")


@STUDIES.register("tour")
class Tour(Study):
    """Every learner on its canonical family with a small budget, beside the oracle (metalens tour)."""

    title = "metalens tour"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the tour (``metalens tour`` flags, or ``--set study.KEY=VALUE``)."""

        learners: tuple[str, ...] = opt(tuple(TOUR), "learners to show, each on its canonical family", min_len=1,
                                        check=_known)
        episodes: int | None = opt(None, "held-out tasks per learner (null: 1000 for regression, 600 for "
                                         "classification)", ge=2)
        steps_scale: float = opt(1.0, "multiply every training budget (e.g. 0.05 for a quick look)", gt=0)

    def command(self) -> str:
        c = self.config
        parts = ["metalens tour --out OUT"]
        if c.learners != tuple(TOUR):
            parts += [f"--learner {n}" for n in c.learners]
        if c.episodes is not None:
            parts.append(f"--episodes {c.episodes}")
        if c.steps_scale != 1.0:
            parts.append(f"--steps-scale {c.steps_scale:g}")
        return " ".join(parts)

    def runs(self) -> dict[str, RunConfig]:
        out = {}
        for name in self.config.learners:
            recipe = TOUR[name]
            train: dict[str, Any] = dict(recipe.train)
            if "steps" in train:
                train["steps"] = max(1, round(train["steps"] * self.config.steps_scale))
            out[name] = RunConfig.resolve(recipe.task, name, recipe.task_options, recipe.learner_options, train)
        return out

    def analyse(self, ctx: Context, report: Report) -> None:
        report.text("Each learner meta-trained on its canonical family with the small budget of its tour recipe "
                    "(`metalens.experiments.recipes.TOUR`; the run folders under `runs/` hold the exact "
                    "configuration), then scored on held-out tasks drawn from evaluation seed 0.")
        by_family: dict[tuple[str, str], list[tuple[str, Evaluation]]] = {}
        timings: dict[str, dict[str, float]] = {}
        for name, cfg in ctx.configs.items():
            ev = ctx.evaluate(name, episodes=self.config.episodes)
            timings[name] = {"train_seconds": ctx.train_seconds[name]}
            ctx.say(f"{name}: " + ", ".join(f"{k} {m}" for k, m in ev.metrics.items()))
            by_family.setdefault((cfg.task, repr(cfg.task_config)), []).append((name, ev))
        report.data["timings"] = timings
        for items in by_family.values():
            report.evaluations += [ev for _, ev in items]
            self._check_family(report, items)
            report.figure(self._figure(ctx, [name for name, _ in items]))

    def _check_family(self, report: Report, items: list[tuple[str, Evaluation]]) -> None:
        scratch = next((ev for name, ev in items if name == "scratch"), None)
        for name, ev in items:
            if ev.oracle_per_task is None or name == "oracle":
                continue
            report.check(f"{name}.no_better_than_oracle", oracle_bound(ev))
            key = "accuracy" if "accuracy" in ev.per_task else "mse"
            if scratch is not None and name != "scratch" and LEARNERS[name].cls.trainable and key == "mse":
                ratio = float(np.mean(ev.per_task["mse"]) / np.mean(scratch.per_task["mse"]))
                report.check(f"{name}.beats_scratch", at_most(round(ratio, 4), 1.0))

    def _figure(self, ctx: Context, names: list[str]):
        run = ctx.run(names[0])
        family, spec = run.family, run.family.spec
        learners = {n: ctx.learner(n).to("cpu") for n in names if n != "oracle"}
        path = ctx.figure(f"{run.config.task}.png")
        if spec.is_classification and spec.x_shape == (2,):
            predictors = {n: lrn.predict for n, lrn in learners.items()}
            if spec.oracle is not None:
                predictors["oracle"] = spec.oracle
            return plot_decision_regions(path, family.eval_episodes(0, 1), predictors,
                                         title=f"{run.config.task}: a held-out task")
        if not spec.is_classification:
            return plot_regression_tasks(path, family, learners, title=f"{run.config.task}: held-out tasks")
        return None
