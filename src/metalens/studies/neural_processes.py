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
  the GP oracle, the sum of per-point terms for the CNP (its predictive factorises),
  an importance-weighted estimate with proposal ``q(z | C u T)`` for the latent
  models (``joint_samples`` draws);
- a **sample-efficiency curve**: per-target log-likelihood against the number of
  context points, at fixed counts from ``curve_contexts`` (the family's
  ``min_context = max_context = n``). Zero context points cannot be an Episode, so
  for ``n = 0`` the tasks of ``n = 1`` are scored with their one context point masked
  out: the oracle is then the GP prior, and the models pool an empty set to zero
  (a situation they never met in training, which starts at 3 points);
- figures of predictive means with ±2 standard-deviation bands against the exact
  GP posterior on a few held-out tasks;
- the same models on ``sinusoid`` (and ``maml`` when it is registered): predictive
  mean MSE beside the oracle's.

Runs live in ``OUT/runs/<model>-<kernel>`` (and ``<model>-sinusoid``); running the
study again with the same options reuses finished runs, and a larger ``steps``
continues them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalens import rng
from metalens.config import check_min, check_positive, check_step_counts, opt, to_dict
from metalens.episode import Episode
from metalens.evaluate import Evaluation, Metric, evaluate, score, summarize
from metalens.learners.base import Learner
from metalens.experiments.recipes import TOUR
from metalens.registry import LEARNERS, STUDIES
from metalens.report import save_figure, write_report
from metalens.run import RunConfig, make_learner, make_task, start_run
from metalens.studies import Study
from metalens.tasks.gp import GP

__all__ = ["NeuralProcesses", "KERNEL_VARIANTS"]

# Study kernel names -> gp family options (the random-length-scale range is a study option).
KERNEL_VARIANTS = ("rbf", "matern52", "periodic", "rbf-random")
# Steps per model on gp, about 20 minutes each on one (shared) CPU thread at batch_tasks 16: chosen from
# 11.8 / 18.2 / 92.7 ms per step of cnp / lnp / anp; the RBF runs in the README took 20.6 / 26.8 / 13.0 min.
DEFAULT_STEPS = {"cnp": 100000, "lnp": 65000, "anp": 13000}
_QUICK_LEARNER = {"hidden": 16, "latent_dim": 8, "heads": 2, "eval_samples": 4}
_EVAL_BATCH = 50  # tasks per predict call when scoring (memory only; results do not depend on it)


@STUDIES.register("neural-processes")
class NeuralProcesses(Study):
    """CNP, latent NP and attentive NP on GP families, in nats beside the exact GP oracle."""

    @dataclass(frozen=True)
    class Config:
        """Options of the neural-processes study (``--set study.KEY=VALUE``)."""

        models: tuple[str, ...] = opt(("cnp", "lnp", "anp"), "Neural-Process learners to train and score")
        kernels: tuple[str, ...] = opt(KERNEL_VARIANTS, "GP kernels: rbf, matern52, periodic, rbf-random")
        lengthscale_range: tuple[float, float] = opt(
            (0.1, 1.0), "rbf-random: each task's length scale, log-uniform on [low, high]")
        steps: int | dict[str, int] = opt(
            dict(DEFAULT_STEPS), "meta-training steps per kernel: one number for every model, or a table "
            "{cnp = N, lnp = N, anp = N} (models it leaves out keep their default)")
        objective: str = opt("elbo", "training objective of lnp and anp: elbo (the papers') or ml (NP-ML, Foong et "
                                     "al. 2020); their ml runs live apart, in OUT/runs/<model>-ml-<kernel>")
        ml_samples: int = opt(8, "objective = ml: z samples per task in each training step")
        batch_tasks: int = opt(16, "tasks per meta-training step")
        lr: float = opt(5e-4, "Adam learning rate")
        lr_decay: float = opt(0.0, "fraction of each run's steps, at its end, over which the learning rate decays "
                                   "to 0 by a half cosine (0: constant); a finished constant run continued to more "
                                   "steps decays from where it stopped when the fraction reaches back that far")
        seed: int = opt(0, "training seed of every run (episodes, initial weights, z samples)")
        episodes: int = opt(1000, "held-out tasks per kernel for the log-likelihood table")
        eval_seed: int = opt(0, "seed of the held-out tasks")
        joint_samples: int = opt(64, "z samples of the latent models' importance-weighted joint estimate")
        curve_contexts: tuple[int, ...] = opt((0, 1, 2, 3, 5, 10, 15, 20, 30, 40, 50),
                                              "context counts of the sample-efficiency curve")
        curve_episodes: int = opt(200, "held-out tasks per context count of the curve")
        figure_tasks: int = opt(3, "held-out tasks drawn in each prediction figure")
        sinusoid: bool = opt(True, "also train and score the models (and maml, if registered) on sinusoid")
        sinusoid_steps: int = opt(20000, "meta-training steps per model on sinusoid")
        quick: bool = opt(False, "smoke test: tiny networks, 3 steps, few tasks (overrides the budgets)")

        def __post_init__(self) -> None:
            for m in self.models:
                if m not in ("cnp", "lnp", "anp"):
                    raise ValueError(f"models must be among cnp, lnp, anp; got {m!r}")
            for k in self.kernels:
                if k not in KERNEL_VARIANTS:
                    raise ValueError(f"kernels must be among {', '.join(KERNEL_VARIANTS)}; got {k!r}")
            if not self.models or not self.kernels:
                raise ValueError("models and kernels must each name at least one entry")
            if isinstance(self.steps, dict):
                unknown = sorted(set(self.steps) - {"cnp", "lnp", "anp"})
                if unknown:
                    raise ValueError(f"steps names unknown model {unknown[0]!r}; use cnp, lnp or anp")
            check_step_counts(self.steps)
            if self.objective not in ("elbo", "ml"):
                raise ValueError(f"objective must be 'elbo' or 'ml', got {self.objective!r}")
            check_min(self, 1, "batch_tasks", "sinusoid_steps", "joint_samples", "figure_tasks", "ml_samples")
            check_min(self, 2, "episodes", "curve_episodes", why="for a confidence interval")
            check_positive(self, "lr")
            if not 0.0 <= self.lr_decay < 1.0:
                raise ValueError(f"lr_decay must be in [0, 1), got {self.lr_decay}")
            if any(n < 0 for n in self.curve_contexts):
                raise ValueError(f"curve_contexts must be >= 0, got {list(self.curve_contexts)}")

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

    # -- running ------------------------------------------------------------------------------------
    def run(self, out: Path, *, progress: bool | None = None, echo: Callable[[str], None] = print) -> Path:
        c = self.effective()
        out = Path(out)
        t_start = time.perf_counter()
        learner_opts = _QUICK_LEARNER if c.quick else {}
        rows: list[dict[str, Any]] = []
        ordering: list[dict[str, Any]] = []  # paired LL differences between models on the same tasks
        evaluations: list[Evaluation] = []
        curves: dict[str, dict[str, list[list[float]]]] = {}
        figures: list[Path] = []
        timings: dict[str, dict[str, float]] = {}
        for kernel in c.kernels:
            task_opts = self.task_options(kernel)
            runs: dict[str, Learner] = {}
            per_task_ll: dict[str, np.ndarray] = {}
            for model in c.models:
                opts = self._learner_options(model, learner_opts)
                learner, seconds = self._train(out, model, self._label(model, kernel), "gp", task_opts, opts,
                                               c.steps_for(model), progress, echo)
                runs[model] = learner
                timings[f"{model}-{kernel}"] = {"train_seconds": round(seconds, 1)}
            family = GP(GP.Config(**task_opts))
            echo(f"[study] scoring {', '.join(c.models)} on gp/{kernel}: {c.episodes} held-out tasks")
            oracle_ev = evaluate(make_learner("oracle", family), family, episodes=c.episodes, seed=c.eval_seed,
                                 batch_tasks=_EVAL_BATCH, with_oracle=False)
            tasks = family.eval_episodes(c.eval_seed, c.episodes)
            oracle_joint = family.joint_log_likelihood(tasks) / _n_targets(tasks)
            rows.append(_row("oracle", kernel, oracle_ev.per_task["nll"], oracle_ev.per_task["nll"],
                             oracle_joint.numpy(), oracle_joint.numpy()))
            for model, learner in runs.items():
                t0 = time.perf_counter()
                ev = evaluate(learner, family, episodes=c.episodes, seed=c.eval_seed, batch_tasks=_EVAL_BATCH,
                              with_oracle=False)
                ev.oracle, ev.oracle_per_task = oracle_ev.metrics, oracle_ev.per_task  # the very same tasks
                ev.task = f"gp/{kernel}"
                evaluations.append(ev)
                joint = _joint_per_target(learner, tasks, c.joint_samples, c.eval_seed)
                per_task_ll[model] = -ev.per_task["nll"]
                rows.append(_row(model, kernel, ev.per_task["nll"], oracle_ev.per_task["nll"], joint,
                                 oracle_joint.numpy()))
                timings[f"{model}-{kernel}"]["eval_seconds"] = round(time.perf_counter() - t0, 1)
                echo(f"[study] {model} on {kernel}: log-lik {_fmt(rows[-1]['ll'])} "
                     f"(oracle {_fmt(rows[-1]['oracle_ll'])}, gap {_fmt(rows[-1]['gap'])})")
            for a, b in (("anp", "lnp"), ("lnp", "cnp"), ("anp", "cnp")):
                if a in per_task_ll and b in per_task_ll:
                    ordering.append({"kernel": kernel, "pair": f"{a} - {b}",
                                     "difference": _metric(summarize(per_task_ll[a] - per_task_ll[b]))})
            curves[kernel] = self._curve(task_opts, runs, echo)
            figures.append(_plot_predictions(out / "figures" / f"predictions-{kernel}.png", family, runs,
                                             n_tasks=c.figure_tasks, seed=c.eval_seed, title=f"gp / {kernel}"))
        figures.append(_plot_curves(out / "figures" / "sample-efficiency.png", curves))

        sinusoid_rows: list[dict[str, Any]] = []
        if c.sinusoid:
            sinusoid_rows, sin_evals, sin_fig = self._sinusoid(out, learner_opts, progress, echo, timings)
            evaluations += sin_evals
            if sin_fig is not None:
                figures.append(sin_fig)

        notes = self._notes(c, rows, ordering, curves, sinusoid_rows, time.perf_counter() - t_start)
        path = write_report(out, title="Neural Processes against the exact GP", evaluations=evaluations,
                            figures=figures, notes=notes,
                            extra={"config": to_dict(c), "loglik": rows, "ordering": ordering, "curves": curves,
                                   "sinusoid": sinusoid_rows, "timings": timings})
        echo(f"[study] report: {path}")
        return path

    def _on_ml(self, model: str) -> bool:
        """Whether ``model`` trains on NP-ML here (the study's objective, for models that have one)."""
        return self.effective().objective == "ml" and "objective" in _option_names(model)

    def _learner_options(self, model: str, base: dict[str, Any]) -> dict[str, Any]:
        """The study's options of ``model``: ``base`` (where it has them) and the latent models' objective."""
        opts = {k: v for k, v in base.items() if k in _option_names(model)}
        if self._on_ml(model):
            opts.update(objective="ml", train_samples=self.effective().ml_samples)
        return opts

    def _label(self, model: str, task: str) -> str:
        """The run folder's suffix: ``<task>``, or ``ml-<task>`` for a latent model trained on NP-ML."""
        return f"ml-{task}" if self._on_ml(model) else task

    def task_options(self, kernel: str) -> dict[str, Any]:
        """``gp`` options of a study kernel (the family's defaults are the ConvCNP protocol)."""
        if kernel == "rbf-random":
            return {"kernel": "rbf", "lengthscale_range": list(self.config.lengthscale_range)}
        return {"kernel": kernel}

    def _train(self, out: Path, model: str, label: str, task: str, task_opts: dict[str, Any],
               learner_opts: dict[str, Any], steps: int, progress: bool | None,
               echo: Callable[[str], None], train_opts: dict[str, Any] | None = None) -> tuple[Learner, float]:
        c = self.effective()
        decay = {"lr_schedule": "cosine", "lr_decay_start": round(steps * (1 - c.lr_decay))} if c.lr_decay else {}
        train = {"batch_tasks": c.batch_tasks, "lr": c.lr, **decay, **(train_opts or {}),
                 "steps": steps, "seed": c.seed, "log_every": 50, "checkpoint_every": 2000, "device": self.device}
        cfg = RunConfig.resolve(task, model, task_opts, learner_opts, train)
        run_dir = out / "runs" / f"{model}-{label}"
        resume = (run_dir / "config.json").exists()
        run = start_run(cfg, run_dir, resume=resume)
        echo(f"[study] {model} on {task}/{label}: training to step {steps}" + (" (resuming)" if resume else ""))
        t0 = time.perf_counter()
        run.train(resume=resume, progress=progress)
        return run.learner.to("cpu"), time.perf_counter() - t0  # scored on the CPU, in float32 as trained

    def _curve(self, task_opts: dict[str, Any], runs: dict[str, Learner],
               echo: Callable[[str], None]) -> dict[str, list[list[float]]]:
        """``{name: [[n, ll, ci95], ...]}`` for each model and the oracle."""
        c = self.effective()
        out: dict[str, list[list[float]]] = {name: [] for name in ["oracle", *runs]}
        for n in c.curve_contexts:
            family = GP(GP.Config(**task_opts, min_context=max(n, 1), max_context=max(n, 1)))
            tasks = family.eval_episodes(c.eval_seed, c.curve_episodes)
            mask = torch.zeros(tasks.n_tasks, tasks.n_support, dtype=torch.bool) if n == 0 else tasks.support_mask
            predictors = {"oracle": family.oracle, **{k: v.predict for k, v in runs.items()}}
            for name, predict in predictors.items():
                m = summarize(-_per_task_nll(predict, tasks, mask))
                out[name].append([n, m.mean, m.ci95])
        echo(f"[study] sample-efficiency curve over {len(c.curve_contexts)} context counts done")
        return out

    def _sinusoid(self, out: Path, learner_opts: dict[str, Any], progress: bool | None,
                  echo: Callable[[str], None], timings: dict[str, dict[str, float]]):
        c = self.effective()
        learners: dict[str, Learner] = {}
        for model in c.models:
            opts = self._learner_options(model, learner_opts)
            learners[model], seconds = self._train(out, model, self._label(model, "sinusoid"), "sinusoid", {}, opts,
                                                   c.sinusoid_steps, progress, echo)
            timings[f"{model}-sinusoid"] = {"train_seconds": round(seconds, 1)}
        if "maml" in LEARNERS:
            plan = TOUR["maml"]
            opts = dict(plan.learner_options) if plan is not None else {}
            train = dict(plan.train) if plan is not None else {}
            if c.quick:
                opts = {**opts, "hidden": [8]}
            learners["maml"], seconds = self._train(out, "maml", "sinusoid", "sinusoid", {}, opts,
                                                    c.sinusoid_steps, progress, echo, train_opts=train)
            timings["maml-sinusoid"] = {"train_seconds": round(seconds, 1)}
        family = make_task("sinusoid")
        echo(f"[study] scoring {', '.join(learners)} on sinusoid: {c.episodes} held-out tasks")
        oracle_ev = evaluate(make_learner("oracle", family), family, episodes=c.episodes, seed=c.eval_seed,
                             with_oracle=False)
        rows, evals = [], []
        for name, learner in learners.items():
            ev = evaluate(learner, family, episodes=c.episodes, seed=c.eval_seed, with_oracle=False)
            ev.oracle, ev.oracle_per_task = oracle_ev.metrics, oracle_ev.per_task
            evals.append(ev)
            gap = summarize(ev.per_task["mse"] - oracle_ev.per_task["mse"])
            rows.append({"learner": name, "mse": _metric(ev.metrics["mse"]),
                         "oracle_mse": _metric(oracle_ev.metrics["mse"]), "gap": _metric(gap),
                         "ll": _metric(_neg(ev.metrics["nll"])) if "nll" in ev.metrics else None,
                         "oracle_ll": _metric(_neg(oracle_ev.metrics["nll"]))})
        from metalens.report import plot_regression_tasks

        fig = plot_regression_tasks(out / "figures" / "sinusoid.png", family, learners, n_tasks=c.figure_tasks,
                                    seed=c.eval_seed, title="sinusoid: held-out tasks")
        return rows, evals, fig

    # -- the report ----------------------------------------------------------------------------
    def _notes(self, c: Config, rows: list[dict[str, Any]], ordering: list[dict[str, Any]], curves: dict[str, Any],
               sinusoid_rows: list[dict[str, Any]], seconds: float) -> str:
        md = [f"Command: `{self.command()}` "
              f"(this invocation: {seconds / 60:.1f} min on {self.hardware()}; "
              "finished runs found in `OUT/runs` are reused, not trained again).", "",
              "Training: " + ", ".join(f"{m} {c.steps_for(m)}" for m in c.models) + " steps per kernel, "
              + ("latent models on the conditional ELBO, " if c.objective == "elbo" else
                 f"latent models on NP-ML ({c.ml_samples} z samples per task), ") +
              f"{c.batch_tasks} tasks per step, Adam lr {c.lr}"
              + (f" decaying to 0 by a half cosine over the last {c.lr_decay:.0%} of each run's steps, " if c.lr_decay
                 else ", ") +
              "seed " f"{c.seed}; `gp` family defaults (ConvCNP protocol: x ~ U[-2, 2], contexts U{{3..50}}, "
              f"targets U{{3..50}}, length scale 0.25, noise sd 0.05); rbf-random: rbf with a log-uniform "
              f"length scale on {list(c.lengthscale_range)}. Scored on {c.episodes} held-out tasks per kernel "
              f"(evaluation seed {c.eval_seed}), the same tasks for every model and the oracle.", "",
              "## Per-target predictive log-likelihood (nats, higher is better)", "",
              "`LL` is the per-point marginal log p(y_t | x_t, context), averaged over each task's targets, "
              "then mean ± 95% CI over tasks (= minus the evaluator's `nll`). Latent models: log of an "
              "equal-weight mixture over their `eval_samples` (default 32) draws z ~ q(z | context). "
              "`gap` = oracle LL - model LL with a paired 95% CI. `joint LL` = log p(y_T | x_T, context) / |T|: "
              "exact for the oracle, factorised for cnp, an importance-weighted estimate with "
              f"q(z | context, targets) as proposal ({c.joint_samples} samples) for lnp and anp.", "",
              "| kernel | model | LL | oracle LL | gap | joint LL | oracle joint LL | joint gap |",
              "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['kernel']} | `{r['model']}` | {_fmt(r['ll'])} | {_fmt(r['oracle_ll'])} | "
                      f"{_fmt(r['gap'])} | {_fmt(r['joint_ll'])} | {_fmt(r['oracle_joint_ll'])} | "
                      f"{_fmt(r['joint_gap'])} |")
        if ordering:
            md += ["", "Paired differences in LL between models on the same tasks (positive: the first is better; "
                   "the issue's target ordering is anp > lnp >= cnp):", "",
                   "| kernel | pair | LL difference |", "|---|---|---|"]
            md += [f"| {o['kernel']} | {o['pair']} | {_fmt(o['difference'])} |" for o in ordering]
        md += ["", "## Sample efficiency (per-target LL vs number of context points)", "",
               "At n = 0 the tasks of n = 1 are scored with their context point masked out (oracle: the GP "
               "prior; models: an empty set pools to zero, never seen in training).", ""]
        for kernel, by_name in curves.items():
            ns = [int(p[0]) for p in next(iter(by_name.values()))]
            md += [f"**{kernel}**", "", "| model | " + " | ".join(f"n={n}" for n in ns) + " |",
                   "|---|" + "---|" * len(ns)]
            for name, pts in by_name.items():
                md.append(f"| `{name}` | " + " | ".join(f"{p[1]:.3f}" for p in pts) + " |")
            md.append("")
        if sinusoid_rows:
            md += ["## Sinusoid (predictive-mean MSE, lower is better)", "",
                   "| learner | MSE | oracle MSE | MSE - oracle (paired) | LL | oracle LL |",
                   "|---|---|---|---|---|---|"]
            for r in sinusoid_rows:
                md.append(f"| `{r['learner']}` | {_fmt(r['mse'])} | {_fmt(r['oracle_mse'])} | {_fmt(r['gap'])} | "
                          f"{_fmt(r['ll']) if r['ll'] else '–'} | {_fmt(r['oracle_ll'])} |")
            md.append("")
        md += ["## Evaluator output (nll = -LL; mse of the predictive mean)", ""]
        return "\n".join(md)


# --------------------------------------------------------------------------------------------
# Scoring helpers
# --------------------------------------------------------------------------------------------
def _option_names(model: str) -> set[str]:
    return {f.name for f in fields(LEARNERS[model].cls.Config)}


def _n_targets(tasks: Episode) -> Tensor:
    if tasks.query_mask is None:
        return torch.full((tasks.n_tasks,), float(tasks.n_query), dtype=torch.float64)
    return tasks.query_mask.sum(1).to(torch.float64)


def _per_task_nll(predict: Callable[..., Any], tasks: Episode, mask: Tensor | None) -> np.ndarray:
    """Per-task NLL per target of ``predict`` on ``tasks`` with support mask ``mask`` (may be all False)."""
    out = []
    with torch.no_grad():
        for lo in range(0, tasks.n_tasks, _EVAL_BATCH):
            ep = tasks[lo: lo + _EVAL_BATCH]
            m = mask[lo: lo + _EVAL_BATCH] if mask is not None else None
            dist = predict(ep.support_x, ep.support_y, ep.query_x, support_mask=m)
            out.append(score(dist, ep, with_nll=True)["nll"])
    return torch.cat(out).numpy()


def _joint_per_target(learner: Learner, tasks: Episode, samples: int, seed: int) -> np.ndarray:
    """Joint log-likelihood per target of each task: IW estimate (latent models) or factorised sum (cnp)."""
    out = []
    with torch.no_grad():
        for i, lo in enumerate(range(0, tasks.n_tasks, _EVAL_BATCH)):
            ep = tasks[lo: lo + _EVAL_BATCH]
            if hasattr(learner, "joint_log_likelihood"):
                g = rng.generator(seed, rng.Stream.EVAL_LEARNER, 1, i)
                joint = learner.joint_log_likelihood(ep, samples=samples, generator=g).double()
            else:
                lp = learner.predict(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask)
                lp = lp.log_prob(ep.query_y).sum(-1).double()  # [T, Q]
                joint = (lp * ep.query_mask).sum(-1) if ep.query_mask is not None else lp.sum(-1)
            out.append(joint / _n_targets(ep))
    return torch.cat(out).numpy()


def _row(model: str, kernel: str, nll: np.ndarray, oracle_nll: np.ndarray, joint: np.ndarray,
         oracle_joint: np.ndarray) -> dict[str, Any]:
    return {"model": model, "kernel": kernel,
            "ll": _metric(summarize(-nll)), "oracle_ll": _metric(summarize(-oracle_nll)),
            "gap": _metric(summarize(nll - oracle_nll)),
            "joint_ll": _metric(summarize(joint)), "oracle_joint_ll": _metric(summarize(oracle_joint)),
            "joint_gap": _metric(summarize(oracle_joint - joint))}


def _metric(m: Metric) -> dict[str, float]:
    return {"mean": m.mean, "ci95": m.ci95}


def _neg(m: Metric) -> Metric:
    return Metric(-m.mean, m.ci95)


def _fmt(m: dict[str, float] | None) -> str:
    return "–" if m is None else f"{m['mean']:.3f} ± {m['ci95']:.3f}"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def _plot_predictions(path: Path, family: GP, learners: dict[str, Learner], *, n_tasks: int, seed: int,
                      title: str) -> Path:
    """Rows: models; columns: held-out tasks. Model mean ± 2 sd against the exact GP posterior's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = family.eval_episodes(seed, n_tasks)
    lo, hi = family.config.x_range
    grid = torch.linspace(lo, hi, 200).view(1, -1, 1).expand(n_tasks, -1, -1)
    with torch.no_grad():
        oracle = family.oracle(ep.support_x, ep.support_y, grid, support_mask=ep.support_mask)
        preds = {name: lrn.predict(ep.support_x, ep.support_y, grid, support_mask=ep.support_mask)
                 for name, lrn in learners.items()}
    xs = grid[0, :, 0].numpy()
    rows = len(preds)
    fig, axes = plt.subplots(rows, n_tasks, figsize=(4 * n_tasks, 2.8 * rows), sharex=True, sharey=True,
                             squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    o_mean, o_sd = oracle.mean[..., 0].numpy(), oracle.variance[..., 0].sqrt().numpy()
    for i, (name, dist) in enumerate(preds.items()):
        mean, sd = dist.mean[..., 0].numpy(), dist.variance[..., 0].sqrt().numpy()
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
