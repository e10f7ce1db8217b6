"""``metalens study sinusoid-gradient``: the sinusoid benchmark of MAML (Finn et al. 2017, sec. 5.1 and
appendix table): every gradient learner and the baselines, trained at K=10, tested at K=5 and K=10
after 1, 5 and 10 adaptation steps, beside the Bayes-optimal oracle.

Each learner is trained with its recipe in :data:`~metalens.experiments.recipes.TOUR` for the number
of steps in :data:`BUDGETS` (times ``steps_multiplier``); then every (K, steps) cell is an evaluation of
the same trained parameters with ``task.shots=K`` and the learner's adaptation-steps option
(:data:`~metalens.experiments.recipes.ADAPTATION_STEPS`: ``eval_inner_steps`` for the gradient
learners, ``finetune_steps`` for ``pretrain``, ``steps`` for ``scratch``) set to ``steps``.

Checks: no learner beats the oracle beyond chance in any cell (the paired MSE excess on the same
tasks, against its 95% CI); the published MSEs at K=5 (Finn et al. 2017, appendix; Meta-SGD: Li et
al. 2017, table 1), each taken as a target; ``maml`` has a lower MSE than ``pretrain`` at every K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from metalens.config import Options, opt
from metalens.errors import NumericalError
from metalens.evaluate import Evaluation, Metric
from metalens.experiments.recipes import ADAPTATION_STEPS, TOUR
from metalens.experiments.spine import Context, Study
from metalens.plots import plot_regression_tasks, pyplot, save_figure
from metalens.registry import LEARNERS, STUDIES
from metalens.report import Check, Report, Table, at_most, fmt, oracle_bound
from metalens.run import RunConfig

__all__ = ["SinusoidGradient", "PUBLISHED", "BUDGETS"]

# Finn et al. (2017), appendix table (K=5, MSE after 1 / 5 / 10 steps); Li et al. (2017), table 1.
PUBLISHED = {
    "maml": {1: 0.67, 5: 0.38, 10: 0.35},
    "pretrain": {1: 2.41, 5: 2.23, 10: 2.19},
    "metasgd": {1: 0.90},
}
PUBLISHED_K = 5
DEFAULT_LEARNERS = ("maml", "fomaml", "metasgd", "anil", "reptile", "imaml", "pretrain", "scratch", "oracle")
# Meta-training steps per learner (each otherwise trained with its tour recipe):
# about 20 minutes for all of them on one quiet CPU thread.
BUDGETS = {"maml": 30000, "fomaml": 30000, "metasgd": 30000, "anil": 30000, "reptile": 24000, "imaml": 6000,
           "pretrain": 12000}

Cell = tuple[int, "int | None"]  # (K, adaptation steps); None for learners without such an option


def _registered(names: tuple[str, ...]) -> None:
    for n in names:
        if n not in LEARNERS:
            raise ValueError(f"must name registered learners ({', '.join(LEARNERS.names())}); {n!r} is not one")


@STUDIES.register("sinusoid-gradient")
class SinusoidGradient(Study):
    """Sinusoid regression: gradient learners and baselines at K=5/10 after 1/5/10 steps (Finn et al. 2017)."""

    title = "Sinusoid regression: the gradient lens against the oracle"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the sinusoid study (``--set study.KEY=VALUE``)."""

        learners: tuple[str, ...] = opt(DEFAULT_LEARNERS, "learners to train and compare", min_len=1,
                                        check=_registered)
        steps_multiplier: float = opt(1.0, "multiply every learner's training budget (BUDGETS) by this", gt=0)
        train_shots: int = opt(10, "support points per task in meta-training (K)", ge=1)
        test_shots: tuple[int, ...] = opt((5, 10), "support points per task at evaluation", min_len=1, ge=1)
        adapt_steps: tuple[int, ...] = opt((1, 5, 10), "adaptation steps at evaluation", min_len=1, ge=0)
        episodes: int = opt(1000, "held-out tasks per cell", ge=2)
        seed: int = opt(0, "training seed (evaluation uses seed 0 of the evaluation stream)", ge=0)
        quick: bool = opt(False, "smoke test: 1% of the budget and 50 held-out tasks")

    def effective(self) -> SinusoidGradient.Config:
        """The options actually run: ``quick`` takes 1% of every budget and 50 held-out tasks."""
        c = self.config
        return replace(c, steps_multiplier=c.steps_multiplier * 0.01, episodes=50) if c.quick else c

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        out = {}
        for name in c.learners:
            recipe = TOUR.get(name)
            train: dict[str, Any] = dict(recipe.train) if recipe is not None else {}
            train["steps"] = max(1, math.ceil(BUDGETS.get(name, train.get("steps", 1)) * c.steps_multiplier))
            train["seed"] = c.seed
            out[name] = RunConfig.resolve("sinusoid", name, {"shots": c.train_shots},
                                          dict(recipe.learner_options) if recipe is not None else {}, train)
        return out

    def _cells(self, name: str) -> list[Cell]:
        c = self.effective()
        return [(K, n) for K in c.test_shots for n in (c.adapt_steps if ADAPTATION_STEPS.get(name) else (None,))]

    def _final(self, name: str, K: int) -> Cell:
        """The cell at ``K`` after the most adaptation steps (the only one of a learner without them)."""
        return (K, self.effective().adapt_steps[-1] if ADAPTATION_STEPS.get(name) else None)

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        cells: dict[str, dict[Cell, Metric]] = {}
        evals: dict[str, dict[Cell, Evaluation]] = {}
        for name in ctx.configs:
            option = ADAPTATION_STEPS.get(name)
            cells[name], evals[name] = {}, {}
            for K, n in self._cells(name):
                try:
                    ev = ctx.evaluate(name, episodes=c.episodes, task={"shots": K},
                                      learner={option: n} if option else None)
                except NumericalError as e:  # e.g. an inner loop that diverges at this many steps
                    ctx.say(f"{name} K={K} steps={n}: diverged ({e})")
                    cells[name][(K, n)] = Metric(float("nan"), float("nan"))
                    continue
                cells[name][(K, n)], evals[name][(K, n)] = ev.metrics["mse"], ev
                if ev.diverged:
                    ctx.say(f"{name} K={K} steps={n}: {ev.diverged} of {ev.episodes} tasks diverged (left out)")
                if "oracle" not in ctx.configs and name == next(iter(ctx.configs)) and ev.oracle is not None:
                    for m in (c.adapt_steps if option else (None,)):
                        cells.setdefault("oracle (exact)", {})[(K, m)] = ev.oracle["mse"]
            ctx.say(f"{name}: " + "  ".join(f"K={K}/{n}: {m.mean:.3f}" for (K, n), m in cells[name].items()))
        shown = [evals[name].get(self._final(name, c.test_shots[0])) for name in evals]
        report.evaluations += [ev for ev in shown if ev is not None]
        self._text(ctx, report, cells, evals)
        self._checks(report, evals)
        report.data["cells"] = {n: {f"K={K},steps={s}": {"mean": m.mean, "ci95": m.ci95} for (K, s), m in v.items()}
                                for n, v in cells.items()}
        report.data["published"] = {k: {str(s): v for s, v in d.items()} for k, d in PUBLISHED.items()}
        report.figure(_plot_curves(ctx.figure("mse_vs_steps.png"), cells, c.test_shots, c.adapt_steps))
        report.figure(self._predictions(ctx))

    def _text(self, ctx: Context, report: Report, cells: dict[str, dict[Cell, Metric]],
              evals: dict[str, dict[Cell, Evaluation]]) -> None:
        c = self.effective()
        steps = {n: cfg.train.steps for n, cfg in ctx.configs.items() if LEARNERS[n].cls.trainable}
        report.text(
            f"Each learner was meta-trained on sinusoid tasks with K={c.train_shots} support points, with its "
            "recipe in `metalens.experiments.recipes.TOUR` (the gradient learners: Finn et al.'s 1-40-40-1 "
            f"network and inner rate 0.01) and seed {c.seed}"
            + (f", for {_listing(steps, ' steps')}" if steps else "") +
            " (the run folders under `runs/` hold each configuration); seconds spent training in this "
            f"invocation, finished runs being reused: {_listing(ctx.train_seconds, ' s')}. Each cell is the MSE "
            f"on {c.episodes} held-out tasks (evaluation seed 0, the same tasks for every learner; mean ± 95% "
            "CI) at K support points after the given number of adaptation steps; tasks whose predictions diverged "
            "(non-finite) are counted in the cell and left out of its MSE.")
        head = ["learner"] + [f"K={K}, {n} step{'s' * (n != 1)}" for K in c.test_shots for n in c.adapt_steps]
        table = Table(head)
        def cell(name: str, K: int, n: int) -> str:
            key = (K, n) if (K, n) in cells[name] else (K, None)
            ev = evals.get(name, {}).get(key)
            left_out = f" ({ev.diverged} of {ev.episodes} diverged)" if ev is not None and ev.diverged else ""
            return fmt(cells[name].get(key), 3) + left_out

        for name in cells:
            table.rows.append([f"`{name}`"] + [cell(name, K, n) for K in c.test_shots for n in c.adapt_steps])
        for name, pub in PUBLISHED.items():
            table.rows.append([f"{name}, published"] + [f"{pub[n]:.2f}" if K == PUBLISHED_K and n in pub else "–"
                                                        for K in c.test_shots for n in c.adapt_steps])
        report.table(table)
        report.text(
            "The published rows are the figures of the papers, taken here as targets (the checks above): at K=5, "
            "MSE after 1 / 5 / 10 steps, MAML 0.67 / 0.38 / 0.35 and pretrained 2.41 / 2.23 / 2.19 (Finn et al. "
            "2017, appendix); Meta-SGD 0.90 ± 0.16 after one step (Li et al. 2017). The evaluator's full output "
            f"below is each learner's at K={c.test_shots[0]} after {c.adapt_steps[-1]} steps.")

    def _checks(self, report: Report, evals: dict[str, dict[Cell, Evaluation]]) -> None:
        c = self.effective()
        for name, row in evals.items():
            if name == "oracle":
                continue
            for (K, n), ev in row.items():
                check = oracle_bound(ev)
                if check is not None:
                    report.check(f"{name}.K={K},steps={n}.no_better_than_oracle", check)
        for name, pub in PUBLISHED.items():
            for n, target in pub.items():
                ev = evals.get(name, {}).get((PUBLISHED_K, n))
                if ev is not None:
                    report.check(f"{name}.K={PUBLISHED_K},steps={n}.within_published",
                                 at_most(round(ev.metrics["mse"].mean, 4), target))
        if "maml" in evals and "pretrain" in evals:
            for K in c.test_shots:
                maml, pretrain = evals["maml"].get(self._final("maml", K)), evals["pretrain"].get(
                    self._final("pretrain", K))
                if maml is not None and pretrain is not None:
                    ratio = maml.metrics["mse"].mean / pretrain.metrics["mse"].mean
                    report.check(f"maml.K={K},steps={c.adapt_steps[-1]}.beats_pretrain",
                                 Check(round(ratio, 4), "< 1 (MSE ratio maml / pretrain)", ratio < 1))

    @staticmethod
    def _finite(ctx: Context, learner: Any, family: Any) -> bool:
        """Whether ``learner`` predicts the figure's tasks without diverging (it is left out otherwise)."""
        ep = family.eval_episodes(0, 4)
        try:
            ctx.score(learner.predict, ep, with_nll=False)
        except NumericalError:
            return False
        return True

    def _predictions(self, ctx: Context) -> Path | None:
        """Predictions on a few held-out tasks at the first K, after the last number of adaptation steps."""
        c = self.effective()
        K, n = c.test_shots[0], c.adapt_steps[-1]
        learners, family = {}, None
        for name in ctx.configs:
            option = ADAPTATION_STEPS.get(name)
            run = ctx.run(name, task={"shots": K}, learner={option: n} if option else None)
            family = run.family
            if name != "oracle" and self._finite(ctx, run.learner, family):
                learners[name] = run.learner.to("cpu")
        if family is None or not learners:
            return None
        return plot_regression_tasks(ctx.figure("predictions.png"), family, learners,
                                     title=f"sinusoid, K={K}, {n} adaptation steps: held-out tasks")


def _listing(d: dict[str, Any], unit: str) -> str:
    return ", ".join(f"`{k}` {v}{unit}" for k, v in d.items())


def _plot_curves(path: Path, cells: dict[str, dict[Cell, Metric]], test_shots: tuple[int, ...],
                 adapt_steps: tuple[int, ...]) -> Path:
    """Held-out MSE against adaptation steps, one panel per K (log scale; the oracle dashed)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(test_shots), figsize=(5 * len(test_shots), 3.6), squeeze=False)
    for ax, K in zip(axes[0], test_shots):
        for name, row in cells.items():
            points = [(n, m) for n in adapt_steps
                      if (m := row.get((K, n), row.get((K, None)))) is not None and math.isfinite(m.mean)]
            if points:
                style = {"color": "k", "ls": "--"} if name.startswith("oracle") else {}
                ax.errorbar([n for n, _ in points], [m.mean for _, m in points], yerr=[m.ci95 for _, m in points],
                            marker="o", ms=3, capsize=2, label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("MSE (held-out)")
        ax.set_title(f"K = {K}")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)
