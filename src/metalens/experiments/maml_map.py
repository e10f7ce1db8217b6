"""MAML as MAP (``metalens study maml-map``; Grant et al. 2018, "Recasting Gradient-Based Meta-Learning as
Hierarchical Bayes", sec. 3.1).

On the ``linear`` family (``d`` inputs, ``w ~ N(0, I / d)``, noise variance ``sigma^2``) MAML with a
linear model (``hidden = []``: ``y = w . x + b``) adapts by gradient steps on a quadratic support
loss, and ``N`` steps of rate ``alpha`` from ``theta`` are exactly the MAP estimate under a Gaussian
prior centred at ``theta`` with the implicit precision
``p(lambda) = lambda (1 - alpha lambda)^N / (1 - (1 - alpha lambda)^N)`` per eigenvalue ``lambda`` of
the support Hessian ``H = 2 X^T X / S`` (the loss is the mean squared error over the ``S`` support
points, :mod:`metalens.theory.maml_map`). The study checks:

- ``gd_equals_map``: the learner's own inner loop (:func:`~metalens.learners.gradient.adapt` in
  float64, from its meta-trained ``theta``) against the closed-form MAP estimate with that
  precision, for ``N = 1..identity_max_steps``, every ``identity_alphas`` and support sets with
  ``S < d + 1`` and ``S > d + 1`` (``d + 1`` parameters with the bias; the directions the support
  set does not span have ``lambda = 0``, an infinitely strong prior): the largest difference is at
  most ``1e-10``;
- ``precision_limit``: ``p alpha N -> 1`` as ``alpha lambda -> 0`` (``|p alpha N - 1|`` at
  ``alpha lambda = 1e-6`` for ``N = 1..20``; to first order it is ``(N + 1) alpha lambda / 2``);
- ``theta_near_prior_mean``: meta-training moves ``theta`` to the prior mean 0: ``||theta||`` (weights
  and bias) at most ``theta_tolerance`` (the prior's weights have ``E||w||^2 = 1``);
- ``grid.best_is_matched``: over the grid ``alphas x adapt_steps`` the adapted MAML's predictive MSE
  is lowest at the cell whose implicit prior best matches the Bayes posterior's precision
  ``p* = 2 sigma^2 d / S`` (on the shrinkage scale: :func:`~metalens.theory.maml_map.precision_mismatch`
  over the eigenvalues of the held-out support sets' ``H``), or at a neighbour of it (grid distance
  at most 1);
- ``grid.best_near_oracle``: the lowest MSE is within 10% of the conjugate oracle's on the same tasks.

Defaults: ``d = 8``, ``S = 16``, noise sd 1 (``p* = 1``), MAML with ``alpha = 0.05``, 5 inner steps,
2000 steps of 25 tasks (Adam 1e-3). Measured at the defaults: 1.4 min on one thread of this project's
2-core CPU machine, shared with other jobs (training 34 s). The run lives in ``OUT/runs/maml-linear``;
running again reuses it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalens.config import Options, opt
from metalens.errors import NumericalError
from metalens.evaluate import summarize
from metalens.experiments.spine import Context, Study
from metalens.learners.gradient import adapt, map_tasks, sgd
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, at_most, fmt
from metalens.run import RunConfig, make_task
from metalens.theory.maml_map import implicit_precision, map_estimate, precision_mismatch, shrinkage, spectrum, \
    true_precision

__all__ = ["MAMLMap"]

LABEL = "maml-linear"
IDENTITY_TOL = 1e-10
LIMIT_AT = 1e-6  # alpha lambda where p alpha N is compared with 1
LIMIT_TOL = 1e-4
NEAR_ORACLE = 1.10


@STUDIES.register("maml-map")
class MAMLMap(Study):
    """MAML's inner loop on linear regression is MAP inference under an implicit Gaussian prior (Grant et al. 2018)."""

    title = "MAML as MAP under an implicit Gaussian prior (Grant et al. 2018)"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the maml-map study (``--set study.KEY=VALUE``)."""

        dim: int = opt(8, "input dimension d of the linear family", ge=1)
        shots: int = opt(16, "support points per task in training and on the grid", ge=1)
        queries: int = opt(16, "query points per task", ge=1)
        noise_std: float = opt(1.0, "noise sd sigma (the Bayes posterior's precision is 2 sigma^2 d / shots)", gt=0)
        inner_lr: float = opt(0.05, "MAML's inner rate alpha in meta-training", gt=0)
        inner_steps: int = opt(5, "MAML's inner steps in meta-training", ge=1)
        steps: int = opt(2000, "meta-training steps", ge=1)
        batch_tasks: int = opt(25, "tasks per meta-training step", ge=1)
        lr: float = opt(1e-3, "Adam learning rate of meta-training", gt=0)
        seed: int = opt(0, "training seed", ge=0)
        alphas: tuple[float, ...] = opt((0.01, 0.02, 0.05, 0.1, 0.15), "grid: inner rates alpha at evaluation",
                                        gt=0, min_len=1, increasing=True)
        adapt_steps: tuple[int, ...] = opt((1, 2, 3, 5, 10, 20, 50, 100), "grid: inner steps N at evaluation",
                                           ge=1, min_len=1, increasing=True)
        episodes: int = opt(2000, "held-out tasks scored per grid cell (the same for every cell and the oracle)",
                            ge=2)
        eval_seed: int = opt(0, "seed of the held-out tasks", ge=0)
        identity_shots: tuple[int, ...] = opt((4, 16), "support sizes of the GD = MAP identity (below and above "
                                                       "d + 1)", ge=1, min_len=1)
        identity_alphas: tuple[float, ...] = opt((0.01, 0.05, 0.1), "rates of the GD = MAP identity", gt=0,
                                                 min_len=1)
        identity_max_steps: int = opt(20, "the identity is checked for N = 1..this", ge=1)
        identity_tasks: int = opt(20, "tasks per support size in the identity", ge=1)
        theta_tolerance: float = opt(0.05, "largest ||theta|| (weights and bias) that counts as the prior mean 0",
                                     gt=0)
        quick: bool = opt(False, "smoke test: 5 training steps, a 3 x 3 grid, few tasks (overrides the budgets)")

    def effective(self) -> MAMLMap.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=min(c.steps, 5), alphas=c.alphas[:3], adapt_steps=c.adapt_steps[:3],
                       episodes=min(c.episodes, 20), identity_tasks=min(c.identity_tasks, 2),
                       identity_max_steps=min(c.identity_max_steps, 3))

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        return {LABEL: RunConfig.resolve(
            "linear", "maml", {"dim": c.dim, "shots": c.shots, "queries": c.queries, "noise_std": c.noise_std},
            {"hidden": [], "inner_lr": c.inner_lr, "inner_steps": c.inner_steps, "eval_inner_steps": c.inner_steps},
            {"steps": c.steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "seed": c.seed, "log_every": 50})}

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        p_star = true_precision(noise_var=c.noise_std ** 2, prior_precision=c.dim, shots=c.shots)
        report.text(
            f"MAML with a linear model (`hidden = []`: y = w . x + b, {c.dim + 1} parameters) meta-trained on `linear` "
            f"(d = {c.dim}, w ~ N(0, I/{c.dim}), noise sd {c.noise_std}, {c.shots} support and {c.queries} query "
            f"points), inner rate {c.inner_lr}, {c.inner_steps} inner steps, {c.steps} steps of {c.batch_tasks} "
            f"tasks, Adam {c.lr}, seed {c.seed}. Loss scaling: the support loss is the mean squared error "
            "L(w) = (1/S) sum_s (x_s . w - y_s)^2, so H = 2 X^T X / S and the Bayes posterior mean is the MAP "
            f"estimate under the isotropic precision p* = 2 sigma^2 d / S = {p_star:g}.")
        learner = ctx.learner(LABEL)
        net = copy.deepcopy(learner.net).double()
        theta = {k: v.detach() for k, v in net.named_parameters()}
        self._identity(report, net, theta)
        figs = [self._limit(ctx, report)]
        self._theta(ctx, report, theta)
        figs += self._grid(ctx, report, p_star)
        for f in figs:
            report.figure(f)

    # -- GD = MAP, with the learner's own inner loop -------------------------------------------------
    def _identity(self, report: Report, net: torch.nn.Module, theta: dict[str, torch.Tensor]) -> None:
        c = self.effective()
        theta_vec = torch.cat([theta["layers.0.weight"][0], theta["layers.0.bias"]])  # [d + 1]
        rows, worst = [], 0.0
        for S in c.identity_shots:
            ep = make_task("linear", dim=c.dim, shots=S, queries=1, noise_std=c.noise_std).eval_episodes(
                c.eval_seed + 1, c.identity_tasks)
            sx, sy = ep.support_x.double(), ep.support_y.double()
            X = torch.cat([sx, torch.ones_like(sx[..., :1])], -1)  # [T, S, d + 1]: the bias is a feature
            lam, _ = spectrum(X)
            unseen = int((lam == 0).sum(-1).min())
            for alpha in c.identity_alphas:
                dev = 0.0
                for N in range(1, c.identity_max_steps + 1):
                    phi = map_tasks(lambda x, y, n=N, a=alpha: adapt(net, theta, x, y, steps=n, step=sgd(a),
                                                                     classification=False), sx, sy, batching="vmap")
                    gd = torch.cat([phi["layers.0.weight"][:, 0], phi["layers.0.bias"]], -1)  # [T, d + 1]
                    prior = lambda lam_, a=alpha, n=N: implicit_precision(lam_, alpha=a, steps=n)  # noqa: E731
                    mp = map_estimate(X, sy[..., 0], theta_vec, precision=prior)
                    dev = max(dev, float((gd - mp).abs().max()))
                worst = max(worst, dev)
                rows.append([S, unseen, alpha, f"1..{c.identity_max_steps}", f"{float(lam.max()) * alpha:.3f}",
                             f"{dev:.2e}"])
        report.check("gd_equals_map", at_most(float(f"{worst:.3e}"), IDENTITY_TOL))
        report.heading("N gradient steps = MAP under the implicit prior")
        report.text(
            "The learner's inner loop (`adapt`, float64, from its meta-trained theta) against the closed-form MAP "
            "estimate `theta - V diag(1/(lambda + p(lambda))) V^T grad L(theta)` with the implicit precision "
            "(`metalens.theory.maml_map`), the bias taken as a constant feature. Directions the support set does "
            "not span (lambda = 0) have p = inf: neither moves there.")
        report.table(Table(["S", "unseen directions (lambda = 0)", "alpha", "N", "max alpha lambda",
                            "max abs(GD - MAP)"], rows))

    # -- p alpha N -> 1 ------------------------------------------------------------------------------
    def _limit(self, ctx: Context, report: Report) -> Path:
        Ns = list(range(1, 21))
        at = torch.tensor([LIMIT_AT], dtype=torch.float64)
        dev = max(abs(float(implicit_precision(at, alpha=1.0, steps=n)[0]) * n - 1.0) for n in Ns)
        report.check("precision_limit", at_most(float(f"{dev:.3e}"), LIMIT_TOL))
        report.heading("The implicit precision for small alpha lambda")
        rows = []
        for n in (1, 2, 5, 20):
            row = [n]
            for al in (1e-4, 1e-2, 0.1, 0.5):
                row.append(f"{float(implicit_precision(torch.tensor([al]), alpha=1.0, steps=n)[0]) * n:.4f}")
            rows.append(row)
        report.text(f"p alpha N against alpha lambda: it tends to 1 (the prior N(theta, alpha N I)) as alpha lambda "
                    f"-> 0, to first order 1 - (N + 1) alpha lambda / 2; |p alpha N - 1| at alpha lambda = "
                    f"{LIMIT_AT:g}, N = 1..20: {dev:.2e}.")
        report.table(Table(["N", "alpha lambda = 1e-4", "1e-2", "0.1", "0.5"], rows))
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        al = torch.logspace(-4, np.log10(0.99), 200, dtype=torch.float64)
        for n in (1, 2, 5, 20):
            ax.plot(al.numpy(), (implicit_precision(al, alpha=1.0, steps=n) * n).numpy(), label=f"N = {n}")
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("alpha lambda")
        ax.set_ylabel("p alpha N")
        ax.set_title("implicit prior precision p, in units of 1 / (alpha N)")
        ax.legend(fontsize=8)
        return save_figure(fig, ctx.figure("precision-limit.png"))

    # -- meta-training finds the prior mean -------------------------------------------------------------
    def _theta(self, ctx: Context, report: Report, theta: dict[str, torch.Tensor]) -> None:
        c = self.effective()
        norm = float(torch.sqrt(sum((v ** 2).sum() for v in theta.values())))
        _, init = ctx.configs[LABEL].build()
        norm0 = float(torch.sqrt(sum((v.detach().double() ** 2).sum() for v in init.net.parameters())))
        report.check("theta_near_prior_mean", at_most(round(norm, 5), c.theta_tolerance))
        report.heading("Meta-training moves theta to the prior mean")
        report.text(f"||theta|| (weights and bias): {norm0:.4f} at initialisation, {norm:.4f} after {c.steps} steps "
                    "(the prior mean is 0; prior weight vectors have E||w||^2 = 1).")
        report.data["theta"] = {"norm": norm, "initial_norm": norm0,
                                "values": [float(v) for v in torch.cat([t.flatten() for t in theta.values()])]}

    # -- the grid of (alpha, N) --------------------------------------------------------------------------
    def _grid(self, ctx: Context, report: Report, p_star: float) -> list[Path]:
        c = self.effective()
        family = make_task("linear", dim=c.dim, shots=c.shots, queries=c.queries, noise_std=c.noise_std)
        ep = family.eval_episodes(c.eval_seed, c.episodes)
        lam, _ = spectrum(ep.support_x.double())
        lam = lam.flatten()
        mse = np.zeros((len(c.alphas), len(c.adapt_steps)))
        mismatch = np.zeros_like(mse)
        per_task: dict[tuple[int, int], np.ndarray] = {}
        oracle = ctx.score(family.oracle, ep, with_nll=False)["mse"]
        for i, a in enumerate(c.alphas):
            for j, n in enumerate(c.adapt_steps):
                lrn = ctx.learner(LABEL, learner={"inner_lr": a, "eval_inner_steps": n})
                try:
                    per_task[i, j] = ctx.score(lrn.predict, ep, with_nll=False)["mse"]
                except NumericalError:  # alpha beyond 2 / the curvature of some task: the steps diverge
                    per_task[i, j] = np.full(c.episodes, np.inf)
                # a cell where the steps diverge on any task is marked diverged (inf), never the best
                mse[i, j] = per_task[i, j].mean() if np.isfinite(per_task[i, j]).all() else np.inf
                mismatch[i, j] = float(precision_mismatch(lam, alpha=a, steps=n, target=p_star))
        best = np.unravel_index(np.argmin(mse), mse.shape)
        matched = np.unravel_index(np.argmin(mismatch), mismatch.shape)
        distance = int(max(abs(best[0] - matched[0]), abs(best[1] - matched[1])))
        ratio = float(mse[best] / oracle.mean())
        report.check("grid.best_is_matched", Check(distance, "<= 1 (grid cells from the matched one)",
                                                   distance <= 1))
        report.check("grid.best_near_oracle", at_most(round(ratio, 4), NEAR_ORACLE))
        cell = lambda ij: f"alpha = {c.alphas[ij[0]]:g}, N = {c.adapt_steps[ij[1]]}"  # noqa: E731
        report.heading("Predictive MSE over (alpha, N), against the oracle")
        report.text(
            f"{c.episodes} held-out tasks (evaluation seed {c.eval_seed}), the same for every cell and the conjugate "
            f"oracle (MSE {fmt(summarize(oracle))}). Each cell adapts the meta-trained theta with N steps of rate "
            "alpha (the learner's `predict` with `inner_lr = alpha`, `eval_inner_steps = N`). The matched cell "
            "minimises the mismatch between the implicit prior and the Bayes posterior's precision p*, measured "
            "on the shrinkage scale: the mean over the eigenvalues lambda of the held-out support sets' H of "
            "(1 - (1 - alpha lambda)^N - lambda / (lambda + p*))^2.")
        report.text(f"Lowest MSE: {cell(best)} ({fmt(summarize(per_task[best]))}, {ratio:.4f} x the oracle's; "
                    f"paired excess {fmt(summarize(per_task[best] - oracle))}). Matched cell: {cell(matched)}; "
                    f"grid distance {distance}.")
        report.table(Table(["MSE / oracle", *(f"N={n}" for n in c.adapt_steps)],
                           [[f"alpha={a:g}", *(self._mark(mse[i, j] / oracle.mean(), (i, j), best, matched)
                                               for j in range(len(c.adapt_steps)))] for i, a in enumerate(c.alphas)]))
        report.text("**bold**: lowest MSE; _italic_: matched prior.")
        report.table(Table(["prior mismatch", *(f"N={n}" for n in c.adapt_steps)],
                           [[f"alpha={a:g}", *(f"{mismatch[i, j]:.4f}" for j in range(len(c.adapt_steps)))]
                            for i, a in enumerate(c.alphas)]))
        ev = ctx.evaluate(LABEL, family, episodes=c.episodes, seed=c.eval_seed,
                          learner={"inner_lr": c.alphas[best[0]], "eval_inner_steps": c.adapt_steps[best[1]]})
        ev.task = f"linear d={c.dim}, S={c.shots}, {cell(best)}"
        report.evaluations.append(ev)
        report.data["grid"] = {"alphas": list(c.alphas), "adapt_steps": list(c.adapt_steps), "p_star": p_star,
                               "mse": [[float(v) if np.isfinite(v) else None for v in row] for row in mse],
                               "mismatch": mismatch.tolist(), "oracle_mse": float(oracle.mean()),
                               "best": [int(best[0]), int(best[1])], "matched": [int(matched[0]), int(matched[1])]}
        return [self._plot_grid(ctx, mse / oracle.mean(), mismatch, best, matched),
                self._plot_shrinkage(ctx, lam, p_star, matched)]

    @staticmethod
    def _mark(value: float, ij: tuple[int, int], best: Any, matched: Any) -> str:
        text = f"{value:.3f}" if np.isfinite(value) else "diverged"
        if ij == tuple(matched):
            text = f"_{text}_"
        return f"**{text}**" if ij == tuple(best) else text

    def _plot_grid(self, ctx: Context, ratio: np.ndarray, mismatch: np.ndarray, best: Any, matched: Any) -> Path:
        c = self.effective()
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, values, title in ((axes[0], np.log10(np.where(np.isfinite(ratio), ratio, np.nan)),
                                   "log10(MSE / oracle MSE)"),
                                  (axes[1], np.log10(mismatch), "log10(prior mismatch)")):
            im = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis")
            fig.colorbar(im, ax=ax)
            ax.set_xticks(range(len(c.adapt_steps)), [str(n) for n in c.adapt_steps])
            ax.set_yticks(range(len(c.alphas)), [f"{a:g}" for a in c.alphas])
            ax.set_xlabel("inner steps N")
            ax.set_ylabel("inner rate alpha")
            ax.scatter([best[1]], [best[0]], marker="o", s=120, facecolors="none", edgecolors="w", lw=2,
                       label="lowest MSE")
            ax.scatter([matched[1]], [matched[0]], marker="x", s=80, color="r", lw=2, label="matched prior")
            ax.set_title(title)
        axes[0].legend(fontsize=7, loc="upper right")
        return save_figure(fig, ctx.figure("grid.png"))

    def _plot_shrinkage(self, ctx: Context, lam: torch.Tensor, p_star: float, matched: Any) -> Path:
        c = self.effective()
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        grid = torch.linspace(1e-3, float(lam.max()), 300, dtype=torch.float64)
        ax.hist(lam.numpy(), bins=60, density=True, color="0.85", label="eigenvalues of H (held-out tasks)")
        ax2 = ax.twinx()
        ax2.plot(grid.numpy(), (grid / (grid + p_star)).numpy(), "k--", lw=2,
                 label=f"Bayes posterior (p* = {p_star:g})")
        a_m, n_m = c.alphas[matched[0]], c.adapt_steps[matched[1]]
        for a, n in dict.fromkeys([(a_m, n_m), (c.alphas[0], c.adapt_steps[0]), (c.alphas[-1], c.adapt_steps[-1])]):
            style = {"lw": 2} if (a, n) == (a_m, n_m) else {"lw": 1, "alpha": 0.7}
            ax2.plot(grid.numpy(), shrinkage(grid, alpha=a, steps=n).numpy(), label=f"alpha = {a:g}, N = {n}"
                     + (" (matched)" if (a, n) == (a_m, n_m) else ""), **style)
        ax.set_xlabel("eigenvalue lambda of H = 2 X^T X / S")
        ax.set_ylabel("density")
        ax2.set_ylabel("fraction of the way to least squares")
        ax2.set_ylim(0, 1.05)
        ax2.legend(fontsize=7, loc="lower right")
        ax.set_title("shrinkage lambda / (lambda + p) of N steps and of the posterior")
        return save_figure(fig, ctx.figure("shrinkage.png"))
