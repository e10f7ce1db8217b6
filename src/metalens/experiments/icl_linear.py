"""Linear regression in context (``metalens study icl-linear``; Garg et al. 2022, fig. 2).

A ``transformer`` in ``sequence`` mode is meta-trained on the ``linear`` family (``d``
inputs, ``w ~ N(0, I / d)``, noise ``noise_std``) on sequences of ``3d + 1`` points, i.e.
on every number of in-context examples from 0 to ``3d``. For each ``n`` in ``0..3d`` it is
scored on held-out tasks with ``n`` examples beside least squares (minimum-norm, the
pseudo-inverse: :func:`least_squares`), ridge regression with a fixed ``ridge_lambda``
(:func:`ridge`) and the exact Bayes oracle (conjugate Bayesian linear regression: the
posterior mean is ridge with ``lambda = sigma^2 d``), all on the very same tasks. The
error is the squared error on the query targets; because the family draws
``w ~ N(0, I / d)`` where Garg et al. draw ``w ~ N(0, I)``, it equals their squared error
divided by ``d`` (predicting 0 scores ``1 + noise_std^2``). With 0 examples the baselines
predict 0 (the prior mean) and the transformer predicts from the query alone (its support
set fully masked).

Checks, per ``d``: at ``n = 2d`` the transformer's squared error is within 1.25x the
oracle's (Garg et al. report near-optimal in-context least squares); at ``n = d``, where
minimum-norm least squares interpolates the noise, the transformer's error is below least
squares'.

Runs live in ``OUT/runs/transformer-d<d>``; running the study again with the same options
reuses them, and a larger ``steps`` continues them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Normal

from metalens.config import Options, opt
from metalens.evaluate import summarize
from metalens.experiments.recipes import IN_CONTEXT_QUICK_MODEL, in_context_quick, in_context_train
from metalens.experiments.spine import Context, Study
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Report, Table, at_most, fmt
from metalens.run import RunConfig, make_task

__all__ = ["ICLLinear", "least_squares", "ridge"]

NEAR_ORACLE = 1.25  # at n = 2d, the transformer's error at most this multiple of the oracle's


def _heads_divide_width(c: Any) -> None:
    if c.width % c.heads:
        raise ValueError(f"heads must divide width, got width={c.width} and heads={c.heads}")


def least_squares(support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                  support_mask: Tensor | None = None) -> Normal:
    """Minimum-norm least squares ``w = X^+ y`` per task (Garg et al.'s baseline), as ``Normal(mean, 1)``
    over the queries (mean ``[T, Q, 1]``; the scale is a placeholder: only the mean is scored).

    Padded rows are zeroed, which leaves ``X^+ y`` unchanged; no real row gives ``w = 0``.
    Computed in float64 on the inputs' device.

    >>> x = torch.eye(2)[None]; y = torch.tensor([[[1.0], [2.0]]])
    >>> least_squares(x, y, torch.tensor([[[1.0, 1.0]]])).mean
    tensor([[[3.]]])
    """
    X, y = _masked(support_x, support_y, support_mask)
    w = torch.linalg.pinv(X) @ y  # [T, d, 1]
    return _point(query_x, w)


def ridge(support_x: Tensor, support_y: Tensor, query_x: Tensor, *, lam: float,
          support_mask: Tensor | None = None) -> Normal:
    """Ridge regression ``w = (X^T X + lam I)^-1 X^T y`` per task, as ``Normal(mean, 1)`` (see
    :func:`least_squares`).

    >>> x = torch.eye(2)[None]; y = torch.tensor([[[1.0], [2.0]]])
    >>> ridge(x, y, torch.tensor([[[1.0, 1.0]]]), lam=1.0).mean
    tensor([[[1.5000]]])
    """
    X, y = _masked(support_x, support_y, support_mask)
    d = X.shape[-1]
    A = X.transpose(1, 2) @ X + lam * torch.eye(d, dtype=X.dtype, device=X.device)
    w = torch.linalg.solve(A, X.transpose(1, 2) @ y)  # [T, d, 1]
    return _point(query_x, w)


def _masked(support_x: Tensor, support_y: Tensor, support_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The support set in float64, padded rows zeroed."""
    X, y = support_x.double(), support_y.double()
    if support_mask is not None:
        m = support_mask.double()[..., None]
        X, y = X * m, y * m
    return X, y


def _point(query_x: Tensor, w: Tensor) -> Normal:
    mean = (query_x.double() @ w).to(query_x.dtype)  # [T, Q, 1]
    return Normal(mean, torch.ones_like(mean))


@STUDIES.register("icl-linear")
class ICLLinear(Study):
    """Linear regression in context (Garg et al. 2022): transformer vs least squares, ridge and the Bayes oracle."""

    title = "Linear regression in context (Garg et al. 2022)"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the icl-linear study (``--set study.KEY=VALUE``)."""

        dims: tuple[int, ...] = opt((5, 10), "input dimensions d; one transformer is trained per d", ge=1, min_len=1)
        noise_std: float = opt(0.5, "standard deviation of the noise on y (the oracle's error is 0 without it)",
                               ge=0)
        ridge_lambda: float = opt(0.1, "lambda of the fixed ridge baseline (the oracle is ridge with sigma^2 d)",
                                  gt=0)
        width: int = opt(64, "transformer width (d_model)", ge=1)
        layers: int = opt(4, "transformer blocks", ge=1)
        heads: int = opt(4, "attention heads (must divide width)", ge=1)
        steps: int = opt(6000, "meta-training steps per d (d = 5: ~10-15 min on one CPU thread)", ge=1)
        batch_tasks: int = opt(64, "tasks (sequences of 3d + 1 points) per step", ge=1)
        lr: float = opt(1e-3, "Adam learning rate", gt=0)
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)", ge=0)
        seed: int = opt(0, "training seed (episodes and initial weights)", ge=0)
        episodes: int = opt(1000, "held-out tasks per number of examples", ge=2)
        queries: int = opt(10, "query points per held-out task", ge=1)
        eval_seed: int = opt(0, "seed of the held-out tasks", ge=0)
        quick: bool = opt(False, "smoke test: a tiny model, 3 steps, few tasks (overrides the budgets)")

        def check(self) -> None:
            _heads_divide_width(self)

    def effective(self) -> ICLLinear.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        return in_context_quick(self.config, **IN_CONTEXT_QUICK_MODEL) if self.config.quick else self.config

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        return {f"transformer-d{d}": RunConfig.resolve(
            "linear", "transformer", {"dim": d, "shots": 3 * d, "queries": 1, "noise_std": c.noise_std},
            {"mode": "sequence", "dim": c.width, "layers": c.layers, "heads": c.heads}, in_context_train(c))
            for d in c.dims}

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        curves: dict[str, dict[str, list[dict[str, float]]]] = {}
        at_2d: dict[str, dict[str, Any]] = {}
        for d in c.dims:
            label = f"transformer-d{d}"
            curves[str(d)], at_2d[str(d)] = self._curve(ctx, report, d, label)
            family = make_task("linear", dim=d, shots=2 * d, queries=c.queries, noise_std=c.noise_std)
            ev = ctx.evaluate(label, family, episodes=c.episodes, seed=c.eval_seed)
            ev.task = f"linear d={d}, {2 * d} examples"
            report.evaluations.append(ev)
        report.figure(_plot(ctx.figure("error-vs-examples.png"), curves))
        self._text(report, curves, at_2d)
        report.data.update(curves=curves, at_2d=at_2d)

    def _curve(self, ctx: Context, report: Report, d: int, label: str):
        """``{method: [{n, mean, ci95}, ...]}`` for n = 0..3d and the comparison at n = 2d; records the checks."""
        c = self.effective()
        methods = {"transformer": ctx.learner(label).predict, "least squares": least_squares,
                   f"ridge (lambda={c.ridge_lambda:g})": partial(ridge, lam=c.ridge_lambda)}
        out: dict[str, list[dict[str, float]]] = {name: [] for name in [*methods, "oracle"]}
        at_2d: dict[str, Any] = {}
        for n in range(0, 3 * d + 1):
            family = make_task("linear", dim=d, shots=max(n, 1), queries=c.queries, noise_std=c.noise_std)
            tasks = family.eval_episodes(c.eval_seed, c.episodes)
            per = {name: ctx.score(predict, tasks, with_nll=False, empty_support=n == 0)["mse"]
                   for name, predict in {**methods, "oracle": family.oracle}.items()}
            for name, v in per.items():
                out[name].append({"n": n, **asdict(summarize(v))})
            if n == d:
                ratio = float(per["transformer"].mean() / per["least squares"].mean())
                report.check(f"d{d}.beats_least_squares_at_d", at_most(round(ratio, 4), 1.0))
            if n == 2 * d:
                ratio = float(per["transformer"].mean() / per["oracle"].mean())
                at_2d = {"n": n, "transformer": asdict(summarize(per["transformer"])),
                         "oracle": asdict(summarize(per["oracle"])),
                         "least_squares": asdict(summarize(per["least squares"])),
                         "excess": asdict(summarize(per["transformer"] - per["oracle"])), "ratio": ratio}
                report.check(f"d{d}.near_oracle_at_2d", at_most(round(ratio, 4), NEAR_ORACLE))
        ctx.say(f"d={d}: at n={2 * d} transformer {fmt(at_2d['transformer'])}, oracle {fmt(at_2d['oracle'])} "
                f"(ratio {at_2d['ratio']:.3f})")
        return out, at_2d

    def _text(self, report: Report, curves: dict[str, Any], at_2d: dict[str, Any]) -> None:
        c = self.effective()
        report.text(
            f"Training, per d: a `transformer` (mode `sequence`, width {c.width}, {c.layers} blocks, {c.heads} heads, "
            f"loss mse) on `linear` (d inputs, w ~ N(0, I/d), noise sd {c.noise_std}) sequences of 3d + 1 points, "
            f"averaged over every position; {c.steps} steps of {c.batch_tasks} tasks, Adam lr {c.lr}, "
            f"grad clip {c.grad_clip}, seed {c.seed}.")
        report.text(
            f"Scoring: for each number of examples n, {c.episodes} held-out tasks with {c.queries} query points "
            f"(evaluation seed {c.eval_seed}), the same tasks for every method. Squared error of the prediction "
            "of each query target, averaged per task, then mean ± 95% CI over tasks; predicting 0 scores "
            f"1 + noise_sd^2 = {1 + c.noise_std ** 2:.3f}. This equals Garg et al.'s squared error / d (their "
            "w ~ N(0, I)). The oracle is the exact posterior predictive (its mean is ridge with "
            "lambda = sigma^2 d).")
        report.heading("At n = 2d")
        report.text("Garg et al. (2022) report near-optimal in-context least squares: the check "
                    f"`d<d>.near_oracle_at_2d` holds the transformer's error within {NEAR_ORACLE}x the oracle's, and "
                    "`d<d>.beats_least_squares_at_d` its error below minimum-norm least squares' at n = d, where "
                    "least squares interpolates the noise.")
        report.table(Table(["d", "n", "transformer", "oracle", "least squares", "transformer - oracle (paired)",
                            "ratio"],
                           [[d, r["n"], fmt(r["transformer"]), fmt(r["oracle"]), fmt(r["least_squares"]),
                             fmt(r["excess"]), f"{r['ratio']:.3f}"] for d, r in at_2d.items()]))
        for d, by_name in curves.items():
            ns = [p["n"] for p in next(iter(by_name.values()))]
            report.heading(f"d = {d}: squared error vs number of in-context examples")
            report.table(Table(["method", *(f"n={n}" for n in ns)],
                               [[name, *(fmt(p["mean"], 3) for p in pts)] for name, pts in by_name.items()]))
        report.text("The evaluator's output below: the transformer at n = 2d beside the oracle, on the same tasks.")


def _plot(path: Path, curves: dict[str, dict[str, list[dict[str, float]]]]) -> Path:
    """Squared error against the number of in-context examples, one panel per d."""
    plt = pyplot()
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
    return save_figure(fig, path)
