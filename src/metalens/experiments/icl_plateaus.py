"""Loss plateaus of in-context learning (``metalens study icl-plateaus``; Kirsch et al. 2022, sec. 4.4).

Meta-training a transformer on GPICL tasks (``projected`` digits: a random projection and
label permutation per task) often starts with a long plateau: the loss stays near that of
guessing, ``ln N``, before in-context learning sets in. Kirsch et al. (2022) report that
larger meta-batches shorten the plateau (in steps), and that biasing the training
distribution -- a fraction of the sequences drawn from one fixed task, which the model can
first memorise -- shortens it too.

The study trains the same ``transformer`` for the same number of steps at each meta-batch
size of ``batch_sizes`` (log-spaced), and, at ``bias_batch``, with each fraction of
``bias_fractions`` of its training tasks replaced by one fixed task (the
``projected_biased`` family, registered here: the same stream of tasks, each replaced with
probability ``bias_fraction`` by task 0 of the pool of ``pool_seed``, on fresh examples).

**Plateau length** (:func:`plateau_length`): the loss logged every ``log_every`` steps is
smoothed by a trailing mean over ``window`` logged values; the plateau ends at the first
logged step whose smoothed loss is below ``threshold`` (0.9) times the initial loss (the
mean of the first ``window`` logged values). A run whose smoothed loss never gets there
has a plateau longer than the run (reported as ``> steps``, counted as ``steps + 1``).

Every run is scored on the same unseen tasks (new projections and label maps on held-out
examples, no bias). Checks: ``batch.larger_shortens_plateau`` (the plateau does not grow
with the batch size, and the largest batch's is shorter than the smallest's);
``bias<f>.shortens_plateau`` (the biased run's plateau is shorter than the unbiased run's at
the same batch size); ``bias<f>.keeps_accuracy`` (its final accuracy on unseen tasks is not
below the unbiased run's beyond the 95% CI of the paired difference).

Runs live in ``OUT/runs/batch<B>`` and ``OUT/runs/batch<B>-bias<f>``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from metalens import checkpoint
from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.experiments.spine import Context, Study
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES, TASKS
from metalens.report import Check, Report, Table, fmt, not_below
from metalens.run import RunConfig, make_task
from metalens.tasks.base import Split, TaskFamily
from metalens.tasks.projected import Projected

__all__ = ["ICLPlateaus", "ProjectedBiased", "plateau_length", "smooth"]


# --------------------------------------------------------------------------------------------
# The biased training distribution
# --------------------------------------------------------------------------------------------
@TASKS.register("projected_biased")
class ProjectedBiased(TaskFamily):
    """Projected tasks (GPICL) with a fraction of the meta-training tasks replaced by one fixed task."""

    @dataclass(frozen=True)
    class Config(Projected.Config):
        """Options of the projected family, and how many meta-training tasks are replaced by a fixed one."""

        bias_fraction: float = opt(0.0, "each meta-training task is replaced, with this probability, by task 0 of "
                                        "the pool of pool_seed (fresh examples of the same projection and labels)",
                                   ge=0, le=1)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        base = {f.name: getattr(self.config, f.name) for f in fields(Projected.Config)}
        self.base = Projected(Projected.Config(**base))
        self.fixed = Projected(Projected.Config(**{**base, "pool_log2": 0}))  # a pool of one task

    @property
    def spec(self) -> TaskSpec:
        return self.base.spec

    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """The projected family's tasks; on the training split, each replaced with probability
        ``bias_fraction`` by the fixed task. The base tasks are drawn first, so a run with a bias
        sees the same stream as one without, but for the replaced tasks."""
        ep = self.base.sample(n_tasks, generator=generator, split=split)
        f = self.config.bias_fraction
        if split != "train" or f == 0:
            return ep
        replaced = torch.rand(n_tasks, generator=generator) < f  # [T]
        fixed = self.fixed.sample(n_tasks, generator=generator, split="train")

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(replaced.view(-1, *([1] * (a.dim() - 1))), b, a)

        return Episode(pick(ep.support_x, fixed.support_x), pick(ep.support_y, fixed.support_y),
                       pick(ep.query_x, fixed.query_x), pick(ep.query_y, fixed.query_y), num_classes=ep.num_classes)


# --------------------------------------------------------------------------------------------
# Plateaus
# --------------------------------------------------------------------------------------------
def smooth(values: list[float], window: int) -> list[float]:
    """Trailing means over ``window`` values (fewer at the start).

    >>> smooth([1.0, 3.0, 2.0, 4.0], 2)
    [1.0, 2.0, 2.5, 3.0]
    """
    out = []
    for i in range(len(values)):
        part = values[max(0, i + 1 - window): i + 1]
        out.append(sum(part) / len(part))
    return out


def plateau_length(curve: list[tuple[int, float]], *, window: int = 5, threshold: float = 0.9) -> int | None:
    """The first logged step whose smoothed loss is below ``threshold`` times the initial loss.

    ``curve``: ``(step, loss)`` pairs in order. The smoothed loss is the trailing mean over
    ``window`` logged values; the initial loss is the mean of the first ``window`` values.
    None when the smoothed loss never gets there (the plateau outlasts the curve).

    >>> curve = [(10 * i, 2.0 if i < 6 else 1.0) for i in range(1, 13)]
    >>> plateau_length(curve, window=2)  # (2.0 + 1.0) / 2 < 0.9 * 2.0 at the first low value
    60
    >>> plateau_length(curve[:5], window=2) is None  # the loss never drops: the plateau outlasts the curve
    True
    """
    if not curve:
        return None
    steps, losses = [s for s, _ in curve], [v for _, v in curve]
    initial = sum(losses[:window]) / len(losses[:window])
    for s, v in zip(steps, smooth(losses, window)):
        if v < threshold * initial:
            return s
    return None


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------
@STUDIES.register("icl-plateaus")
class ICLPlateaus(Study):
    """The initial loss plateau of an in-context transformer against the meta-batch size and a biased task mix."""

    title = "Loss plateaus of in-context learning: batch size and biased training tasks (Kirsch et al. 2022)"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the icl-plateaus study (``--set study.KEY=VALUE``)."""

        batch_sizes: tuple[int, ...] = opt((8, 32, 128), "meta-batch sizes (tasks per step), log-spaced within 8 .. "
                                                         "512", ge=1, min_len=2, increasing=True)
        bias_fractions: tuple[float, ...] = opt((0.1, 0.25, 0.5), "fractions of the training tasks replaced by one "
                                                                  "fixed task, each a run at bias_batch (empty: none)",
                                                gt=0, lt=1)
        bias_batch: int = opt(32, "meta-batch size of the biased runs (the unbiased run at it is their reference)",
                              ge=1)
        steps: int = opt(600, "meta-training steps of every run", ge=1)
        ways: int = opt(5, "classes per task (N)", ge=2, le=10)
        shots: int = opt(5, "support examples per class", ge=1)
        queries: int = opt(5, "query examples per class", ge=1)
        dim: int = opt(64, "width of the projected inputs", ge=1)
        mode: Literal["set", "sequence"] = opt("sequence", "transformer mode (sequence: GPICL's causal objective)")
        width: int = opt(32, "transformer width (dim)", ge=1)
        layers: int = opt(2, "transformer blocks", ge=1)
        heads: int = opt(2, "attention heads (must divide width)", ge=1)
        lr: float = opt(1e-3, "Adam learning rate", gt=0)
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)", ge=0)
        seed: int = opt(0, "training seed of every run", ge=0)
        log_every: int = opt(5, "log the training loss every this many steps", ge=1)
        eval_every: int = opt(10, "score a checkpoint on the curve's unseen tasks every this many steps", ge=1)
        curve_episodes: int = opt(64, "unseen tasks of the meta-test loss curve", ge=2)
        window: int = opt(2, "plateau: trailing mean over this many points of the meta-test loss curve", ge=1)
        threshold: float = opt(0.9, "plateau: ends when the smoothed loss is below this fraction of the initial loss",
                               gt=0, lt=1)
        episodes: int = opt(200, "unseen tasks scored per run at its last step", ge=2)
        eval_seed: int = opt(0, "seed of the scored tasks", ge=0)
        quick: bool = opt(False, "smoke test: a tiny model, 6 steps, few tasks")

        def check(self) -> None:
            if self.width % self.heads:
                raise ValueError(f"heads must divide width, got width={self.width} and heads={self.heads}")

    def effective(self) -> ICLPlateaus.Config:
        """The options actually run: ``quick`` shrinks the model and the budgets."""
        c = self.config
        if not c.quick:
            return c
        batches = tuple(2 * (i + 1) for i in range(len(c.batch_sizes)))  # 2, 4, ...: as many as asked for
        return replace(c, steps=6, episodes=min(c.episodes, 10), width=8, layers=1, heads=2, dim=16, log_every=1,
                       eval_every=2, curve_episodes=min(c.curve_episodes, 8), window=1, batch_sizes=batches,
                       bias_batch=batches[min(1, len(batches) - 1)])

    # -- the runs -------------------------------------------------------------------------------------
    def task_options(self) -> dict[str, Any]:
        c = self.effective()
        return {"ways": c.ways, "shots": c.shots, "queries": c.queries, "dim": c.dim}

    @staticmethod
    def label(batch: int, bias: float = 0.0) -> str:
        return f"batch{batch}" + (f"-bias{bias:g}" if bias else "")

    def plan(self) -> list[tuple[str, int, float]]:
        """``(label, batch size, bias fraction)`` of every run, the batch sweep first."""
        c = self.effective()
        out = [(self.label(b), b, 0.0) for b in c.batch_sizes]
        if c.bias_fractions and c.bias_batch not in c.batch_sizes:
            out.append((self.label(c.bias_batch), c.bias_batch, 0.0))
        out += [(self.label(c.bias_batch, f), c.bias_batch, f) for f in c.bias_fractions]
        return out

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        learner = {"mode": c.mode, "dim": c.width, "layers": c.layers, "heads": c.heads}
        out = {}
        for label, batch, bias in self.plan():
            train = {"steps": c.steps, "batch_tasks": batch, "lr": c.lr, "grad_clip": c.grad_clip, "seed": c.seed,
                     "log_every": c.log_every, "checkpoint_every": c.eval_every, "keep_checkpoints": 0}
            if bias:
                out[label] = RunConfig.resolve("projected_biased", "transformer",
                                               {**self.task_options(), "bias_fraction": bias}, learner, train)
            else:
                out[label] = RunConfig.resolve("projected", "transformer", self.task_options(), learner, train)
        return out

    # -- the analysis ---------------------------------------------------------------------------------
    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        family = make_task("projected", **self.task_options())  # the unseen tasks every run is scored on
        curve_tasks = family.eval_episodes(c.eval_seed, c.curve_episodes)
        rows: dict[str, dict[str, Any]] = {}
        per_task: dict[str, np.ndarray] = {}
        curves: dict[str, list[tuple[int, float]]] = {}
        training: dict[str, list[tuple[int, float]]] = {}
        for label, batch, bias in self.plan():
            training[label] = [(int(r["step"]), float(r["loss"])) for r in ctx.log(label)
                               if "loss" in r and "step" in r]
            curves[label] = self._meta_test_curve(ctx, label, curve_tasks)
            plateau = plateau_length(curves[label], window=c.window, threshold=c.threshold)
            ev = ctx.evaluate(label, family, episodes=c.episodes, seed=c.eval_seed, with_oracle=False)
            ev.task = f"projected (unseen tasks), trained at batch {batch}" + (f", bias {bias:g}" if bias else "")
            report.evaluations.append(ev)
            per_task[label] = ev.per_task["accuracy"]
            losses = [v for _, v in curves[label]]
            rows[label] = {"batch": batch, "bias_fraction": bias, "plateau": plateau,
                           "plateau_tasks": None if plateau is None else plateau * batch,
                           "initial_loss": losses[0], "final_loss": losses[-1],
                           "accuracy": asdict(ev.metrics["accuracy"]), "train_seconds": ctx.train_seconds[label]}
            ctx.say(f"{label}: plateau {'> ' + str(c.steps) if plateau is None else plateau} steps, accuracy "
                    f"{fmt(ev.metrics['accuracy'], percent=True)}")
        self._checks(report, rows, per_task)
        self._text(report, rows)
        report.data.update(rows=rows, curves={k: [list(p) for p in v] for k, v in curves.items()},
                           training_curves={k: [list(p) for p in v] for k, v in training.items()})
        report.figure(self._plot(ctx.figure("plateaus.png"), rows, curves, training))

    def _meta_test_curve(self, ctx: Context, label: str, tasks: Episode) -> list[tuple[int, float]]:
        """``(step, loss)``: the cross-entropy on the queries of ``tasks`` of the initial weights and of every
        checkpoint of run ``label``."""
        _, learner = ctx.configs[label].build()  # the initial weights (from the run's seed), as the trainer's
        learner.to(ctx.device)
        out = [(0, self._loss(ctx, learner, tasks))]
        for path in checkpoint.complete(ctx.path(label)):
            saved = checkpoint.load(path, map_location=ctx.device)
            learner.load_state_dict(saved.model)
            out.append((saved.step, self._loss(ctx, learner, tasks)))
        return out

    @staticmethod
    def _loss(ctx: Context, learner: Any, tasks: Episode) -> float:
        return float(ctx.score(learner.predict, tasks, with_nll=True)["nll"].mean())

    def _censored(self, plateau: int | None) -> int:
        return self.effective().steps + 1 if plateau is None else plateau

    def _checks(self, report: Report, rows: dict[str, dict[str, Any]], per_task: dict[str, np.ndarray]) -> None:
        c = self.effective()
        sweep = [rows[self.label(b)]["plateau"] for b in c.batch_sizes]
        lengths = [self._censored(p) for p in sweep]
        monotone = all(b <= a for a, b in itertools.pairwise(lengths))
        shown = [f"> {c.steps}" if p is None else p for p in sweep]
        report.check("batch.larger_shortens_plateau", Check(
            shown, f"non-increasing in the batch size {list(c.batch_sizes)}, the largest batch's shorter than the "
                   "smallest's (plateau length in steps; > steps: longer than the run)",
            bool(monotone and lengths[-1] < lengths[0])))
        ref = self.label(c.bias_batch)
        for f in c.bias_fractions:
            label = self.label(c.bias_batch, f)
            mine, theirs = rows[label]["plateau"], rows[ref]["plateau"]
            report.check(f"bias{f:g}.shortens_plateau", Check(
                f"> {c.steps}" if mine is None else mine,
                f"shorter than the unbiased run's plateau at batch {c.bias_batch} "
                f"({'> ' + str(c.steps) if theirs is None else theirs} steps)",
                bool(self._censored(mine) < self._censored(theirs))))
            report.check(f"bias{f:g}.keeps_accuracy", not_below(
                per_task[label] - per_task[ref], f"accuracy on unseen tasks minus the unbiased run's at batch "
                                                 f"{c.bias_batch}, paired"))

    def _text(self, report: Report, rows: dict[str, dict[str, Any]]) -> None:
        c = self.effective()
        report.text(
            f"Every run: `transformer` (mode {c.mode}, width {c.width}, {c.layers} blocks, {c.heads} heads) on "
            f"`projected` digits ({c.ways}-way {c.shots}-shot, {c.queries} queries per class, projection to {c.dim} "
            f"dimensions, a new projection and label permutation per task), {c.steps} steps, Adam lr {c.lr}, grad "
            f"clip {c.grad_clip}, seed {c.seed}. Meta-test loss: the cross-entropy on the queries of "
            f"{c.curve_episodes} unseen tasks (held-out examples, evaluation seed {c.eval_seed}) at step 0 and every "
            f"{c.eval_every} steps. Plateau: the first step whose meta-test loss, averaged over the last {c.window} "
            f"points, is below {c.threshold:g} times the initial loss (the mean of the first {c.window}); ln N = "
            f"{math.log(c.ways):.3f}. Accuracy at the last step on {c.episodes} unseen tasks, chance "
            f"{100 / c.ways:.0f}%.")
        table = Table(["run", "batch", "biased tasks", "plateau (steps)", "plateau (tasks seen)",
                       "meta-test loss, step 0", "meta-test loss, last step", "accuracy, unseen tasks",
                       "train seconds"])
        for label, r in rows.items():
            p = r["plateau"]
            table.rows.append([f"`{label}`", r["batch"], f"{r['bias_fraction']:g}", f"> {c.steps}" if p is None else p,
                               f"> {c.steps * r['batch']}" if p is None else r["plateau_tasks"],
                               f"{r['initial_loss']:.3f}" if r["initial_loss"] is not None else "–",
                               f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "–",
                               fmt(r["accuracy"], percent=True), r["train_seconds"]])
        report.table(table)

    def _plot(self, path: Path, rows: dict[str, dict[str, Any]], curves: dict[str, list[tuple[int, float]]],
              training: dict[str, list[tuple[int, float]]]) -> Path:
        """Meta-test loss curves (solid) and smoothed training losses (faint): the batch sweep, and the biased runs
        beside their reference; dotted: where each plateau ends."""
        c = self.effective()
        plt = pyplot()
        panels = [("meta-batch size", [self.label(b) for b in c.batch_sizes])]
        if c.bias_fractions:
            panels.append((f"biased tasks (batch {c.bias_batch})",
                           [self.label(c.bias_batch)] + [self.label(c.bias_batch, f) for f in c.bias_fractions]))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        for ax, (title, labels) in zip(axes[0], panels):
            for label in labels:
                r = rows[label]
                name = f"batch {r['batch']}" + (f", bias {r['bias_fraction']:g}" if r["bias_fraction"] else "")
                line, = ax.plot([s for s, _ in curves[label]], [v for _, v in curves[label]], label=name)
                if training[label]:
                    ax.plot([s for s, _ in training[label]], smooth([v for _, v in training[label]], 5),
                            color=line.get_color(), lw=0.7, alpha=0.35)
                if r["plateau"] is not None:
                    ax.axvline(r["plateau"], color=line.get_color(), lw=0.8, ls=":")
            ax.axhline(math.log(c.ways), color="k", lw=0.8, ls="--", label="ln N (guessing)")
            ax.set_xlabel("step")
            ax.set_ylabel("loss (solid: unseen tasks; faint: training)")
            ax.set_title(title + "; dotted: end of the plateau", fontsize=9)
            ax.legend(fontsize=7)
        return save_figure(fig, path)
