"""In-context learning out of distribution (``metalens study icl-transfer``).

A ``transformer`` (``sequence`` mode, so that it reads any number of examples up to its
training length) is meta-trained on 1-D ``random_mlp`` functions only, then scored on
``sinusoid`` (``shots`` in ``sinusoid_shots``) and ``gp`` (the ConvCNP protocol: 3 to 50
context points) tasks it never saw, beside ``scratch`` (a network fitted to each support
set, no meta-learning) and the families' exact oracles, on the same tasks. Its error on
held-out ``random_mlp`` functions is the in-distribution reference.

Checks: the transformer's MSE is below scratch's on held-out ``random_mlp`` functions (in
distribution); and, for each target it never saw, whether it still is (the study's
question: such a check may fail).

The run lives in ``OUT/runs/transformer-random_mlp``; running the study again with the same
options reuses it, and a larger ``steps`` continues it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from metalens.config import Options, opt
from metalens.experiments.recipes import IN_CONTEXT_QUICK_MODEL, in_context_quick, in_context_train
from metalens.experiments.spine import Context, Study
from metalens.plots import plot_regression_tasks
from metalens.registry import LEARNERS, STUDIES
from metalens.report import Report, Table, at_most, fmt
from metalens.run import RunConfig, make_learner, make_task

__all__ = ["ICLTransfer"]

RUN = "transformer-random_mlp"


@STUDIES.register("icl-transfer")
class ICLTransfer(Study):
    """A transformer meta-trained on random MLP functions, scored in context on sinusoid and GP tasks."""

    title = "In-context transfer: random MLPs to sinusoids and GPs"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the icl-transfer study (``--set study.KEY=VALUE``)."""

        x_range: tuple[float, float] = opt((-5.0, 5.0), "random_mlp inputs (covers sinusoid's and gp's)",
                                           increasing=True)
        output_std_range: tuple[float, float] = opt((0.1, 4.0), "random_mlp: each function's standard deviation, "
                                                    "~ U[low, high]", gt=0, nondecreasing=True)
        first_layer_scale: float = opt(3.0, "random_mlp: wiggliness of the functions", gt=0)
        depth: int = opt(2, "random_mlp: hidden layers of the random functions", ge=1)
        noise_std: float = opt(0.05, "random_mlp: noise on y", ge=0)
        sequence_length: int = opt(60, "points per training sequence (the most examples the model reads is one "
                                       "less)", ge=2)
        width: int = opt(64, "transformer width", ge=1)
        layers: int = opt(4, "transformer blocks", ge=1)
        heads: int = opt(4, "attention heads (must divide width)", ge=1)
        steps: int = opt(5000, "meta-training steps", ge=1)
        batch_tasks: int = opt(32, "tasks per step", ge=1)
        lr: float = opt(1e-3, "Adam learning rate", gt=0)
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)", ge=0)
        seed: int = opt(0, "training seed", ge=0)
        sinusoid_shots: tuple[int, ...] = opt((5, 10), "support points of the sinusoid tasks scored (each less than "
                                                       "sequence_length)", ge=1, min_len=1)
        episodes: int = opt(500, "held-out tasks per target family", ge=2)
        eval_seed: int = opt(0, "seed of the held-out tasks", ge=0)
        quick: bool = opt(False, "smoke test: a tiny model, 3 steps, few tasks (overrides the budgets)")

        def check(self) -> None:
            if any(k >= self.sequence_length for k in self.sinusoid_shots):
                raise ValueError(f"sinusoid_shots must be less than sequence_length ({self.sequence_length}), got "
                                 f"{list(self.sinusoid_shots)}")
            if self.width % self.heads:
                raise ValueError(f"heads must divide width, got width={self.width} and heads={self.heads}")

    def effective(self) -> ICLTransfer.Config:
        """The configuration actually run: ``quick`` shrinks every budget."""
        return in_context_quick(self.config, **IN_CONTEXT_QUICK_MODEL) if self.config.quick else self.config

    def mlp_options(self) -> dict[str, Any]:
        """The ``random_mlp`` options of the training run (sequences of ``sequence_length`` points)."""
        c = self.effective()
        return {"x_range": list(c.x_range), "output_std_range": list(c.output_std_range),
                "first_layer_scale": c.first_layer_scale, "depth": c.depth, "noise_std": c.noise_std,
                "shots": c.sequence_length - 1, "queries": 1}

    def scratch_options(self) -> dict[str, Any]:
        """The ``scratch`` baseline's options: its defaults (5 steps per task in a quick run)."""
        return {"steps": 5} if self.effective().quick else {}

    def targets(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """``(key, label, family, options)`` of each target scored, the in-distribution one last."""
        c = self.effective()
        return [*[(f"sinusoid-K{k}", f"sinusoid K={k}", "sinusoid", {"shots": k}) for k in c.sinusoid_shots],
                ("gp", "gp (rbf, 3-50 context points)", "gp", {}),
                ("random_mlp", "random_mlp (held-out functions)", "random_mlp",
                 {**self.mlp_options(), "shots": 10, "queries": 10})]

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        return {RUN: RunConfig.resolve("random_mlp", "transformer", self.mlp_options(),
                                       {"mode": "sequence", "dim": c.width, "layers": c.layers, "heads": c.heads},
                                       in_context_train(c))}

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        rows = []
        for key, label, task, opts in self.targets():
            family = make_task(task, **opts)
            row: dict[str, Any] = {"target": label, "task": task, "task_options": opts}
            scratch = make_learner("scratch", family, seed=c.seed, **self.scratch_options())
            per_task = {}
            for name, what in (("transformer", RUN), ("scratch", scratch)):
                ev = ctx.evaluate(what, family, episodes=c.episodes, seed=c.eval_seed)
                ev.task = label
                report.evaluations.append(ev)
                row[name] = asdict(ev.metrics["mse"])
                row["oracle"] = asdict(ev.oracle["mse"]) if ev.oracle is not None else None
                per_task[name] = ev.per_task["mse"]
            rows.append(row)
            ratio = float(np.mean(per_task["transformer"]) / np.mean(per_task["scratch"]))
            report.check(f"{key}.beats_scratch", at_most(round(ratio, 4), 1.0))
            ctx.say(f"{label}: transformer {fmt(row['transformer'], 3)}, scratch {fmt(row['scratch'], 3)}, "
                    f"oracle {fmt(row['oracle'], 3)}")
        sc = LEARNERS["scratch"].cls.Config(**self.scratch_options())
        report.text(
            f"Training: `transformer` (mode `sequence`, width {c.width}, {c.layers} blocks, {c.heads} heads, loss mse) "
            f"on `random_mlp` only (1-D, x ~ U{list(c.x_range)}, depth {c.depth}, tanh, first-layer scale "
            f"{c.first_layer_scale}, output sd ~ U{list(c.output_std_range)}, noise sd {c.noise_std}), sequences of "
            f"{c.sequence_length} points, {c.steps} steps of {c.batch_tasks} tasks, Adam lr {c.lr}, seed {c.seed}. "
            f"`scratch`: an MLP {tuple(sc.hidden)} fitted to each support set ({sc.steps} {sc.optimizer} steps of "
            f"rate {sc.lr}), no meta-learning. "
            f"Scored on {c.episodes} held-out tasks per target (evaluation seed {c.eval_seed}), the oracle on "
            "the same tasks. The checks `<target>.beats_scratch` compare mean MSEs: on held-out `random_mlp` "
            "functions (in distribution) the transformer is expected below scratch; on the targets it never saw, "
            "whether it stays below is the question the study asks.")
        report.table(Table(["target", "transformer MSE", "scratch MSE", "oracle MSE"],
                           [[r["target"], fmt(r["transformer"], 3), fmt(r["scratch"], 3), fmt(r["oracle"], 3)]
                            for r in rows]))
        model = {"transformer (random_mlp)": ctx.learner(RUN).to("cpu")}
        for k in c.sinusoid_shots[:1]:
            report.figure(plot_regression_tasks(ctx.figure(f"sinusoid-K{k}.png"), make_task("sinusoid", shots=k),
                                                model, n_tasks=3, seed=c.eval_seed,
                                                title=f"sinusoid K={k}, never seen in training"))
        report.figure(plot_regression_tasks(ctx.figure("gp.png"), make_task("gp"), model, n_tasks=3,
                                            seed=c.eval_seed, title="gp (rbf), never seen in training"))
        report.data["rows"] = rows
