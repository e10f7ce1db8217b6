"""How far first-order meta-gradients are from MAML's (``metalens study first-order-bias``).

MAML is meta-trained on ``sinusoid`` with the tour's recipe (:data:`~metalens.experiments.recipes.TOUR`
``["maml"]``: Finn et al.'s 1-40-40-1 network, one inner step of rate 0.01, Adam 1e-3, 25 tasks a
step) on a budget of ``steps``. At its meta-trained ``theta``, on a fixed set of ``tasks`` held-out
tasks, every meta-gradient is computed per task with ``torch.func`` in float64
(:mod:`metalens.theory.meta_gradients`) and averaged over the tasks:

- MAML's exact meta-gradient ``g`` (through the inner steps) and FOMAML's ``g_FO`` (inner gradients
  held constant): the relative error ``||g_FO - g|| / ||g||`` and their cosine, against the inner rate
  ``alpha`` (log-spaced, one step) and against the number of steps ``N`` at ``fixed_alpha``. To first
  order ``g - g_FO = -alpha sum_i H_S(phi_i) grad L_Q(phi_N)``, so the relative error vanishes
  linearly as ``alpha -> 0``;
- Reptile's direction ``(theta - phi_k) / (alpha k)`` (``k`` steps on the support set) against MAML's
  gradient likewise (``k = reptile_steps`` on the ``alpha`` sweep, ``k = N`` on the ``N`` sweep). As
  ``alpha -> 0`` it tends to the gradient of the support loss at ``theta`` and MAML's to that of the
  query loss: they agree only on average over tasks, and the gap that stays is reported.

Check ``fomaml.bias_slope``: the log-log slope of the relative error of the task-averaged FOMAML
meta-gradient against ``alpha``, over ``alpha <= small_alpha_max`` (1e-3: there ``alpha`` times the
largest curvature of the support losses stays well below 1), is within 1 +- 0.1;
``fomaml.per_task_bias_slope``: the same for the median over tasks of the per-task relative error.

Defaults: 2000 training steps, 500 tasks, 17 rates from 1e-5 to 1e-1, ``N`` in 1..10 at ``alpha = 1e-3``.
Measured at the defaults: 1.0 min on one thread of this project's 2-core CPU machine, shared with other
jobs (training 42 s). The run lives in ``OUT/runs/maml``; running again reuses it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalens.config import Options, opt
from metalens.episode import Episode
from metalens.experiments.recipes import TOUR
from metalens.experiments.spine import Context, Study
from metalens.learners.gradient import map_tasks, support_loss
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table
from metalens.run import RunConfig
from metalens.theory.meta_gradients import (cosine, flat, loglog_slope, relative_error, task_meta_gradients,
                                            task_reptile_directions)

__all__ = ["FirstOrderBias", "ALPHAS"]

ALPHAS = tuple(float(f"{a:.3g}") for a in np.logspace(-5, -1, 17))
SLOPE_TOL = 0.1


def sinusoid_maml_run(steps: int, seed: int) -> RunConfig:
    """The tour's MAML recipe on sinusoid with ``steps`` training steps and ``seed``."""
    recipe = TOUR["maml"]
    return RunConfig.resolve(recipe.task, "maml", recipe.task_options, recipe.learner_options,
                             {**recipe.train, "steps": steps, "seed": seed, "log_every": 50})


def float64_copy(ctx: Context, label: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Any]:
    """Run ``label``'s network in float64, its meta-trained ``theta`` (detached) and the run."""
    run = ctx.run(label)
    net = copy.deepcopy(run.learner.net).double().cpu()
    return net, {k: v.detach() for k, v in net.named_parameters()}, run


def float64_episode(ep: Episode) -> Episode:
    """``ep`` in float64 (full episodes: no masks)."""
    return Episode(ep.support_x.double(), ep.support_y.double(), ep.query_x.double(), ep.query_y.double())


@STUDIES.register("first-order-bias")
class FirstOrderBias(Study):
    """FOMAML's and Reptile's meta-gradients against MAML's exact one, as alpha and N vary."""

    title = "The bias of first-order meta-gradients"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the first-order-bias study (``--set study.KEY=VALUE``)."""

        steps: int = opt(2000, "MAML's meta-training steps (the tour's recipe otherwise)", ge=1)
        seed: int = opt(0, "training seed", ge=0)
        tasks: int = opt(500, "held-out tasks the meta-gradients are averaged over", ge=1)
        eval_seed: int = opt(0, "seed of the held-out tasks", ge=0)
        alphas: tuple[float, ...] = opt(ALPHAS, "inner rates alpha of the sweep (one inner step)", gt=0, min_len=2,
                                        increasing=True)
        small_alpha_max: float = opt(1e-3, "the slope is fitted over alpha <= this (where alpha times the largest "
                                                        "curvature stays well below 1)", gt=0)
        adapt_steps: tuple[int, ...] = opt((1, 2, 3, 5, 10), "inner steps N of the sweep at fixed_alpha", ge=1,
                                           min_len=1, increasing=True)
        fixed_alpha: float = opt(1e-3, "the inner rate of the N sweep", gt=0)
        reptile_steps: int = opt(5, "Reptile's inner steps k on the alpha sweep", ge=1)
        quick: bool = opt(False, "smoke test: 5 training steps, 8 tasks, 4 rates, N up to 2 (overrides the budgets)")

        def check(self) -> None:
            if sum(a <= self.small_alpha_max for a in self.alphas) < 2:
                raise ValueError(f"at least 2 alphas must be <= small_alpha_max = {self.small_alpha_max} to fit a "
                                 f"slope, got {list(self.alphas)}")

    def effective(self) -> FirstOrderBias.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=min(c.steps, 5), tasks=min(c.tasks, 8), alphas=(1e-5, 1e-4, 1e-3, 1e-1),
                       adapt_steps=c.adapt_steps[:2], reptile_steps=min(c.reptile_steps, 2))

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        return {"maml": sinusoid_maml_run(c.steps, c.seed)}

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        net, theta, run = float64_copy(ctx, "maml")
        ep = float64_episode(run.family.eval_episodes(c.eval_seed, c.tasks))

        loss_at_theta = _support_losses(net, theta, ep, batched=False)  # [T]

        def compare(alpha: float, steps: int, k: int) -> dict[str, Any]:
            g = flat(task_meta_gradients(net, theta, ep, alpha=alpha, steps=steps))  # [T, P]
            fo = flat(task_meta_gradients(net, theta, ep, alpha=alpha, steps=steps, first_order=True))
            direction = task_reptile_directions(net, theta, ep, alpha=alpha, steps=k)
            rep = flat(direction)
            phi = {name: theta[name] - alpha * k * d for name, d in direction.items()}  # [T, ...]
            raised = (~(_support_losses(net, phi, ep, batched=True) <= loss_at_theta)).double().mean()
            per_task = [relative_error(fo[t], g[t]) for t in range(g.shape[0])]
            G = g.mean(0)
            return {"alpha": alpha, "N": steps, "k": k, "g_norm": float(G.norm()),
                    "fo_rel_error": relative_error(fo.mean(0), G), "fo_cosine": cosine(fo.mean(0), G),
                    "fo_rel_error_per_task_median": float(np.median(per_task)),
                    "reptile_rel_error": _finite(relative_error(rep.mean(0), G)),
                    "reptile_cosine": _finite(cosine(rep.mean(0), G)),
                    # the k steps raise the support loss (or overflow): alpha beyond 2 / the task's curvature
                    "reptile_raised_loss": float(raised)}

        by_alpha = [compare(a, 1, c.reptile_steps) for a in c.alphas]
        by_steps = [compare(c.fixed_alpha, n, n) for n in c.adapt_steps]
        # alpha -> 0: Reptile's direction -> grad L_S(theta), MAML's gradient -> grad L_Q(theta)
        g_q = flat(task_meta_gradients(net, theta, ep, alpha=1.0, steps=0)).mean(0)
        g_s = flat(task_reptile_directions(net, theta, ep, alpha=1.0, steps=1)).mean(0)
        floor = {"rel_error": relative_error(g_s, g_q), "cosine": cosine(g_s, g_q)}

        small = [r for r in by_alpha if r["alpha"] <= c.small_alpha_max]
        slope = loglog_slope([r["alpha"] for r in small], [r["fo_rel_error"] for r in small])
        target = f"1 ± {SLOPE_TOL:g} (log-log, alpha <= {c.small_alpha_max:g})"
        report.check("fomaml.bias_slope", Check(round(slope, 4), target, abs(slope - 1) <= SLOPE_TOL))
        per_task_slope = loglog_slope([r["alpha"] for r in small], [r["fo_rel_error_per_task_median"] for r in small])
        report.check("fomaml.per_task_bias_slope", Check(round(per_task_slope, 4), f"1 ± {SLOPE_TOL:g} (median over "
                                                         "tasks)", abs(per_task_slope - 1) <= SLOPE_TOL))
        ctx.say(f"FOMAML bias slope {slope:.4f} (per-task median: {per_task_slope:.4f})")
        self._text(report, by_alpha, by_steps, floor, slope, per_task_slope)
        report.data.update(by_alpha=by_alpha, by_steps=by_steps, alpha_to_zero=floor, slope=slope,
                           per_task_slope=per_task_slope)
        report.figure(self._plot_alpha(ctx, by_alpha, floor))
        report.figure(self._plot_steps(ctx, by_steps, floor))

    def _text(self, report: Report, by_alpha: list[dict[str, float]], by_steps: list[dict[str, float]],
              floor: dict[str, float], slope: float, per_task_slope: float) -> None:
        c = self.effective()
        report.text(
            f"MAML meta-trained on `sinusoid` with the tour's recipe (1-40-40-1 MLP, one inner step of rate 0.01, "
            f"Adam 1e-3, 25 tasks a step) for {c.steps} steps, seed {c.seed}. At its theta, on {c.tasks} held-out "
            f"tasks (evaluation seed {c.eval_seed}; 10 support and 10 query points each), per-task meta-gradients in "
            "float64 with `torch.func`, averaged over the tasks: MAML's exact g, FOMAML's g_FO and Reptile's "
            "direction (theta - phi_k) / (alpha k) after k steps on the support set. Relative error: "
            "||estimate - g|| / ||g|| of the task averages (the per-task median of FOMAML's in its own column).")
        report.text(f"The FOMAML bias vanishes linearly: log-log slope {slope:.4f} over alpha <= "
                    f"{c.small_alpha_max:g} (per-task median: {per_task_slope:.4f}). As alpha -> 0 Reptile's "
                    f"direction tends to the mean support-loss gradient at theta and MAML's to the mean query-loss "
                    f"gradient; on these {c.tasks} tasks they differ by {floor['rel_error']:.4f} (relative; cosine "
                    f"{floor['cosine']:.4f}), the level Reptile's error settles at for small alpha. Near the "
                    "training rate 0.01 the meta-gradient itself is smallest (theta was meta-trained to make it "
                    "vanish there), so "
                    "every relative error is large there; beyond it some tasks' curvature exceeds 2 / alpha and "
                    "Reptile's k steps raise the support loss (last column) until they overflow.")
        report.heading(f"Against alpha (N = 1; Reptile k = {c.reptile_steps})")
        report.table(self._table("alpha", by_alpha))
        report.heading(f"Against N (alpha = {c.fixed_alpha:g}; Reptile k = N)")
        report.table(self._table("N", by_steps))

    @staticmethod
    def _table(key: str, rows: list[dict[str, Any]]) -> Table:
        return Table([key, "‖g_MAML‖", "FOMAML rel. error", "FOMAML cosine", "FOMAML per-task median",
                      "Reptile rel. error", "Reptile cosine", "tasks where Reptile's steps raise the loss"],
                     [[f"{r[key]:.3g}", f"{r['g_norm']:.4g}", f"{r['fo_rel_error']:.3e}", f"{r['fo_cosine']:.6f}",
                       f"{r['fo_rel_error_per_task_median']:.3e}", _show(r["reptile_rel_error"]),
                       _show(r["reptile_cosine"]), f"{100 * r['reptile_raised_loss']:.1f}%"] for r in rows])

    def _plot_alpha(self, ctx: Context, rows: list[dict[str, float]], floor: dict[str, float]) -> Path:
        c = self.effective()
        plt = pyplot()
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
        a = np.array([r["alpha"] for r in rows])
        fo = np.array([r["fo_rel_error"] for r in rows])
        ax.loglog(a, fo, "o-", label="FOMAML (task average)")
        ax.loglog(a, [r["fo_rel_error_per_task_median"] for r in rows], "s--", ms=4, label="FOMAML (per-task median)")
        ax.loglog(a, _nan(rows, "reptile_rel_error"), "^-",
                  label=f"Reptile, k = {c.reptile_steps} (where no task's loss rises)")
        ax.loglog(a, fo[0] * a / a[0], "k:", lw=1, label="proportional to alpha")
        ax.axhline(floor["rel_error"], color="0.6", lw=0.8, ls="--", label="Reptile's alpha -> 0 limit")
        ax.axvline(c.small_alpha_max, color="0.8", lw=0.8)
        ax.set_ylim(0.5 * float(np.nanmin([r["fo_rel_error_per_task_median"] for r in rows] + list(fo))), 20)
        ax.set_xlabel("inner rate alpha (N = 1)")
        ax.set_ylabel("||estimate - g_MAML|| / ||g_MAML||")
        ax.legend(fontsize=7)
        bx.semilogx(a, [r["fo_cosine"] for r in rows], "o-", label="FOMAML")
        bx.semilogx(a, _nan(rows, "reptile_cosine"), "^-", label="Reptile (where no task's loss rises)")
        bx.set_xlabel("inner rate alpha (N = 1)")
        bx.set_ylabel("cosine with g_MAML")
        bx.legend(fontsize=7)
        fig.suptitle("first-order meta-gradients against MAML's, at a meta-trained theta (sinusoid)")
        return save_figure(fig, ctx.figure("bias-vs-alpha.png"))

    def _plot_steps(self, ctx: Context, rows: list[dict[str, float]], floor: dict[str, float]) -> Path:
        c = self.effective()
        plt = pyplot()
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
        n = [r["N"] for r in rows]
        ax.semilogy(n, [r["fo_rel_error"] for r in rows], "o-", label="FOMAML (task average)")
        ax.semilogy(n, [r["fo_rel_error_per_task_median"] for r in rows], "s--", ms=4, label="FOMAML (per-task median)")
        ax.semilogy(n, _nan(rows, "reptile_rel_error"), "^-", label="Reptile, k = N")
        ax.set_xlabel(f"inner steps N (alpha = {c.fixed_alpha:g})")
        ax.set_ylabel("||estimate - g_MAML|| / ||g_MAML||")
        ax.legend(fontsize=7)
        bx.plot(n, [r["fo_cosine"] for r in rows], "o-", label="FOMAML")
        bx.plot(n, _nan(rows, "reptile_cosine"), "^-", label="Reptile")
        bx.set_xlabel(f"inner steps N (alpha = {c.fixed_alpha:g})")
        bx.set_ylabel("cosine with g_MAML")
        bx.legend(fontsize=7)
        return save_figure(fig, ctx.figure("bias-vs-steps.png"))


def _support_losses(net: torch.nn.Module, params: dict[str, torch.Tensor], ep: Episode, *,
                    batched: bool) -> torch.Tensor:
    """Each task's support loss ``[T]`` at shared parameters or at per-task ones (``batched``)."""
    def one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return support_loss(net, p, x, y, None, classification=False)

    if batched:
        return map_tasks(one, params, ep.support_x, ep.support_y, batching="vmap")
    return map_tasks(lambda x, y: one(params, x, y), ep.support_x, ep.support_y, batching="vmap")


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _show(x: float | None) -> str:
    return "overflow" if x is None else f"{x:.4g}"


def _nan(rows: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` of each row, NaN (not drawn) where Reptile's steps raised some task's support loss."""
    return [np.nan if r[key] is None or r["reptile_raised_loss"] > 0 else r[key] for r in rows]
