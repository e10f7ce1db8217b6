"""``metalens study inner-loop-stability``: when MAML's inner loop diverges at test time, and a safeguard.

MAML is meta-trained on sinusoid with Finn et al.'s settings (K = ``train_shots`` support points,
one inner step of rate ``alpha = 0.01``; :data:`~metalens.experiments.recipes.FINN_SINUSOID`), with a
checkpoint every ``checkpoint_every`` steps. Then:

- **the spectrum**: for held-out tasks at each checkpoint and each K in ``test_shots``, the extreme
  eigenvalues of the task's support-loss Hessian at the meta-trained ``theta`` (Lanczos on
  Hessian-vector products: :mod:`metalens.theory.curvature`). Gradient descent of rate ``alpha`` is
  stable along an eigenvector of curvature ``lambda`` exactly where ``alpha lambda < 2`` (for a
  quadratic; locally otherwise);
- **the failure**: at the final checkpoint and K = ``test_shots[0]``, the evaluator after each number of
  adaptation steps in ``adapt_steps`` (tasks with non-finite predictions counted as diverged, the
  metrics over the others), at the trained rate and at ``rate_multipliers`` times it (a larger rate
  stands for a sharper loss: ``alpha lambda`` is what matters), beside the fraction of tasks with
  ``alpha lambda_max > 2`` and the fraction whose support loss rose over the inner steps;
- **the safeguard**: the same cells with ``learner.inner_lr_cap = "curvature"`` (each task's rate
  ``min(alpha, c / lambda_max)``, ``c = cap_c``);
- **Lemma 1** of Fallah, Mokhtari & Ozdaglar (2020): its per-task smoothness constant ``L`` is at
  least ``lambda_max`` of each task, and the lemma assumes ``alpha <= 1 / L``; the table gives
  ``alpha L`` and the gradient-Lipschitz part ``L (1 + alpha L)^2`` of its bound along training.

Checks: the spectrum sharpens with meta-training and with fewer shots; the fraction of tasks with
``alpha lambda_max > 2`` predicts the fraction that diverge (within 0.05), at every step count; every
task whose inner loop diverged, or whose support loss rose, has ``alpha lambda_max > 2``; with the cap,
no task diverges in any cell.

The run lives in ``OUT/runs/maml`` (every checkpoint kept); running the study again reuses it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalens import checkpoint
from metalens.config import Options, opt
from metalens.episode import Episode
from metalens.evaluate import Evaluation
from metalens.experiments.recipes import FINN_SINUSOID, finn_train
from metalens.experiments.spine import Context, Study
from metalens.learners.gradient import (
    GradientLearner,
    lanczos_start,
    map_tasks,
    support_grad,
    support_loss,
)
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, at_most, fmt
from metalens.run import RunConfig
from metalens.theory.curvature import extreme_eigenvalues, flatten

__all__ = ["PREDICTION_TOLERANCE", "InnerLoopStability", "task_spectrum"]

PREDICTION_TOLERANCE = 0.05  # |fraction with alpha lambda_max > 2 - fraction diverged| allowed
LABEL = "maml"
_CHUNK = 250  # tasks per vmapped spectrum call (memory only)


def task_spectrum(learner: GradientLearner, episode: Episode, *, steps: int) -> dict[str, np.ndarray]:
    """Per task of ``episode``: ``lambda_max`` and ``lambda_min`` of its support-loss Hessian at the learner's
    ``theta`` (over all parameters; :func:`~metalens.theory.curvature.extreme_eigenvalues`, ``steps`` Lanczos
    iterations from :func:`~metalens.learners.gradient.lanczos_start`), the support loss and the norm of its
    gradient there. Arrays ``[T]`` (float64)."""
    theta = {k: v.detach() for k, v in learner.theta().items()}
    v0 = lanczos_start(theta)
    cls = learner.spec.is_classification

    def one(sx: Tensor, sy: Tensor, sm: Tensor | None) -> Tensor:
        loss = lambda p: support_loss(learner.net, p, sx, sy, sm, classification=cls)
        lo, hi = extreme_eigenvalues(loss, theta, v0, steps=steps)
        g = flatten(support_grad(learner.net, theta, sx, sy, sm, classification=cls))
        return torch.stack([hi, lo, loss(theta), torch.linalg.vector_norm(g)])

    parts = []
    for lo in range(0, episode.n_tasks, _CHUNK):
        ep = episode[lo: lo + _CHUNK]
        parts.append(map_tasks(one, ep.support_x, ep.support_y, ep.support_mask, batching=learner.batching))
    out = torch.cat(parts).double().numpy()
    return {"lam_max": out[:, 0], "lam_min": out[:, 1], "support_loss": out[:, 2], "grad_norm": out[:, 3]}


@STUDIES.register("inner-loop-stability")
class InnerLoopStability(Study):
    """MAML's inner loop at test time: the support loss's curvature against 2 / alpha, and a rate cap."""

    title = "Inner-loop stability: the support loss's curvature against 2 / alpha"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the inner-loop-stability study (``--set study.KEY=VALUE``)."""

        steps: int = opt(20000, "meta-training steps of the MAML run (Finn et al.'s sinusoid settings)", ge=1)
        checkpoint_every: int = opt(2000, "a checkpoint every this many steps: the spectrum is measured at each",
                                    ge=1)
        train_shots: int = opt(10, "support points per task in meta-training (K)", ge=1)
        test_shots: tuple[int, ...] = opt((5, 10, 20), "K at which the spectrum is measured; the first is also "
                                                       "the K of the evaluations", min_len=1, ge=1)
        adapt_steps: tuple[int, ...] = opt((1, 2, 5, 10, 20), "adaptation steps at evaluation", min_len=1, ge=1,
                                           increasing=True)
        rate_multipliers: tuple[float, ...] = opt((1.0, 2.0, 3.0, 4.0), "inner rates at evaluation, as multiples "
                                                  "of the trained one (the first should be 1)", min_len=1, gt=0)
        episodes: int = opt(1000, "held-out tasks of each evaluation", ge=2)
        curvature_tasks: int = opt(500, "held-out tasks whose spectrum is measured at each checkpoint and K", ge=2)
        lanczos_steps: int = opt(20, "Lanczos iterations (Hessian-vector products) per task", ge=2)
        cap_c: float = opt(1.0, "c of the safeguard: each task's rate min(alpha, c / lambda_max)", gt=0)
        cap_c_sweep: tuple[float, ...] = opt((1.5, 1.9), "other values of c, tried at the last number of steps",
                                             gt=0)
        seed: int = opt(0, "training seed (evaluation uses seed 0 of the evaluation stream)", ge=0)
        quick: bool = opt(False, "smoke test: 60 steps, 40 tasks, two step counts and two rates")

    def effective(self) -> InnerLoopStability.Config:
        """The options actually run: ``quick`` shrinks every budget to seconds."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=min(c.steps, 60), checkpoint_every=min(c.checkpoint_every, 30),
                       test_shots=c.test_shots[:2], adapt_steps=c.adapt_steps[:1] + c.adapt_steps[-1:]
                       if len(c.adapt_steps) > 1 else c.adapt_steps,
                       rate_multipliers=c.rate_multipliers[:1] + c.rate_multipliers[-1:]
                       if len(c.rate_multipliers) > 1 else c.rate_multipliers,
                       episodes=min(c.episodes, 40), curvature_tasks=min(c.curvature_tasks, 20),
                       lanczos_steps=min(c.lanczos_steps, 8), cap_c_sweep=c.cap_c_sweep[:1])

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        train: dict[str, Any] = {**finn_train(c.steps), "seed": c.seed, "checkpoint_every": c.checkpoint_every,
                                 "keep_checkpoints": 0, "log_every": 100}
        return {LABEL: RunConfig.resolve("sinusoid", "maml", {"shots": c.train_shots}, dict(FINN_SINUSOID), train)}

    # -- analysis ----------------------------------------------------------------------------------------
    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        cfg = ctx.configs[LABEL]
        alpha = cfg.learner_config.inner_lr
        report.text(
            f"MAML meta-trained on sinusoid tasks with K={c.train_shots} support points, one inner step of rate "
            f"alpha = {alpha:g} (Finn et al. 2017's settings: `metalens.experiments.recipes.FINN_SINUSOID`, Adam "
            f"1e-3, 25 tasks a step) for {cfg.train.steps} steps, seed {c.seed}, a checkpoint every "
            f"{c.checkpoint_every} steps. Gradient descent of rate alpha multiplies the error along an eigenvector "
            "of the support loss's Hessian with eigenvalue lambda by (1 - alpha lambda) per step: stable where "
            "alpha lambda < 2. lambda_max and lambda_min of each task's Hessian at the meta-trained parameters come "
            f"from {c.lanczos_steps} Lanczos iterations on Hessian-vector products (`metalens.theory.curvature`).")
        spectra = self._spectra(ctx, report, alpha)
        cells = self._failure(ctx, report, alpha)
        self._checks(report, spectra, cells, alpha)
        report.data["spectrum"] = {f"step={s},K={K}": _summary(v["lam_max"], alpha) for (s, K), v in spectra.items()}
        report.data["cells"] = {f"rate_x{m:g},steps={n},cap={cap}": {k: v for k, v in d.items() if k != "masks"}
                                for (m, n, cap), d in cells.items()}

    def _spectra(self, ctx: Context, report: Report, alpha: float) -> dict[tuple[int, int], dict[str, np.ndarray]]:
        """The spectrum at every checkpoint and every K (the same held-out tasks throughout)."""
        c = self.effective()
        cfg = ctx.configs[LABEL]
        ckpts = checkpoint.complete(ctx.path(LABEL))
        spectra: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for K in c.test_shots:
            family, learner = cfg.updated(task={"shots": K}).build()
            tasks = family.eval_episodes(0, c.curvature_tasks)
            for path in ckpts:
                ck = checkpoint.load(path)
                learner.load_state_dict(ck.model)
                learner.to("cpu").eval()
                spectra[(ck.step, K)] = task_spectrum(learner, tasks, steps=c.lanczos_steps)
            last = spectra[(max(s for s, k in spectra if k == K), K)]
            ctx.say(f"K={K}: alpha lambda_max at the last checkpoint: median {alpha * np.median(last['lam_max']):.2f}, "
                    f"max {alpha * last['lam_max'].max():.2f}")
        steps = sorted({s for s, _ in spectra})
        report.heading("The spectrum along meta-training")
        report.text(
            f"alpha lambda_max of the support-loss Hessian at the meta-trained parameters, over {c.curvature_tasks} "
            "held-out tasks (evaluation seed 0, the same tasks at every checkpoint): median, 90% quantile and "
            "maximum over tasks, and the fraction of tasks with alpha lambda_max > 2 (unstable along their top "
            "eigenvector); the last column compares the most negative curvature with it.")
        table = Table(["step", "K", "median", "90%", "max", "fraction > 2", "median lambda_min / lambda_max"])
        for s in steps:
            for K in c.test_shots:
                v = spectra[(s, K)]
                a = alpha * v["lam_max"]
                table.rows.append([str(s), str(K), f"{np.median(a):.2f}", f"{np.quantile(a, 0.9):.2f}",
                                   f"{a.max():.2f}", f"{np.mean(a > 2):.3f}",
                                   f"{np.median(v['lam_min'] / v['lam_max']):.3f}"])
        report.table(table)
        report.figure(_plot_spectrum(ctx.figure("spectrum_vs_training.png"), spectra, alpha, c.test_shots))
        # Lemma 1's terms (Fallah et al. 2020): L >= lambda_max of every task; the lemma assumes alpha L <= 1
        K0 = c.train_shots if c.train_shots in c.test_shots else c.test_shots[0]
        report.heading("Lemma 1's smoothness terms")
        report.text(
            "Fallah, Mokhtari & Ozdaglar (2020), Lemma 1: for alpha in (0, 1/L], with every task's loss L-smooth "
            "and its Hessian rho-Lipschitz, the meta-gradient is Lipschitz with constant "
            "L(w) = 4L + 2 rho alpha E_i ||grad f_i(w)|| (from L (1 + alpha L)^2 + rho alpha (1 + alpha L) "
            "E_i ||grad f_i(w)||, which it bounds using alpha L <= 1; `metalens.theory.convergence.lemma1_bound`). "
            f"Here, at K={K0}: L is at least max_i lambda_max,i over the tasks measured; alpha L > 1 means the "
            "lemma's premise fails and with it the bound, whose first term L (1 + alpha L)^2 is shown at the "
            "measured L; E_i ||grad f_i|| is the mean norm of the support-loss gradient at theta (rho is not "
            "measured).")
        lemma = Table(["step", "L >= max lambda_max", "alpha L", "L (1 + alpha L)^2", "E ||grad f_i(theta)||"])
        for s in steps:
            v = spectra[(s, K0)]
            L = float(v["lam_max"].max())
            lemma.rows.append([str(s), f"{L:.1f}", f"{alpha * L:.2f}", f"{L * (1 + alpha * L) ** 2:.0f}",
                               f"{np.mean(v['grad_norm']):.2f}"])
        report.table(lemma)
        return spectra

    def _failure(self, ctx: Context, report: Report, alpha: float) -> dict[tuple[float, int, bool], dict[str, Any]]:
        """Evaluations at the final checkpoint, K = test_shots[0]: every (rate, steps), without and with the cap."""
        c = self.effective()
        K = c.test_shots[0]
        family = ctx.run(LABEL, task={"shots": K}).family
        tasks = family.eval_episodes(0, c.episodes)
        base = ctx.learner(LABEL, task={"shots": K})
        lam = task_spectrum(base, tasks, steps=c.lanczos_steps)["lam_max"]
        with torch.no_grad():
            before = ((base.net(tasks.support_x) - tasks.support_y) ** 2).mean((1, 2)).double().numpy()
        on_support = Episode(tasks.support_x, tasks.support_y, tasks.support_x, tasks.support_y)
        cells: dict[tuple[float, int, bool], dict[str, Any]] = {}
        shown: list[Evaluation] = []
        for m in c.rate_multipliers:
            for n in c.adapt_steps:
                for cap in (False, True):
                    options: dict[str, Any] = {"eval_inner_steps": n, "inner_lr": alpha * m}
                    if cap:
                        options.update(inner_lr_cap="curvature", inner_lr_cap_c=c.cap_c,
                                       curvature_iters=c.lanczos_steps)
                    ev = ctx.evaluate(LABEL, episodes=c.episodes, task={"shots": K}, learner=options,
                                      with_oracle=m == c.rate_multipliers[0] and n == c.adapt_steps[-1] and not cap)
                    after = ctx.score(ctx.learner(LABEL, task={"shots": K}, learner=options).predict, on_support,
                                      with_nll=False)["mse"]
                    diverged = ev.diverged_tasks if ev.diverged_tasks is not None else np.zeros(c.episodes, bool)
                    rose = ~np.isfinite(after) | (after > before)
                    unstable = alpha * m * lam > 2
                    mse = ev.per_task["mse"]
                    cells[(m, n, cap)] = {
                        "diverged": int(diverged.sum()), "diverged_fraction": float(diverged.mean()),
                        "rose_fraction": float(rose.mean()), "unstable_fraction": float(unstable.mean()),
                        "mse_mean": float(np.mean(mse)), "mse_ci95": ev.metrics["mse"].ci95,
                        "mse_median": float(np.median(mse)),
                        "masks": {"diverged": diverged, "rose": rose, "unstable": unstable, "ratio": after / before,
                                  "alpha_lam": alpha * m * lam}}
                    if m == c.rate_multipliers[0] and n == c.adapt_steps[-1] and not cap:
                        shown.append(ev)
            ctx.say(f"rate x{m:g}: diverged " + ", ".join(
                f"{n} steps {cells[(m, n, False)]['diverged']} (capped {cells[(m, n, True)]['diverged']})"
                for n in c.adapt_steps) + f" of {c.episodes}")
        report.evaluations += shown
        self._failure_tables(report, cells, alpha, K)
        self._threshold(report, cells)
        self._cap_sweep(ctx, report, cells, alpha, K)
        report.figure(_plot_outcomes(ctx.figure("outcome_vs_curvature.png"), cells, c.rate_multipliers,
                                     c.adapt_steps[-1]))
        report.figure(_plot_cap(ctx.figure("mse_with_and_without_cap.png"), cells, c.adapt_steps, c.episodes))
        return cells

    def _failure_tables(self, report: Report, cells: dict[tuple[float, int, bool], dict[str, Any]], alpha: float,
                        K: int) -> None:
        c = self.effective()
        report.heading(f"Evaluation at K={K}: the trained rate, more steps")
        report.text(
            f"{c.episodes} held-out tasks (evaluation seed 0) at the final checkpoint, K={K}, after n adaptation "
            f"steps of rate alpha = {alpha:g}. *Diverged*: tasks with non-finite predictions (the evaluator leaves "
            "them out of the metrics and counts them); *rose*: tasks whose support loss after the n steps is above "
            "its value at theta (the inner loop did not descend; diverged tasks included); *alpha lambda_max > 2*: "
            "the fraction the quadratic model calls unstable. MSE over the tasks that did not diverge: mean ± 95% "
            f"CI, and median. *Capped*: the same with `learner.inner_lr_cap = \"curvature\"` (c = {c.cap_c:g}).")
        table = Table(["n", "alpha lambda_max > 2", "diverged", "rose", "MSE mean", "MSE median", "capped: diverged",
                       "capped: rose", "capped: MSE mean", "capped: MSE median"])
        m0 = c.rate_multipliers[0]
        for n in c.adapt_steps:
            a, b = cells[(m0, n, False)], cells[(m0, n, True)]
            table.rows.append([str(n), f"{a['unstable_fraction']:.3f}", str(a["diverged"]), f"{a['rose_fraction']:.3f}",
                               _fmt(a["mse_mean"], a["mse_ci95"]), f"{a['mse_median']:.3f}",
                               str(b["diverged"]), f"{b['rose_fraction']:.3f}",
                               _fmt(b["mse_mean"], b["mse_ci95"]), f"{b['mse_median']:.3f}"])
        report.table(table)
        report.heading("Larger inner rates (a sharper loss, in effect)")
        report.text(
            "Gradient descent of rate m alpha on a loss is gradient descent of rate alpha on the loss times m: "
            "multiplying the rate at evaluation stands for a loss that much sharper (its gradients and all its "
            "derivatives scaled alike, which a longer meta-training need not do). Fractions of the held-out tasks, "
            "per rate and number of steps; *smallest alpha lambda_max diverged*: the least curved task that "
            "diverged.")
        sweep = Table(["rate", "n", "alpha lambda_max > 2", "diverged", "rose", "smallest alpha lambda_max diverged",
                       "MSE median", "capped: diverged", "capped: MSE median"])
        for m in c.rate_multipliers:
            for n in c.adapt_steps:
                a, b = cells[(m, n, False)], cells[(m, n, True)]
                d = a["masks"]["diverged"]
                smallest = f"{a['masks']['alpha_lam'][d].min():.2f}" if d.any() else "–"
                sweep.rows.append([f"{alpha * m:g}", str(n), f"{a['unstable_fraction']:.3f}",
                                   f"{a['diverged_fraction']:.3f}", f"{a['rose_fraction']:.3f}", smallest,
                                   f"{a['mse_median']:.3f}", str(b["diverged"]), f"{b['mse_median']:.3f}"])
        report.table(sweep)

    def _threshold(self, report: Report, cells: dict[tuple[float, int, bool], dict[str, Any]]) -> None:
        """The threshold on alpha lambda_max that best separates the tasks that diverged within the last number of
        steps from the others, pooled over the rates (in-sample: a description, not a prediction)."""
        c = self.effective()
        n = c.adapt_steps[-1]
        a = np.concatenate([cells[(m, n, False)]["masks"]["alpha_lam"] for m in c.rate_multipliers])
        d = np.concatenate([cells[(m, n, False)]["masks"]["diverged"] for m in c.rate_multipliers])
        candidates = np.unique(np.concatenate([[2.0], a]))
        accuracy = np.array([np.mean((a > t) == d) for t in candidates])
        best = int(np.argmax(accuracy))
        at_two = float(np.mean((a > 2) == d))
        none = float(np.mean(~d))
        report.text(
            f"Which tasks diverge within {n} steps, pooled over the rates: the rule alpha lambda_max > 2 is right "
            f"about {100 * at_two:.1f}% of the task-cells; the best single threshold, alpha lambda_max > "
            f"{candidates[best]:.2f}, about {100 * accuracy[best]:.1f}% (fitted on these same tasks); saying that no "
            f"task diverges, about {100 * none:.1f}%.")
        report.data["threshold"] = {"steps": n, "best": float(candidates[best]), "accuracy": float(accuracy[best]),
                                    "accuracy_at_2": at_two, "accuracy_of_none": none}

    def _cap_sweep(self, ctx: Context, report: Report, cells: dict[tuple[float, int, bool], dict[str, Any]],
                   alpha: float, K: int) -> None:
        """The safeguard with other values of c, at the trained rate and the largest one, after the last step count."""
        c = self.effective()
        if not c.cap_c_sweep:
            return
        n = c.adapt_steps[-1]
        rates = sorted({c.rate_multipliers[0], max(c.rate_multipliers)})
        table = Table(["c", *(f"rate {alpha * m:g}: diverged / MSE mean / median" for m in rates)])
        results: dict[str, Any] = {}
        for cap_c in (c.cap_c, *c.cap_c_sweep):
            row = [f"{cap_c:g}"]
            for m in rates:
                if cap_c == c.cap_c:
                    d = cells[(m, n, True)]
                    div, mean, median = d["diverged"], d["mse_mean"], d["mse_median"]
                else:
                    ev = ctx.evaluate(LABEL, episodes=c.episodes, task={"shots": K}, with_oracle=False, learner={
                        "eval_inner_steps": n, "inner_lr": alpha * m, "inner_lr_cap": "curvature",
                        "inner_lr_cap_c": cap_c, "curvature_iters": c.lanczos_steps})
                    div, mean, median = ev.diverged, ev.metrics["mse"].mean, float(np.median(ev.per_task["mse"]))
                row.append(f"{div} / {mean:.4g} / {median:.3f}")
                results[f"c={cap_c:g},rate_x{m:g}"] = {"diverged": div, "mse_mean": mean, "mse_median": median}
            table.rows.append(row)
        uncapped = ["uncapped"] + [f"{cells[(m, n, False)]['diverged']} / {cells[(m, n, False)]['mse_mean']:.4g} / "
                                   f"{cells[(m, n, False)]['mse_median']:.3f}" for m in rates]
        table.rows.append(uncapped)
        report.heading("The safeguard's constant c")
        report.text(f"`learner.inner_lr_cap = \"curvature\"` with each c, after {n} steps at K={K}: diverged tasks of "
                    f"{c.episodes}, MSE mean and median over the others. c < 2 keeps alpha_t lambda_max < 2 at theta.")
        report.table(table)
        report.data["cap_sweep"] = results

    def _checks(self, report: Report, spectra: dict[tuple[int, int], dict[str, np.ndarray]],
                cells: dict[tuple[float, int, bool], dict[str, Any]], alpha: float) -> None:
        c = self.effective()
        steps = sorted({s for s, _ in spectra})
        K0 = c.test_shots[0]
        first, last = np.median(spectra[(steps[0], K0)]["lam_max"]), np.median(spectra[(steps[-1], K0)]["lam_max"])
        report.check(f"spectrum.K={K0}.sharpens_with_training",
                     Check(round(float(last / first), 4), f"> 1 (median lambda_max, step {steps[-1]} / step {steps[0]})",
                           bool(last > first)))
        if len(c.test_shots) > 1:
            by_k = sorted(c.test_shots)
            med = [float(np.median(spectra[(steps[-1], K)]["lam_max"])) for K in by_k]
            ordered = all(a > b for a, b in itertools.pairwise(med))
            report.check("spectrum.fewer_shots_sharper",
                         Check(round(med[0] / med[-1], 4), f"> 1 and decreasing in K (median lambda_max at K="
                               f"{', '.join(map(str, by_k))}: {', '.join(f'{x:.0f}' for x in med)})", ordered))
        m0, n_last = c.rate_multipliers[0], c.adapt_steps[-1]
        for (m, n, cap), d in cells.items():
            if cap or not (m == m0 or n == n_last):
                continue
            gap = d["unstable_fraction"] - d["diverged_fraction"]
            report.check(f"rate_x{m:g}.steps={n}.unstable_fraction_predicts_divergence",
                         Check(round(gap, 4), f"|.| <= {PREDICTION_TOLERANCE:g} (fraction alpha lambda_max > 2 minus "
                               "fraction diverged)", bool(abs(gap) <= PREDICTION_TOLERANCE)))
        for what in ("diverged", "rose"):
            hit = sum(int(d["masks"][what].sum()) for (m, n, cap), d in cells.items() if not cap)
            inside = sum(int((d["masks"][what] & d["masks"]["unstable"]).sum()) for (m, n, cap), d in cells.items()
                         if not cap)
            report.check(f"{what}_only_where_alpha_lambda_max_above_2",
                         Check(round(inside / hit, 4) if hit else 1.0,
                               f">= 0.99 (share of the {hit} task-cells {what} that have alpha lambda_max > 2)",
                               bool(not hit or inside / hit >= 0.99)))
        worst = max(d["diverged"] for (m, n, cap), d in cells.items() if cap)
        report.check("cap.no_task_diverges", at_most(worst, 0))
        uncapped = max(d["diverged"] for (m, n, cap), d in cells.items() if not cap)
        report.data["uncapped_max_diverged"] = uncapped


def _fmt(mean: float, ci: float) -> str:
    """``mean ± ci95`` with 3 decimals, or 3 significant digits beyond 1e4 (tasks that blew up)."""
    return f"{mean:.3g} ± {ci:.2g}" if abs(mean) >= 1e4 else fmt({"mean": mean, "ci95": ci}, 3)


def _summary(lam: np.ndarray, alpha: float) -> dict[str, float]:
    a = alpha * lam
    return {"median": float(np.median(a)), "q90": float(np.quantile(a, 0.9)), "max": float(a.max()),
            "fraction_above_2": float(np.mean(a > 2))}


def _plot_spectrum(path: Path, spectra: dict[tuple[int, int], dict[str, np.ndarray]], alpha: float,
                   shots: tuple[int, ...]) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = sorted({s for s, _ in spectra})
    for i, K in enumerate(shots):
        a = [alpha * spectra[(s, K)]["lam_max"] for s in steps]
        axes[0].plot(steps, [np.median(x) for x in a], marker="o", ms=3, color=f"C{i}", label=f"K={K} median")
        axes[0].fill_between(steps, [np.quantile(x, 0.1) for x in a], [np.quantile(x, 0.9) for x in a],
                             color=f"C{i}", alpha=0.15)
        axes[1].plot(steps, [np.mean(x > 2) for x in a], marker="o", ms=3, color=f"C{i}", label=f"K={K}")
    axes[0].axhline(2, color="k", ls="--", lw=1, label="alpha lambda = 2")
    axes[0].set_ylabel("alpha lambda_max (median, 10-90%)")
    axes[1].set_ylabel("fraction of tasks with alpha lambda_max > 2")
    for ax in axes:
        ax.set_xlabel("meta-training step")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _plot_outcomes(path: Path, cells: dict[tuple[float, int, bool], dict[str, Any]], rates: tuple[float, ...],
                   n: int) -> Path:
    """Per task: alpha lambda_max against the support loss after n steps / before (diverged tasks on top)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    top = 1.0
    for m in rates:
        r = cells[(m, n, False)]["masks"]["ratio"]
        if np.isfinite(r).any():
            top = max(top, float(np.nanmax(np.where(np.isfinite(r), r, np.nan))))
    ceiling = top * 10
    for i, m in enumerate(rates):
        masks = cells[(m, n, False)]["masks"]
        r = np.where(np.isfinite(masks["ratio"]), masks["ratio"], ceiling)
        ax.scatter(masks["alpha_lam"], np.clip(r, 1e-6, ceiling), s=5, color=f"C{i}", alpha=0.5,
                   label=f"rate x{m:g}")
    ax.axvline(2, color="k", ls="--", lw=1)
    ax.axhline(1, color="0.5", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [t for t in (0.5, 1, 2, 3, 5, 10, 20, 50) if t <= 2 * max(
        float(np.max(cells[(m, n, False)]["masks"]["alpha_lam"])) for m in rates)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("alpha lambda_max (support-loss Hessian at theta)")
    ax.set_ylabel(f"support loss: after {n} steps / at theta")
    ax.set_title("each task at each rate (non-finite: drawn on top)", fontsize=9)
    ax.legend(fontsize=7, markerscale=3)
    return save_figure(fig, path)


def _plot_cap(path: Path, cells: dict[tuple[float, int, bool], dict[str, Any]], steps: tuple[int, ...],
              episodes: int) -> Path:
    plt = pyplot()
    m0 = next(iter(cells))[0]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for cap, style in ((False, "-"), (True, "--")):
        name = "capped" if cap else "fixed rate"
        ax.plot(steps, [cells[(m0, n, cap)]["mse_mean"] for n in steps], style, marker="o", ms=3, color="C0",
                label=f"{name}: mean")
        ax.plot(steps, [cells[(m0, n, cap)]["mse_median"] for n in steps], style, marker="s", ms=3, color="C1",
                label=f"{name}: median")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel(f"held-out MSE (tasks that did not diverge, of {episodes})")
    ax.legend(fontsize=7)
    return save_figure(fig, path)

