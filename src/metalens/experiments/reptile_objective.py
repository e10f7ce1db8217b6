"""What Reptile optimises (``metalens study reptile-objective``; Nichol, Achiam & Schulman 2018, "On First-Order
Meta-Learning Algorithms", sec. 5.1).

**Quadratic tasks, exactly.** ``tasks`` random tasks, each with minibatch losses
``L_ia(phi) = 1/2 (phi - c_ia)^T A_ia (phi - c_ia)`` (``A_ia`` symmetric positive definite, eigenvalues
in ``eig_range``). Reptile's expected update ``E[Delta] = E[theta - phi_k]`` after ``k`` SGD steps of rate
``alpha`` is computed exactly (the mean over the finite task set and over every equally likely order
of minibatches) and held against the expansion (:mod:`metalens.theory.reptile`)::

    E[Delta] = alpha k grad E[L] - alpha^2 (n_cross AvgGradInner + n_same AvgGradSame) + O(alpha^3),

``AvgGradInner = 1/2 grad E[g_a . g_b]`` (the gradient of the gradient alignment between different
minibatches), ``AvgGradSame = 1/2 grad E[|g_a|^2]``, and ``n_cross``, ``n_same`` the pairs of steps on
different and on the same minibatch. In the paper's setting (a fresh minibatch every step,
``schedule = "fresh"``) this is ``E[g_Reptile] = k AvgGrad - alpha k(k-1)/2 AvgGradInner`` (``k = 2``:
``2 AvgGrad - alpha AvgGradInner``); ``"alternate"`` takes two minibatches in turn, ``"full"`` the whole
task loss every step. Checks, per schedule and ``k``:

- ``<schedule>.k<k>.residual_slope`` (``k >= 3``): the log-log slope of ``||E[Delta] - expansion||``
  against ``alpha`` over ``alpha <= small_alpha_max`` is within 3 +- 0.15;
- ``<schedule>.k2.exact``: for ``k = 2`` the expansion is the whole update (a quadratic's update after
  two steps is a polynomial of degree 2 in ``alpha``): relative residual at most 1e-12;
- ``<schedule>.k<k>.first_order_slope``: keeping only ``alpha k grad E[L]`` (joint training) leaves a
  residual of slope 2 +- 0.15: the alignment term is the leading correction.

**Sinusoid.** Reptile is meta-trained on ``sinusoid`` with the tour's recipe (5 inner steps of rate
0.01) for ``reptile_steps`` steps, a checkpoint every ``checkpoint_every``; at each, the gradient
alignment ``E[g_1 . g_2]`` between a task's support-set and query-set gradients (two minibatches of
the task) is measured on ``alignment_tasks`` held-out tasks (figure; check
``sinusoid.alignment_finite``).

Defaults: d = 10, 64 tasks, ``k`` in (2, 3, 5), 9 rates from 1e-3 to 1e-1; 1000 Reptile steps.
Measured at the defaults: 0.5 min on one thread of this project's 2-core CPU machine, shared with other
jobs (training 25 s). The run lives in ``OUT/runs/reptile``; running again reuses it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalens import checkpoint
from metalens.config import Options, opt
from metalens.experiments.first_order_bias import float64_episode
from metalens.experiments.recipes import TOUR
from metalens.experiments.spine import Context, Study
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, at_most
from metalens.rng import generator
from metalens.run import RunConfig
from metalens.theory.meta_gradients import gradient_alignment, loglog_slope
from metalens.theory.reptile import (MAX_FRESH_STEPS, Schedule, alignment, expected_update, expansion,
                                     expansion_terms, minibatches, pair_counts, random_quadratics)

__all__ = ["ReptileObjective"]

ALPHAS = tuple(float(f"{a:.3g}") for a in np.logspace(-3, -1, 9))
SLOPE_TOL = 0.15
EXACT_TOL = 1e-12


def _steps_ok(ks: tuple[int, ...]) -> None:
    if any(k > MAX_FRESH_STEPS for k in ks):
        raise ValueError(f"must be at most {MAX_FRESH_STEPS} (the 'fresh' schedule enumerates k! orders)")


@STUDIES.register("reptile-objective")
class ReptileObjective(Study):
    """Reptile's expected update against its expansion in alpha (Nichol et al. 2018, sec. 5.1)."""

    title = "What Reptile optimises: the expansion of its expected update (Nichol et al. 2018)"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the reptile-objective study (``--set study.KEY=VALUE``)."""

        dim: int = opt(10, "dimension d of the quadratic tasks", ge=1)
        tasks: int = opt(64, "quadratic tasks (the expectation is their mean, exactly)", ge=1)
        eig_range: tuple[float, float] = opt((0.5, 2.0), "eigenvalues of every A_ia ~ U[low, high]", gt=0,
                                             nondecreasing=True)
        schedules: tuple[Schedule, ...] = opt(("full", "alternate", "fresh"), "minibatch schedules: full (one "
                                              "loss), alternate (two in turn), fresh (k in random order)",
                                              min_len=1)
        inner_steps: tuple[int, ...] = opt((2, 3, 5), "Reptile's inner steps k", ge=2, min_len=1, increasing=True,
                                           check=_steps_ok)
        alphas: tuple[float, ...] = opt(ALPHAS, "inner rates alpha", gt=0, min_len=2, increasing=True)
        small_alpha_max: float = opt(0.01, "slopes are fitted over alpha <= this", gt=0)
        seed: int = opt(0, "seed of the quadratic tasks, of theta and of the Reptile run", ge=0)
        reptile_steps: int = opt(1000, "sinusoid: Reptile's meta-training steps (the tour's recipe otherwise)", ge=1)
        checkpoint_every: int = opt(100, "sinusoid: the alignment is measured at a checkpoint every this many "
                                         "steps", ge=1)
        alignment_tasks: int = opt(500, "sinusoid: held-out tasks the alignment is averaged over", ge=1)
        eval_seed: int = opt(0, "sinusoid: seed of the held-out tasks", ge=0)
        quick: bool = opt(False, "smoke test: 8 tasks, 4 rates, 6 Reptile steps (overrides the budgets)")

        def check(self) -> None:
            if len(set(self.schedules)) != len(self.schedules):
                raise ValueError(f"schedules must not repeat, got {list(self.schedules)}")
            if sum(a <= self.small_alpha_max for a in self.alphas) < 2:
                raise ValueError(f"at least 2 alphas must be <= small_alpha_max = {self.small_alpha_max} to fit a "
                                 f"slope, got {list(self.alphas)}")

    def effective(self) -> ReptileObjective.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, tasks=min(c.tasks, 8), alphas=(1e-3, 3e-3, 1e-2, 1e-1), reptile_steps=min(c.reptile_steps, 6),
                       checkpoint_every=min(c.checkpoint_every, 3), alignment_tasks=min(c.alignment_tasks, 10))

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        recipe = TOUR["reptile"]
        return {"reptile": RunConfig.resolve(
            recipe.task, "reptile", recipe.task_options, recipe.learner_options,
            {**recipe.train, "steps": c.reptile_steps, "seed": c.seed, "log_every": 10,
             "checkpoint_every": c.checkpoint_every, "keep_checkpoints": 0})}

    def analyse(self, ctx: Context, report: Report) -> None:
        figures = [self._quadratics(ctx, report), self._sinusoid(ctx, report)]
        for f in figures:
            report.figure(f)

    # -- quadratic tasks ------------------------------------------------------------------------------
    def _quadratics(self, ctx: Context, report: Report) -> Path:
        c = self.effective()
        theta = torch.randn(c.dim, generator=generator(c.seed, 1), dtype=torch.float64)
        alphas = np.array(c.alphas)
        small = alphas <= c.small_alpha_max
        report.text(
            f"Quadratic tasks: {c.tasks} tasks in d = {c.dim}, each with 1, 2 or k minibatch losses "
            f"1/2 (phi - c)^T A (phi - c) (A = Q diag(e) Q^T, e ~ U{list(c.eig_range)}, c ~ N(0, I)), seed {c.seed}; "
            "theta ~ N(0, I). The expected update is exact: the mean over the tasks and over every equally likely "
            "order of minibatches of theta - phi_k after the k SGD steps. The expansion "
            "alpha k grad E[L] - alpha^2 (n_cross AvgGradInner + n_same AvgGradSame) comes from "
            "`metalens.theory.reptile.expansion`; slopes are fitted over alpha <= "
            f"{c.small_alpha_max:g}.")
        rows, curves = [], {}
        for sched in c.schedules:
            for k in c.inner_steps:
                g = generator(c.seed, 0, k, ("full", "alternate", "fresh").index(sched))
                A, cc = random_quadratics(c.tasks, c.dim, minibatches(sched, k), eig_range=c.eig_range, generator=g)
                exact = [expected_update(theta, A, cc, alpha=a, schedule=sched, steps=k) for a in alphas]
                r2 = np.array([float((e - expansion(theta, A, cc, alpha=a, schedule=sched, steps=k)).norm())
                               for e, a in zip(exact, alphas)])
                r1 = np.array([float((e - expansion(theta, A, cc, alpha=a, schedule=sched, steps=k, order=1)).norm())
                               for e, a in zip(exact, alphas)])
                rel2 = r2 / np.array([float(e.norm()) for e in exact])
                slope1 = loglog_slope(alphas[small], r1[small])
                name = f"{sched}.k{k}"
                if k == 2:
                    worst = float(rel2.max())
                    report.check(f"{name}.exact", at_most(float(f"{worst:.3e}"), EXACT_TOL))
                    slope2, shown = None, f"exact (max relative residual {worst:.1e})"
                else:
                    slope2 = loglog_slope(alphas[small], r2[small])
                    report.check(f"{name}.residual_slope", Check(round(slope2, 4), f"3 ± {SLOPE_TOL:g} (log-log)",
                                                                 abs(slope2 - 3) <= SLOPE_TOL))
                    shown = f"{slope2:.4f}"
                report.check(f"{name}.first_order_slope", Check(round(slope1, 4), f"2 ± {SLOPE_TOL:g} (log-log)",
                                                                abs(slope1 - 2) <= SLOPE_TOL))
                n_cross, n_same = pair_counts(sched, k)
                terms = expansion_terms(theta, A, cc)
                align = alignment(theta, A, cc) if minibatches(sched, k) > 1 else None
                rows.append([sched, k, f"{n_cross:g}", f"{n_same:g}", "–" if align is None else f"{align:.4f}",
                             "–" if align is None else f"{float(terms['avg_grad_inner'].norm()):.4f}", shown,
                             f"{slope1:.4f}"])
                curves[name] = {"alpha": list(c.alphas), "residual": r2.tolist(), "first_order_residual": r1.tolist(),
                                "relative_residual": rel2.tolist(), "residual_slope": slope2,
                                "first_order_slope": slope1, "n_cross": n_cross, "n_same": n_same,
                                "alignment": align}
        report.heading("Quadratic tasks: exact expected update against the expansion")
        report.table(Table(["schedule", "k", "n_cross", "n_same", "alignment E[g_a . g_b]", "norm of AvgGradInner",
                            "residual slope (order 2)", "residual slope (order 1)"], rows))
        report.data["quadratics"] = curves
        return self._plot_quadratics(ctx, curves)

    def _plot_quadratics(self, ctx: Context, curves: dict[str, dict[str, Any]]) -> Path:
        c = self.effective()
        plt = pyplot()
        fig, axes = plt.subplots(1, len(c.schedules), figsize=(5 * len(c.schedules), 4), squeeze=False)
        for ax, sched in zip(axes[0], c.schedules):
            for k in c.inner_steps:
                cv = curves[f"{sched}.k{k}"]
                a = np.array(cv["alpha"])
                (line,) = ax.loglog(a, cv["first_order_residual"], "--", lw=1, label=f"k={k}: order 1 (slope 2)")
                if k > 2:
                    ax.loglog(a, cv["residual"], "o-", color=line.get_color(), label=f"k={k}: order 2 (slope 3)")
            ax.axvline(c.small_alpha_max, color="0.8", lw=0.8)
            ax.set_title(f"schedule: {sched}")
            ax.set_xlabel("inner rate alpha")
            ax.set_ylabel("||E[Delta] - expansion||")
            ax.legend(fontsize=7)
        fig.suptitle("Reptile's expected update minus its expansion (k = 2: order 2 is exact)")
        return save_figure(fig, ctx.figure("residual-vs-alpha.png"))

    # -- sinusoid: the alignment during training --------------------------------------------------------
    def _sinusoid(self, ctx: Context, report: Report) -> Path:
        c = self.effective()
        run = ctx.run("reptile")
        ep = float64_episode(run.family.eval_episodes(c.eval_seed, c.alignment_tasks))
        _, initial = ctx.configs["reptile"].build()
        states = [(0, initial.state_dict())] + [(ck.step, ck.model) for ck in
                                                 map(checkpoint.load, checkpoint.complete(ctx.path("reptile")))]
        learner = copy.deepcopy(run.learner).cpu()
        points = []
        for step, state in states:
            learner.load_state_dict(state)
            net = copy.deepcopy(learner.net).double()
            theta = {k: v.detach() for k, v in net.named_parameters()}
            points.append({"step": step, "alignment": float(gradient_alignment(net, theta, ep))})
        bad = sum(not np.isfinite(p["alignment"]) for p in points)
        report.check("sinusoid.alignment_finite", at_most(bad, 0))
        log = [(r["step"], r["loss"]) for r in ctx.log("reptile") if "loss" in r]
        lc = run.config.learner_config
        report.heading("Sinusoid: the gradient alignment during Reptile's training")
        report.text(
            f"Reptile on `sinusoid` with the tour's recipe ({lc.inner_steps} inner steps of rate {lc.inner_lr}, "
            f"Adam {run.config.train.lr}, {run.config.train.batch_tasks} tasks a step) for {c.reptile_steps} steps, "
            f"seed {c.seed}. At initialisation and at every checkpoint: E[g_1 . g_2], the inner product of each "
            f"task's support-set and query-set loss gradients at theta (two minibatches of one task; float64), "
            f"averaged over {c.alignment_tasks} held-out tasks (evaluation seed {c.eval_seed}).")
        report.table(Table(["step", *(str(p["step"]) for p in points)],
                           [["E[g_1 . g_2]", *(f"{p['alignment']:.4g}" for p in points)]]))
        report.data["sinusoid"] = {"alignment": points, "training_loss": log}
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot([p["step"] for p in points], [p["alignment"] for p in points], "o-", color="C0")
        ax.set_xlabel("Reptile meta-training step")
        ax.set_ylabel("gradient alignment E[g_1 . g_2]", color="C0")
        if log:
            bx = ax.twinx()
            bx.plot(*zip(*log), color="C1", lw=0.8, alpha=0.7)
            bx.set_ylabel("query loss after the inner steps (training log)", color="C1")
            bx.set_yscale("log")
        ax.set_title("sinusoid: gradient alignment during Reptile's training")
        return save_figure(fig, ctx.figure("sinusoid-alignment.png"))
