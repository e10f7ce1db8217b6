"""An in-context learner for real tables, meta-trained on synthetic tables only (``metalens study tabular-incontext``).

TabPFN's idea (Hollmann et al. 2023; Müller et al. 2022) at this project's scale: a
``transformer`` in ``set`` mode is meta-trained on the ``synthetic_tables`` family only
(random MLP and tree labelers over Gaussian or uniform features, 2 to ``max_classes`` classes,
1 to ``shots`` examples per class, up to ``max_features`` zero-padded features; see
:mod:`metalens.tasks.synthetic_tables`). It never sees a real table in training. Beside it, a
``protonet`` with an MLP embedding is meta-trained on the same family (the metric lens on the
same prior), unless ``protonet = false``.

**The real-data check.** scikit-learn's bundled data sets (iris: 150 rows, 4 features, 3
classes; wine: 178, 13, 3; breast cancer: 569, 30, 2; digits: 1797, 64, 10), each as few-shot
problems with ``K`` labelled examples per class (``K`` in ``shots_eval``, default 1, 5, 10) and
every other row as a query, ``draws`` random draws per ``K`` (draw ``i`` of data set ``j`` at
``K`` from the generator ``(eval_seed, j, K, i)``). Every method sees the very same draws:

- the meta-trained learners through :mod:`metalens.use`, exactly as ``FewShotClassifier`` uses
  them (features zero-padded to ``max_features``, standardised with the support set's mean and
  standard deviation, all queries of a draw in one task: they never attend to each other);
- scikit-learn's ``LogisticRegression`` (default ``C = 1``, ``max_iter = 1000``) and
  ``KNeighborsClassifier`` with ``k = min(K, knn_k)`` neighbours (1 at ``K = 1``, 3 above by
  default), each after a ``StandardScaler`` fitted on the support set, and
  ``RandomForestClassifier`` (``rf_trees`` trees, ``random_state`` = the draw's index) on the
  raw features.

Accuracy is the fraction of a draw's queries classified correctly; the table gives its mean
over the draws and the half-width of the 95% confidence interval (``1.96 std / sqrt(draws)``).

**Checks.** ``K<k>.transformer_above_best_classical`` for ``k`` = 1 and 5: the transformer's
accuracy averaged over the four data sets minus that of the best classical method (the one
with the highest four-data-set average at that ``K``); it holds when positive. Whichever way it
goes is reported. ``synthetic.transformer_above_chance``: on held-out synthetic tables
(``max_classes``-way, ``shots``-shot), the meta-training worked.

The runs live in ``OUT/runs/transformer-synthetic_tables`` and ``OUT/runs/protonet-synthetic_tables``;
running the study again reuses them, a larger ``steps`` continues them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from metalens import rng
from metalens.config import Options, opt
from metalens.evaluate import summarize
from metalens.experiments.spine import Context, Study
from metalens.model_file import Model
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, at_least, fmt
from metalens.run import RunConfig
from metalens.use import classify, prepare

__all__ = ["TabularInContext", "DATASETS", "load_dataset", "draw_support", "CLASSICAL"]

TRANSFORMER, PROTONET = "transformer-synthetic_tables", "protonet-synthetic_tables"
DATASETS = ("iris", "wine", "breast_cancer", "digits")
CLASSICAL = ("logistic_regression", "knn", "random_forest")
_DRAW_KEY = 0x7AB2  # draw i of data set j at K: rng.generator(eval_seed, _DRAW_KEY, j, K, i)


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled data set ``name``: features ``[n, F]`` float64 and labels ``[n]`` int64."""
    from sklearn import datasets

    loader = {"iris": datasets.load_iris, "wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer,
              "digits": datasets.load_digits}[name]
    d = loader()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def draw_support(y: np.ndarray, shots: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``shots`` random rows of every class as the support set, every other row as a query: their indices.

    >>> s, q = draw_support(np.array([0, 0, 0, 1, 1, 1]), 1, torch.Generator().manual_seed(0))
    >>> len(s), len(q), sorted(np.array([0, 0, 0, 1, 1, 1])[s].tolist())
    (2, 4, [0, 1])
    """
    support = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) <= shots:
            raise ValueError(f"class {c} has {len(rows)} rows, not more than shots = {shots}")
        pick = torch.randperm(len(rows), generator=generator)[:shots].numpy()
        support.append(rows[pick])
    s = np.sort(np.concatenate(support))
    return s, np.setdiff1d(np.arange(len(y)), s)


def _classical(name: str, shots: int, knn_k: int, trees: int, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    if name == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(shots, knn_k)))
    return RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)


@STUDIES.register("tabular-incontext")
class TabularInContext(Study):
    """A transformer meta-trained on synthetic tables only, against classical methods on scikit-learn's real tables."""

    title = "In-context learning on real tables, meta-trained on synthetic tables only"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the tabular-incontext study (``--set study.KEY=VALUE``)."""

        max_features: int = opt(64, "synthetic_tables: input width (real tables are zero-padded to it)", ge=1)
        max_classes: int = opt(10, "synthetic_tables: most classes of a task (the transformer's output width)", ge=2)
        min_classes: int = opt(2, "synthetic_tables: fewest classes of a task", ge=2)
        shots: int = opt(10, "synthetic_tables: most support examples per class in training", ge=1)
        min_shots: int = opt(1, "synthetic_tables: fewest support examples per class in training", ge=1)
        queries: int = opt(5, "synthetic_tables: query examples per class in training", ge=1)
        width: int = opt(128, "transformer width", ge=1)
        layers: int = opt(4, "transformer blocks", ge=1)
        heads: int = opt(4, "attention heads (must divide width)", ge=1)
        steps: int = opt(6000, "transformer: meta-training steps", ge=1)
        batch_tasks: int = opt(32, "tasks per step", ge=1)
        lr: float = opt(1e-3, "Adam learning rate (a half cosine to 0 over the steps)", gt=0)
        grad_clip: float = opt(1.0, "clip the meta-gradient's norm (0: off)", ge=0)
        seed: int = opt(0, "training seed", ge=0)
        protonet: bool = opt(True, "also meta-train protonet (MLP embedding) on the same family")
        protonet_steps: int = opt(2000, "protonet: meta-training steps", ge=1)
        protonet_hidden: tuple[int, ...] = opt((128, 128), "protonet: hidden widths of the MLP embedding", ge=1,
                                               min_len=1)
        datasets: tuple[str, ...] = opt(DATASETS, "scikit-learn data sets scored (iris, wine, breast_cancer, "
                                                  "digits)", min_len=1)
        shots_eval: tuple[int, ...] = opt((1, 5, 10), "labelled examples per class of the real-data problems", ge=1,
                                          min_len=1)
        draws: int = opt(100, "random draws of the support set per data set and K", ge=2)
        knn_k: int = opt(3, "k-nearest neighbours uses k = min(K, knn_k)", ge=1)
        rf_trees: int = opt(100, "trees of the random forest", ge=1)
        synthetic_episodes: int = opt(200, "held-out synthetic tables scored (in-distribution check)", ge=2)
        eval_seed: int = opt(0, "seed of the real-data draws and of the held-out synthetic tables", ge=0)
        quick: bool = opt(False, "smoke test: a tiny model, 3 steps, 3 draws, few trees (overrides the budgets)")

        def check(self) -> None:
            if self.width % self.heads:
                raise ValueError(f"heads must divide width, got width={self.width} and heads={self.heads}")
            if self.min_classes > self.max_classes:
                raise ValueError(f"min_classes must be <= max_classes, got {self.min_classes} > {self.max_classes}")
            if self.min_shots > self.shots:
                raise ValueError(f"min_shots must be <= shots, got {self.min_shots} > {self.shots}")
            unknown = [d for d in self.datasets if d not in DATASETS]
            if unknown:
                raise ValueError(f"datasets must name {', '.join(DATASETS)}, got {unknown[0]!r}")

    def effective(self) -> TabularInContext.Config:
        """The options actually run: ``quick`` shrinks every budget."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, width=16, layers=1, heads=2, steps=min(c.steps, 3), protonet_steps=min(c.protonet_steps, 3),
                       batch_tasks=min(c.batch_tasks, 4), protonet_hidden=(16,), draws=min(c.draws, 3),
                       rf_trees=min(c.rf_trees, 5), synthetic_episodes=min(c.synthetic_episodes, 4))

    def family_options(self) -> dict[str, Any]:
        c = self.effective()
        return {"max_features": c.max_features, "max_classes": c.max_classes, "min_classes": c.min_classes,
                "shots": c.shots, "min_shots": c.min_shots, "queries": c.queries}

    def _train(self, steps: int) -> dict[str, Any]:
        c = self.effective()
        return {"steps": steps, "batch_tasks": c.batch_tasks, "lr": c.lr, "lr_schedule": "cosine",
                "grad_clip": c.grad_clip, "seed": c.seed, "log_every": 50, "checkpoint_every": 500}

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        out = {TRANSFORMER: RunConfig.resolve("synthetic_tables", "transformer", self.family_options(),
                                              {"mode": "set", "dim": c.width, "layers": c.layers, "heads": c.heads},
                                              self._train(c.steps))}
        if c.protonet:
            out[PROTONET] = RunConfig.resolve("synthetic_tables", "protonet", self.family_options(),
                                              {"backbone": "mlp", "hidden": list(c.protonet_hidden),
                                               "embedding_dim": 64}, self._train(c.protonet_steps))
        return out

    # -- scoring ------------------------------------------------------------------------------------
    def score_dataset(self, j: int, name: str, models: dict[str, Model]) -> dict[int, dict[str, np.ndarray]]:
        """Accuracy of every method on every draw: ``{K: {method: [draws]}}``."""
        c = self.effective()
        x_all, y_all = load_dataset(name)
        n_classes = len(np.unique(y_all))
        out: dict[int, dict[str, np.ndarray]] = {}
        for K in c.shots_eval:
            acc: dict[str, list[float]] = {m: [] for m in [*models, *CLASSICAL]}
            for i in range(c.draws):
                s, q = draw_support(y_all, K, rng.generator(c.eval_seed, _DRAW_KEY, j, K, i))
                xs, ys, xq, yq = x_all[s], y_all[s], x_all[q], y_all[q]
                for label, model in models.items():
                    probs = classify(model, prepare(model, torch.from_numpy(xs)), torch.from_numpy(ys), n_classes,
                                     prepare(model, torch.from_numpy(xq)))
                    acc[label].append(float((probs.argmax(-1).numpy() == yq).mean()))
                for m in CLASSICAL:
                    est = _classical(m, K, c.knn_k, c.rf_trees, i).fit(xs, ys)
                    acc[m].append(float((est.predict(xq) == yq).mean()))
            out[K] = {m: np.asarray(v) for m, v in acc.items()}
        return out

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        labels = [TRANSFORMER] + ([PROTONET] if c.protonet else [])
        names = {TRANSFORMER: "transformer", PROTONET: "protonet"}
        models = {}
        for label in labels:
            run = ctx.run(label)
            run.learner.to("cpu")
            models[names[label]] = Model.of(run.learner, run.family, config=run.config, step=run.step)

        # in distribution: held-out synthetic tables
        synth = {}
        for label in labels:
            ev = ctx.evaluate(label, episodes=c.synthetic_episodes, seed=c.eval_seed, with_oracle=False)
            report.evaluations.append(ev)
            synth[names[label]] = ev.metrics["accuracy"]
        chance = 1.0 / c.max_classes
        report.check("synthetic.transformer_above_chance", at_least(round(synth["transformer"].mean, 4),
                                                                     round(chance, 4)))

        # the real data sets
        methods = [*models, *CLASSICAL]
        t0 = time.perf_counter()
        scores: dict[str, dict[int, dict[str, np.ndarray]]] = {}
        for j, name in enumerate(DATASETS):
            if name not in c.datasets:
                continue
            scores[name] = self.score_dataset(j, name, models)
            ctx.say(f"{name}: " + "; ".join(f"K={K} " + ", ".join(f"{m} {v.mean():.3f}" for m, v in r.items())
                                           for K, r in scores[name].items()))
        score_seconds = round(time.perf_counter() - t0, 1)
        rows, table = [], Table(["data set", "K", *[f"`{m}`" for m in methods]])
        for name, per_k in scores.items():
            for K, r in per_k.items():
                cells = {m: summarize(r[m]) for m in methods}
                best = max(methods, key=lambda m: cells[m].mean)
                table.rows.append([name, K, *[("**" if m == best else "") + fmt(cells[m], percent=True)
                                              + ("**" if m == best else "") for m in methods]])
                rows.append({"dataset": name, "shots": K, **{m: {"mean": cells[m].mean, "ci95": cells[m].ci95}
                                                              for m in methods}})
        averages = {}
        for K in c.shots_eval:
            avg = {m: float(np.mean([scores[d][K][m].mean() for d in scores])) for m in methods}
            averages[K] = avg
            best = max(methods, key=avg.__getitem__)
            table.rows.append([f"*average of {len(scores)}*", K,
                               *[("**" if m == best else "") + f"{100 * avg[m]:.2f}%" + ("**" if m == best else "")
                                 for m in methods]])
        for K in (1, 5):
            if K not in averages:
                continue
            avg = averages[K]
            best_classical = max(CLASSICAL, key=avg.__getitem__)
            diff = round(avg["transformer"] - avg[best_classical], 4)
            report.check(f"K{K}.transformer_above_best_classical",
                         Check(diff, f"> 0 (vs {best_classical}, average over {len(scores)} data sets)", diff > 0))

        tr = ctx.configs[TRANSFORMER]
        report.text(
            f"Training (no real data): `transformer` (mode `set`, width {c.width}, {c.layers} blocks, {c.heads} heads; "
            f"{sum(p.numel() for p in models['transformer'].learner.parameters())} parameters) on `synthetic_tables` "
            f"(up to {c.max_features} features, {c.min_classes}-{c.max_classes} classes and {c.min_shots}-{c.shots} "
            f"support examples per class drawn per step, {c.queries} queries per class), {c.steps} steps of "
            f"{c.batch_tasks} tasks, Adam lr {c.lr} with a half-cosine decay, gradient clipping {c.grad_clip}, seed "
            f"{c.seed}"
            + (f"; `protonet` (MLP embedding {list(c.protonet_hidden)} -> 64) on the same family, "
               f"{c.protonet_steps} steps" if c.protonet else "")
            + f". Training time: {', '.join(f'`{k}` {v / 60:.1f} min' for k, v in ctx.train_seconds.items())} "
            f"({tr.train.device}).")
        report.heading("Held-out synthetic tables")
        report.text(f"{c.max_classes}-way {c.shots}-shot, {c.synthetic_episodes} tables (evaluation seed "
                    f"{c.eval_seed}); chance is {100 * chance:.0f}%: "
                    + ", ".join(f"`{m}` {fmt(v, percent=True)}" for m, v in synth.items()) + ".")
        report.heading("Real data sets, never seen in training")
        report.text(
            f"scikit-learn's iris, wine, breast cancer and digits; K labelled rows per class, every other row a query; "
            f"{c.draws} draws per data set and K (seed {c.eval_seed}), the same draws for every method. "
            f"`logistic_regression`: StandardScaler + LogisticRegression(C=1, max_iter=1000); `knn`: StandardScaler + "
            f"KNeighborsClassifier(k = min(K, {c.knn_k})); `random_forest`: RandomForestClassifier({c.rf_trees} "
            "trees). Accuracy over each draw's queries, mean ± 95% CI half-width over the draws; the best of each "
            f"row in bold. Scoring took {score_seconds / 60:.1f} min.")
        report.table(table)
        report.data["rows"] = rows
        report.data["averages"] = {str(K): v for K, v in averages.items()}
        report.data["synthetic"] = {m: {"mean": v.mean, "ci95": v.ci95} for m, v in synth.items()}
        report.data["score_seconds"] = score_seconds
        cpu = time.process_time()
        report.data["cpu_seconds"] = round(cpu, 1)
        report.text(f"CPU time of this invocation (training, if it trained, and scoring): {cpu / 60:.1f} min.")
