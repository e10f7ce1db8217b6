"""``metalens study convergence``: the convergence theory of MAML (Fallah, Mokhtari & Ozdaglar 2020) on linear tasks.

On the ``linear`` family with a linear model (``learner.hidden = []``), the MAML meta-objective and its
gradient have closed forms (:mod:`metalens.theory.convergence`), so each claim of the theory can be
held against exact numbers:

- **(b) bias of the stochastic meta-gradient.** MAML's meta-gradient at a fixed ``theta``, averaged over
  ``n`` tasks (the learner's ``meta_loss`` on an episode of ``n`` tasks, float64), against the exact
  ``grad F`` (``F``: every loss an expectation over the task's data), over ``bias_repeats`` independent
  episodes: with the usual shared batches (the inner step and its Hessian on the support set) the error
  tends to the closed-form bias ``(8 alpha^2 / K) diag((d + 2) I_d, d) theta`` and does not shrink with
  ``n``; with ``learner.meta_batches = "independent"`` (inner step, outer gradient and Hessian on three
  independent batches, as the theorem assumes) it shrinks like ``n^(-1/2)``. The shared estimator is
  unbiased for another objective, ``F_K`` (finite support sets), which is checked too.
- **(c) smoothness.** The smoothness constant of MAML's meta-objective on ``smoothness_tasks`` fixed tasks
  (``N`` inner steps, shared batches), measured as the largest ``||g(w) - g(u)|| / ||w - u||`` over
  ``pairs`` random pairs of points (``g``: the learner's meta-gradient), against Lemma 1's bound in its
  ``N``-step form (:func:`~metalens.theory.convergence.lemma1_bound`) with ``L`` the largest smoothness
  constant of those tasks' losses (``2 lambda_max`` of each batch's ``Z^T Z / n``) and ``rho = 0`` (their
  Hessians are constant), and, for ``N = 1``, against the closed form of ``F_K``'s constant.
- **(d) the rate.** ``chains`` runs of SGD on the meta-objective with unbiased (independent-batch)
  meta-gradients of ``batch_tasks`` tasks, for each horizon ``T``, at the step size that minimises the
  bound ``2 Delta / (beta T) + L beta sigma^2`` (Ghadimi & Lan 2013; the descent argument of Fallah et
  al.'s Theorem 1) with ``L`` = Lemma 1's constant ``4 L_task + 2 rho alpha E ||grad f_i||``: ``beta_T =
  min(1 / L, sqrt(2 Delta / (L sigma^2 T)))``. ``min_{t <= T} E ||grad F(theta_t)||^2`` (the expectation
  over the chains, ``grad F`` exact) against ``T``: its log-log slope should be ``-1/2``.

No run is trained: every number is computed in the analysis (the linear model's meta-gradients from
the learner, the SGD runs from the closed-form estimator, equal to the learner's meta-gradient on the
same episode: a check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metalens import rng
from metalens.config import Options, opt
from metalens.episode import Episode
from metalens.experiments.spine import Context, Study
from metalens.learners.gradient import GradientLearner
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, at_most
from metalens.run import RunConfig, make_learner, make_task
from metalens.tasks.base import TaskFamily
from metalens.theory.convergence import (
    features,
    lemma1_bound,
    linear_meta_gradient,
    linear_meta_objective,
    loglog_slope,
    sgd_bound,
    sgd_step_size,
    shared_batch_bias,
    shared_batch_expected_gradient,
    shared_batch_smoothness,
    stochastic_meta_gradient,
)

__all__ = ["Convergence", "learner_meta_gradient"]

F64 = torch.float64
TASK_SMOOTHNESS = 2.0  # the population loss |theta - u|^2 + s^2 of a linear task: Hessian 2 I
_CHUNK = 20000  # tasks per meta-gradient call (memory only: the mean over chunks is the same)


def learner_meta_gradient(learner: GradientLearner, theta: Tensor, episode: Episode) -> Tensor:
    """The learner's meta-gradient (the gradient of its ``meta_loss``) at ``theta = (weights, bias)`` on a
    linear-model learner, as a vector ``[d + 1]`` in float64; the mean over all the episode's tasks (computed
    in chunks, weighted by their sizes)."""
    w, b = learner.net.layers[0].weight, learner.net.layers[0].bias
    d = w.shape[1]
    total = torch.zeros(d + 1, dtype=F64)
    for lo in range(0, episode.n_tasks, _CHUNK):
        ep = episode[lo: lo + _CHUNK]
        with torch.no_grad():
            w.copy_(theta[:d].view(1, d))
            b.copy_(theta[d:])
        learner.zero_grad(set_to_none=True)
        loss, _ = learner.meta_loss(ep)
        loss.backward()
        total += torch.cat([w.grad[0], b.grad]).to(F64) * ep.n_tasks
    return total / episode.n_tasks


def _double(ep: Episode) -> Episode:
    return Episode(ep.support_x.to(F64), ep.support_y.to(F64), ep.query_x.to(F64), ep.query_y.to(F64))


@STUDIES.register("convergence")
class Convergence(Study):
    """Fallah et al. (2020) on linear tasks: the meta-gradient's bias, Lemma 1's smoothness, the T^(-1/2) rate."""

    title = "The convergence theory of MAML (Fallah, Mokhtari & Ozdaglar 2020) on linear tasks"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the convergence study (``--set study.KEY=VALUE``)."""

        dim: int = opt(5, "input dimension d of the linear tasks", ge=1)
        shots: int = opt(5, "support points per task (K)", ge=1)
        queries: int = opt(10, "query points per task (at least 2: the independent batches split them)", ge=2)
        noise_std: float = opt(0.1, "standard deviation of the noise on y", ge=0)
        alpha: float = opt(0.1, "inner rate of the bias and rate experiments", gt=0, lt=0.5)
        bias_samples: tuple[int, ...] = opt((100, 1000, 10000, 100000), "tasks averaged per meta-gradient (n)",
                                            min_len=2, ge=1, increasing=True)
        bias_repeats: int = opt(8, "independent episodes per n (the error is their root-mean-square)", ge=2)
        alphas: tuple[float, ...] = opt((0.05, 0.1, 0.2), "inner rates of the smoothness grid", min_len=1, gt=0)
        inner_steps: tuple[int, ...] = opt((1, 2, 5), "inner steps N of the smoothness grid", min_len=1, ge=1)
        smoothness_tasks: int = opt(2000, "tasks of the meta-objective whose smoothness is measured", ge=1)
        pairs: int = opt(30, "random pairs of points per smoothness measurement", ge=1)
        horizons: tuple[int, ...] = opt((100, 200, 400, 800, 1600, 3200), "SGD horizons T", min_len=2, ge=1,
                                        increasing=True)
        chains: int = opt(64, "independent SGD runs per horizon (the expectation)", ge=2)
        batch_tasks: int = opt(5, "tasks per SGD meta-gradient", ge=1)
        slope_tolerance: float = opt(0.1, "allowed distance of each fitted log-log slope from -1/2", gt=0)
        seed: int = opt(0, "seed of every draw of the study", ge=0)
        quick: bool = opt(False, "smoke test: small samples, a 2 x 2 grid, two short horizons")

    def effective(self) -> Convergence.Config:
        """The options actually run: ``quick`` shrinks every sample to seconds."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, bias_samples=(10, 100), bias_repeats=2, alphas=c.alphas[:2], inner_steps=c.inner_steps[:2],
                       smoothness_tasks=min(c.smoothness_tasks, 50), pairs=min(c.pairs, 3), horizons=(10, 20),
                       chains=min(c.chains, 4))

    def runs(self) -> dict[str, RunConfig]:
        return {}  # everything is computed in the analysis

    # -- analysis ----------------------------------------------------------------------------------------
    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        family = make_task("linear", dim=c.dim, shots=c.shots, queries=c.queries, noise_std=c.noise_std)
        theta = torch.randn(c.dim + 1, generator=rng.generator(c.seed, 0), dtype=F64)
        report.text(
            f"Linear tasks (`linear`, d = {c.dim}, K = {c.shots} support and {c.queries} query points, noise "
            f"{c.noise_std:g}) and MAML with a linear model (`learner.hidden = []`, parameters theta = (weights, "
            "bias) in R^(d+1)). For this model the meta-objective with every loss an expectation over the task's "
            "data is F_N(theta) = (1 - 2 alpha)^(2N) (|theta|^2 + 1) + noise^2 (N inner steps), and one-step "
            "MAML with shared batches is unbiased for F_K instead, whose gradient is 2 M theta with M = (1 - "
            "2 alpha)^2 I + (4 alpha^2 / K) diag((d + 2) I_d, d) (derivations: `metalens.theory.convergence`).")
        self._estimator(report, family, theta, c)
        self._bias(ctx, report, family, theta, c)
        self._smoothness(ctx, report, family, c)
        self._rate(ctx, report, family, theta, c)

    def _learner(self, family: TaskFamily, alpha: float, steps: int, batches: str) -> GradientLearner:
        lrn = make_learner("maml", family, hidden=[], inner_lr=alpha, inner_steps=steps, meta_batches=batches)
        return lrn.to(F64)  # type: ignore[return-value]

    def _estimator(self, report: Report, family: TaskFamily, theta: Tensor, c: Convergence.Config) -> None:
        """The closed-form estimator of :mod:`metalens.theory.convergence` is the learner's meta-gradient."""
        ep = _double(family.sample(64, generator=rng.generator(c.seed, 1)))
        for batches in ("shared", "independent"):
            g = learner_meta_gradient(self._learner(family, c.alpha, 1, batches), theta, ep)
            closed = stochastic_meta_gradient(theta, ep.support_x, ep.support_y, ep.query_x, ep.query_y,
                                              alpha=c.alpha, batches=batches).mean(0)
            err = float((g - closed).abs().max())
            report.check(f"estimator.{batches}.learner_equals_closed_form",
                         Check(float(f"{err:.3g}"), "<= 1e-10 (largest difference, float64)", err <= 1e-10))

    def _bias(self, ctx: Context, report: Report, family: TaskFamily, theta: Tensor, c: Convergence.Config) -> None:
        exact = linear_meta_gradient(theta, alpha=c.alpha)
        expected_shared = shared_batch_expected_gradient(theta, alpha=c.alpha, shots=c.shots, dim=c.dim)
        bias = float(shared_batch_bias(theta, alpha=c.alpha, shots=c.shots, dim=c.dim).norm())
        learners = {b: self._learner(family, c.alpha, 1, b) for b in ("shared", "independent")}
        err: dict[str, list[float]] = {"shared": [], "independent": [], "shared vs F_K": []}
        for n in c.bias_samples:
            sq: dict[str, list[float]] = {k: [] for k in err}
            for r in range(c.bias_repeats):
                ep = _double(family.sample(n, generator=rng.generator(c.seed, 2, n, r)))
                for b, lrn in learners.items():
                    g = learner_meta_gradient(lrn, theta, ep)
                    sq[b].append(float(((g - exact) ** 2).sum()))
                    if b == "shared":
                        sq["shared vs F_K"].append(float(((g - expected_shared) ** 2).sum()))
            for k, values in err.items():
                values.append(math.sqrt(float(np.mean(sq[k]))))
            ctx.say(f"bias: n={n}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in err.items()))
        report.heading("(b) The bias of the stochastic meta-gradient")
        report.text(
            f"At a fixed theta (|grad F| = {float(exact.norm()):.4f}), the root-mean-square distance between MAML's "
            f"meta-gradient averaged over n tasks (the learner's, alpha = {c.alpha:g}, one inner step) and the "
            f"exact grad F, over {c.bias_repeats} independent episodes per n. Closed-form bias of the shared "
            f"estimator: |E g_shared - grad F| = {bias:.4f}. The last column measures the shared estimator "
            "against the gradient of F_K, the objective it is unbiased for.")
        table = Table(["n", "shared: error", "independent: error", "shared against grad F_K"])
        for i, n in enumerate(c.bias_samples):
            table.rows.append([str(n)] + [f"{err[k][i]:.4f}" for k in ("shared", "independent", "shared vs F_K")])
        report.table(table)
        ns = list(c.bias_samples)
        slope_ind, slope_fk = loglog_slope(ns, err["independent"]), loglog_slope(ns, err["shared vs F_K"])
        tol = c.slope_tolerance
        report.check("bias.independent.shrinks_like_n^-1/2",
                     Check(round(slope_ind, 4), f"-0.5 ± {tol:g} (log-log slope of the error against n)",
                           abs(slope_ind + 0.5) <= tol))
        last, before = err["shared"][-1], err["shared"][-2]
        report.check("bias.shared.error_tends_to_the_closed_form_bias",
                     Check(round(last / bias, 4), f"1 ± 0.2 (error at n = {ns[-1]} / closed-form bias {bias:.4f})",
                           abs(last / bias - 1) <= 0.2))
        report.check("bias.shared.does_not_shrink",
                     Check(round(last / before, 4), f">= 0.8 (error at n = {ns[-1]} / at n = {ns[-2]}; an unbiased "
                           f"estimator: {math.sqrt(ns[-2] / ns[-1]):.2f})", last / before >= 0.8))
        report.check("bias.shared.unbiased_for_F_K",
                     Check(round(slope_fk, 4), f"-0.5 ± {tol:g} (log-log slope of its distance to grad F_K)",
                           abs(slope_fk + 0.5) <= tol))
        report.data["bias"] = {"n": ns, "closed_form_bias": bias, "grad_norm": float(exact.norm()), **err}
        report.figure(_plot_bias(ctx.figure("bias.png"), ns, err, bias))

    def _smoothness(self, ctx: Context, report: Report, family: TaskFamily, c: Convergence.Config) -> None:
        ep = _double(family.sample(c.smoothness_tasks, generator=rng.generator(c.seed, 3)))
        # L: the largest smoothness constant among these tasks' support and query losses, 2 lambda_max(Z^T Z / n)
        L = 0.0
        for x in (ep.support_x, ep.query_x):
            z = features(x)
            L = max(L, float(2 * torch.linalg.eigvalsh(z.transpose(1, 2) @ z / z.shape[1]).max()))
        gen = rng.generator(c.seed, 4)
        points = [(torch.randn(c.dim + 1, generator=gen, dtype=F64), torch.randn(c.dim + 1, generator=gen, dtype=F64))
                  for _ in range(c.pairs)]
        rows: dict[tuple[float, int], dict[str, float]] = {}
        for a in c.alphas:
            for N in c.inner_steps:
                lrn = self._learner(family, a, N, "shared")
                ratio = 0.0
                for w, u in points:
                    gw, gu = learner_meta_gradient(lrn, w, ep), learner_meta_gradient(lrn, u, ep)
                    ratio = max(ratio, float((gw - gu).norm() / (w - u).norm()))
                rows[(a, N)] = {"measured": ratio, "bound": lemma1_bound(L, 0.0, a, 0.0, steps=N),
                                "closed_form": shared_batch_smoothness(alpha=a, shots=c.shots, dim=c.dim)
                                if N == 1 else float("nan")}
            ctx.say(f"smoothness: alpha={a:g}: " + ", ".join(f"N={N} {rows[(a, N)]['measured']:.4g}"
                                                           for N in c.inner_steps))
        report.heading("(c) The smoothness constant of the meta-objective")
        report.text(
            f"The meta-objective is MAML's loss (shared batches, N inner steps) on {c.smoothness_tasks} fixed tasks; "
            f"its smoothness constant is measured as the largest ||g(w) - g(u)|| / ||w - u|| over {c.pairs} random "
            "pairs (w, u ~ N(0, I), g the learner's meta-gradient). Lemma 1 (Fallah et al. 2020): for alpha <= "
            "1/L, L(w) = 4L + 2 rho alpha E||grad f_i(w)||; the bound implemented is the form it comes from, "
            "L (1 + alpha L)^(2N) + (rho / L)(1 + alpha L)^(2N-1)((1 + alpha L)^N - 1) E||grad f_i(w)|| "
            "(`lemma1_bound`; N = 1: L (1 + alpha L)^2 + rho alpha (1 + alpha L) E||grad f_i||), valid for any "
            f"alpha. Here every task's losses are quadratic (rho = 0) and L = {L:.2f}: the largest 2 lambda_max "
            "of Z^T Z / n over the support and query sets of these tasks. For N = 1 the closed form of F_K's "
            "constant, 2((1 - 2 alpha)^2 + 4 alpha^2 (d + 2) / K), is the expected value of what is measured.")
        table = Table(["alpha", "N", "alpha L", "measured", "closed form (N = 1)", "Lemma 1 bound"])
        for (a, N), r in rows.items():
            table.rows.append([f"{a:g}", str(N), f"{a * L:.2f}", f"{r['measured']:.4g}",
                               "–" if math.isnan(r["closed_form"]) else f"{r['closed_form']:.4g}",
                               f"{r['bound']:.4g}"])
            report.check(f"smoothness.alpha={a:g}.N={N}.within_lemma1",
                         Check(float(f"{r['measured']:.4g}"), f"<= {r['bound']:.4g} (Lemma 1, N-step form)",
                               r["measured"] <= r["bound"]))
            if N == 1:
                rel = r["measured"] / r["closed_form"] - 1
                report.check(f"smoothness.alpha={a:g}.N=1.matches_closed_form",
                             Check(round(rel, 4), "|.| <= 0.1 (measured / closed form - 1)", abs(rel) <= 0.1))
        report.table(table)
        report.data["smoothness"] = {"L": L, "rows": {f"alpha={a:g},N={N}": r for (a, N), r in rows.items()}}
        report.figure(_plot_smoothness(ctx.figure("smoothness.png"), rows, c.alphas, c.inner_steps))

    def _rate(self, ctx: Context, report: Report, family: TaskFamily, theta0: Tensor, c: Convergence.Config) -> None:
        a, B, R = c.alpha, c.batch_tasks, c.chains
        L = 4 * TASK_SMOOTHNESS  # Lemma 1 for alpha <= 1/L: 4 L + 2 rho alpha E||grad f_i||, rho = 0
        gap = float(linear_meta_objective(theta0, alpha=a) - linear_meta_objective(torch.zeros_like(theta0), alpha=a))
        big = _double(family.sample(max(1000, 50 * B), generator=rng.generator(c.seed, 5)))
        per_task = stochastic_meta_gradient(theta0, big.support_x, big.support_y, big.query_x, big.query_y, alpha=a,
                                            batches="independent")
        variance = float(((per_task - linear_meta_gradient(theta0, alpha=a)) ** 2).sum(-1).mean()) / B
        mins, bounds, steps = [], [], []
        for T in c.horizons:
            beta = sgd_step_size(L, gap, variance, T)
            th = theta0.expand(R, -1).clone()  # [R, p]: one row per chain
            best = math.inf
            for t in range(T + 1):
                best = min(best, float((linear_meta_gradient(th, alpha=a) ** 2).sum(-1).mean()))
                if t == T:
                    break
                ep = family.sample(R * B, generator=rng.generator(c.seed, 6, T, t))
                sx, sy, qx, qy = (v.to(F64).view(R, B, *v.shape[1:]) for v in
                                  (ep.support_x, ep.support_y, ep.query_x, ep.query_y))
                th = th - beta * stochastic_meta_gradient(th, sx, sy, qx, qy, alpha=a, batches="independent").mean(-2)
            mins.append(best)
            bounds.append(sgd_bound(L, gap, variance, T, beta))
            steps.append(beta)
            ctx.say(f"rate: T={T}: step {beta:.4g}, min_t E||grad F||^2 {best:.4g} (bound {bounds[-1]:.4g})")
        slope = loglog_slope(c.horizons, mins)
        report.heading("(d) The rate: min over t <= T of E ||grad F(theta_t)||^2")
        report.text(
            f"{R} independent SGD runs per horizon T from the same theta_0, each step with the independent-batch "
            f"meta-gradient of {B} fresh tasks (alpha = {a:g}, one inner step; unbiased for grad F). Step size "
            "beta_T = min(1/L, sqrt(2 Delta / (L sigma^2 T))), the minimiser of the bound 2 Delta / (beta T) + "
            "L beta sigma^2 on min_t E||grad F(theta_t)||^2 (Ghadimi & Lan 2013, Theorem 2.1; the argument of "
            "Fallah et al.'s Theorem 1 with fixed batches), with L = 4 L_task + 2 rho alpha E||grad f_i|| = "
            f"{L:g} (Lemma 1: L_task = 2, rho = 0), Delta = F(theta_0) - min F = {gap:.4f} and sigma^2 = "
            f"{variance:.4f} (the estimator's variance at theta_0, from {big.n_tasks} tasks). grad F is exact; E is "
            f"the mean over the runs. Fitted log-log slope: {slope:.3f}.")
        table = Table(["T", "step beta_T", "min_t E||grad F||^2", "bound"])
        for T, b, m, bd in zip(c.horizons, steps, mins, bounds):
            table.rows.append([str(T), f"{b:.4g}", f"{m:.4g}", f"{bd:.4g}"])
        report.table(table)
        report.check("rate.slope_is_-1/2",
                     Check(round(slope, 4), f"-0.5 ± {c.slope_tolerance:g} (log-log slope against T)",
                           abs(slope + 0.5) <= c.slope_tolerance))
        report.check("rate.within_the_bound", at_most(round(max(m / bd for m, bd in zip(mins, bounds)), 4), 1.0))
        report.data["rate"] = {"T": list(c.horizons), "step": steps, "min_sq_grad": mins, "bound": bounds,
                               "slope": slope, "L": L, "gap": gap, "variance": variance}
        report.figure(_plot_rate(ctx.figure("rate.png"), list(c.horizons), mins, bounds, slope))


def _plot_bias(path: Path, ns: list[int], err: dict[str, list[float]], bias: float) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, style in (("shared", "o-"), ("independent", "s-"), ("shared vs F_K", "^:")):
        ax.plot(ns, err[k], style, ms=4, label=k if k != "shared vs F_K" else "shared, against grad F_K")
    ax.axhline(bias, color="k", ls="--", lw=1, label="closed-form bias (shared)")
    ref = err["independent"][0] * np.sqrt(ns[0] / np.asarray(ns, dtype=float))
    ax.plot(ns, ref, color="0.6", lw=1, label="n^(-1/2)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks averaged (n)")
    ax.set_ylabel("RMS error of the meta-gradient")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _plot_smoothness(path: Path, rows: dict[tuple[float, int], dict[str, float]], alphas: tuple[float, ...],
                     steps: tuple[int, ...]) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, a in enumerate(alphas):
        ax.plot(steps, [rows[(a, N)]["measured"] for N in steps], "o-", color=f"C{i}", label=f"alpha={a:g} measured")
        ax.plot(steps, [rows[(a, N)]["bound"] for N in steps], "--", color=f"C{i}", label=f"alpha={a:g} Lemma 1")
        if 1 in steps:
            ax.plot([1], [rows[(a, 1)]["closed_form"]], "kx")
    ax.set_yscale("log")
    ax.set_xlabel("inner steps N")
    ax.set_ylabel("smoothness constant")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _plot_rate(path: Path, Ts: list[int], mins: list[float], bounds: list[float], slope: float) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(Ts, mins, "o-", label=f"measured (slope {slope:.2f})")
    ax.plot(Ts, bounds, "--", label="bound 2 Delta / (beta T) + L beta sigma^2")
    ax.plot(Ts, mins[0] * (Ts[0] / np.asarray(Ts, dtype=float)) ** 0.5, color="0.6", lw=1, label="T^(-1/2)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("horizon T (SGD steps)")
    ax.set_ylabel("min_t E ||grad F(theta_t)||^2")
    ax.legend(fontsize=7)
    return save_figure(fig, path)

