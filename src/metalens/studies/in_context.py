"""Studies of the in-context lens (``metalens study icl-linear | icl-phase-transition | icl-transfer``).

``icl-linear`` -- linear regression in context (Garg et al. 2022, fig. 2)
    A ``transformer`` in ``sequence`` mode is meta-trained on the ``linear`` family
    (``d`` inputs, ``w ~ N(0, I / d)``, noise ``noise_std``) on sequences of ``3d + 1``
    points, i.e. on every number of in-context examples from 0 to ``3d``. For each
    ``n`` in ``0..3d`` it is scored on held-out tasks with ``n`` examples beside
    least squares (minimum-norm, the pseudo-inverse), ridge regression with a fixed
    ``ridge_lambda`` and the exact Bayes oracle (conjugate Bayesian linear
    regression: the posterior mean is ridge with ``lambda = sigma^2 d``), all on the
    very same tasks. The error is the squared error on the query targets; because the
    family draws ``w ~ N(0, I / d)`` where Garg et al. draw ``w ~ N(0, I)``, it equals
    their squared error divided by ``d`` (predicting 0 scores ``1 + noise_std^2``).
    With 0 examples the baselines predict 0 (the prior mean) and the transformer
    predicts from the query alone (its support set fully masked).

``icl-phase-transition`` -- memorisation vs learning-to-learn (Kirsch et al. 2022, fig. 3)
    With the model and the budget fixed, the learner is meta-trained on pools of
    ``2^k`` distinct tasks (``projected`` digits by default, or ``random_mlp``) for each
    ``k`` in a grid (and on an unbounded stream), then scored on tasks of the pool
    (fresh examples) and on unseen tasks (new projections and label maps on held-out
    examples). The report gives the first ``k`` at which the unseen-task score departs
    from chance (see :func:`departure`), and the gap between training and unseen tasks
    for every ``k``; ``model_dims`` adds a second axis, the model's width.

``icl-transfer`` -- in-context learning out of distribution
    A ``transformer`` (``sequence`` mode, so that it reads any number of examples up to
    its training length) is meta-trained on 1-D ``random_mlp`` functions only, then
    scored on ``sinusoid`` (``shots`` in ``sinusoid_shots``) and ``gp`` (the ConvCNP
    protocol: 3 to 50 context points) tasks it never saw, beside ``scratch`` (a
    network fitted to each support set, no meta-learning) and the families' exact
    oracles, on the same tasks. Its error on held-out ``random_mlp`` functions is the
    in-distribution reference.

Runs live in ``OUT/runs/<label>``; running a study again with the same options reuses
its finished runs, and a larger ``steps`` continues them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from metalens.config import check_min, check_positive, opt, to_dict
from metalens.episode import Episode
from metalens.evaluate import Evaluation, Metric, evaluate, summarize
from metalens.learners.base import Learner
from metalens.registry import STUDIES
from metalens.report import save_figure, write_report
from metalens.run import RunConfig, make_learner, make_task, start_run
from metalens.studies import Study

__all__ = ["ICLLinear", "ICLPhaseTransition", "ICLTransfer", "least_squares", "ridge", "departure"]

_EVAL_BATCH = 100  # tasks per predict call when scoring (memory only; results do not depend on it)
_QUICK_MODEL = {"dim": 16, "layers": 1, "heads": 2}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _train(out: Path, label: str, task: str, task_opts: dict[str, Any], learner: str,
           learner_opts: dict[str, Any], train_opts: dict[str, Any], progress: bool | None,
           echo: Callable[[str], None]) -> tuple[Learner, float]:
    """Train (or continue, or reuse) the run ``OUT/runs/<label>``; returns its learner and the seconds spent."""
    cfg = RunConfig.resolve(task, learner, task_opts, learner_opts,
                            {"log_every": 50, "checkpoint_every": 1000, **train_opts})
    run_dir = out / "runs" / label
    resume = (run_dir / "config.json").exists()
    run = start_run(cfg, run_dir, resume=resume)
    echo(f"[study] {learner} on {task} ({label}): training to step {cfg.train.steps}"
         + (" (resuming)" if resume else ""))
    t0 = time.perf_counter()
    run.train(resume=resume, progress=progress)
    return run.learner.to("cpu"), time.perf_counter() - t0  # scored on the CPU


def _metric(m: Metric) -> dict[str, float]:
    return {"mean": m.mean, "ci95": m.ci95}


def _fmt(m: dict[str, float] | None, digits: int = 4) -> str:
    return "–" if m is None else f"{m['mean']:.{digits}f} ± {m['ci95']:.{digits}f}"


def _per_task_sq_error(mean: Tensor, episode: Episode) -> np.ndarray:
    """Squared error of a point prediction ``[T, Q, dy]``, averaged over each task's real queries -> ``[T]``."""
    se = ((mean.double() - episode.query_y.double()) ** 2).mean(-1)  # [T, Q]
    if episode.query_mask is None:
        return se.mean(-1).numpy()
    m = episode.query_mask.double()
    return ((se * m).sum(-1) / m.sum(-1)).numpy()


def _predict_mean(mean_fn: Callable[..., Tensor], episode: Episode, mask: Tensor | None) -> Tensor:
    """``mean_fn(support_x, support_y, query_x, support_mask=...) -> [t, Q, dy]`` over ``episode`` in chunks."""
    out = []
    with torch.no_grad():
        for lo in range(0, episode.n_tasks, _EVAL_BATCH):
            ep = episode[lo: lo + _EVAL_BATCH]
            m = mask[lo: lo + _EVAL_BATCH] if mask is not None else None
            out.append(mean_fn(ep.support_x, ep.support_y, ep.query_x, support_mask=m))
    return torch.cat(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# 1. Linear regression in context
# --------------------------------------------------------------------------------------------
def least_squares(support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                  support_mask: Tensor | None = None) -> Tensor:
    """Minimum-norm least squares ``w = X^+ y`` per task (Garg et al.'s baseline); mean ``[T, Q, 1]``.

    Padded rows are zeroed, which leaves ``X^+ y`` unchanged; no real row gives ``w = 0``.

    >>> x = torch.eye(2)[None]; y = torch.tensor([[[1.0], [2.0]]])
    >>> least_squares(x, y, torch.tensor([[[1.0, 1.0]]]))
    tensor([[[3.]]])
    """
    X, y = support_x.double(), support_y.double()
    if support_mask is not None:
        m = support_mask.double()[..., None]
        X, y = X * m, y * m
    w = torch.linalg.pinv(X) @ y  # [T, d, 1]
    return (query_x.double() @ w).to(query_x.dtype)


def ridge(support_x: Tensor, support_y: Tensor, query_x: Tensor, *, lam: float,
          support_mask: Tensor | None = None) -> Tensor:
    """Ridge regression ``w = (X^T X + lam I)^-1 X^T y`` per task; mean ``[T, Q, 1]``.

    >>> x = torch.eye(2)[None]; y = torch.tensor([[[1.0], [2.0]]])
    >>> ridge(x, y, torch.tensor([[[1.0, 1.0]]]), lam=1.0)
    tensor([[[1.5000]]])
    """
    X, y = support_x.double(), support_y.double()
    if support_mask is not None:
        m = support_mask.double()[..., None]
        X, y = X * m, y * m
    d = X.shape[-1]
    A = X.transpose(1, 2) @ X + lam * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(A, X.transpose(1, 2) @ y)
    return (query_x.double() @ w).to(query_x.dtype)


@STUDIES.register("icl-linear")
class ICLLinear(Study):
    """Linear regression in context (Garg et al. 2022): transformer vs least squares, ridge and the Bayes oracle."""

    @dataclass(frozen=True)
    class Config:
        """Options of the icl-linear study (``--set study.KEY=VALUE``)."""

        dims: tuple[int, ...] = opt((5, 10), "input dimensions d; one transformer is trained per d")
        noise_std: float = opt(0.5, "standard deviation of the noise on y (the oracle's error is 0 without it)")
        ridge_lambda: float = opt(0.1, "lambda of the fixed ridge baseline (the oracle is ridge with sigma^2 d)")
        width: int = opt(64, "transformer width (d_model)")
        layers: int = opt(4, "transformer blocks")
        heads: int = opt(4, "attention heads")
        steps: int = opt(6000, "meta-training steps per d (d = 5: ~10-15 min on one CPU thread)")
        batch_tasks: int = opt(64, "tasks (sequences of 3d + 1 points) per step")
        lr: float = opt(1e-3, "Adam learning rate")
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)")
        seed: int = opt(0, "training seed (episodes and initial weights)")
        episodes: int = opt(1000, "held-out tasks per number of examples")
        queries: int = opt(10, "query points per held-out task")
        eval_seed: int = opt(0, "seed of the held-out tasks")
        quick: bool = opt(False, "smoke test: a tiny model, 3 steps, few tasks (overrides the budgets)")

        def __post_init__(self) -> None:
            if not self.dims or any(d < 1 for d in self.dims):
                raise ValueError(f"dims must be a non-empty list of dimensions >= 1, got {list(self.dims)}")
            if not self.noise_std >= 0:
                raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
            check_positive(self, "ridge_lambda")
            check_min(self, 1, "width", "layers", "heads", "steps", "batch_tasks", "queries")
            check_min(self, 2, "episodes", why="for a confidence interval")
            check_positive(self, "lr")

    def effective(self) -> ICLLinear.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=min(c.steps, 3), episodes=min(c.episodes, 10), batch_tasks=min(c.batch_tasks, 4),
                       width=_QUICK_MODEL["dim"], layers=_QUICK_MODEL["layers"], heads=_QUICK_MODEL["heads"])

    def run(self, out: Path, *, progress: bool | None = None, echo: Callable[[str], None] = print) -> Path:
        c = self.effective()
        out = Path(out)
        t_start = time.perf_counter()
        curves: dict[str, dict[str, list[dict[str, float]]]] = {}
        evaluations: list[Evaluation] = []
        timings: dict[str, float] = {}
        at_2d: dict[str, dict[str, Any]] = {}
        for d in c.dims:
            task_opts = {"dim": d, "shots": 3 * d, "queries": 1, "noise_std": c.noise_std}
            learner_opts = {"mode": "sequence", "dim": c.width, "layers": c.layers, "heads": c.heads}
            train_opts = {"steps": c.steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "grad_clip": c.grad_clip,
                          "seed": c.seed, "device": self.device}
            model, seconds = _train(out, f"transformer-d{d}", "linear", task_opts, "transformer", learner_opts,
                                    train_opts, progress, echo)
            timings[f"d{d}_train_seconds"] = round(seconds, 1)
            curves[str(d)], at_2d[str(d)] = self._curve(d, model, echo)
            fam = make_task("linear", dim=d, shots=2 * d, queries=c.queries, noise_std=c.noise_std)
            ev = evaluate(model, fam, episodes=c.episodes, seed=c.eval_seed, batch_tasks=_EVAL_BATCH)
            ev.task = f"linear d={d}, {2 * d} examples"
            evaluations.append(ev)
        figure = self._plot(out / "figures" / "error-vs-examples.png", curves)
        notes = self._notes(c, curves, at_2d, time.perf_counter() - t_start)
        path = write_report(out, title="Linear regression in context (Garg et al. 2022)", evaluations=evaluations,
                            figures=[figure], notes=notes,
                            extra={"config": to_dict(c), "curves": curves, "at_2d": at_2d, "timings": timings})
        echo(f"[study] report: {path}")
        return path

    def _curve(self, d: int, model: Learner, echo: Callable[[str], None]):
        """``{method: [{n, mean, ci95}, ...]}`` for n = 0..3d, and the comparison at n = 2d."""
        c = self.effective()
        methods: dict[str, Callable[..., Tensor]] = {
            "transformer": lambda *a, **k: model.predict(*a, **k).mean,
            "least squares": least_squares,
            f"ridge (lambda={c.ridge_lambda:g})": lambda *a, **k: ridge(*a, lam=c.ridge_lambda, **k)}
        out: dict[str, list[dict[str, float]]] = {name: [] for name in [*methods, "oracle"]}
        at_2d: dict[str, Any] = {}
        model.eval()
        for n in range(0, 3 * d + 1):
            fam = make_task("linear", dim=d, shots=max(n, 1), queries=c.queries, noise_std=c.noise_std)
            tasks = fam.eval_episodes(c.eval_seed, c.episodes)
            mask = torch.zeros(tasks.n_tasks, tasks.n_support, dtype=torch.bool) if n == 0 else None
            per = {name: _per_task_sq_error(_predict_mean(fn, tasks, mask), tasks) for name, fn in methods.items()}
            per["oracle"] = _per_task_sq_error(_predict_mean(lambda *a, **k: fam.oracle(*a, **k).mean, tasks, mask),
                                               tasks)
            for name, v in per.items():
                m = summarize(v)
                out[name].append({"n": n, "mean": m.mean, "ci95": m.ci95})
            if n == 2 * d:
                ratio = float(per["transformer"].mean() / per["oracle"].mean())
                at_2d = {"n": n, "transformer": _metric(summarize(per["transformer"])),
                         "oracle": _metric(summarize(per["oracle"])),
                         "least_squares": _metric(summarize(per["least squares"])),
                         "excess": _metric(summarize(per["transformer"] - per["oracle"])), "ratio": ratio}
        echo(f"[study] d={d}: at n={2 * d} transformer {_fmt(at_2d.get('transformer'))}, "
             f"oracle {_fmt(at_2d.get('oracle'))} (ratio {at_2d.get('ratio', float('nan')):.3f})")
        return out, at_2d

    def _plot(self, path: Path, curves: dict[str, dict[str, list[dict[str, float]]]]) -> Path:
        plt = _plt()
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
        for ax, (d, by_name) in zip(axes[0], curves.items()):
            for name, pts in by_name.items():
                n = [p["n"] for p in pts]
                mean = np.array([p["mean"] for p in pts])
                ci = np.array([p["ci95"] for p in pts])
                style = {"color": "k", "ls": "--"} if name == "oracle" else {}
                (line,) = ax.plot(n, mean, marker="o", ms=3, label=name, **style)
                ax.fill_between(n, mean - ci, mean + ci, alpha=0.2, color=line.get_color())
            ax.axvline(int(d), color="0.7", lw=0.8)
            ax.axvline(2 * int(d), color="0.7", lw=0.8, ls=":")
            # minimum-norm least squares explodes near n = d (interpolating noisy targets): keep the
            # scale of the other curves and let it leave the plot
            ax.set_ylim(0, 1.3 * by_name["oracle"][0]["mean"])
            ax.set_title(f"linear regression, d = {d} (dotted: n = 2d)")
            ax.set_xlabel("in-context examples n")
            ax.set_ylabel("squared error (= Garg et al.'s / d)")
            ax.legend(fontsize=7)
        return _save(fig, path)

    def _notes(self, c: Config, curves: dict[str, Any], at_2d: dict[str, Any], seconds: float) -> str:
        md = [f"Command: `{self.command()}` (ran in {seconds / 60:.1f} min on "
              f"{self.hardware()}).", "",
              f"Training, per d: a `transformer` (mode `sequence`, width {c.width}, {c.layers} blocks, {c.heads} heads, "
              f"loss mse) on `linear` (d inputs, w ~ N(0, I/d), noise sd {c.noise_std}) sequences of 3d + 1 points, "
              f"averaged over every position; {c.steps} steps of {c.batch_tasks} tasks, Adam lr {c.lr}, "
              f"grad clip {c.grad_clip}, seed {c.seed}.", "",
              f"Scoring: for each number of examples n, {c.episodes} held-out tasks with {c.queries} query points "
              f"(evaluation seed {c.eval_seed}), the same tasks for every method. Squared error of the prediction "
              "of each query target, averaged per task, then mean ± 95% CI over tasks; predicting 0 scores "
              f"1 + noise_sd^2 = {1 + c.noise_std ** 2:.3f}. This equals Garg et al.'s squared error / d (their "
              "w ~ N(0, I)). The oracle is the exact posterior predictive (its mean is ridge with "
              "lambda = sigma^2 d).", ""]
        md += ["## At n = 2d (the issue's target: transformer within 1.25x the oracle)", "",
               "| d | n | transformer | oracle | least squares | transformer - oracle (paired) | ratio | within 1.25x |",
               "|---|---|---|---|---|---|---|---|"]
        for d, r in at_2d.items():
            if r:
                md.append(f"| {d} | {r['n']} | {_fmt(r['transformer'])} | {_fmt(r['oracle'])} | "
                          f"{_fmt(r['least_squares'])} | {_fmt(r['excess'])} | {r['ratio']:.3f} | "
                          f"{'yes' if r['ratio'] <= 1.25 else 'no'} |")
        for d, by_name in curves.items():
            ns = [p["n"] for p in next(iter(by_name.values()))]
            md += ["", f"## d = {d}: squared error vs number of in-context examples", "",
                   "| method | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
            for name, pts in by_name.items():
                md.append(f"| {name} | " + " | ".join(f"{p['mean']:.3f}" for p in pts) + " |")
        md += ["", "## Evaluator output at n = 2d (the transformer beside the oracle, same tasks)", ""]
        return "\n".join(md)


# --------------------------------------------------------------------------------------------
# 2. The memorisation / generalisation transition
# --------------------------------------------------------------------------------------------
def departure(unseen: list[dict[str, float]], chance: list[float], *, lower_is_better: bool,
              margin: float) -> int | None:
    """Index of the first point whose unseen-task score beats chance by more than its 95% CI
    half-width and by ``margin`` (absolute: accuracy points; relative: a fraction of the
    chance loss when ``lower_is_better``); None if none does.

    >>> departure([{"mean": 0.1, "ci95": 0.01}, {"mean": 0.2, "ci95": 0.01}], [0.1, 0.1],
    ...           lower_is_better=False, margin=0.05)
    1
    """
    for i, (u, ch) in enumerate(zip(unseen, chance)):
        gain = (ch - u["mean"]) if lower_is_better else (u["mean"] - ch)
        needed = margin * ch if lower_is_better else margin
        if gain > max(u["ci95"], needed):
            return i
    return None


@STUDIES.register("icl-phase-transition")
class ICLPhaseTransition(Study):
    """Memorisation vs learning-to-learn against the number of training tasks (Kirsch et al. 2022)."""

    @dataclass(frozen=True)
    class Config:
        """Options of the icl-phase-transition study (``--set study.KEY=VALUE``)."""

        task: Literal["projected", "random_mlp"] = opt("projected", "task family: projected digits or random_mlp")
        log2_tasks: tuple[int, ...] = opt((0, 3, 6, 9, 12), "k: pools of 2^k training tasks")
        unbounded: bool = opt(True, "also train on an unbounded stream of tasks")
        learner: Literal["transformer", "lstm"] = opt("transformer", "the in-context learner")
        mode: Literal["set", "sequence"] = opt("set", "transformer mode")
        model_dims: tuple[int, ...] = opt((32,), "model widths (transformer dim or lstm hidden): a second axis")
        layers: int = opt(2, "transformer blocks (the lstm has one layer)")
        heads: int = opt(2, "attention heads")
        shots: int = opt(5, "support examples per class (projected) or support points (random_mlp)")
        queries: int = opt(5, "query examples per class (projected) or query points (random_mlp)")
        steps: int = opt(1500, "meta-training steps of every run (the defaults: ~12 min on one CPU thread)")
        batch_tasks: int = opt(32, "tasks per step")
        lr: float = opt(1e-3, "Adam learning rate")
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)")
        seed: int = opt(0, "training seed (episodes and initial weights; the pools are fixed by pool_seed 0)")
        episodes: int = opt(200, "held-out tasks per split (training tasks, unseen tasks)")
        eval_seed: int = opt(0, "seed of the scored tasks")
        quick: bool = opt(False, "smoke test: tiny models, 3 steps, few tasks (overrides the budgets)")

        def __post_init__(self) -> None:
            if self.task not in ("projected", "random_mlp"):
                raise ValueError(f"task must be 'projected' or 'random_mlp', got {self.task!r}")
            if self.learner not in ("transformer", "lstm"):
                raise ValueError(f"learner must be 'transformer' or 'lstm', got {self.learner!r}")
            if self.mode not in ("set", "sequence"):
                raise ValueError(f"mode must be 'set' or 'sequence', got {self.mode!r}")
            if any(k < 0 or k > 40 for k in self.log2_tasks) or (not self.log2_tasks and not self.unbounded):
                raise ValueError(f"log2_tasks must hold integers in [0, 40] (or unbounded be true), "
                                 f"got {list(self.log2_tasks)}")
            if not self.model_dims or any(m < 1 for m in self.model_dims):
                raise ValueError(f"model_dims must be a non-empty list of widths >= 1, got {list(self.model_dims)}")
            check_min(self, 1, "layers", "heads", "shots", "queries", "steps", "batch_tasks")
            check_min(self, 2, "episodes", why="for a confidence interval")
            check_positive(self, "lr")

    def effective(self) -> ICLPhaseTransition.Config:
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=min(c.steps, 3), episodes=min(c.episodes, 10), batch_tasks=min(c.batch_tasks, 4),
                       model_dims=tuple(min(m, 16) for m in c.model_dims), layers=1, heads=2)

    def task_options(self, k: int | None) -> dict[str, Any]:
        c = self.effective()
        opts: dict[str, Any] = {"shots": c.shots, "queries": c.queries, "pool_log2": k}
        if c.quick and c.task == "projected":
            opts.update(ways=3, dim=16)
        return opts

    def learner_options(self, width: int) -> dict[str, Any]:
        c = self.effective()
        if c.learner == "lstm":
            return {"hidden": width}
        return {"mode": c.mode, "dim": width, "layers": c.layers, "heads": min(c.heads, width)}

    def run(self, out: Path, *, progress: bool | None = None, echo: Callable[[str], None] = print) -> Path:
        c = self.effective()
        out = Path(out)
        t_start = time.perf_counter()
        ks: list[int | None] = [*sorted(set(c.log2_tasks)), *([None] if c.unbounded else [])]
        classification = c.task == "projected"
        rows: list[dict[str, Any]] = []
        evaluations: list[Evaluation] = []
        for width in c.model_dims:
            for k in ks:
                label = f"{c.learner}{width}-k{'inf' if k is None else k}"
                family = make_task(c.task, **self.task_options(k))
                train = {"steps": c.steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "grad_clip": c.grad_clip,
                         "seed": c.seed, "device": self.device}
                model, seconds = _train(out, label, c.task, self.task_options(k), c.learner,
                                        self.learner_options(width), train, progress, echo)
                row: dict[str, Any] = {"width": width, "log2_tasks": k, "train_seconds": round(seconds, 1)}
                for split, name in (("train", "training"), ("test", "unseen")):
                    ev = evaluate(model, family, episodes=c.episodes, seed=c.eval_seed, split=split,
                                  batch_tasks=_EVAL_BATCH, with_oracle=False)
                    ev.task = f"{c.task} 2^{k if k is not None else 'inf'} tasks, {name} tasks"
                    evaluations.append(ev)
                    for metric, m in ev.metrics.items():
                        row[f"{name}_{metric}"] = _metric(m)
                    if classification:
                        row[f"{name}_chance"] = 1.0 / family.spec.num_classes
                    else:
                        zero = family.eval_episodes(c.eval_seed, c.episodes, split=split)
                        row[f"{name}_chance"] = float(_per_task_sq_error(torch.zeros_like(zero.query_y), zero).mean())
                rows.append(row)
                key = "accuracy" if classification else "mse"
                echo(f"[study] {label}: {key} training tasks {_fmt(row[f'training_{key}'], 3)}, "
                     f"unseen {_fmt(row[f'unseen_{key}'], 3)} (chance {row['unseen_chance']:.3f})")
        transitions = {}
        for width in c.model_dims:
            mine = [r for r in rows if r["width"] == width]
            key = "accuracy" if classification else "mse"
            i = departure([r[f"unseen_{key}"] for r in mine], [r["unseen_chance"] for r in mine],
                          lower_is_better=not classification, margin=0.05 if classification else 0.1)
            transitions[str(width)] = None if i is None else mine[i]["log2_tasks"]
            if i is not None and mine[i]["log2_tasks"] is None:
                transitions[str(width)] = "inf"
        figure = self._plot(out / "figures" / "phase-transition.png", rows, classification)
        notes = self._notes(c, rows, transitions, classification, time.perf_counter() - t_start)
        path = write_report(out, title="Memorisation vs learning-to-learn (Kirsch et al. 2022)",
                            evaluations=evaluations, figures=[figure], notes=notes,
                            extra={"config": to_dict(c), "rows": rows, "transition_log2_tasks": transitions})
        echo(f"[study] report: {path}")
        return path

    def _plot(self, path: Path, rows: list[dict[str, Any]], classification: bool) -> Path:
        plt = _plt()
        metrics = ["accuracy", "nll"] if classification else ["mse"]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
        finite = [r["log2_tasks"] for r in rows if r["log2_tasks"] is not None]
        inf_x = (max(finite) + 2) if finite else 0
        for ax, metric in zip(axes[0], metrics):
            for width in sorted({r["width"] for r in rows}):
                mine = [r for r in rows if r["width"] == width]
                x = [r["log2_tasks"] if r["log2_tasks"] is not None else inf_x for r in mine]
                for name, ls in (("training", "-"), ("unseen", "--")):
                    m = np.array([r[f"{name}_{metric}"]["mean"] for r in mine])
                    ci = np.array([r[f"{name}_{metric}"]["ci95"] for r in mine])
                    ax.errorbar(x, m, yerr=ci, ls=ls, marker="o", ms=3, capsize=2,
                                label=f"width {width}, {name} tasks")
            if metric == "accuracy" or not classification:
                chance = [r["unseen_chance"] for r in rows]
                ax.axhline(float(np.mean(chance)), color="k", lw=0.8, ls=":", label="chance")
            elif metric == "nll":
                ax.axhline(math.log(1.0 / rows[0]["unseen_chance"]), color="k", lw=0.8, ls=":", label="chance")
            ticks = sorted({r["log2_tasks"] for r in rows if r["log2_tasks"] is not None})
            labels = [str(t) for t in ticks]
            if len(finite) < len(rows):
                ticks, labels = [*ticks, inf_x], [*labels, "∞"]
            ax.set_xticks(ticks, labels)
            ax.set_xlabel("log2(number of training tasks)")
            ax.set_ylabel(metric)
            ax.legend(fontsize=7)
        return _save(fig, path)

    def _notes(self, c: Config, rows: list[dict[str, Any]], transitions: dict[str, Any], classification: bool,
               seconds: float) -> str:
        key = "accuracy" if classification else "mse"
        rule = ("unseen-task accuracy above chance (1/ways) by more than its 95% CI and by 5 points" if classification
                else "unseen-task MSE below the zero predictor's by more than its 95% CI and by 10%")
        md = [f"Command: `{self.command()}` (ran in {seconds / 60:.1f} min on "
              f"{self.hardware()}).", "",
              f"Every run: `{c.learner}` ({self._describe(c)}) on `{c.task}` with a pool of 2^k tasks (pool seed 0), "
              f"{c.steps} steps of {c.batch_tasks} tasks, Adam lr {c.lr}, grad clip {c.grad_clip}, seed {c.seed}. "
              f"Scored on {c.episodes} tasks of the pool with fresh examples (\"training tasks\") and {c.episodes} "
              f"unseen tasks on held-out examples (evaluation seed {c.eval_seed}).", "",
              f"**Transition** (first k with {rule}): "
              + ", ".join(f"width {w}: k = {t if t is not None else 'none in the grid'}"
                          for w, t in transitions.items()), "",
              f"| width | k | {key}: training tasks | {key}: unseen tasks | chance | train seconds |",
              "|---|---|---|---|---|---|"]
        for r in rows:
            k = "∞" if r["log2_tasks"] is None else r["log2_tasks"]
            md.append(f"| {r['width']} | {k} | {_fmt(r[f'training_{key}'], 3)} | {_fmt(r[f'unseen_{key}'], 3)} | "
                      f"{r['unseen_chance']:.3f} | {r['train_seconds']} |")
        md += ["", "## Evaluator output", ""]
        return "\n".join(md)

    @staticmethod
    def _describe(c: Config) -> str:
        if c.learner == "lstm":
            return "hidden = width"
        return f"mode {c.mode}, width = dim, {c.layers} blocks, {c.heads} heads"


# --------------------------------------------------------------------------------------------
# 3. Transfer out of distribution
# --------------------------------------------------------------------------------------------
@STUDIES.register("icl-transfer")
class ICLTransfer(Study):
    """A transformer meta-trained on random MLP functions, scored in context on sinusoid and GP tasks."""

    @dataclass(frozen=True)
    class Config:
        """Options of the icl-transfer study (``--set study.KEY=VALUE``)."""

        x_range: tuple[float, float] = opt((-5.0, 5.0), "random_mlp inputs (covers sinusoid's and gp's)")
        output_std_range: tuple[float, float] = opt((0.1, 4.0), "random_mlp: each function's standard deviation")
        first_layer_scale: float = opt(3.0, "random_mlp: wiggliness of the functions")
        depth: int = opt(2, "random_mlp: hidden layers of the random functions")
        noise_std: float = opt(0.05, "random_mlp: noise on y")
        sequence_length: int = opt(60, "points per training sequence (the most examples the model reads is one less)")
        width: int = opt(64, "transformer width")
        layers: int = opt(4, "transformer blocks")
        heads: int = opt(4, "attention heads")
        steps: int = opt(5000, "meta-training steps")
        batch_tasks: int = opt(32, "tasks per step")
        lr: float = opt(1e-3, "Adam learning rate")
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)")
        seed: int = opt(0, "training seed")
        sinusoid_shots: tuple[int, ...] = opt((5, 10), "support points of the sinusoid tasks scored")
        episodes: int = opt(500, "held-out tasks per target family")
        eval_seed: int = opt(0, "seed of the held-out tasks")
        quick: bool = opt(False, "smoke test: a tiny model, 3 steps, few tasks (overrides the budgets)")

        def __post_init__(self) -> None:
            if len(self.x_range) != 2 or not self.x_range[0] < self.x_range[1]:
                raise ValueError(f"x_range must be (low, high) with low < high, got {tuple(self.x_range)}")
            if len(self.output_std_range) != 2 or not 0 < self.output_std_range[0] <= self.output_std_range[1]:
                raise ValueError(f"output_std_range must be (low, high) with 0 < low <= high, "
                                 f"got {tuple(self.output_std_range)}")
            if not self.first_layer_scale > 0 or not self.noise_std >= 0:
                raise ValueError("first_layer_scale must be > 0 and noise_std >= 0")
            if self.sequence_length < 2:
                raise ValueError(f"sequence_length must be >= 2, got {self.sequence_length}")
            check_min(self, 1, "depth", "width", "layers", "heads", "steps", "batch_tasks")
            if not self.sinusoid_shots or any(s < 1 or s >= self.sequence_length for s in self.sinusoid_shots):
                raise ValueError(f"sinusoid_shots must be in [1, sequence_length), got {list(self.sinusoid_shots)}")
            check_min(self, 2, "episodes", why="for a confidence interval")
            check_positive(self, "lr")

    def effective(self) -> ICLTransfer.Config:
        c = self.config
        if not c.quick:
            return c
        return replace(c, steps=min(c.steps, 3), episodes=min(c.episodes, 10), batch_tasks=min(c.batch_tasks, 4),
                       width=_QUICK_MODEL["dim"], layers=_QUICK_MODEL["layers"], heads=_QUICK_MODEL["heads"])

    def mlp_options(self) -> dict[str, Any]:
        c = self.effective()
        return {"x_range": list(c.x_range), "output_std_range": list(c.output_std_range),
                "first_layer_scale": c.first_layer_scale, "depth": c.depth, "noise_std": c.noise_std,
                "shots": c.sequence_length - 1, "queries": 1}

    def run(self, out: Path, *, progress: bool | None = None, echo: Callable[[str], None] = print) -> Path:
        c = self.effective()
        out = Path(out)
        t_start = time.perf_counter()
        train = {"steps": c.steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "grad_clip": c.grad_clip, "seed": c.seed, "device": self.device}
        learner_opts = {"mode": "sequence", "dim": c.width, "layers": c.layers, "heads": c.heads}
        model, seconds = _train(out, "transformer-random_mlp", "random_mlp", self.mlp_options(), "transformer",
                                learner_opts, train, progress, echo)
        targets: list[tuple[str, str, dict[str, Any]]] = [
            *[(f"sinusoid K={k}", "sinusoid", {"shots": k}) for k in c.sinusoid_shots],
            ("gp (rbf, 3-50 context points)", "gp", {}),
            ("random_mlp (held-out functions)", "random_mlp", {**self.mlp_options(), "shots": 10, "queries": 10}),
        ]
        rows, evaluations = [], []
        for label, task, opts in targets:
            family = make_task(task, **opts)
            row: dict[str, Any] = {"target": label, "task": task, "task_options": opts}
            scratch = make_learner("scratch", family, seed=c.seed, **({"steps": 5} if c.quick else {}))
            for name, learner in (("transformer", model), ("scratch", scratch)):
                t0 = time.perf_counter()
                ev = evaluate(learner, family, episodes=c.episodes, seed=c.eval_seed, batch_tasks=_EVAL_BATCH)
                ev.task = label
                evaluations.append(ev)
                row[name] = _metric(ev.metrics["mse"])
                row[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
                row["oracle"] = _metric(ev.oracle["mse"]) if ev.oracle is not None else None
            rows.append(row)
            echo(f"[study] {label}: transformer {_fmt(row['transformer'], 3)}, scratch {_fmt(row['scratch'], 3)}, "
                 f"oracle {_fmt(row['oracle'], 3)}")
        figures = []
        from metalens.report import plot_regression_tasks

        for k in c.sinusoid_shots[:1]:
            fam = make_task("sinusoid", shots=k)
            fig = plot_regression_tasks(out / "figures" / f"sinusoid-K{k}.png", fam, {"transformer (random_mlp)": model},
                                        n_tasks=3, seed=c.eval_seed, title=f"sinusoid K={k}, never seen in training")
            figures += [fig] if fig is not None else []
        fig = plot_regression_tasks(out / "figures" / "gp.png", make_task("gp"), {"transformer (random_mlp)": model},
                                    n_tasks=3, seed=c.eval_seed, title="gp (rbf), never seen in training")
        figures += [fig] if fig is not None else []
        notes = self._notes(c, rows, seconds, time.perf_counter() - t_start)
        path = write_report(out, title="In-context transfer: random MLPs to sinusoids and GPs",
                            evaluations=evaluations, figures=figures, notes=notes,
                            extra={"config": to_dict(c), "rows": rows, "train_seconds": round(seconds, 1)})
        echo(f"[study] report: {path}")
        return path

    def _notes(self, c: Config, rows: list[dict[str, Any]], train_seconds: float, seconds: float) -> str:
        md = [f"Command: `{self.command()}` (ran in {seconds / 60:.1f} min on "
              f"{self.hardware()}; training {train_seconds / 60:.1f} min).", "",
              f"Training: `transformer` (mode `sequence`, width {c.width}, {c.layers} blocks, {c.heads} heads, loss mse) "
              f"on `random_mlp` only (1-D, x ~ U{list(c.x_range)}, depth {c.depth}, tanh, first-layer scale "
              f"{c.first_layer_scale}, output sd ~ U{list(c.output_std_range)}, noise sd {c.noise_std}), sequences of "
              f"{c.sequence_length} points, {c.steps} steps of {c.batch_tasks} tasks, Adam lr {c.lr}, seed {c.seed}. "
              f"`scratch`: an MLP (40, 40) fitted to each support set (100 Adam steps), no meta-learning. "
              f"Scored on {c.episodes} held-out tasks per target (evaluation seed {c.eval_seed}), the oracle on "
              "the same tasks.", "",
              "| target (never seen in training) | transformer MSE | scratch MSE | oracle MSE |", "|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['target']} | {_fmt(r['transformer'], 3)} | {_fmt(r['scratch'], 3)} | "
                      f"{_fmt(r['oracle'], 3)} |")
        md += ["", "## Evaluator output", ""]
        return "\n".join(md)
