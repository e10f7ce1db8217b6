"""State size, not parameters (``metalens study icl-state-size``; Kirsch et al. 2022, sec. 4.4).

Kirsch et al. (2022), "General-Purpose In-Context Learning by Meta-Learning Transformers",
find that what limits a sequence model's in-context learning is the size of the state it
can access when it predicts (an LSTM's hidden state; a transformer's whole context), not
its number of parameters. This study separates the two with the ``lstm`` learner's
``rank`` option (:class:`~metalens.learners.in_context.LowRankLSTM`): its gates read
``[x_t, h_{t-1}]`` through a rank-``r`` projection, so the state ``(h, c)`` (``2 x hidden``
numbers) and the parameter count (``r (5 hidden + in) + 4 hidden + head``) are chosen apart.

- **state sweep**: ``hidden`` in ``hiddens``, each with the rank that brings its parameter
  count nearest to ``params`` (a wide state gets narrow gates, a narrow one more gate
  parameters than it can use);
- **parameter sweep**: ``hidden = fixed_hidden``, with the ranks that bring the parameter
  count nearest to ``params`` times each of ``param_scales``.

Every run is meta-trained the same way (the sequence loss of ``lstm``) on ``projected``
digits (accuracy) or ``random_mlp`` functions (MSE), and scored on the same unseen tasks.

Checks: ``state.helps``: at a fixed parameter count, the largest state scores better than
the smallest beyond the 95% CI of the paired per-task difference; ``state_not_parameters``:
the score moves more across the state sweep (same parameters) than across the parameter
sweep (same state): the state, not the parameters, is the bottleneck.

Runs live in ``OUT/runs/h<hidden>-r<rank>``; the run shared by both sweeps is trained once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Normal

from metalens.config import Options, opt
from metalens.experiments.spine import Context, Study
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, above, fmt
from metalens.run import RunConfig, make_task

__all__ = ["ICLStateSize", "lstm_parameters", "rank_for"]


def lstm_parameters(hidden: int, rank: int, in_width: int, out_width: int) -> int:
    """Parameters of a one-layer ``lstm`` learner with rank-``rank`` gates: ``r (5H + in) + 4H`` in the
    recurrence (:class:`~metalens.learners.in_context.LowRankLSTM`) and ``(H + 1) out`` in the head.

    >>> lstm_parameters(16, 2, 3, 1)
    247
    """
    return rank * (5 * hidden + in_width) + 4 * hidden + (hidden + 1) * out_width


def rank_for(hidden: int, params: int, in_width: int, out_width: int) -> int:
    """The rank (at least 1) whose parameter count is nearest to ``params`` at this ``hidden``.

    >>> rank_for(16, 247, 3, 1), rank_for(512, 10, 3, 1)
    (2, 1)
    """
    fixed = 4 * hidden + (hidden + 1) * out_width
    per_rank = 5 * hidden + in_width
    return max(1, round((params - fixed) / per_rank))


def _zero(support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None) -> Normal:
    mean = query_x.new_zeros(*query_x.shape[:2], support_y.shape[-1])
    return Normal(mean, torch.ones_like(mean))


@STUDIES.register("icl-state-size")
class ICLStateSize(Study):
    """In-context learning against the state size at fixed parameters, and against parameters at a fixed state."""

    title = "State size, not parameters, bottlenecks in-context learning (Kirsch et al. 2022)"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the icl-state-size study (``--set study.KEY=VALUE``)."""

        task: Literal["projected", "random_mlp"] = opt("projected", "tasks: projected digits (accuracy) or random_mlp "
                                                                    "functions (MSE)")
        hiddens: tuple[int, ...] = opt((8, 16, 32, 64, 128), "state sweep: LSTM hidden sizes at the fixed parameter "
                                                          "count", ge=1, min_len=2, increasing=True)
        params: int = opt(12000, "the fixed parameter count of the state sweep (each run: the rank nearest to it)",
                          ge=1)
        fixed_hidden: int = opt(32, "parameter sweep: the LSTM hidden size held fixed", ge=1)
        param_scales: tuple[float, ...] = opt((0.25, 0.5, 1.0), "parameter sweep: parameter counts, in multiples "
                                                                "of params", gt=0, min_len=2, increasing=True)
        ways: int = opt(3, "projected: classes per task", ge=2, le=10)
        shots: int = opt(5, "support examples per class (projected) or support points (random_mlp)", ge=1)
        queries: int = opt(5, "query examples per class (projected) or query points (random_mlp)", ge=1)
        dim: int = opt(16, "projected: width of the projected inputs", ge=1)
        steps: int = opt(1000, "meta-training steps of every run", ge=1)
        batch_tasks: int = opt(32, "tasks per step", ge=1)
        lr: float = opt(1e-2, "Adam learning rate", gt=0)
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)", ge=0)
        seed: int = opt(0, "training seed of every run", ge=0)
        episodes: int = opt(300, "unseen tasks scored per run", ge=2)
        eval_seed: int = opt(0, "seed of the scored tasks", ge=0)
        quick: bool = opt(False, "smoke test: 3 steps, few tasks, small states")

    def effective(self) -> ICLStateSize.Config:
        """The options actually run: ``quick`` shrinks the budgets and the states."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, hiddens=tuple(4 * (i + 1) for i in range(len(c.hiddens))), fixed_hidden=4, params=600,
                       steps=3, batch_tasks=4, episodes=min(c.episodes, 10), ways=min(c.ways, 3), dim=8)

    @property
    def classification(self) -> bool:
        return self.config.task == "projected"

    def task_options(self) -> dict[str, Any]:
        c = self.effective()
        if self.classification:
            return {"ways": c.ways, "shots": c.shots, "queries": c.queries, "dim": c.dim}
        return {"shots": c.shots, "queries": c.queries}

    def widths(self) -> tuple[int, int]:
        """``(in, out)``: the width of an LSTM step's input ``[x_t, y_{t-1}, flag]`` and of its head."""
        spec = make_task(self.effective().task, **self.task_options()).spec
        y = spec.num_classes if spec.is_classification else spec.y_dim
        return spec.x_dim + y + 1, y

    def plan(self) -> dict[str, dict[str, Any]]:
        """``{label: {hidden, rank, params, sweeps}}`` of every run (the shared one once)."""
        c = self.effective()
        in_w, out_w = self.widths()
        plan: dict[str, dict[str, Any]] = {}

        def add(hidden: int, target: int, sweep: str) -> None:
            rank = rank_for(hidden, target, in_w, out_w)
            label = f"h{hidden}-r{rank}"
            entry = plan.setdefault(label, {"hidden": hidden, "rank": rank, "state": 2 * hidden,
                                            "params": lstm_parameters(hidden, rank, in_w, out_w), "sweeps": []})
            entry["sweeps"].append(sweep)

        for h in c.hiddens:
            add(h, c.params, "state")
        for s in c.param_scales:
            add(c.fixed_hidden, round(s * c.params), "params")
        return plan

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        train = {"steps": c.steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "grad_clip": c.grad_clip, "seed": c.seed,
                 "log_every": 50, "checkpoint_every": max(c.steps, 1)}
        return {label: RunConfig.resolve(c.task, "lstm", self.task_options(), {"hidden": p["hidden"],
                                                                                "rank": p["rank"]}, train)
                for label, p in self.plan().items()}

    # -- the analysis ---------------------------------------------------------------------------------
    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        key = "accuracy" if self.classification else "mse"
        plan = self.plan()
        family = make_task(c.task, **self.task_options())
        chance = 1.0 / c.ways if self.classification else float(
            ctx.score(_zero, family.eval_episodes(c.eval_seed, c.episodes), with_nll=False)["mse"].mean())
        rows: dict[str, dict[str, Any]] = {}
        per_task: dict[str, np.ndarray] = {}
        for label, p in plan.items():
            counted = sum(t.numel() for t in ctx.learner(label).parameters())
            if counted != p["params"]:  # the formula is the learner's: a mismatch is a bug
                raise AssertionError(f"{label}: {counted} parameters, the formula says {p['params']}")
            ev = ctx.evaluate(label, family, episodes=c.episodes, seed=c.eval_seed, with_oracle=False)
            ev.task = f"{c.task} (unseen tasks), lstm hidden {p['hidden']} rank {p['rank']}"
            report.evaluations.append(ev)
            per_task[label] = ev.per_task[key]
            rows[label] = {**p, key: asdict(ev.metrics[key]), "train_seconds": ctx.train_seconds[label]}
            ctx.say(f"{label}: state {p['state']}, {p['params']} parameters, {key} {fmt(ev.metrics[key], 4)}")
        state = [label for label, p in plan.items() if "state" in p["sweeps"]]
        state.sort(key=lambda k: plan[k]["hidden"])
        params = [label for label, p in plan.items() if "params" in p["sweeps"]]
        params.sort(key=lambda k: plan[k]["params"])
        self._checks(report, rows, per_task, state, params, key)
        self._text(report, rows, state, params, key, chance)
        report.data.update(rows=rows, state_sweep=state, parameter_sweep=params, chance=chance)
        report.figure(_plot(ctx.figure("state-size.png"), rows, state, params, key, chance))

    def _checks(self, report: Report, rows: dict[str, dict[str, Any]], per_task: dict[str, np.ndarray],
                state: list[str], params: list[str], key: str) -> None:
        sign = 1.0 if self.classification else -1.0  # higher accuracy, lower MSE is better
        small, large = state[0], state[-1]
        report.check("state.helps", above(sign * (per_task[large] - per_task[small]),
                                          f"{key} gain of state {rows[large]['state']} over state "
                                          f"{rows[small]['state']} at ~{rows[small]['params']} parameters, paired"))
        spread_state = _spread([rows[k][key]["mean"] for k in state])
        spread_params = _spread([rows[k][key]["mean"] for k in params])
        report.check("state_not_parameters", Check(
            round(spread_state, 4), f"> {spread_params:.4g} (the {key} range across the state sweep at a fixed "
                                    f"parameter count must exceed its range across the parameter sweep "
                                    f"{rows[params[0]]['params']}..{rows[params[-1]]['params']} at a fixed state)",
            bool(spread_state > spread_params)))

    def _text(self, report: Report, rows: dict[str, dict[str, Any]], state: list[str], params: list[str], key: str,
              chance: float) -> None:
        c = self.effective()
        what = (f"`projected` digits ({c.ways}-way {c.shots}-shot, {c.queries} queries per class, projected to "
                f"{c.dim} dimensions)" if self.classification else
                f"`random_mlp` functions ({c.shots} support and {c.queries} query points)")
        report.text(
            f"Every run: `lstm` (one layer, gates through a rank-r projection, the sequence loss) on {what}, "
            f"{c.steps} steps of {c.batch_tasks} tasks, Adam lr {c.lr}, grad clip {c.grad_clip}, seed {c.seed}; "
            f"scored on {c.episodes} unseen tasks (evaluation seed {c.eval_seed}); "
            + (f"chance {100 * chance:.0f}%." if self.classification else f"the zero predictor's MSE {chance:.3f}."))
        sweeps = ((f"State sweep (parameters held near {c.params})", state),
                  (f"Parameter sweep (hidden {c.fixed_hidden})", params))
        for title, labels in sweeps:
            report.heading(title)
            table = Table(["run", "hidden", "state (h and c)", "rank", "parameters", key, "train seconds"])
            for k in labels:
                r = rows[k]
                table.rows.append([f"`{k}`", r["hidden"], r["state"], r["rank"], r["params"],
                                   fmt(r[key], 4, percent=self.classification), r["train_seconds"]])
            report.table(table)


def _spread(values: list[float]) -> float:
    return float(max(values) - min(values)) if values else 0.0


def _plot(path: Path, rows: dict[str, dict[str, Any]], state: list[str], params: list[str], key: str,
          chance: float) -> Path:
    """The score against the state size (fixed parameters) and against the parameter count (fixed state)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    scale = 100.0 if key == "accuracy" else 1.0
    for ax, labels, x_key, title in ((axes[0], state, "state", "state size, parameters fixed"),
                                     (axes[1], params, "params", "parameters, state fixed")):
        xs = [rows[k][x_key] for k in labels]
        ys = [scale * rows[k][key]["mean"] for k in labels]
        err = [scale * rows[k][key]["ci95"] for k in labels]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2)
        for k, x, y in zip(labels, xs, ys):
            ax.annotate(f"H={rows[k]['hidden']}, r={rows[k]['rank']}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(scale * chance, color="k", lw=0.8, ls=":", label="chance" if key == "accuracy" else "zero "
                                                                                                        "predictor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("state size (numbers in h and c)" if x_key == "state" else "parameters")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy (%), unseen tasks" if key == "accuracy" else "MSE, unseen tasks")
    return save_figure(fig, path)
