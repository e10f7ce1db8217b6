"""Time to quality on three headline results: held-out quality against CPU minutes of one thread.

A recipe of a workload is trained with a checkpoint every ``--every`` steps; every checkpoint is
then scored on the workload's held-out tasks (the same ones as its study). The clock is the
training process's CPU time (``time.process_time`` plus that of the processes it waited for, such as
the C++ compiler under ``train.compile``), read when each training step starts, so a machine shared
with other jobs does not distort it; wall time is recorded beside it. Loading the data and scoring
are not counted.

Workloads (the quality, the target, the study whose protocol is reused):

- ``anp-gp``: the attentive NP on GP RBF tasks; per-target LL gap to the exact GP on the 1000
  held-out tasks of ``metalens study neural-processes`` (paired, nats); target 0.15;
- ``maml-sinusoid``: MAML (MLP 1-40-40-1, one inner step of 0.01), trained at K = 10 and scored at
  K = 5 after one step on 1000 held-out tasks (``metalens study sinusoid-gradient``); target MSE 0.67
  (Finn et al. 2017);
- ``protonet-omniglot``: prototypical networks, Conv-4, on the ``small`` protocol; 5-way 1-shot
  accuracy on 600 held-out tasks with 15 queries per class (``metalens study omniglot``); target 93%.

Run (one recipe; ``--set`` changes the workload's options, ``--name`` labels the recipe)::

    .venv/bin/python benchmarks/time_to_quality.py run anp-gp --name lr2e-3 --steps 20000 --every 2000 \\
        --set train.lr=2e-3 --set train.lr_schedule=cosine
    .venv/bin/python benchmarks/time_to_quality.py report     # tables of every recipe run so far, figures

Results go to ``runs/bench/time-to-quality/<workload>/<recipe>/`` (the run folder ``run/`` and
``result.json``); ``report`` writes ``summary.json`` and ``time-to-quality-<workload>.png`` beside them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path("runs/bench/time-to-quality")


@dataclass(frozen=True)
class Workload:
    """A headline result: the run that produces it, how a checkpoint is scored and the quality to reach."""

    title: str
    task: str
    learner: str
    task_options: dict[str, Any]
    learner_options: dict[str, Any]
    train: dict[str, Any]
    metric: str  # "gap" (LL gap to the oracle, nats), "mse" or "accuracy"
    target: float
    episodes: int  # held-out tasks, evaluation seed 0
    eval_batch: int  # tasks per predict call (memory only, except where the study fixes it)
    eval_task: dict[str, Any] = field(default_factory=dict)  # task options changed for scoring
    eval_learner: dict[str, Any] = field(default_factory=dict)  # learner options changed for scoring

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target


WORKLOADS: dict[str, Workload] = {
    # metalens.experiments.neural_processes: gp defaults (ConvCNP protocol), 16 tasks a step, Adam 5e-4,
    # scored on 1000 held-out tasks in chunks of 50 (its EVAL_BATCH) beside the exact GP
    "anp-gp": Workload("attentive NP on GP RBF: LL gap to the exact GP (nats)", "gp", "anp", {"kernel": "rbf"}, {},
                       {"batch_tasks": 16, "lr": 5e-4}, "gap", 0.15, 1000, 50),
    # metalens.experiments.sinusoid: Finn et al.'s recipe (TOUR["maml"]), trained at K = 10, scored at K = 5
    # after one inner step
    "maml-sinusoid": Workload("MAML on sinusoid, K = 5, one step: MSE", "sinusoid", "maml", {"shots": 10},
                              {"hidden": [40, 40], "inner_lr": 0.01, "inner_steps": 1, "eval_inner_steps": 10},
                              {"batch_tasks": 25, "lr": 1e-3}, "mse", 0.67, 1000, 100,
                              eval_task={"shots": 5}, eval_learner={"eval_inner_steps": 1}),
    # metalens.experiments.omniglot: protonet's 1-shot model, trained 20-way with 5 queries, one task a step,
    # Adam 1e-3; scored 5-way with 15 queries per class in chunks of 4
    "protonet-omniglot": Workload("protonet on Omniglot (small), 5-way 1-shot: accuracy", "omniglot", "protonet",
                                  {"protocol": "small", "ways": 20, "shots": 1, "queries": 5},
                                  {"backbone": "conv4", "channels": 64}, {"batch_tasks": 1, "lr": 1e-3},
                                  "accuracy", 0.93, 600, 4, eval_task={"ways": 5, "queries": 15}),
}


def cpu_seconds() -> float:
    """CPU time of this process and of the child processes it has waited for (user + system)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class _Clocked:
    """The family as the trainer sees it, noting the CPU and wall time when each step in ``marks`` starts."""

    def __init__(self, family: Any, marks: set[int]) -> None:
        self.family, self.marks = family, marks
        self.cpu: dict[int, float] = {}
        self.wall: dict[int, float] = {}
        self.cpu0, self.wall0 = cpu_seconds(), time.perf_counter()

    def episode(self, seed: int, step: int, n_tasks: int, **kwargs: Any) -> Any:
        if step in self.marks:  # steps 0..step-1 done and checkpoint `step` written
            self.note(step)
        return self.family.episode(seed, step, n_tasks, **kwargs)

    def note(self, step: int) -> None:
        self.cpu[step] = cpu_seconds() - self.cpu0
        self.wall[step] = time.perf_counter() - self.wall0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.family, name)


def score(w: Workload, learner: Any, family: Any) -> dict[str, float]:
    """The workload's quality of ``learner`` on its held-out tasks: value, 95% CI and what goes with it."""
    from metalens.evaluate import evaluate, summarize

    ev = evaluate(learner, family, episodes=w.episodes, seed=0, batch_tasks=w.eval_batch,
                  with_oracle=w.metric == "gap")
    if w.metric == "gap":
        gap = summarize(ev.per_task["nll"] - ev.oracle_per_task["nll"])  # paired over tasks
        return {"value": gap.mean, "ci95": gap.ci95, "ll": -ev.metrics["nll"].mean,
                "oracle_ll": -ev.oracle["nll"].mean, "diverged": ev.diverged}
    m = ev.metrics[w.metric]
    return {"value": m.mean, "ci95": m.ci95, "diverged": ev.diverged}


def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    from metalens import checkpoint
    from metalens.config import parse_set
    from metalens.run import RunConfig, start_run
    from metalens.train import train

    w = WORKLOADS[args.workload]
    sets: dict[str, dict[str, Any]] = {"task": {}, "learner": {}, "train": {}}
    for item in args.set:
        section, key, value = parse_set(item)
        if section not in sets:
            raise SystemExit(f"--set {item!r}: only task.*, learner.* and train.* keys apply here")
        sets[section][key] = value
    train_opts = {**w.train, **sets["train"], "steps": args.steps, "checkpoint_every": args.every,
                  "keep_checkpoints": 0, "log_every": max(1, min(50, args.every))}
    cfg = RunConfig.resolve(w.task, w.learner, {**w.task_options, **sets["task"]},
                            {**w.learner_options, **sets["learner"]}, train_opts)
    out = ROOT / args.workload / args.name
    run_dir = out / "run"
    if not args.score_only:
        r = start_run(cfg, run_dir)  # builds the family and draws step 0's episode: data loading is not timed
        clock = _Clocked(r.family, set(range(args.every, args.steps, args.every)))
        train(r.learner, clock, cfg.train, run_dir=run_dir, progress=False, extra_state={"run": cfg.identity()})
        clock.note(args.steps)
        print(f"{args.workload}/{args.name}: {args.steps} steps in {clock.cpu[args.steps] / 60:.2f} CPU min "
              f"({clock.wall[args.steps] / 60:.2f} min wall)", flush=True)
        (out / "times.json").write_text(json.dumps({s: [clock.cpu[s], clock.wall[s]] for s in clock.cpu}) + "\n")
    times = clock_times(out)
    eval_cfg = cfg.updated(task=w.eval_task, learner=w.eval_learner)
    family, learner = eval_cfg.build()
    ckpts = checkpoint.complete(run_dir)
    chosen = ckpts if args.score == "all" else ckpts[-1:] if args.score == "final" else \
        [c for i, c in enumerate(ckpts) if (len(ckpts) - 1 - i) % int(args.score) == 0]
    points = []
    for path in chosen:
        ck = checkpoint.load(path)
        learner.load_state_dict(ck.model)
        t = time.perf_counter()
        s = score(w, learner, family)
        cpu, wall = times.get(ck.step, (None, None))
        points.append({"step": ck.step, "cpu_s": cpu, "wall_s": wall, **s,
                       "score_wall_s": round(time.perf_counter() - t, 1)})
        print(f"  step {ck.step:>6}  {fmt_minutes(cpu)} CPU min  {w.metric} {fmt_value(w, s['value'])} "
              f"± {fmt_value(w, s['ci95'])}", flush=True)
    reached = next((p for p in points if w.reached(p["value"])), None)
    result = {"workload": args.workload, "recipe": args.name, "title": w.title, "metric": w.metric,
              "target": w.target, "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name,
                                                                                  *sys.argv]),
              "sets": args.set, "steps": args.steps, "every": args.every, "threads": args.threads,
              "config": cfg.to_json(), "points": points, "times": {str(k): v for k, v in times.items()},
              "reached_at_cpu_s": reached["cpu_s"] if reached else None,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu": platform.processor() or platform.machine()}}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'result.json'}")


def clock_times(out: Path) -> dict[int, tuple[float, float]]:
    """``{step: (cpu_s, wall_s)}`` at each checkpoint, as the training wrote them to ``times.json``."""
    path = out / "times.json"
    if not path.exists():
        return {}
    return {int(k): (v[0], v[1]) for k, v in json.loads(path.read_text()).items()}


def fmt_minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.2f}"


def fmt_value(w: Workload, v: float) -> str:
    return f"{100 * v:.2f}%" if w.metric == "accuracy" else f"{v:.3f}"


def report(args: argparse.Namespace) -> None:
    from metalens.plots import pyplot, save_figure

    results: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(ROOT.glob("*/*/result.json")):
        r = json.loads(path.read_text())
        results.setdefault(r["workload"], []).append(r)
    summary = {}
    for name, rs in results.items():
        w = WORKLOADS[name]
        print(f"\n### {w.title}; target {fmt_value(w, w.target)}\n")
        print("| recipe | steps | CPU min | wall min | " + w.metric + " |\n|---|---|---|---|---|")
        for r in rs:
            for p in r["points"]:
                print(f"| {r['recipe']} | {p['step']} | {fmt_minutes(p['cpu_s'])} | {fmt_minutes(p['wall_s'])} | "
                      f"{fmt_value(w, p['value'])} ± {fmt_value(w, p['ci95'])} |")
        print("\n| recipe | settings | target reached at (CPU min) | best |\n|---|---|---|---|")
        for r in rs:
            best = (max if w.higher_is_better else min)(r["points"], key=lambda p: p["value"])
            settings = f"`{' '.join(r['sets'])}`" if r["sets"] else "the study's"
            print(f"| {r['recipe']} | {settings} | "
                  f"{fmt_minutes(r['reached_at_cpu_s'])} | {fmt_value(w, best['value'])} at "
                  f"{fmt_minutes(best['cpu_s'])} CPU min |")
        summary[name] = [{k: r[k] for k in ("recipe", "sets", "steps", "points", "reached_at_cpu_s", "command")}
                         for r in rs]
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        scale = 100 if w.metric == "accuracy" else 1
        for r in rs:
            pts = [p for p in r["points"] if p["cpu_s"] is not None]
            if pts:
                ax.errorbar([p["cpu_s"] / 60 for p in pts], [scale * p["value"] for p in pts],
                            yerr=[scale * p["ci95"] for p in pts], marker="o", ms=3, capsize=2, label=r["recipe"])
        ax.axhline(scale * w.target, color="k", ls="--", lw=1, label="target")
        ax.set_xlabel("CPU minutes of training (one thread)")
        ax.set_ylabel({"gap": "LL gap to the exact GP (nats)", "mse": "MSE", "accuracy": "accuracy (%)"}[w.metric])
        ax.set_title(w.title, fontsize=9)
        ax.legend(fontsize=7)
        save_figure(fig, ROOT / f"time-to-quality-{name}.png")
    (ROOT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {ROOT / 'summary.json'} and {ROOT}/time-to-quality-*.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train one recipe of a workload with checkpoints, and score them")
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--name", required=True, help="the recipe's label (its folder under the workload's)")
    p.add_argument("--steps", type=int, required=True, help="training steps (train.steps)")
    p.add_argument("--every", type=int, required=True, help="a checkpoint every this many steps")
    p.add_argument("--set", action="append", default=[], help="task.KEY=VALUE, learner.KEY=VALUE or train.KEY=VALUE")
    p.add_argument("--score", default="all", help="checkpoints to score: all, final, or N (every N-th, to the end)")
    p.add_argument("--score-only", action="store_true", help="score the checkpoints of a run already trained")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU time of one thread)")
    sub.add_parser("report", help="Markdown tables of every result so far, summary.json and the figures")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
