"""The variance of stochastic meta-gradients against the task batch (``metalens study meta-gradient-variance``;
Fallah, Mokhtari & Ozdaglar 2020, "On the Convergence Theory of Gradient-Based Model-Agnostic Meta-Learning
Algorithms", Lemma 2).

The meta-gradient a step of MAML follows is the mean over a batch of ``B`` tasks drawn i.i.d.
from the family; its variance (the trace of its covariance, ``E||G_B - E G_B||^2``) is
``tr Cov(g_t) / B`` for the per-task meta-gradients ``g_t`` (Fallah et al. bound the second moment of
the stochastic MAML gradient by ``sigma^2 / B`` plus the within-task sampling terms). MAML is
meta-trained on ``sinusoid`` with the tour's recipe (its own run: one inner step of rate 0.01); at
its ``theta``, the exact per-task MAML and FOMAML meta-gradients of ``tasks`` held-out tasks are
computed with ``torch.func`` in float64 (:mod:`metalens.theory.meta_gradients`) and, for
``B = 1, 2, 4, ..., max_batch``, cut into disjoint batches of ``B`` whose means give the variance
(:func:`~metalens.theory.meta_gradients.batch_mean_variance`).

Checks ``maml.variance_slope`` and ``fomaml.variance_slope``: the log-log slope of the variance
against ``B`` is within -1 +- 0.05.

Defaults: 2000 training steps, 32768 tasks, ``B`` up to 64 (512 disjoint batches at ``B = 64``).
Measured at the defaults: 1.3 min on one thread of this project's 2-core CPU machine, shared with other
jobs (training 31 s). The run lives in ``OUT/runs/maml``; running again reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalens.config import Options, opt
from metalens.experiments.first_order_bias import float64_copy, float64_episode, sinusoid_maml_run
from metalens.experiments.spine import Context, Study
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table
from metalens.run import RunConfig
from metalens.theory.meta_gradients import batch_mean_variance, flat, loglog_slope, task_meta_gradients

__all__ = ["MetaGradientVariance"]

SLOPE_TOL = 0.05
CHUNK = 2048  # tasks whose float64 meta-gradients are held at once (memory only)


@STUDIES.register("meta-gradient-variance")
class MetaGradientVariance(Study):
    """The variance of the task-batch mean of MAML and FOMAML meta-gradients falls as 1/B (Fallah et al. 2020)."""

    title = "Variance of stochastic meta-gradients against the task batch (Fallah et al. 2020)"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the meta-gradient-variance study (``--set study.KEY=VALUE``)."""

        steps: int = opt(2000, "MAML's meta-training steps (the tour's recipe otherwise)", ge=1)
        seed: int = opt(0, "training seed", ge=0)
        tasks: int = opt(32768, "held-out tasks with one meta-gradient each (at least 512)", ge=512)
        eval_seed: int = opt(0, "seed of the held-out tasks", ge=0)
        max_batch: int = opt(64, "the largest batch B (B = 1, 2, 4, ... up to it)", ge=2)
        quick: bool = opt(False, "smoke test: 5 training steps, 512 tasks, B up to 16 (overrides the budgets)")

        def check(self) -> None:
            if self.tasks // self.max_batch < 2:
                raise ValueError(f"tasks must hold at least 2 disjoint batches of max_batch, got tasks={self.tasks} "
                                 f"and max_batch={self.max_batch}")

    def effective(self) -> MetaGradientVariance.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=min(c.steps, 5), tasks=512, max_batch=min(c.max_batch, 16))

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        return {"maml": sinusoid_maml_run(c.steps, c.seed)}

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        net, theta, run = float64_copy(ctx, "maml")
        alpha, steps = run.config.learner_config.inner_lr, run.config.learner_config.inner_steps
        ep = float64_episode(run.family.eval_episodes(c.eval_seed, c.tasks))
        batches = [2 ** i for i in range(int(np.log2(c.max_batch)) + 1)]
        curves: dict[str, dict[str, Any]] = {}
        for name, first_order in (("maml", False), ("fomaml", True)):
            # computed in float64, kept in float32 (tasks x 1761 values): the variances need no more
            g = torch.cat([flat(task_meta_gradients(net, theta, ep[i: i + CHUNK], alpha=alpha, steps=steps,
                                                    first_order=first_order)).float()
                           for i in range(0, c.tasks, CHUNK)])  # [tasks, P]
            var = [batch_mean_variance(g, b) for b in batches]
            slope = loglog_slope(batches, var)
            per_task = var[0]  # B = 1: the unbiased tr Cov(g_t)
            curves[name] = {"batch": batches, "variance": var, "slope": slope, "trace_cov": per_task,
                            "mean_norm": float(g.mean(0).norm())}
            report.check(f"{name}.variance_slope", Check(round(slope, 4), f"-1 ± {SLOPE_TOL:g} (log-log)",
                                                         abs(slope + 1) <= SLOPE_TOL))
            ctx.say(f"{name}: slope {slope:.4f}, tr Cov {per_task:.4g}")
        report.text(
            f"MAML meta-trained on `sinusoid` with the tour's recipe (1-40-40-1 MLP, {steps} inner step(s) of rate "
            f"{alpha:g}, Adam 1e-3, 25 tasks a step) for {c.steps} steps, seed {c.seed}. At its theta, the exact "
            f"per-task MAML and FOMAML meta-gradients (float64, `torch.func`, the training inner loop) of {c.tasks} "
            f"held-out tasks (evaluation seed {c.eval_seed}); for each B the tasks are cut, in order, into "
            f"{c.tasks} // B disjoint batches, and the variance of the B-task mean is the unbiased estimate "
            "sum_j ||G_j - mean G||^2 / (m - 1) over the m batch means G_j. For i.i.d. tasks it is tr Cov(g_t) / B.")
        rows = []
        for i, b in enumerate(batches):
            rows.append([b, c.tasks // b, *(f"{curves[n]['variance'][i]:.4g}" for n in curves),
                         *(f"{curves[n]['trace_cov'] / b:.4g}" for n in curves)])
        report.table(Table(["B", "batches", "MAML variance", "FOMAML variance", "MAML tr Cov / B",
                            "FOMAML tr Cov / B"], rows))
        report.text("Log-log slopes: " + ", ".join(f"{n} {curves[n]['slope']:.4f}" for n in curves) + ". Norm of the "
                    "mean meta-gradient over all tasks: " + ", ".join(f"{n} {curves[n]['mean_norm']:.4g}"
                                                                      for n in curves) + ".")
        report.data["curves"] = curves
        report.figure(self._plot(ctx, curves))

    def _plot(self, ctx: Context, curves: dict[str, dict[str, Any]]) -> Path:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for name, cv in curves.items():
            b = np.array(cv["batch"], dtype=float)
            (line,) = ax.loglog(b, cv["variance"], "o-", label=f"{name} (slope {cv['slope']:.3f})")
            ax.loglog(b, cv["trace_cov"] / b, ":", color=line.get_color(), lw=1, label=f"{name}: tr Cov / B")
        ax.set_xlabel("tasks per batch B")
        ax.set_ylabel("variance of the batch-mean meta-gradient")
        ax.set_xscale("log", base=2)
        ax.set_title("stochastic meta-gradients: variance against B")
        ax.legend(fontsize=8)
        return save_figure(fig, ctx.figure("variance-vs-batch.png"))

