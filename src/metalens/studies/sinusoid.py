"""The sinusoid benchmark of MAML (Finn et al. 2017, sec. 5.1 and appendix table):
every gradient learner and the baselines, trained at K=10, tested at K=5 and K=10
after 1, 5 and 10 adaptation steps, beside the Bayes-optimal oracle.

Each learner is trained with its tour plan's configuration (``metalens list NAME``)
for the number of steps in :data:`BUDGETS` (times ``steps_multiplier``); then every (K, steps) cell is an
evaluation of the same trained parameters with ``task.shots=K`` and the learner's
adaptation-steps option set to ``steps`` (``eval_inner_steps`` for the gradient
learners, ``finetune_steps`` for ``pretrain``, ``steps`` for ``scratch``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalens import checkpoint
from metalens.config import opt, to_dict
from metalens.evaluate import Evaluation, Metric
from metalens.experiments.recipes import ADAPTATION_STEPS, TOUR
from metalens.registry import LEARNERS
from metalens.report import plot_regression_tasks, save_figure, write_report
from metalens.run import RunConfig, ensure_trained, load_run
from metalens.studies import STUDIES, Study
from metalens.train import TrainingDiverged

__all__ = ["SinusoidGradient"]

# Finn et al. (2017), appendix table (K=5, MSE after 1 / 5 / 10 steps); Li et al. (2017), table 1.
PUBLISHED = {
    "maml": {1: 0.67, 5: 0.38, 10: 0.35},
    "pretrain": {1: 2.41, 5: 2.23, 10: 2.19},
    "metasgd": {1: 0.90},
}
DEFAULT_LEARNERS = ("maml", "fomaml", "metasgd", "anil", "reptile", "imaml", "pretrain", "scratch", "oracle")
# Meta-training steps per learner (each otherwise trained with its tour configuration):
# about 20 minutes for all of them on one quiet CPU thread.
BUDGETS = {"maml": 30000, "fomaml": 30000, "metasgd": 30000, "anil": 30000, "reptile": 24000, "imaml": 6000,
           "pretrain": 12000}


@STUDIES.register("sinusoid-gradient")
class SinusoidGradient(Study):
    """Sinusoid regression: gradient learners and baselines at K=5/10 after 1/5/10 steps (Finn et al. 2017)."""

    @dataclass(frozen=True)
    class Config:
        learners: tuple[str, ...] = opt(DEFAULT_LEARNERS, "learners to train and compare")
        steps_multiplier: float = opt(1.0, "multiply every learner's training budget (BUDGETS) by this")
        train_shots: int = opt(10, "support points per task in meta-training (K)")
        test_shots: tuple[int, ...] = opt((5, 10), "support points per task at evaluation")
        adapt_steps: tuple[int, ...] = opt((1, 5, 10), "adaptation steps at evaluation")
        episodes: int = opt(1000, "held-out tasks per cell")
        seed: int = opt(0, "training seed (evaluation uses seed 0 of the evaluation stream)")
        quick: bool = opt(False, "smoke test: 1% of the budget and 50 held-out tasks")

        def __post_init__(self) -> None:
            unknown = [n for n in self.learners if n not in LEARNERS]
            if unknown:
                raise ValueError(f"unknown learner {unknown[0]!r}; known: {', '.join(LEARNERS.names())}")
            if not self.steps_multiplier > 0 or self.train_shots < 1 or self.episodes < 2:
                raise ValueError("steps_multiplier must be > 0, train_shots >= 1 and episodes >= 2")
            if not self.test_shots or min(self.test_shots) < 1 or not self.adapt_steps or min(self.adapt_steps) < 0:
                raise ValueError("test_shots must be >= 1 and adapt_steps >= 0")

    def run(self, out: Path, *, progress: bool | None = None, echo: Callable[[str], None] = print) -> Path:
        c = self.config
        out = Path(out)
        scale = c.steps_multiplier * (0.01 if c.quick else 1.0)
        episodes = 50 if c.quick else c.episodes
        cells: dict[str, dict[tuple[int, int | None], Metric]] = {}
        evals: list[Evaluation] = []
        timings: dict[str, float] = {}
        diverged: dict[str, str] = {}  # learners whose training diverged: what happened
        runs = {}
        for name in c.learners:
            cls = LEARNERS[name].cls
            plan = TOUR.get(name)
            train: dict[str, Any] = dict(plan.train) if plan is not None else {}
            train["steps"] = max(1, math.ceil(BUDGETS.get(name, train.get("steps", 1)) * scale))
            train["seed"] = c.seed
            train["device"] = self.device
            cfg = RunConfig.resolve("sinusoid", name, {"shots": c.train_shots},
                                    dict(plan.learner_options) if plan else {}, train)
            echo(f"[sinusoid] {name}: " + (f"training {cfg.train.steps} steps" if cls.trainable else "no training"))
            t0 = time.perf_counter()
            try:
                ensure_trained(cfg, out / "runs" / name, progress=progress)
            except TrainingDiverged as e:  # report the last good checkpoint, and say so
                try:
                    last = checkpoint.load(checkpoint.latest(out / "runs" / name)).step
                except checkpoint.CheckpointError:
                    echo(f"[sinusoid] {name}: {e}; no checkpoint to evaluate")
                    continue
                diverged[name] = f"{e.args[0].split(';')[0].removeprefix('training stopped: ')}; step {last} shown"
                echo(f"[sinusoid] {name}: {diverged[name]}")
            timings[name] = round(time.perf_counter() - t0, 1)
            option = ADAPTATION_STEPS.get(name)
            cells[name] = {}
            for K in c.test_shots:
                for n in (c.adapt_steps if option else (None,)):
                    run = load_run(out / "runs" / name, task_options={"shots": K},
                                   learner_options={option: n} if option else {})
                    runs.setdefault(name, run)
                    try:
                        ev = run.evaluate(episodes=episodes)
                    except FloatingPointError as e:  # e.g. an inner loop that diverges at this many steps
                        echo(f"[sinusoid] {name} K={K} steps={n}: diverged ({e})")
                        cells[name][(K, n)] = Metric(float("nan"), float("nan"))
                        continue
                    cells[name][(K, n)] = ev.metrics["mse"]
                    if K == c.test_shots[0] and n == (c.adapt_steps[-1] if option else None):
                        evals.append(ev)
                    if "oracle" not in c.learners and name == c.learners[0] and ev.oracle is not None:
                        cells.setdefault("oracle (exact)", {})
                        for m in (c.adapt_steps if option else (None,)):
                            cells["oracle (exact)"][(K, m)] = ev.oracle["mse"]
            shown = "  ".join(f"K={K}/{n}: {m.mean:.3f}" for (K, n), m in cells[name].items())
            echo(f"[sinusoid] {name} ({timings[name]}s): {shown}")
        table = _table(cells, c)
        if diverged:
            table += "\n\n" + "\n".join(f"- `{n}`: training diverged ({why})." for n, why in diverged.items())
        figures = []
        fig = _plot_curves(out / "figures" / "mse_vs_steps.png", cells, c)
        if fig is not None:
            figures.append(fig)
        shown_learners = {n: r.learner for n, r in runs.items() if n != "oracle"}
        if shown_learners:
            fam = next(iter(runs.values())).family
            p = plot_regression_tasks(out / "figures" / "predictions.png", fam, shown_learners,
                                      title=f"sinusoid, K={c.test_shots[0]}: held-out tasks")
            if p is not None:
                figures.append(p)
        steps = {n: math.ceil(BUDGETS[n] * scale) for n in c.learners if n in BUDGETS}
        notes = (f"Trained at K={c.train_shots} with each learner's tour configuration for {steps} steps "
                 f"(seconds spent training in this invocation, finished runs being reused: {timings}); MSE on {episodes} held-out "
                 "tasks per cell (mean ± 95% CI), after the given number of adaptation steps.\n\n" + table
                 + "\n\nPublished at K=5 (MSE after 1 / 5 / 10 steps): MAML 0.67 / 0.38 / 0.35 and pretrained "
                 "2.41 / 2.23 / 2.19 (Finn et al. 2017, appendix); Meta-SGD 0.90 ± 0.16 after one step "
                 "(Li et al. 2017). The table below gives the evaluator's full output for each learner at "
                 f"K={c.test_shots[0]} after {c.adapt_steps[-1]} steps.")
        json_cells = {n: {f"K={K},steps={s}": {"mean": m.mean, "ci95": m.ci95} for (K, s), m in v.items()}
                      for n, v in cells.items()}
        return write_report(out, title="Sinusoid regression: the gradient lens against the oracle",
                            evaluations=evals, figures=figures, notes=notes,
                            extra={"config": to_dict(c), "cells": json_cells, "train_seconds": timings,
                                   "diverged": diverged, "published": {k: {str(s): v for s, v in d.items()} for k, d in PUBLISHED.items()}})


def _table(cells: dict[str, dict[tuple[int, int | None], Metric]], c: Any) -> str:
    head = ["learner"] + [f"K={K}, {n} step{'s' * (n != 1)}" for K in c.test_shots for n in c.adapt_steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in cells.items():
        vals = []
        for K in c.test_shots:
            for n in c.adapt_steps:
                m = row.get((K, n), row.get((K, None)))
                vals.append("diverged" if m is not None and math.isnan(m.mean) else
                            (f"{m.mean:.3f} ± {m.ci95:.3f}" if m is not None else "–"))
        lines.append(f"| `{name}` | " + " | ".join(vals) + " |")
    for name, pub in PUBLISHED.items():
        vals = [f"{pub[n]:.2f}" if (K == 5 and n in pub) else "–" for K in c.test_shots for n in c.adapt_steps]
        lines.append(f"| {name}, published | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _plot_curves(path: Path, cells: dict[str, dict[tuple[int, int | None], Metric]], c: Any) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(c.test_shots), figsize=(5 * len(c.test_shots), 3.6), squeeze=False)
    for ax, K in zip(axes[0], c.test_shots):
        for name, row in cells.items():
            xs, ys, es = [], [], []
            for n in c.adapt_steps:
                m = row.get((K, n), row.get((K, None)))
                if m is not None and math.isfinite(m.mean):
                    xs.append(n)
                    ys.append(m.mean)
                    es.append(m.ci95)
            if xs:
                style = {"color": "k", "ls": "--"} if name.startswith("oracle") else {}
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("MSE (held-out)")
        ax.set_title(f"K = {K}")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)
