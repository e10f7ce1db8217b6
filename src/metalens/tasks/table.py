"""Few-shot classification from a user's labelled table: the ``table`` family.

A CSV file with a header row holds numeric feature columns, a label column and, optionally,
a task column. Every row is an example; its label is any text (``setosa``, ``3``, ``yes``).

**Class split** (no task column). The classes of the label column are split once, by
``split_seed``, into meta-training, validation and test classes (``val_size``,
``test_size``: a fraction < 1 or a count, as for the ``images`` family). An N-way K-shot
task of split ``s`` draws ``ways`` classes of ``s``, then ``shots + queries`` distinct rows
of each; the support set holds ``shots`` rows per class and the query set ``queries``, each
set in a random order, labelled ``0..N-1`` in the order the classes were drawn.

**Task split** (``task_column`` names a column). Rows with the same value in that column
form one task with its own classes (a label means nothing across tasks). The tasks are split
by ``split_seed`` into meta-training, validation and test tasks; an episode's task draws one
task of the split uniformly, then ``ways`` of its classes and their rows as above. Tasks of
the meta-training split with too few classes or rows are refused, naming the task.

**Features.** Every column but the label and task columns is a feature (or those named by
``features``); every cell must be a number. Features are standardised with the mean and
standard deviation of the rows of the meta-training split (a constant feature is centred
only), so no statistic of a held-out class or task leaks into training;
:meth:`Table.user_inputs` hands the same statistics to ``metalens predict`` and the
estimators, which prepare a user's rows exactly so.

Meta-training tasks carry ``Episode.classes``: the index, in :meth:`Table.classes`, of each
local label's class (``pretrain`` trains a classifier over them). Draws depend on the
generator only (the trainer derives it from ``(seed, step)``). There is no oracle.

Bad data is a :class:`~metalens.errors.DataError` naming the file and the column (and the
row, class or task): a missing label column, a cell that is not a number, a class or task
with too few rows, a split with fewer than ``ways`` classes.

``path = ""`` reads scikit-learn's bundled digits as a table (64 pixel columns ``pixel_R_C``
and a ``target`` column; no file is written): a demonstration that needs no data.

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
>>> rows = [f"{i % 7},{(i * 3) % 5},c{i % 6}" for i in range(60)]
>>> _ = p.write_text("a,b,label\\n" + "\\n".join(rows) + "\\n")
>>> family = Table(Table.Config(path=str(p), ways=2, shots=2, queries=3, test_size=2))
>>> ep = family.sample(4, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape, ep.query_y.shape, family.classes("test")
(torch.Size([4, 4, 2]), torch.Size([4, 6]), ['c0', 'c4'])
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalens import rng
from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.errors import DataError, excerpt
from metalens.files import NotRegular, read_regular
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = ["Table", "CsvTable", "read_csv", "sort_labels", "LABEL_COLUMNS", "MAX_TABLE_BYTES"]

SPLITS: tuple[Split, ...] = ("train", "val", "test")
LABEL_COLUMNS = ("label", "target")  # the label column's default names, in this order
MAX_TABLE_BYTES = 1 << 30  # a CSV file larger than this is refused unread
_SPLIT_KEY = 0x7AB1  # seeds the class or task split: rng.derive_seed(split_seed, _SPLIT_KEY)


# ------------------------------------------------------------------------------------------------
# Reading CSV files
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CsvTable:
    """A CSV file as text cells: its ``columns`` (the header) and ``cells[column] -> [rows]``."""

    path: str
    columns: tuple[str, ...]
    cells: dict[str, list[str]]

    @property
    def n_rows(self) -> int:
        return len(next(iter(self.cells.values()))) if self.cells else 0

    def numeric(self, names: list[str] | tuple[str, ...]) -> np.ndarray:
        """The columns ``names`` as numbers ``[rows, len(names)]`` (float64); a cell that is not a finite
        number is a :class:`DataError` naming the file, the column and the row (as a spreadsheet counts it:
        the header is row 1)."""
        out = np.empty((self.n_rows, len(names)), dtype=np.float64)
        for j, name in enumerate(names):
            values = self.cells[name]
            try:
                out[:, j] = np.asarray(values, dtype=np.float64)
            except ValueError:
                out[:, j] = [_number(v) for v in values]
            bad = np.flatnonzero(~np.isfinite(out[:, j]))
            if bad.size:
                i = int(bad[0])
                what = "is empty" if not values[i] else f"holds {excerpt(values[i], 20)}"
                raise DataError(f"{self.path}: column {name!r} must hold numbers, but row {i + 2} {what}; "
                                "every feature column must be numeric (remove or encode the column)")
        return out

    def label_column(self, name: str = "") -> str:
        """The label column: ``name``, or (``""``) the first of ``label``, ``target`` that the file has."""
        if name:
            if name not in self.cells:
                raise DataError(f"{self.path} has no column {name!r} (the label column); columns: "
                                f"{_names(self.columns)}")
            return name
        for n in LABEL_COLUMNS:
            if n in self.cells:
                return n
        raise DataError(f"{self.path} has no label column: name one 'label' or 'target' (columns: "
                        f"{_names(self.columns)})")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _names(columns: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(repr(c) for c in columns[:8])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > 8 else "")


def read_csv(path: str | os.PathLike, *, what: str = "table") -> CsvTable:
    """Read a CSV file with a header row into text cells (see :class:`CsvTable`).

    A missing, unreadable, empty or ragged file, or one with a duplicate or empty column
    name, is a :class:`DataError` naming the file (and the row).
    """
    where = os.fspath(path)
    try:
        raw = read_regular(path, limit=MAX_TABLE_BYTES, follow=True)
    except FileNotFoundError:
        raise DataError(f"{what} {where} does not exist") from None
    except NotRegular as e:
        raise DataError(f"{what} {where} {e}; give a CSV file") from None
    except OSError as e:
        raise DataError(f"cannot read {what} {where}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{what} {where} is not UTF-8 text (it starts {excerpt(raw, 24)}); save it as a CSV file "
                        "in UTF-8") from None
    try:
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    except csv.Error as e:
        raise DataError(f"{what} {where} is not a valid CSV file ({e})") from None
    if not rows:
        raise DataError(f"{what} {where} is empty; it needs a header row and one row per example")
    header = tuple(c.strip() for c in rows[0])
    if "" in header:
        raise DataError(f"{what} {where}: column {header.index('') + 1} of the header row has no name")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise DataError(f"{what} {where}: the header names column {dup[0]!r} twice")
    body = rows[1:]
    if not body:
        raise DataError(f"{what} {where} has a header row but no examples")
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise DataError(f"{what} {where}: row {i + 2} has {len(r)} cells, the header {len(header)}")
    cells = {name: [r[j].strip() for r in body] for j, name in enumerate(header)}
    return CsvTable(where, header, cells)


def sort_labels(labels: list[str] | set[str]) -> list[str]:
    """Distinct labels in their natural order: numerically when every label is a number, else as text.

    >>> sort_labels({"10", "9", "1"}), sort_labels({"b", "a"})
    (['1', '9', '10'], ['a', 'b'])
    """
    distinct = set(labels)
    try:
        return sorted(distinct, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(distinct)


def _digits_table() -> CsvTable:
    """scikit-learn's bundled digits as text cells (the demonstration table of ``path = ""``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    names = tuple(d.feature_names) + ("target",)
    cells = {n: [repr(float(v)) for v in d.data[:, j]] for j, n in enumerate(d.feature_names)}
    cells["target"] = [str(int(v)) for v in d.target]
    return CsvTable("scikit-learn's digits (task.path = '')", names, cells)


def _fraction_or_count(value: float) -> None:
    if value >= 1 and not float(value).is_integer():
        raise ValueError("must be a fraction < 1 or a whole count")


def _size(value: float, n: int) -> int:
    return int(round(value * n)) if value < 1 else int(value)


@dataclass(frozen=True)
class _Prepared:
    """A table read and split: standardised features ``x [rows, F]`` (float32), the feature names, the
    global classes (``(task, label)`` pairs; task ``""`` without a task column) with their rows
    (``rows [C, max]`` padded with -1, ``counts [C]``), and per split the tasks: ``task_classes [n, max]``
    (global class ids, -1 padded) and ``task_counts [n]``, plus their names."""

    source: str
    x: Tensor
    features: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_column: str
    classes: list[tuple[str, str]]
    rows: Tensor
    counts: Tensor
    task_names: dict[str, list[str]]
    task_classes: dict[str, Tensor]
    task_counts: dict[str, Tensor]


@functools.lru_cache(maxsize=4)
def _prepare(path: str, mtime_ns: int, label: str, task: str, features: str, split_seed: int, val_size: float,
             test_size: float) -> _Prepared:
    table = read_csv(path) if path else _digits_table()
    src = table.path
    label = table.label_column(label)
    if task and task not in table.cells:
        raise DataError(f"{src} has no column {task!r} (task.task_column); columns: {_names(table.columns)}")
    if task == label:
        raise DataError(f"{src}: task.task_column and the label column are both {label!r}; name two columns")
    if features:
        names = [f.strip() for f in features.split(",") if f.strip()]
        missing = [f for f in names if f not in table.cells]
        if missing:
            raise DataError(f"{src} has no column {missing[0]!r} (task.features); columns: {_names(table.columns)}")
        clash = [f for f in names if f in (label, task)]
        if clash:
            raise DataError(f"{src}: column {clash[0]!r} is named as a feature and as the label or task column")
    else:
        names = [c for c in table.columns if c not in (label, task)]
    if not names:
        raise DataError(f"{src} has no feature column besides the label column {label!r}")
    x_all = table.numeric(names)
    labels = table.cells[label]
    empty = [i for i, v in enumerate(labels) if not v]
    if empty:
        raise DataError(f"{src}: the label column {label!r} is empty in row {empty[0] + 2}; every row needs a label")
    tasks = table.cells[task] if task else [""] * len(labels)
    if task:
        empty = [i for i, v in enumerate(tasks) if not v]
        if empty:
            raise DataError(f"{src}: the task column {task!r} is empty in row {empty[0] + 2}")

    # global classes: (task, label) pairs, in (task, label) natural order
    task_list = sort_labels(set(tasks))
    classes: list[tuple[str, str]] = []
    for t in task_list:
        classes += [(t, lab) for lab in sort_labels({lab for tt, lab in zip(tasks, labels) if tt == t})]
    index = {c: i for i, c in enumerate(classes)}
    member = np.array([index[(t, lab)] for t, lab in zip(tasks, labels)])
    counts = np.bincount(member, minlength=len(classes))
    rows = torch.full((len(classes), int(counts.max())), -1, dtype=torch.int64)
    for c in range(len(classes)):
        idx = np.flatnonzero(member == c)
        rows[c, : len(idx)] = torch.from_numpy(idx)

    # the split: over classes (no task column) or over tasks
    g = torch.Generator().manual_seed(rng.derive_seed(split_seed, _SPLIT_KEY))
    units = task_list if task else list(range(len(classes)))
    n = len(units)
    n_val, n_test = _size(val_size, n), _size(test_size, n)
    what = "tasks" if task else "classes"
    if n_val + n_test >= n:
        raise DataError(f"{src}: task.val_size and task.test_size take {n_val} + {n_test} of the {n} {what} of "
                        f"column {task or label!r}, leaving none for meta-training; lower them")
    perm = torch.randperm(n, generator=g).tolist()
    part = {"test": sorted(perm[:n_test]), "val": sorted(perm[n_test:n_test + n_val]),
            "train": sorted(perm[n_test + n_val:])}
    task_names: dict[str, list[str]] = {}
    task_classes: dict[str, Tensor] = {}
    task_counts: dict[str, Tensor] = {}
    for s in SPLITS:
        if task:
            names_s = [task_list[i] for i in part[s]]
            lists = [[index[c] for c in classes if c[0] == t] for t in names_s]
        else:
            names_s = [""] if part[s] else []
            lists = [part[s]] if part[s] else []
        width = max([len(li) for li in lists], default=1)
        tc = torch.full((len(lists), max(width, 1)), -1, dtype=torch.int64)
        for i, li in enumerate(lists):
            tc[i, : len(li)] = torch.tensor(li, dtype=torch.int64)
        task_names[s], task_classes[s] = names_s, tc
        task_counts[s] = torch.tensor([len(li) for li in lists], dtype=torch.int64)

    # standardise with the meta-training split's rows
    train_classes = task_classes["train"][task_classes["train"] >= 0]
    train_rows = np.isin(member, train_classes.numpy())
    mean = x_all[train_rows].mean(0)
    std = x_all[train_rows].std(0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature is centred only
    x = torch.from_numpy(((x_all - mean) / std).astype(np.float32))
    return _Prepared(src, x, tuple(names), tuple(float(v) for v in mean), tuple(float(v) for v in std), label,
                     classes, rows, torch.from_numpy(counts), task_names, task_classes, task_counts)


@TASKS.register("table")
class Table(TaskFamily):
    """N-way K-shot classification from a labelled CSV table (numeric features; a class or task split)."""

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the table family."""

        path: str = opt("", "the CSV file (a header row; numeric feature columns, a label column); '': "
                            "scikit-learn's bundled digits as a table")
        label_column: str = opt("", "the label column ('': the column named label, else target)")
        task_column: str = opt("", "a column naming each row's task: split over tasks, each with its own classes "
                                   "('': one table of classes, split over classes)")
        features: str = opt("", "comma-separated feature columns ('': every other column)")
        ways: int = opt(3, "classes per task (N)", ge=2)
        shots: int = opt(1, "support rows per class (K)", ge=1)
        queries: int = opt(5, "query rows per class", ge=1)
        split_seed: int = opt(0, "seed of the class (or task) split", ge=0)
        val_size: float = opt(0.0, "validation classes (or tasks): a fraction (< 1) or a count", ge=0,
                              check=_fraction_or_count)
        test_size: float = opt(0.3, "test classes (or tasks): a fraction (< 1) or a count", ge=0,
                               check=_fraction_or_count)

        def check(self) -> None:
            if self.val_size < 1 and self.test_size < 1 and self.val_size + self.test_size >= 1:
                raise ValueError(f"val_size + test_size must leave classes for meta-training, got "
                                 f"{self.val_size} + {self.test_size}")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        c = self.config
        mtime = 0
        if c.path:
            try:
                mtime = os.stat(c.path).st_mtime_ns
            except OSError:
                mtime = -1  # read_csv says what is wrong
        self.data = _prepare(c.path, mtime, c.label_column, c.task_column, c.features, c.split_seed, c.val_size,
                             c.test_size)
        self._check_counts()

    # -- checks --------------------------------------------------------------------------------------
    def _eligible(self, split: str) -> Tensor:
        """``[n_tasks, max]`` bool: the classes of each task of ``split`` with enough rows for an episode."""
        tc = self.data.task_classes[split]
        need = self.config.shots + self.config.queries
        return (tc >= 0) & (self.data.counts[tc.clamp_min(0)] >= need)

    def _check_counts(self) -> None:
        d, c = self.data, self.config
        need = c.shots + c.queries
        col = repr(d.label_column)
        for s in ("train", "test"):
            tc = d.task_classes[s]
            if self.config.task_column:
                ok = self._eligible(s).sum(1) >= c.ways
                if not bool(ok.all()):
                    i = int((~ok).nonzero()[0, 0])
                    name = d.task_names[s][i]
                    n_ok = int(self._eligible(s)[i].sum())
                    raise DataError(f"{d.source}: task {name!r} (column {self.config.task_column!r}) of the {s} "
                                    f"split has {n_ok} classes (column {col}) with at least shots + queries = "
                                    f"{need} rows, fewer than ways = {c.ways}; lower task.ways, task.shots or "
                                    "task.queries, or remove the task's rows")
                if tc.shape[0] == 0:
                    raise DataError(f"{d.source}: the {s} split has no task; lower task.val_size or raise "
                                    "task.test_size")
                continue
            ids = tc[tc >= 0]
            short = [int(i) for i in ids if int(d.counts[i]) < need]
            if short:
                cls = d.classes[short[0]][1]
                raise DataError(f"{d.source}: class {cls!r} (column {col}) has {int(d.counts[short[0]])} rows, fewer "
                                f"than shots + queries = {need}; lower task.shots or task.queries, or remove the "
                                "class's rows")
            if ids.numel() < c.ways:
                raise DataError(self._too_few(s, ids.numel()))

    def _too_few(self, split: str, n: int) -> str:
        d, c = self.data, self.config
        fix = "raise task.test_size" if split == "test" else (
            "raise task.val_size" if split == "val" else "lower task.val_size or task.test_size")
        return (f"{d.source}: the {split} split has {n} classes (column {d.label_column!r}), fewer than ways = "
                f"{c.ways}; lower task.ways, or {fix}")

    # -- what is in each split -----------------------------------------------------------------------
    def classes(self, split: Split = "train") -> list[str]:
        """The labels of the classes of ``split`` (``task/label`` with a task column), in the order
        ``Episode.classes`` counts them for the meta-training split."""
        tc = self.data.task_classes[split]
        ids = tc[tc >= 0].tolist()
        return [f"{t}/{lab}" if self.config.task_column else lab for t, lab in (self.data.classes[i] for i in ids)]

    def tasks(self, split: Split = "train") -> list[str]:
        """The tasks of ``split`` (the task column's values; empty without one)."""
        return list(self.data.task_names[split]) if self.config.task_column else []

    @property
    def features(self) -> tuple[str, ...]:
        """The feature columns, in the order of the inputs' last dimension."""
        return self.data.features

    def user_inputs(self) -> dict[str, Any]:
        """How a user's rows are prepared for a learner trained on this family (used by ``metalens predict``,
        the estimators and model files): the feature columns by name and the meta-training split's mean and
        standard deviation of each."""
        d = self.data
        return {"columns": list(d.features), "mean": list(d.mean), "std": list(d.std), "standardize": "fixed"}

    # -- the contract --------------------------------------------------------------------------------
    @property
    def spec(self) -> TaskSpec:
        n_train = int((self.data.task_classes["train"] >= 0).sum())
        return TaskSpec(kind="classification", x_shape=(len(self.data.features),), num_classes=self.config.ways,
                        train_classes=n_train)

    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` N-way K-shot tasks of ``split``.

        Returns ``support_x [T, N*K, F]``, ``support_y [T, N*K]`` (int64), ``query_x [T, N*Q, F]``,
        ``query_y [T, N*Q]``, each set in a random order; meta-training tasks carry ``classes [T, N]``,
        the index in :meth:`classes` of each local label's class.
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        d, c, g = self.data, self.config, generator
        T, N, K, Q = n_tasks, c.ways, c.shots, c.queries
        eligible = self._eligible(split)  # [n, max]
        usable = (eligible.sum(1) >= N).nonzero()[:, 0]
        if usable.numel() == 0:
            n = int(eligible.sum(1).max()) if eligible.numel() else 0
            raise DataError(self._too_few(split, n) if not c.task_column else
                            f"{d.source}: no task of the {split} split has {N} classes with enough rows; lower "
                            "task.ways, task.shots or task.queries")
        task = usable[torch.randint(usable.numel(), (T,), generator=g)]  # [T]
        keys = torch.rand(T, eligible.shape[1], generator=g).masked_fill(~eligible[task], 2.0)
        slot = torch.argsort(keys, dim=1)[:, :N]  # [T, N] positions of the drawn classes in their task
        cls = d.task_classes[split][task[:, None], slot]  # [T, N] global class ids
        M = d.rows.shape[1]
        rkeys = torch.rand(T, N, M, generator=g).masked_fill(torch.arange(M) >= d.counts[cls][..., None], 2.0)
        picks = torch.argsort(rkeys, dim=2)[..., : K + Q]  # [T, N, K+Q] distinct rows of each class
        x = d.x[d.rows[cls[..., None], picks]]  # [T, N, K+Q, F]

        def shuffled(part: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
            y = torch.arange(N).repeat_interleave(per_class).expand(T, -1)  # [T, P] class-major
            xs = part.reshape(T, N * per_class, -1)
            perm = torch.argsort(torch.rand(T, N * per_class, generator=g), dim=1)
            return xs[torch.arange(T)[:, None], perm], y.gather(1, perm)

        sx, sy = shuffled(x[:, :, :K], K)
        qx, qy = shuffled(x[:, :, K:], Q)
        classes = None
        if split == "train":  # index within classes("train"), the order the split lists them
            order = d.task_classes["train"]
            flat = order[order >= 0]
            lookup = torch.full((len(d.classes),), -1, dtype=torch.int64)
            lookup[flat] = torch.arange(flat.numel())
            classes = lookup[cls]
        return Episode(sx, sy, qx, qy, num_classes=N, classes=classes)
