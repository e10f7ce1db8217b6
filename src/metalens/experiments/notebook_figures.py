"""``metalens study notebook-figures``: the figures of the metalens notebook, with the claims they make checked.

Every learner trains with its tour recipe (:data:`~metalens.experiments.recipes.TOUR`, budgets times
``steps_scale``); held-out tasks come from evaluation seed 0 and every learner is scored beside the
oracle on the very same tasks. The figures:

- **adaptation** (Finn et al. 2017, fig. 2): MAML's predictions after 0, 1, ..., N steps on held-out
  sinusoid tasks with ``evolution_shots`` support points, against the true function (the oracle's mean);
  checked: MAML's held-out MSE falls over each of the first two steps (paired, beyond chance);
- **the (alpha, N) grid**: MAML's meta-training loss curves for every inner rate in ``grid_rates`` and
  number of inner steps in ``grid_steps`` (``grid_train_steps`` steps each), with the held-out MSE after
  N steps; checked: each run's loss falls (its last tenth below its first);
- **the lenses side by side**: MAML on sinusoid, a Neural Process (``cnp``) on GP functions with its
  predictive band (mean ± 2 sd) beside the exact GP posterior's, ProtoNet's decision regions on 2-D
  clusters beside the Bayes classifier's;
- **sample efficiency**: MSE (sinusoid: ``maml``, ``lstm``, ``pretrain``), NLL (gp: ``cnp``) and accuracy
  (clusters: ``protonet``) against the support size, with the oracle's; checked: no learner beats the
  oracle beyond chance at any size (paired, on the same tasks);
- **inner-step sensitivity**: MAML, FOMAML and Reptile from 0 to 2N adaptation steps at test (N: their
  ``eval_inner_steps``); checked: each improves from 0 to N steps, and none beats the oracle.

Runs live in ``OUT/runs/<label>``; running the study again reuses them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from metalens.config import Options, opt
from metalens.evaluate import Evaluation, summarize
from metalens.experiments.recipes import FINN_SINUSOID, TOUR, finn_train
from metalens.experiments.spine import Context, Study
from metalens.learners.base import Learner
from metalens.plots import (
    draw_decision_regions,
    draw_regression_panel,
    plot_adaptation_steps,
    plot_curve_grid,
    plot_metric_curves,
    plot_panels,
)
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, above, fmt, not_below
from metalens.run import RunConfig

__all__ = ["SAMPLE_EFFICIENCY", "SENSITIVITY", "NotebookFigures"]

# family -> (learners, the support-size option(s), the metric, lower is better)
SAMPLE_EFFICIENCY: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "sinusoid": (("maml", "lstm", "pretrain"), "mse", True),
    "gp": (("cnp",), "nll", True),
    "clusters": (("protonet",), "accuracy", False),
}
SENSITIVITY = ("maml", "fomaml", "reptile")


def _grid_label(rate: float, steps: int) -> str:
    return f"maml-a{rate:g}-n{steps}"


def _size_options(family: str, n: int) -> dict[str, Any]:
    """The family options that set the support size to ``n``."""
    if family == "gp":
        return {"min_context": n, "max_context": n}
    return {"shots": n}


def _no_adaptation(learner: Learner) -> Any:
    """A predict-like callable: the gradient learner's network at its meta-learned parameters (0 steps)."""
    def predict(support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                support_mask: Tensor | None = None) -> Distribution:
        return learner.output_distribution(learner.net(query_x))  # type: ignore[attr-defined]
    return predict


@STUDIES.register("notebook-figures")
class NotebookFigures(Study):
    """The notebook's figures: adaptation steps, the (alpha, N) grid, the lenses, sample efficiency, sensitivity."""

    title = "The notebook's figures"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the notebook-figures study (``--set study.KEY=VALUE``)."""

        steps_scale: float = opt(1.0, "multiply every tour budget by this", gt=0)
        episodes: int = opt(200, "held-out tasks per point", ge=2)
        evolution_shots: int = opt(5, "support points of the adaptation figure", ge=1)
        evolution_steps: tuple[int, ...] = opt((0, 1, 2, 5, 10), "step counts drawn in the adaptation figure",
                                               min_len=2, ge=0, increasing=True)
        grid_rates: tuple[float, ...] = opt((0.003, 0.01, 0.03), "inner rates alpha of the grid", min_len=1, gt=0)
        grid_steps: tuple[int, ...] = opt((1, 2, 5), "inner steps N of the grid", min_len=1, ge=1)
        grid_train_steps: int = opt(1000, "meta-training steps of each grid run", ge=1)
        sinusoid_shots: tuple[int, ...] = opt((1, 2, 5, 10, 20), "support sizes on sinusoid", min_len=1, ge=1)
        gp_contexts: tuple[int, ...] = opt((3, 5, 10, 20, 50), "context sizes on gp", min_len=1, ge=1)
        cluster_shots: tuple[int, ...] = opt((1, 2, 5, 10), "shots per class on clusters", min_len=1, ge=1)
        sensitivity_stride: int = opt(1, "inner-step sensitivity: every this many step counts from 0 to 2N (N and "
                                         "2N always)", ge=1)
        quick: bool = opt(False, "smoke test: 2% of every budget, 20 tasks, a 1 x 2 grid, two sizes a family, "
                                 "step counts 0, 5, 10, 15, 20")

    def effective(self) -> NotebookFigures.Config:
        """The options actually run: ``quick`` shrinks every budget to seconds."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps_scale=c.steps_scale * 0.02, episodes=min(c.episodes, 20),
                       evolution_steps=c.evolution_steps[:3], grid_rates=c.grid_rates[:1], grid_steps=c.grid_steps[:2],
                       grid_train_steps=min(c.grid_train_steps, 20), sinusoid_shots=c.sinusoid_shots[:2],
                       gp_contexts=c.gp_contexts[:2], cluster_shots=c.cluster_shots[:2], sensitivity_stride=5)

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        out: dict[str, RunConfig] = {}
        names = {*SENSITIVITY, *(n for names, _, _ in SAMPLE_EFFICIENCY.values() for n in names)}
        for name in [n for n in TOUR if n in names]:
            recipe = TOUR[name]
            train: dict[str, Any] = dict(recipe.train)
            train["steps"] = max(1, round(train.get("steps", 1) * c.steps_scale))
            out[name] = RunConfig.resolve(recipe.task, name, recipe.task_options, recipe.learner_options, train)
        for rate in c.grid_rates:
            for n in c.grid_steps:
                learner = {**FINN_SINUSOID, "inner_lr": rate, "inner_steps": n, "eval_inner_steps": n}
                train = {**finn_train(c.grid_train_steps), "log_every": 10,
                         "checkpoint_every": max(1, c.grid_train_steps // 10)}
                out[_grid_label(rate, n)] = RunConfig.resolve("sinusoid", "maml", {}, learner, train)
        return out

    def analyse(self, ctx: Context, report: Report) -> None:
        report.text(
            "Every learner meta-trained with its tour recipe (`metalens.experiments.recipes.TOUR`; the run folders "
            "under `runs/` hold each configuration), budgets times "
            f"{self.effective().steps_scale:g}; held-out tasks from evaluation seed 0, every learner beside the "
            "oracle on the very same tasks.")
        self._evolution(ctx, report)
        self._grid(ctx, report)
        self._lenses(ctx, report)
        self._sample_efficiency(ctx, report)
        self._sensitivity(ctx, report)

    # -- figure 1: adaptation ------------------------------------------------------------------------------
    def _evolution(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        K = c.evolution_shots
        family = ctx.run("maml", task={"shots": K}).family
        tasks = family.eval_episodes(0, c.episodes)
        oracle = ctx.score(family.spec.oracle, tasks, with_nll=False)["mse"]
        per: dict[int, np.ndarray] = {}
        preds: dict[int, Tensor] = {}
        shown = tasks[:3]
        lo, hi = family.spec.x_range
        xs = torch.linspace(lo, hi, 200)
        grid = xs.view(1, -1, 1).expand(shown.n_tasks, -1, -1)
        for n in c.evolution_steps:
            lrn = ctx.learner("maml", task={"shots": K}, learner={"eval_inner_steps": n} if n else None).to("cpu")
            predict = lrn.predict if n else _no_adaptation(lrn)
            per[n] = ctx.score(predict, tasks, with_nll=False)["mse"]
            with torch.no_grad():
                preds[n] = predict(shown.support_x, shown.support_y, grid).mean[..., 0]
        with torch.no_grad():
            truth = family.spec.oracle(shown.support_x, shown.support_y, grid).mean[..., 0]
        report.heading("Adaptation, step by step (Finn et al. 2017, fig. 2)")
        report.text(f"MAML's held-out MSE on {c.episodes} sinusoid tasks with K={K} support points after n steps of "
                    "its inner rate (0: the meta-learned initialisation itself); the figure shows three of the tasks, "
                    "with the oracle's mean as the true function.")
        table = Table(["steps", "MSE", "oracle MSE"])
        for n in c.evolution_steps:
            table.rows.append([str(n), fmt(summarize(per[n]), 3), fmt(summarize(oracle), 4)])
        report.table(table)
        first = c.evolution_steps[:3]
        for a, b in itertools.pairwise(first):
            report.check(f"adaptation.mse_falls.{a}->{b}_steps", above(per[a] - per[b], f"paired MSE drop, {a} -> {b}"))
        report.data["adaptation"] = {str(n): summarize(v).__dict__ for n, v in per.items()}
        report.figure(plot_adaptation_steps(ctx.figure("adaptation.png"), xs, shown, preds, truth=truth,
                                            title=f"MAML on sinusoid, K={K}: predictions after n steps"))

    # -- figure 2: the (alpha, N) grid ----------------------------------------------------------------------
    def _grid(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        curves: dict[tuple[Any, Any], list[tuple[int, float]]] = {}
        table = Table(["alpha", "N", "training loss: first tenth", "last tenth", "held-out MSE (K=10, N steps)"])
        for rate in c.grid_rates:
            for n in c.grid_steps:
                label = _grid_label(rate, n)
                log = [(r["step"], float(r["loss"])) for r in ctx.log(label) if "loss" in r]
                curves[(f"{rate:g}", n)] = log
                losses = np.array([v for _, v in log], dtype=float)
                k = max(1, len(losses) // 10)
                first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
                ev = ctx.evaluate(label, episodes=c.episodes, with_oracle=False)
                note = f" ({ev.diverged} diverged)" if ev.diverged else ""
                table.rows.append([f"{rate:g}", str(n), f"{first:.3f}", f"{last:.3f}",
                                   fmt(ev.metrics["mse"], 3) + note])
                report.check(f"grid.alpha={rate:g}.N={n}.loss_falls",
                             Check(round(last / first, 4), "< 1 (training loss: last tenth / first tenth)",
                                   bool(last < first)))
        report.heading("Meta-training over the (alpha, N) grid")
        report.text(f"MAML on sinusoid (K=10, Finn et al.'s network, Adam 1e-3, 25 tasks a step) for "
                    f"{c.grid_train_steps} steps at every inner rate alpha and number of inner steps N (held-out "
                    f"MSE on {c.episodes} tasks after the same N steps).")
        report.table(table)
        report.figure(plot_curve_grid(ctx.figure("grid.png"), curves, [f"{r:g}" for r in c.grid_rates],
                                      list(c.grid_steps), row_label="alpha", col_label="N"))

    # -- figure 3: the lenses side by side ---------------------------------------------------------------------
    def _lenses(self, ctx: Context, report: Report) -> None:
        sin, gp, cl = ctx.run("maml"), ctx.run("cnp"), ctx.run("protonet")
        drawers = []
        for run, name in ((sin, "maml"), (gp, "cnp")):
            family, learner = run.family, run.learner.to("cpu")
            ep = family.eval_episodes(0, 1)
            lo, hi = family.spec.x_range
            xs = torch.linspace(lo, hi, 200)
            grid = xs.view(1, -1, 1)
            with torch.no_grad():
                dist = learner.predict(ep.support_x, ep.support_y, grid, support_mask=ep.support_mask)
                odist = family.spec.oracle(ep.support_x, ep.support_y, grid, support_mask=ep.support_mask)
            sd = dist.stddev[0, :, 0] if learner.probabilistic else None
            m = ep.support_mask[0] if ep.support_mask is not None else slice(None)
            sx, sy = ep.support_x[0][m][:, 0], ep.support_y[0][m][:, 0]
            pred = {name: (dist.mean[0, :, 0], sd)}
            orc = (odist.mean[0, :, 0], odist.stddev[0, :, 0])
            title = f"{run.config.task}: {name}" + (" (mean ± 2 sd)" if sd is not None else "")
            drawers.append(lambda ax, xs=xs, sx=sx, sy=sy, pred=pred, orc=orc, title=title: draw_regression_panel(
                ax, xs, sx, sy, predictions=pred, oracle=orc, title=title))
        ep = cl.family.eval_episodes(0, 1)
        proto = cl.learner.to("cpu")
        drawers.append(lambda ax: draw_decision_regions(ax, ep, proto.predict, resolution=120,
                                                        title="clusters: protonet"))
        drawers.append(lambda ax: draw_decision_regions(ax, ep, cl.family.spec.oracle, resolution=120,
                                                        title="clusters: oracle"))
        report.heading("The lenses side by side")
        report.text("One held-out task per family: MAML's prediction on sinusoid; the Neural Process's predictive band "
                    "(mean ± 2 sd) on a GP function beside the exact GP posterior's (grey); ProtoNet's decision regions "
                    "on 2-D clusters beside the Bayes classifier's (lighter where less sure).")
        report.figure(plot_panels(ctx.figure("lenses.png"), drawers, ncols=4))

    # -- figure 4: sample efficiency -------------------------------------------------------------------------
    def _sample_efficiency(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        sizes = {"sinusoid": c.sinusoid_shots, "gp": c.gp_contexts, "clusters": c.cluster_shots}
        panels: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
        report.heading("Sample efficiency")
        blown: list[str] = []
        table = Table(["family", "learner", "metric", *(f"size {i + 1}" for i in range(max(map(len, sizes.values()))))])
        for family_name, (names, metric, lower) in SAMPLE_EFFICIENCY.items():
            panel: dict[str, list[tuple[float, float, float]]] = {}
            held: dict[str, list[bool]] = {}
            oracle_row: list[str] = []
            for n in sizes[family_name]:
                opts = _size_options(family_name, n)
                family = ctx.run(names[0], task=opts).family
                tasks = family.eval_episodes(0, c.episodes)
                oracle = ctx.score(family.spec.oracle, tasks, with_nll=metric == "nll")[metric]
                panel.setdefault("oracle", []).append((n, *_mean_ci(oracle)))
                oracle_row.append(_fmt(_metric((n, *_mean_ci(oracle))), percent=metric == "accuracy"))
                for name in names:
                    ev = ctx.evaluate(name, episodes=c.episodes, task=opts, with_oracle=False)
                    keep = ~ev.diverged_tasks if ev.diverged_tasks is not None else slice(None)
                    mine = ev.per_task[metric]
                    panel.setdefault(name, []).append((n, *_mean_ci(mine)))
                    if metric == "mse" and (mine > 1e3).any():  # finite, yet an inner loop that blew up
                        blown.append(f"`{name}` at {n}: {int((mine > 1e3).sum())} task(s) above 1e3 (largest "
                                     f"{mine.max():.3g}; median over the tasks {np.median(mine):.3f})")
                    if ev.diverged:
                        blown.append(f"`{name}` at {n}: {ev.diverged} task(s) diverged (non-finite), left out")
                    diff = mine - oracle[keep]
                    held.setdefault(name, []).append(not_below(diff if lower else -diff, "").holds)
            for name in names:
                table.rows.append([family_name, f"`{name}`", metric] + [_fmt(m, percent=metric == "accuracy")
                                  for m in (_metric(v) for v in panel[name])])
                ok = held[name]
                report.check(f"sample_efficiency.{family_name}.{name}.no_better_than_oracle",
                             Check(f"{sum(ok)}/{len(ok)}", "every support size (paired excess over the oracle "
                                   ">= -95% CI)", all(ok)))
            table.rows.append([family_name, "oracle", metric, *oracle_row])
            panels[f"{family_name} ({metric})"] = panel
        report.text("Support sizes: " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in sizes.items()) +
                    f" (gp: context points; clusters: shots per class). Each point: {c.episodes} held-out tasks, "
                    "mean ± 95% CI.")
        report.table(table)
        if blown:
            report.text("Means carried by a few tasks whose predictions blew up (gradient learners: an inner loop "
                        "unstable on that support set, see the study inner-loop-stability): " + "; ".join(blown) + ".")
        labels = {f"{k} ({m})": ("shots per class" if k == "clusters" else "context points" if k == "gp"
                                 else "support points (K)") for k, (_, m, _) in SAMPLE_EFFICIENCY.items()}
        report.figure(plot_metric_curves(ctx.figure("sample_efficiency.png"), panels, xlabel=labels,
                                         ylabel={k: k.split("(")[1].rstrip(")") for k in panels},
                                         logy=[k for k in panels if k.endswith("(mse)")]))

    # -- figure 5: inner-step sensitivity --------------------------------------------------------------------
    def _sensitivity(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        family = ctx.run("maml").family
        tasks = family.eval_episodes(0, c.episodes)
        oracle = ctx.score(family.spec.oracle, tasks, with_nll=False)["mse"]
        curves: dict[str, list[tuple[float, float, float]]] = {}
        rows = []
        shown: list[Evaluation] = []
        for name in SENSITIVITY:
            N = ctx.configs[name].learner_config.eval_inner_steps or ctx.configs[name].learner_config.inner_steps
            per: dict[int, np.ndarray] = {}  # [episodes], NaN where the task diverged
            held = []
            diverged = {}
            counts = sorted({*range(0, 2 * N + 1, c.sensitivity_stride), N, 2 * N})
            for n in counts:
                if n == 0:
                    per[n] = ctx.score(_no_adaptation(ctx.learner(name)), tasks, with_nll=False)["mse"]
                else:
                    ev = ctx.evaluate(name, episodes=c.episodes, learner={"eval_inner_steps": n}, with_oracle=False)
                    per[n] = _full(ev, "mse")
                    diverged[n] = ev.diverged
                    if n == N:
                        shown.append(ev)
                ok = np.isfinite(per[n])
                held.append(not_below(per[n][ok] - oracle[ok], "").holds)
                curves.setdefault(name, []).append((n, *_mean_ci(per[n][ok])))
            curves.setdefault("oracle", [(n, *_mean_ci(oracle)) for n in counts])
            both = np.isfinite(per[0]) & np.isfinite(per[N])
            report.check(f"sensitivity.{name}.improves_from_0_to_{N}_steps",
                         above(per[0][both] - per[N][both], f"paired MSE drop, 0 -> {N} steps"))
            report.check(f"sensitivity.{name}.no_better_than_oracle",
                         Check(f"{sum(held)}/{len(held)}", "every step count (paired excess >= -95% CI)", all(held)))
            rows.append([f"`{name}`", str(N)] + [_fmt(_metric((n, *_mean_ci(per[n][np.isfinite(per[n])]))))
                                                 for n in (0, N, 2 * N)]
                        + [str(sum(diverged.values()))])
        report.heading("Inner-step sensitivity")
        report.text(f"Held-out MSE on {c.episodes} sinusoid tasks (K=10) after 0 to 2N adaptation steps at test, N "
                    "being the learner's own number of evaluation steps.")
        table = Table(["learner", "N", "0 steps", "N steps", "2N steps", "diverged task-evaluations"])
        table.rows = rows
        report.table(table)
        report.evaluations += shown
        report.figure(plot_metric_curves(ctx.figure("sensitivity.png"), {"sinusoid, K=10": curves},
                                         xlabel="adaptation steps at test", ylabel="MSE", logy=True))


def _full(ev: Evaluation, metric: str) -> np.ndarray:
    """``ev``'s per-task ``metric`` over all its tasks, NaN where the task diverged."""
    if ev.diverged_tasks is None or not ev.diverged_tasks.any():
        return ev.per_task[metric]
    out = np.full(ev.episodes, np.nan)
    out[~ev.diverged_tasks] = ev.per_task[metric]
    return out


def _mean_ci(v: np.ndarray) -> tuple[float, float]:
    m = summarize(v)
    return m.mean, m.ci95


def _metric(point: tuple[float, float, float]) -> dict[str, float]:
    return {"mean": point[1], "ci95": point[2]}


def _fmt(m: dict[str, float], *, percent: bool = False) -> str:
    """``mean ± ci95`` with 3 decimals, or 3 significant digits for values beyond 1e4 (an inner loop that blew up)."""
    if not percent and abs(m["mean"]) >= 1e4:
        return f"{m['mean']:.3g} ± {m['ci95']:.2g}"
    return fmt(m, 3, percent=percent)

