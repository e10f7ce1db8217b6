"""``metalens tour``: meta-train and evaluate every learner on its canonical family,
on a small budget, and write one report comparing them with the oracle.

Each learner declares its canonical family and budget as a
:class:`~metalens.learners.base.TourPlan`; the tour grows as lenses land. Each
learner's run lives in ``OUT/runs/<learner>``; running the tour again reuses a
finished run with the same configuration instead of training it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metalens.evaluate import Evaluation
from metalens.experiments.recipes import TOUR
from metalens.registry import LEARNERS
from metalens.report import plot_decision_regions, plot_regression_tasks, write_report
from metalens.run import Run, RunConfig, RunFolderError, ensure_trained

__all__ = ["tour"]


def tour(
    out: str | Path,
    *,
    learners: Sequence[str] | None = None,
    episodes: int | None = None,
    steps_scale: float = 1.0,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run the tour into ``out``; returns the path of ``report.md``.

    ``learners`` restricts it to some learners; ``episodes`` sets the number of
    held-out tasks (default: the evaluator's 1000 / 600); ``steps_scale`` multiplies
    every training budget (e.g. 0.01 for a smoke test).
    """
    out = Path(out)
    names = list(learners) if learners is not None else list(TOUR)
    for n in names:
        if n not in TOUR:
            raise ValueError(f"learner {n!r} has no tour plan")
    if steps_scale <= 0:
        raise ValueError(f"steps_scale must be > 0, got {steps_scale}")
    by_task: dict[tuple[str, tuple], list[tuple[str, Run, Evaluation]]] = {}
    timings: dict[str, dict[str, float]] = {}
    for name in names:
        plan = TOUR[name]
        train_opts: dict[str, Any] = dict(plan.train)
        if "steps" in train_opts:
            train_opts["steps"] = max(1, round(train_opts["steps"] * steps_scale))
        cfg = RunConfig.resolve(plan.task, name, plan.task_options, plan.learner_options, train_opts)
        echo(f"[tour] {name} on {plan.task}: "
             + (f"training {cfg.train.steps} steps" if LEARNERS[name].cls.trainable else "nothing to train"))
        t0 = time.perf_counter()
        try:
            run = ensure_trained(cfg, out / "runs" / name, progress=progress)
        except RunFolderError:
            raise RunFolderError(
                f"{out / 'runs' / name} holds a tour run made with another configuration (an earlier metalens, "
                f"or other options); remove {out} or choose another --out") from None
        t1 = time.perf_counter()
        ev = run.evaluate(episodes=episodes, progress=bool(progress))
        t2 = time.perf_counter()
        timings[name] = {"train_seconds": round(t1 - t0, 2), "eval_seconds": round(t2 - t1, 2)}
        shown = ", ".join(f"{k} {m}" for k, m in ev.metrics.items())
        echo(f"[tour] {name}: {shown}  (train {t1 - t0:.1f}s, eval {t2 - t1:.1f}s)")
        key = (plan.task, tuple(sorted(plan.task_options.items())))
        by_task.setdefault(key, []).append((name, run, ev))

    figures = []
    evaluations = []
    for (task, _), items in by_task.items():
        evaluations += [ev for _, _, ev in items]
        family = items[0][1].family
        spec = family.spec
        learners = {name: run.learner for name, run, _ in items if name != "oracle"}
        fig = None
        if spec.is_classification and spec.x_shape == (2,):
            predictors = {name: lrn.predict for name, lrn in learners.items()}
            if spec.oracle is not None:
                predictors["oracle"] = spec.oracle
            fig = plot_decision_regions(out / "figures" / f"{task}.png", family.eval_episodes(0, 1), predictors,
                                        title=f"{task}: a held-out task")
        elif not spec.is_classification:
            fig = plot_regression_tasks(out / "figures" / f"{task}.png", family, learners,
                                        title=f"{task}: held-out tasks")
        if fig is not None:
            figures.append(fig)
    notes = ("Each learner meta-trained on its canonical family with the small budget of its tour plan "
             "(`metalens list` names them; the run folders under `runs/` hold the exact configuration), then "
             "scored on held-out tasks drawn from evaluation seed 0.")
    path = write_report(out, title="metalens tour", evaluations=evaluations, figures=figures, notes=notes,
                        extra={"timings": timings})
    echo(f"[tour] report: {path}")
    return path
