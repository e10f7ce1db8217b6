"""Neural Processes scored in nats against the exact GP posterior (``metalens study neural-processes``).

For each model (``cnp``, ``lnp``, ``anp``) and each GP kernel (RBF, Matern-5/2 and
weakly periodic with length scale 0.25, and RBF with a random length scale), the study
meta-trains the model on the ConvCNP protocol (``x ~ U[-2, 2]``, contexts ``U{3..50}``,
targets ``U{3..50}``; Gordon et al. 2020), then reports on held-out tasks:

- the **per-target predictive log-likelihood** (nats, mean and 95% CI over tasks)
  beside the exact GP oracle's on the very same tasks, and the gap to it with a
  paired 95% CI. This is the per-point marginal ``log p(y_t | x_t, C)`` for every
  model: the evaluator's ``-nll``; for the latent models, the log of an equal-weight
  mixture over ``eval_samples`` draws ``z ~ q(z | C)`` (see
  :mod:`metalens.learners.neural_process`), never the ELBO;
- the **joint** log-likelihood per target, ``log p(y_T | x_T, C) / |T|``: exact for
  the GP oracle (:meth:`metalens.tasks.gp.GP.joint_log_likelihood`), the per-point LL
  for the CNP (its predictive factorises), an importance-weighted estimate with
  proposal ``q(z | C u T)`` for the latent models (``joint_samples`` draws);
- a **sample-efficiency curve**: per-target log-likelihood against the number of
  context points, at fixed counts from ``curve_contexts`` (the family's
  ``min_context = max_context = n``). Zero context points cannot be an Episode, so
  for ``n = 0`` the tasks of ``n = 1`` are scored with their one context point masked
  out: the oracle is then the GP prior, and the models pool an empty set to zero
  (a situation they never met in training, which starts at 3 points);
- figures of predictive means with ±2 standard-deviation bands against the exact
  GP posterior on a few held-out tasks;
- the same models on ``sinusoid`` (and ``maml`` with its tour recipe,
  :data:`metalens.experiments.recipes.TOUR`): predictive-mean MSE beside the oracle's.

Checks, per kernel: the exact GP is an upper bound (each model's paired LL gap to it is
not below minus its 95% CI); the ordering the Neural-Process literature reports,
``anp`` above ``lnp`` (Kim et al. 2019) and ``lnp`` at least level with ``cnp``
(Garnelo et al. 2018b), as paired LL differences against their 95% CI; on sinusoid,
no model's MSE below the oracle's beyond chance.

Runs live in ``OUT/runs/<model>-<kernel>`` (and ``<model>-sinusoid``); running the
study again with the same options reuses finished runs, and a larger ``steps``
continues them.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from metalens import rng
from metalens.config import Options, opt
from metalens.episode import Episode
from metalens.evaluate import Evaluation, summarize
from metalens.experiments.recipes import TOUR
from metalens.experiments.spine import Context, Study
from metalens.learners.base import Learner
from metalens.plots import plot_regression_tasks, pyplot, save_figure
from metalens.registry import LEARNERS, STUDIES
from metalens.report import Report, Table, above, fmt, not_below
from metalens.run import RunConfig
from metalens.tasks.gp import GP

__all__ = ["NeuralProcesses", "KERNEL_VARIANTS", "MODELS"]

Model = Literal["cnp", "lnp", "anp"]
MODELS: tuple[str, ...] = typing.get_args(Model)
# Study kernel names -> gp family options (the random-length-scale range is a study option).
KernelVariant = Literal["rbf", "matern52", "periodic", "rbf-random"]
KERNEL_VARIANTS: tuple[str, ...] = typing.get_args(KernelVariant)
# Steps per model on gp, about 20 minutes each on one (shared) CPU thread at batch_tasks 16: chosen from
# 11.8 / 18.2 / 92.7 ms per step of cnp / lnp / anp; the RBF runs in the README took 20.6 / 26.8 / 13.0 min.
DEFAULT_STEPS = {"cnp": 100000, "lnp": 65000, "anp": 13000}
_QUICK_LEARNER = {"hidden": 16, "latent_dim": 8, "heads": 2, "eval_samples": 4}
# Tasks per predict call on gp. The latent models' joint estimate draws the z of chunk i from
# (eval_seed, i), so this size is part of that estimate's definition; elsewhere it bounds memory only.
EVAL_BATCH = 50
# (a, b, claim) paired LL differences a - b reported per kernel; claim ">": a above b beyond its 95% CI,
# ">=": a not below b beyond it, None: reported only
ORDERING = (("anp", "lnp", ">"), ("lnp", "cnp", ">="), ("anp", "cnp", None))


def _known_models(steps: int | dict[str, int]) -> None:
    for name in steps if isinstance(steps, dict) else ():
        if name not in MODELS:
            raise ValueError(f"must name models among {', '.join(MODELS)} (not {name!r})")


@STUDIES.register("neural-processes")
class NeuralProcesses(Study):
    """CNP, latent NP and attentive NP on GP families, in nats beside the exact GP oracle."""

    title = "Neural Processes against the exact GP"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the neural-processes study (``--set study.KEY=VALUE``)."""

        models: tuple[Model, ...] = opt(MODELS, "Neural-Process learners to train and score", min_len=1)
        kernels: tuple[KernelVariant, ...] = opt(KERNEL_VARIANTS, "GP kernels: rbf, matern52, periodic, rbf-random",
                                                 min_len=1)
        lengthscale_range: tuple[float, float] = opt(
            (0.1, 1.0), "rbf-random: each task's length scale, log-uniform on [low, high]", gt=0, increasing=True)
        steps: int | dict[str, int] = opt(
            dict(DEFAULT_STEPS), "meta-training steps per kernel: one number for every model, or a table "
            "{cnp = N, lnp = N, anp = N} (models it leaves out keep their default)", ge=1, check=_known_models)
        objective: Literal["elbo", "ml"] = opt(
            "elbo", "training objective of lnp and anp: elbo (the papers') or ml (NP-ML, Foong et al. 2020); "
                    "their ml runs live apart, in OUT/runs/<model>-ml-<kernel>")
        ml_samples: int = opt(8, "objective = ml: z samples per task in each training step", ge=1)
        batch_tasks: int = opt(16, "tasks per meta-training step", ge=1)
        lr: float = opt(5e-4, "Adam learning rate", gt=0)
        lr_decay: float = opt(0.0, "fraction of each run's steps, at its end, over which the learning rate decays "
                                   "to 0 by a half cosine (0: constant); a finished constant run continued to more "
                                   "steps decays from where it stopped when the fraction reaches back that far",
                              ge=0, lt=1)
        seed: int = opt(0, "training seed of every run (episodes, initial weights, z samples)", ge=0)
        episodes: int = opt(1000, "held-out tasks per kernel for the log-likelihood table", ge=2)
        eval_seed: int = opt(0, "seed of the held-out tasks", ge=0)
        joint_samples: int = opt(64, "z samples of the latent models' importance-weighted joint estimate", ge=1)
        curve_contexts: tuple[int, ...] = opt((0, 1, 2, 3, 5, 10, 15, 20, 30, 40, 50),
                                              "context counts of the sample-efficiency curve", ge=0, min_len=1)
        curve_episodes: int = opt(200, "held-out tasks per context count of the curve", ge=2)
        figure_tasks: int = opt(3, "held-out tasks drawn in each prediction figure", ge=1)
        sinusoid: bool = opt(True, "also train and score the models (and maml, if registered) on sinusoid")
        sinusoid_steps: int = opt(20000, "meta-training steps per model on sinusoid", ge=1)
        quick: bool = opt(False, "smoke test: tiny networks, 3 steps, few tasks (overrides the budgets)")

        def steps_for(self, model: str) -> int:
            """Training steps of ``model`` on each kernel."""
            if isinstance(self.steps, dict):
                return self.steps.get(model, DEFAULT_STEPS[model])
            return self.steps

    def effective(self) -> NeuralProcesses.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=3, episodes=min(c.episodes, 10), joint_samples=min(c.joint_samples, 4),
                       curve_contexts=tuple(n for n in c.curve_contexts if n in (0, 3, 10)) or (0, 3),
                       curve_episodes=min(c.curve_episodes, 4), figure_tasks=min(c.figure_tasks, 2),
                       sinusoid_steps=min(c.sinusoid_steps, 3))

    # -- the runs ---------------------------------------------------------------------------------
    def task_options(self, kernel: str) -> dict[str, Any]:
        """``gp`` options of a study kernel (the family's defaults are the ConvCNP protocol)."""
        if kernel == "rbf-random":
            return {"kernel": "rbf", "lengthscale_range": list(self.config.lengthscale_range)}
        return {"kernel": kernel}

    def label(self, model: str, task: str) -> str:
        """The run folder's name: ``<model>-<task>``, or ``<model>-ml-<task>`` for a latent model on NP-ML."""
        return f"{model}-ml-{task}" if self._on_ml(model) else f"{model}-{task}"

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        out = {self.label(model, kernel): self._run(model, "gp", self.task_options(kernel), c.steps_for(model))
               for kernel in c.kernels for model in c.models}
        if c.sinusoid:
            for model in c.models:
                out[self.label(model, "sinusoid")] = self._run(model, "sinusoid", {}, c.sinusoid_steps)
            if "maml" in LEARNERS:
                recipe = TOUR["maml"]
                opts = {**recipe.learner_options, **({"hidden": [8]} if c.quick else {})}
                out["maml-sinusoid"] = self._run("maml", "sinusoid", {}, c.sinusoid_steps, learner_options=opts,
                                                 train=recipe.train)
        return out

    def _on_ml(self, model: str) -> bool:
        """Whether ``model`` trains on NP-ML here (the study's objective, for models that have one)."""
        return self.effective().objective == "ml" and "objective" in _option_names(model)

    def _run(self, model: str, task: str, task_options: dict[str, Any], steps: int, *,
             learner_options: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> RunConfig:
        """A run of ``model`` on ``task``: the study's learner options (quick networks, the objective) unless
        given, its trainer options (``train`` overrides batch and rate), ``steps`` steps."""
        c = self.effective()
        if learner_options is None:
            learner_options = {k: v for k, v in (_QUICK_LEARNER if c.quick else {}).items()
                               if k in _option_names(model)}
            if self._on_ml(model):
                learner_options.update(objective="ml", train_samples=c.ml_samples)
        decay = {"lr_schedule": "cosine", "lr_decay_start": round(steps * (1 - c.lr_decay))} if c.lr_decay else {}
        train = {"batch_tasks": c.batch_tasks, "lr": c.lr, **decay, **(train or {}),
                 "steps": steps, "seed": c.seed, "log_every": 50, "checkpoint_every": 2000}
        return RunConfig.resolve(task, model, task_options, learner_options, train)

    # -- the analysis ---------------------------------------------------------------------------------
    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        report.text(self._protocol())
        rows: list[dict[str, Any]] = []
        ordering: list[dict[str, Any]] = []  # paired LL differences between models on the same tasks
        curves: dict[str, dict[str, list[list[float]]]] = {}
        for kernel in c.kernels:
            labels = {model: self.label(model, kernel) for model in c.models}
            per_task_ll = self._loglik(ctx, report, kernel, labels, rows)
            for a, b, claim in ORDERING:
                if a in per_task_ll and b in per_task_ll:
                    diff = per_task_ll[a] - per_task_ll[b]
                    ordering.append({"kernel": kernel, "pair": f"{a} - {b}", "difference": asdict(summarize(diff))})
                    if claim == ">":
                        report.check(f"{kernel}.{a}_beats_{b}", above(diff, f"paired LL {a} - {b}"))
                    elif claim == ">=":
                        report.check(f"{kernel}.{a}_no_worse_than_{b}",
                                     not_below(diff, f"paired LL {a} - {b}"))
            curves[kernel] = self._curve(ctx, labels)
            family = ctx.run(labels[c.models[0]]).family
            report.figure(_plot_predictions(ctx.figure(f"predictions-{kernel}.png"), family,
                                            {m: ctx.learner(label) for m, label in labels.items()},
                                            n_tasks=c.figure_tasks, seed=c.eval_seed, device=ctx.device,
                                            title=f"gp / {kernel}"))
        report.figure(_plot_curves(ctx.figure("sample-efficiency.png"), curves))
        samples = sorted({cfg.learner_config.eval_samples for cfg in ctx.configs.values()
                          if hasattr(cfg.learner_config, "eval_samples")})
        self._report_loglik(report, rows, ordering, curves, samples)
        sinusoid = self._sinusoid(ctx, report) if c.sinusoid else []
        report.text("In the evaluator's output below, `nll` is minus the per-target LL and `mse` the error of the "
                    "predictive mean.")
        report.data.update(loglik=rows, ordering=ordering, curves=curves, sinusoid=sinusoid)

    def _loglik(self, ctx: Context, report: Report, kernel: str, labels: dict[str, str],
                rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Score every model and the exact GP on the same held-out tasks of ``kernel``: rows of the LL table,
        the evaluations and the oracle checks; returns each model's per-task LL."""
        c = self.effective()
        family = ctx.run(next(iter(labels.values()))).family
        ctx.say(f"scoring {', '.join(labels)} on gp/{kernel}: {c.episodes} held-out tasks")
        tasks = family.eval_episodes(c.eval_seed, c.episodes)
        oracle = ctx.score(family.oracle, tasks, with_nll=True, batch_tasks=EVAL_BATCH)
        oracle_joint = (family.joint_log_likelihood(tasks) / _n_targets(tasks)).numpy()
        rows.append(_row("oracle", kernel, oracle["nll"], oracle["nll"], oracle_joint, oracle_joint))
        per_task_ll = {}
        for model, label in labels.items():
            ev = ctx.evaluate(label, family, episodes=c.episodes, seed=c.eval_seed, with_oracle=False,
                              batch_tasks=EVAL_BATCH)
            _attach_oracle(ev, oracle, task=f"gp/{kernel}")
            report.evaluations.append(ev)
            learner = ctx.learner(label)
            joint = (_joint_per_target(ctx, learner, tasks, c.joint_samples, c.eval_seed)
                     if hasattr(learner, "joint_log_likelihood") else -ev.per_task["nll"])  # cnp: factorised
            per_task_ll[model] = -ev.per_task["nll"]
            rows.append(_row(model, kernel, ev.per_task["nll"], oracle["nll"], joint, oracle_joint))
            report.check(f"{kernel}.{model}.no_better_than_oracle",
                         not_below(ev.per_task["nll"] - oracle["nll"], "paired LL gap to the exact GP"))
            ctx.say(f"{model} on {kernel}: log-lik {fmt(rows[-1]['ll'], 3)} (oracle {fmt(rows[-1]['oracle_ll'], 3)}, "
                    f"gap {fmt(rows[-1]['gap'], 3)})")
        return per_task_ll

    def _curve(self, ctx: Context, labels: dict[str, str]) -> dict[str, list[list[float]]]:
        """``{name: [[n, ll, ci95], ...]}`` for the oracle and each model, at each context count n."""
        c = self.effective()
        config = ctx.configs[next(iter(labels.values()))].task_config
        out: dict[str, list[list[float]]] = {name: [] for name in ["oracle", *labels]}
        for n in c.curve_contexts:
            family = GP(replace(config, min_context=max(n, 1), max_context=max(n, 1)))
            tasks = family.eval_episodes(c.eval_seed, c.curve_episodes)
            predictors = {"oracle": family.oracle, **{m: ctx.learner(label).predict for m, label in labels.items()}}
            for name, predict in predictors.items():
                nll = ctx.score(predict, tasks, with_nll=True, empty_support=n == 0, batch_tasks=EVAL_BATCH)["nll"]
                m = summarize(-nll)
                out[name].append([n, m.mean, m.ci95])
        ctx.say(f"sample-efficiency curve over {len(c.curve_contexts)} context counts done")
        return out

    def _sinusoid(self, ctx: Context, report: Report) -> list[dict[str, Any]]:
        """The models (and maml) on sinusoid beside the oracle: rows, evaluations, checks and a figure."""
        c = self.effective()
        labels = [label for label, cfg in ctx.configs.items() if cfg.task == "sinusoid"]
        family = ctx.run(labels[0]).family
        ctx.say(f"scoring {', '.join(labels)} on sinusoid: {c.episodes} held-out tasks")
        oracle = ctx.score(family.oracle, family.eval_episodes(c.eval_seed, c.episodes), with_nll=True)
        rows, learners = [], {}
        for label in labels:
            name = ctx.configs[label].learner
            ev = ctx.evaluate(label, family, episodes=c.episodes, seed=c.eval_seed, with_oracle=False)
            _attach_oracle(ev, oracle)
            report.evaluations.append(ev)
            excess = ev.per_task["mse"] - oracle["mse"]
            rows.append({"learner": name, "mse": asdict(ev.metrics["mse"]),
                         "oracle_mse": asdict(ev.oracle["mse"]), "gap": asdict(summarize(excess)),
                         "ll": asdict(summarize(-ev.per_task["nll"])) if "nll" in ev.per_task else None,
                         "oracle_ll": asdict(summarize(-oracle["nll"]))})
            report.check(f"sinusoid.{name}.no_better_than_oracle",
                         not_below(excess, "paired MSE excess over the oracle"))
            learners[name] = ctx.learner(label)
        report.heading("Sinusoid (predictive-mean MSE, lower is better)")
        report.table(Table(["learner", "MSE", "oracle MSE", "MSE - oracle (paired)", "LL", "oracle LL"],
                           [[f"`{r['learner']}`", fmt(r["mse"], 3), fmt(r["oracle_mse"], 3), fmt(r["gap"], 3),
                             fmt(r["ll"], 3), fmt(r["oracle_ll"], 3)] for r in rows]))
        report.figure(plot_regression_tasks(ctx.figure("sinusoid.png"), family,
                                            {n: lrn.to("cpu") for n, lrn in learners.items()},
                                            n_tasks=c.figure_tasks, seed=c.eval_seed,
                                            title="sinusoid: held-out tasks"))
        return rows

    # -- the report's text ---------------------------------------------------------------------------
    def _protocol(self) -> str:
        c = self.effective()
        return ("Training: " + ", ".join(f"{m} {c.steps_for(m)}" for m in c.models) + " steps per kernel, "
                + ("latent models on the conditional ELBO, " if c.objective == "elbo" else
                   f"latent models on NP-ML ({c.ml_samples} z samples per task), ")
                + f"{c.batch_tasks} tasks per step, Adam lr {c.lr}"
                + (f" decaying to 0 by a half cosine over the last {c.lr_decay:.0%} of each run's steps, "
                   if c.lr_decay else ", ")
                + f"seed {c.seed}; `gp` family defaults (ConvCNP protocol: x ~ U[-2, 2], contexts U{{3..50}}, "
                f"targets U{{3..50}}, length scale 0.25, noise sd 0.05); rbf-random: rbf with a log-uniform "
                f"length scale on {list(c.lengthscale_range)}. Scored on {c.episodes} held-out tasks per kernel "
                f"(evaluation seed {c.eval_seed}), the same tasks for every model and the oracle.")

    def _report_loglik(self, report: Report, rows: list[dict[str, Any]], ordering: list[dict[str, Any]],
                       curves: dict[str, dict[str, list[list[float]]]], eval_samples: list[int]) -> None:
        c = self.effective()
        report.heading("Per-target predictive log-likelihood (nats, higher is better)")
        report.text("`LL` is the per-point marginal log p(y_t | x_t, context), averaged over each task's targets, "
                    "then mean ± 95% CI over tasks (= minus the evaluator's `nll`). Latent models: log of an "
                    f"equal-weight mixture over their `eval_samples` ({', '.join(map(str, eval_samples)) or '–'}) "
                    "draws z ~ q(z | context). "
                    "`gap` = oracle LL - model LL with a paired 95% CI. `joint LL` = log p(y_T | x_T, context) / |T|: "
                    "exact for the oracle, factorised for cnp, an importance-weighted estimate with "
                    f"q(z | context, targets) as proposal ({c.joint_samples} samples) for lnp and anp.")
        keys = ("ll", "oracle_ll", "gap", "joint_ll", "oracle_joint_ll", "joint_gap")
        report.table(Table(["kernel", "model", "LL", "oracle LL", "gap", "joint LL", "oracle joint LL", "joint gap"],
                           [[r["kernel"], f"`{r['model']}`", *(fmt(r[k], 3) for k in keys)] for r in rows]))
        if ordering:
            report.text("Paired differences in LL between models on the same tasks (positive: the first is "
                        "better). The Neural-Process literature reports the attentive NP above the latent NP "
                        "(Kim et al. 2019) and the latent NP at least level with the conditional NP (Garnelo et "
                        "al. 2018b); the checks `KERNEL.anp_beats_lnp` (difference above its 95% CI) and "
                        "`KERNEL.lnp_no_worse_than_cnp` (difference not below minus its 95% CI) test both.")
            report.table(Table(["kernel", "pair", "LL difference"],
                               [[o["kernel"], o["pair"], fmt(o["difference"], 3)] for o in ordering]))
        report.heading("Sample efficiency (per-target LL vs number of context points)")
        report.text("At n = 0 the tasks of n = 1 are scored with their context point masked out (oracle: the GP "
                    "prior; models: an empty set pools to zero, never seen in training).")
        for kernel, by_name in curves.items():
            ns = [int(p[0]) for p in next(iter(by_name.values()))]
            report.text(f"**{kernel}**")
            report.table(Table(["model", *(f"n={n}" for n in ns)],
                               [[f"`{name}`", *(fmt(p[1], 3) for p in pts)] for name, pts in by_name.items()]))


# --------------------------------------------------------------------------------------------
# Scoring helpers
# --------------------------------------------------------------------------------------------
def _option_names(model: str) -> set[str]:
    return {f.name for f in fields(LEARNERS[model].cls.Config)}


def _n_targets(tasks: Episode) -> Tensor:
    """Real targets per task ``[T]`` (float64)."""
    if tasks.query_mask is None:
        return torch.full((tasks.n_tasks,), float(tasks.n_query), dtype=torch.float64, device=tasks.query_x.device)
    return tasks.query_mask.sum(1).to(torch.float64)


def _joint_per_target(ctx: Context, learner: Learner, tasks: Episode, samples: int, seed: int) -> np.ndarray:
    """A latent model's importance-weighted joint log-likelihood per target of each task, on the study's
    device; the z of chunk i are drawn from ``(seed, EVAL_LEARNER, 1, i)``."""
    out = []
    with torch.no_grad():
        for i, lo in enumerate(range(0, tasks.n_tasks, EVAL_BATCH)):
            ep = tasks[lo: lo + EVAL_BATCH].to(ctx.device)
            g = rng.generator(seed, rng.Stream.EVAL_LEARNER, 1, i, device=ctx.device)
            joint = learner.joint_log_likelihood(ep, samples=samples, generator=g).double()
            out.append((joint / _n_targets(ep)).cpu())
    return torch.cat(out).numpy()


def _attach_oracle(ev: Evaluation, oracle: dict[str, np.ndarray], *, task: str | None = None) -> None:
    """Give ``ev`` the oracle's per-task metrics on its very tasks (scored once for every model)."""
    ev.oracle, ev.oracle_per_task = {k: summarize(v) for k, v in oracle.items()}, oracle
    if task is not None:
        ev.task = task


def _row(model: str, kernel: str, nll: np.ndarray, oracle_nll: np.ndarray, joint: np.ndarray,
         oracle_joint: np.ndarray) -> dict[str, Any]:
    return {"model": model, "kernel": kernel,
            "ll": asdict(summarize(-nll)), "oracle_ll": asdict(summarize(-oracle_nll)),
            "gap": asdict(summarize(nll - oracle_nll)),
            "joint_ll": asdict(summarize(joint)), "oracle_joint_ll": asdict(summarize(oracle_joint)),
            "joint_gap": asdict(summarize(oracle_joint - joint))}


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def _plot_predictions(path: Path, family: GP, learners: dict[str, Learner], *, n_tasks: int, seed: int,
                      device: str, title: str) -> Path:
    """Rows: models; columns: held-out tasks. Model mean ± 2 sd against the exact GP posterior's."""
    plt = pyplot()
    ep = family.eval_episodes(seed, n_tasks)
    lo, hi = family.config.x_range
    grid = torch.linspace(lo, hi, 200).view(1, -1, 1).expand(n_tasks, -1, -1)
    on = ep.to(device)
    with torch.no_grad():
        oracle = family.oracle(on.support_x, on.support_y, grid.to(device), support_mask=on.support_mask)
        preds = {name: lrn.predict(on.support_x, on.support_y, grid.to(device), support_mask=on.support_mask)
                 for name, lrn in learners.items()}
    xs = grid[0, :, 0].numpy()
    rows = len(preds)
    fig, axes = plt.subplots(rows, n_tasks, figsize=(4 * n_tasks, 2.8 * rows), sharex=True, sharey=True,
                             squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    o_mean, o_sd = oracle.mean[..., 0].cpu().numpy(), oracle.variance[..., 0].sqrt().cpu().numpy()
    for i, (name, dist) in enumerate(preds.items()):
        mean, sd = dist.mean[..., 0].cpu().numpy(), dist.variance[..., 0].sqrt().cpu().numpy()
        for t in range(n_tasks):
            ax = axes[i][t]
            ax.plot(xs, o_mean[t], color="k", lw=1.2, label="GP posterior mean")
            ax.plot(xs, o_mean[t] - 2 * o_sd[t], color="k", lw=0.8, ls="--", label="GP ±2 sd")
            ax.plot(xs, o_mean[t] + 2 * o_sd[t], color="k", lw=0.8, ls="--")
            col = colors[i % len(colors)]
            ax.fill_between(xs, mean[t] - 2 * sd[t], mean[t] + 2 * sd[t], color=col, alpha=0.25,
                            label=f"{name} ±2 sd")
            ax.plot(xs, mean[t], color=col, lw=1.2, label=f"{name} mean")
            m = ep.support_mask[t] if ep.support_mask is not None else slice(None)
            ax.scatter(ep.support_x[t][m][:, 0], ep.support_y[t][m][:, 0], color="crimson", s=12, zorder=5,
                       label="context")
            if i == 0:
                n_context = int(ep.support_mask[t].sum()) if ep.support_mask is not None else ep.n_support
                ax.set_title(f"held-out task {t} ({n_context} context points)")
            if t == 0:
                ax.set_ylabel(name)
                ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(title)
    return save_figure(fig, path)


def _plot_curves(path: Path, curves: dict[str, dict[str, list[list[float]]]]) -> Path:
    """Per-target LL against the number of context points, one panel per kernel."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
    for ax, (kernel, by_name) in zip(axes[0], curves.items()):
        for name, pts in by_name.items():
            a = np.asarray(pts)
            style = {"color": "k", "ls": "--"} if name == "oracle" else {}
            ax.errorbar(a[:, 0], a[:, 1], yerr=a[:, 2], label=name, marker="o", ms=3, capsize=2, **style)
        ax.set_title(f"gp / {kernel}")
        ax.set_xlabel("context points")
        ax.set_ylabel("per-target log-likelihood (nats)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)
