"""``metalens study pac-bayes``: PAC-Bayes meta-bounds, certified for trained runs, against the risk measured on
new tasks (Amit & Meir 2018; Pentina & Lampert 2014).

For each family and each number ``m`` of examples per task, a ``pacbayes`` learner (a Gaussian
hyper-posterior over diagonal Gaussian priors on a linear model's weights, trained on the meta-bound)
is meta-trained, and :func:`metalens.certify.certificates` states its bound from the first ``n`` tasks
of its meta-training stream, for every ``n``, with the support sets (``m`` examples) as the tasks' data.
Beside each bound: the Gibbs risk it bounds, measured on ``episodes`` fresh held-out tasks (evaluation
seed 0); the learner's own predictions (the posterior-predictive mixture); ``maml`` (the same linear
network) and, on clusters, ``protonet`` (an MLP embedding), meta-trained on the same task stream with the
same budget; and the exact Bayes oracle, all on the very same fresh tasks.

Families: ``clusters`` (5-way 2-D Gaussian clusters, ``m / 5`` examples per class, points at standard
deviation ``clusters_std`` around means uniform on the disk of radius 3; 0-1 loss; chance 0.8) and
``linear`` (``y = w . x + noise``, ``w ~ N(0, I / d)``; the squared error clipped to ``[0, B]`` and
divided by ``B``; the oracle is conjugate Bayesian linear regression, scored with its predictive mean).

Checks, per family: every bound is at or above the measured risk (``sound``: the smallest margin);
at the largest ``n`` and ``m`` the bound is below 1 (``nonvacuous``) and, on clusters, below chance
(``below_chance``); the gap between bound and measured risk shrinks with ``n`` (at the largest ``m``)
and with ``m`` (at the largest ``n``), as the bound's rates (across tasks ``~ 1/sqrt(n)``, within a task
``~ 1/sqrt(m)``) say.

Runs live in ``OUT/runs/<family>-m<m>-<learner>``; running the study again reuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributions import Normal

from metalens.certify import certificates, predictor_risk
from metalens.config import Options, opt
from metalens.evaluate import Metric, summarize
from metalens.experiments.spine import Context, Study
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, fmt
from metalens.run import RunConfig

__all__ = ["PACBayesStudy", "PACBAYES_OPTIONS"]

Family = Literal["clusters", "linear"]
WAYS = 5  # clusters: 5-way
RADIUS = 3.0  # clusters: the class means' disk
QUERIES = 10  # query points per task (per class on clusters): what the fresh tasks are scored on
# The pacbayes learner of every run: a linear model (the Bayes classifier of isotropic clusters and the
# regression function of `linear` are linear; every weight adapted costs KL); hyper-prior, hyper-posterior
# and the priors all start at standard deviation 1, so KL(Q || P) starts at 0.
PACBAYES_OPTIONS: dict[str, Any] = {"hidden": [], "prior_std": 1.0, "hyper_prior_std": 1.0, "hyper_posterior_std": 1.0,
                                    "inner_lr": 0.3}
MAML_OPTIONS: dict[str, dict[str, Any]] = {  # the same linear network; inner rates chosen on 300-step runs
    "clusters": {"hidden": [], "inner_lr": 2.0, "inner_steps": 5, "eval_inner_steps": 5},
    "linear": {"hidden": [], "inner_lr": 0.3, "inner_steps": 5, "eval_inner_steps": 5},
}
PROTONET_OPTIONS: dict[str, Any] = {"backbone": "mlp"}
PROTONET_LR = 1e-3  # the tour's rate for the metric learners


def _label(family: str, m: int, learner: str) -> str:
    return f"{family}-m{m}-{learner}"


@STUDIES.register("pac-bayes")
class PACBayesStudy(Study):
    """PAC-Bayes meta-bounds (pacbayes) against measured new-task risk, for n tasks and m examples per task."""

    title = "PAC-Bayes meta-learning: certified bounds against measured risk"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the pac-bayes study (``--set study.KEY=VALUE``)."""

        families: tuple[Family, ...] = opt(("clusters", "linear"), "task families: clusters (5-way, 0-1 loss) and "
                                                                  "linear (regression, clipped squared error)",
                                           min_len=1)
        tasks: tuple[int, ...] = opt((10, 100, 1000), "n: observed tasks each bound rests on (the first n of the "
                                                      "run's meta-training stream)", ge=2, min_len=1, increasing=True)
        examples: tuple[int, ...] = opt((5, 20, 100), "m: examples per task, the support set (clusters: a multiple of "
                                                      "5, m/5 per class); one run per m", ge=2, min_len=1,
                                        increasing=True)
        delta: float = opt(0.05, "every bound holds with probability at least 1 - delta", gt=0, lt=1)
        clusters_std: float = opt(0.5, "clusters: standard deviation of the points around their class mean "
                                       "(means uniform on the disk of radius 3)", gt=0)
        linear_dim: int = opt(5, "linear: input dimension d", ge=1)
        linear_noise: float = opt(0.5, "linear: standard deviation of the noise on y", ge=0)
        clip: float = opt(4.0, "B: the regression loss is min((y^ - y)^2, B) / B", gt=0)
        steps: int = opt(300, "meta-training steps of every run", ge=1)
        batch_tasks: int = opt(25, "tasks per meta-training step", ge=1)
        lr: float = opt(0.01, "outer Adam learning rate of pacbayes and maml (protonet: 1e-3)", gt=0)
        inner_steps: int = opt(10, "pacbayes: base learner steps (training and prediction)", ge=0)
        episodes: int = opt(1000, "fresh held-out tasks the risks are measured on", ge=2)
        samples: int = opt(20000, "Monte Carlo weight draws for each bound's empirical Gibbs risk", ge=1)
        seed: int = opt(0, "training seed (task streams and initial weights)", ge=0)
        quick: bool = opt(False, "smoke test: n in (10, 20), m in (5, 10), 3 steps, 20 fresh tasks, 400 draws")

        def check(self) -> None:
            if "clusters" in self.families and any(m % WAYS for m in self.examples):
                raise ValueError(f"examples must be multiples of {WAYS} with clusters (the same number per class), "
                                 f"got {self.examples}")
            if len(set(self.families)) != len(self.families):
                raise ValueError(f"families must not repeat, got {self.families}")

    def effective(self) -> PACBayesStudy.Config:
        """The options actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, tasks=(10, 20), examples=(5, 10), steps=min(c.steps, 3), episodes=min(c.episodes, 20),
                       samples=min(c.samples, 400), inner_steps=min(c.inner_steps, 2),
                       batch_tasks=min(c.batch_tasks, 10))

    # -- the runs ---------------------------------------------------------------------------------
    def _task(self, family: str, m: int) -> dict[str, Any]:
        c = self.effective()
        if family == "clusters":
            return {"ways": WAYS, "shots": m // WAYS, "queries": QUERIES, "radius": RADIUS, "std": c.clusters_std}
        return {"dim": c.linear_dim, "shots": m, "queries": QUERIES, "noise_std": c.linear_noise}

    def learners(self, family: str) -> tuple[str, ...]:
        return ("pacbayes", "maml", "protonet") if family == "clusters" else ("pacbayes", "maml")

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        train = {"steps": c.steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "seed": c.seed, "log_every": 50,
                 "checkpoint_every": c.steps}
        out = {}
        for family in c.families:
            for m in c.examples:
                options = {
                    "pacbayes": {**PACBAYES_OPTIONS, "inner_steps": c.inner_steps, "clip": c.clip,
                                 "bound_tasks": max(c.tasks), "delta": c.delta},
                    "maml": MAML_OPTIONS[family], "protonet": PROTONET_OPTIONS}
                for name in self.learners(family):
                    tr = {**train, "lr": PROTONET_LR} if name == "protonet" else train
                    out[_label(family, m, name)] = RunConfig.resolve(family, name, self._task(family, m),
                                                                     options[name], tr)
        return out

    # -- the analysis -----------------------------------------------------------------------------
    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        cells: dict[str, list[dict[str, Any]]] = {}
        for family in c.families:
            cells[family] = []
            for m in c.examples:
                cells[family] += self._cell(ctx, family, m)
        report.data["cells"] = cells
        self._text(ctx, report, cells)
        self._checks(report, cells)
        report.figure(_plot(ctx.figure("bounds.png"), cells, c))

    def _cell(self, ctx: Context, family: str, m: int) -> list[dict[str, Any]]:
        """The certificates of the ``pacbayes`` run at ``m`` for every ``n``, and the comparisons' risks."""
        c = self.effective()
        label = _label(family, m, "pacbayes")
        run = ctx.run(label)
        ctx.say(f"{label}: certificates for n = {', '.join(map(str, c.tasks))}")
        certs = certificates(run, tasks=c.tasks, delta=c.delta, episodes=c.episodes, samples=c.samples,
                             clip=c.clip, say=lambda s: ctx.say(f"{label}: {s}"))
        classification = run.family.spec.is_classification
        fresh = run.family.eval_episodes(0, c.episodes)

        def risk(predict: Any) -> Metric:
            return summarize(predictor_risk(predict, fresh, classification=classification, clip=c.clip))

        others = {name: risk(ctx.learner(_label(family, m, name)).predict) for name in self.learners(family)
                  if name != "pacbayes"}
        others["oracle"] = risk(run.family.oracle)
        if not classification:
            others["zero"] = risk(lambda sx, sy, qx, support_mask=None: Normal(torch.zeros(*qx.shape[:2], 1), 1.0))
        rows = []
        for cert in certs:
            rows.append({"m": m, "n": cert.tasks, "bound": cert.bound, "measured": cert.measured,
                         "gap": cert.bound - cert.measured["mean"], "pacbayes_predictive": cert.predictor,
                         **{k: {"mean": v.mean, "ci95": v.ci95} for k, v in others.items()},
                         "forms": cert.forms, "terms": cert.terms})
        return rows

    def _text(self, ctx: Context, report: Report, cells: dict[str, list[dict[str, Any]]]) -> None:
        c = self.effective()
        report.text(
            f"Each `pacbayes` run is meta-trained for {c.steps} steps of {c.batch_tasks} tasks (Adam, rate {c.lr}, "
            f"seed {c.seed}) on the meta-bound with n = {max(c.tasks)} and its support sets as the tasks' data; its "
            f"base learner takes {c.inner_steps} natural-gradient steps. Each bound is `metalens certify`'s, from "
            "the first n tasks of the run's meta-training stream with their m support points: with probability "
            f"at least {1 - c.delta:g}, `er <= kl^-1(kl^-1(er^+, c_task), c_env)` with `er^+` the Monte Carlo "
            f"upper bound on the observed tasks' empirical Gibbs risk ({c.samples} weight draws, delta/4), "
            "`c_task = (ln dQ/dP + sum_i KL(Q_i||P) + ln(2 sqrt(nm)/(delta/4))) / (nm)` and "
            "`c_env = (ln dQ/dP + ln(2 sqrt(n)/(delta/2))) / n` (`metalens.theory.pac_bayes.meta_kl_bound`, "
            "disintegrated at the prior drawn for prediction). The measured risk is the Gibbs risk it bounds (one "
            f"weight draw per prediction, 8 per task) on {c.episodes} fresh tasks, mean ± 95% CI; the other "
            "columns score each model's own predictions on the same tasks. Losses: 0-1 on clusters, "
            f"min((y^ - y)^2, {c.clip:g}) / {c.clip:g} on linear. `maml` uses the same linear network; `protonet` "
            "an MLP embedding; both are trained on the same task stream (their query points included) for as many "
            "steps.")
        for family, rows in cells.items():
            report.heading(f"{family}")
            others = [k for k in ("maml", "protonet", "oracle", "zero") if k in rows[0]]
            names = {"zero": "predict 0", "oracle": "Bayes oracle"}
            table = Table(["m", "n", "bound", "measured (Gibbs)", "gap", "pacbayes predictive"]
                          + [names.get(k, k) for k in others] + ["Amit-Meir form", "c_env", "c_task"])
            for r in rows:
                table.rows.append([r["m"], r["n"], f"{r['bound']:.4f}", fmt(r["measured"]), f"{r['gap']:.4f}",
                                   fmt(r["pacbayes_predictive"])] + [fmt(r[k]) for k in others]
                                  + [f"{r['forms'].get('amit_meir', float('nan')):.4f}", f"{r['terms']['c_env']:.4g}",
                                     f"{r['terms']['c_task']:.4g}"])
            report.table(table)

    def _checks(self, report: Report, cells: dict[str, list[dict[str, Any]]]) -> None:
        c = self.effective()
        N, M = max(c.tasks), max(c.examples)
        for family, rows in cells.items():
            margin = min(r["bound"] - r["measured"]["mean"] for r in rows)
            report.check(f"{family}.sound", Check(round(margin, 4), ">= 0 (bound - measured risk, smallest over n, m)",
                                                  margin >= 0))
            top = round(next(r for r in rows if r["n"] == N and r["m"] == M)["bound"], 4)  # judged as shown
            report.check(f"{family}.nonvacuous", Check(top, f"< 1 (n = {N}, m = {M})", top < 1))
            if family == "clusters":
                chance = 1 - 1 / WAYS
                report.check("clusters.below_chance", Check(top, f"< {chance:g} (chance, n = {N}, m = {M})",
                                                            top < chance))
            for axis, fixed, along in (("n", ("m", M), c.tasks), ("m", ("n", N), c.examples)):
                if len(along) < 2:
                    continue
                gaps = [next(r["gap"] for r in rows if r[axis] == v and r[fixed[0]] == fixed[1]) for v in along]
                ratio = round(max(b / a if a > 0 else math.inf for a, b in zip(gaps, gaps[1:])), 4)
                report.check(f"{family}.gap_shrinks_with_{axis}",
                             Check(ratio, f"< 1 (largest ratio of consecutive gaps along {axis}, at "
                                          f"{fixed[0]} = {fixed[1]})", ratio < 1))


def _plot(path: Path, cells: dict[str, list[dict[str, Any]]], c: PACBayesStudy.Config) -> Path:
    """Bound and measured risk against n (one line per m) and against m (one line per n; the measured risks, the
    same for every n, drawn once with the comparisons'), per family."""
    plt = pyplot()
    fams = list(cells)
    fig, axes = plt.subplots(len(fams), 2, figsize=(11, 3.8 * len(fams)), squeeze=False)
    for (ax_n, ax_m), family in zip(axes, fams):
        rows = cells[family]
        for j, m in enumerate(c.examples):
            pts = sorted((r["n"], r) for r in rows if r["m"] == m)
            xs = [x for x, _ in pts]
            ax_n.plot(xs, [r["bound"] for _, r in pts], "-o", color=f"C{j}", label=f"bound, m = {m}")
            ax_n.errorbar(xs, [r["measured"]["mean"] for _, r in pts], yerr=[r["measured"]["ci95"] for _, r in pts],
                          fmt="--s", color=f"C{j}", alpha=0.7, label=f"measured, m = {m}")
        ms = list(c.examples)
        for j, n in enumerate(c.tasks):
            ax_m.plot(ms, [next(r["bound"] for r in rows if r["n"] == n and r["m"] == m) for m in ms], "-o",
                      color=f"C{j}", label=f"bound, n = {n}")
        first = {m: next(r for r in rows if r["m"] == m) for m in ms}
        for key, style, colour, label in (("measured", "--s", "k", "pacbayes (Gibbs, measured)"),
                                          ("pacbayes_predictive", "--^", "0.45", "pacbayes predictive"),
                                          ("maml", ":v", "C4", "maml"), ("protonet", ":D", "C5", "protonet"),
                                          ("oracle", ":", "k", "Bayes oracle")):
            if key in first[ms[0]]:
                ax_m.plot(ms, [first[m][key]["mean"] for m in ms], style, color=colour, lw=1.2, ms=4, label=label)
        for ax, axis in ((ax_n, "n"), (ax_m, "m")):
            if family == "clusters":
                ax.axhline(1 - 1 / WAYS, color="0.6", lw=1, label="chance")
            ax.axhline(1.0, color="0.85", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel(f"{axis} ({'observed tasks' if axis == 'n' else 'examples per task'})")
            ax.set_ylabel("risk (0-1)" if family == "clusters" else f"risk (clipped squared error / {c.clip:g})")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{family}: bound and measured risk against {axis}", fontsize=10)
            ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)
