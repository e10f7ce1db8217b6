"""Reports: what a run or a study produced, as JSON for machines and Markdown (+ PNG figures) for people.

A :class:`Report` is a list of blocks (text and :class:`Table` s), figures, the
evaluator's output and the **checks**: every claim a study tests, as
``{"name": {"value", "target", "holds"}}`` in ``report.json`` and as a table at the top
of ``report.md``. Numbers are formatted in one place (:func:`fmt`).

>>> r = Report("A title")
>>> r.check("oracle_first", at_most(0.10, 0.25))
>>> r.text("Some words.")
>>> r.table(Table(["model", "mse"], [["`maml`", fmt(0.1234)]]))
>>> r.to_json()["checks"]
{'oracle_first': {'value': 0.1, 'target': '<= 0.25', 'holds': True}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metalens.evaluate import Evaluation, Metric, summarize
from metalens.files import write_json_atomic, write_text_atomic

__all__ = ["Check", "Table", "Report", "at_most", "at_least", "not_below", "above", "oracle_bound", "fmt", "metrics_table",
           "METRICS_NOTE"]

METRICS_NOTE = ("Metrics are per target point, averaged per task, then mean ± 95% CI half-width (1.96 std / sqrt(n)) "
                "over held-out tasks; the oracle is scored on the very same tasks.")


def fmt(m: Metric | Mapping[str, float] | float | None, digits: int = 4, *, percent: bool = False) -> str:
    """A metric as ``mean ± ci95`` (or a plain number): ``–`` for missing, ``diverged`` for NaN.

    >>> fmt(Metric(0.51234, 0.0112), percent=True), fmt({"mean": 1.5, "ci95": 0.25}, 2), fmt(None)
    ('51.23% ± 1.12', '1.50 ± 0.25', '–')
    """
    if m is None:
        return "–"
    if isinstance(m, Metric):
        mean, ci = m.mean, m.ci95
    elif isinstance(m, Mapping):
        mean, ci = m["mean"], m.get("ci95")
    else:
        mean, ci = float(m), None
    if math.isnan(mean):
        return "diverged"
    scale, unit, d = (100.0, "%", 2) if percent else (1.0, "", digits)
    text = f"{scale * mean:.{d}f}{unit}"
    return text if ci is None else f"{text} ± {scale * ci:.{d}f}"


@dataclass(frozen=True)
class Check:
    """One claim a study tests: the measured ``value``, the ``target`` it is held against, whether it ``holds``."""

    value: Any
    target: Any
    holds: bool

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "holds": bool(self.holds)}


def at_most(value: float, bound: float) -> Check:
    """The claim ``value <= bound``."""
    return Check(value, f"<= {bound:g}", bool(value <= bound))


def at_least(value: float, bound: float) -> Check:
    """The claim ``value >= bound``."""
    return Check(value, f">= {bound:g}", bool(value >= bound))


def not_below(diff: np.ndarray, what: str) -> Check:
    """The claim that per-task paired differences are not below zero beyond chance: mean >= -(95% CI)."""
    m = summarize(diff)
    return Check(round(m.mean, 6), f">= -{m.ci95:.2g} ({what}, 95% CI)", bool(m.mean >= -m.ci95))


def above(diff: np.ndarray, what: str) -> Check:
    """The claim that per-task paired differences are above zero beyond chance: mean > 95% CI."""
    m = summarize(diff)
    return Check(round(m.mean, 6), f"> {m.ci95:.2g} ({what}, 95% CI)", bool(m.mean > m.ci95))


def oracle_bound(ev: Evaluation) -> Check | None:
    """The claim that ``ev``'s learner does not beat the Bayes-optimal oracle beyond chance: its paired excess
    loss over the oracle on the same tasks (accuracy: its shortfall) is at least minus the 95% CI. None when the
    evaluation has no oracle."""
    if ev.oracle_per_task is None:
        return None
    key = "accuracy" if "accuracy" in ev.per_task else "mse"
    diff = ev.per_task[key] - ev.oracle_per_task[key]
    return not_below(-diff if key == "accuracy" else diff, f"paired {key} excess over the oracle")


@dataclass
class Table:
    """A Markdown table: ``columns`` and ``rows`` of cells already formatted as text."""

    columns: Sequence[str]
    rows: list[Sequence[Any]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


def metrics_table(evals: Sequence[Evaluation]) -> str:
    """The evaluator's output: one row per evaluation, its metrics beside the oracle's on the same tasks."""
    names: list[str] = []
    for e in evals:
        for k in list(e.metrics) + list(e.oracle or {}):
            if k not in names:
                names.append(k)
    diverged = any(getattr(e, "diverged", 0) for e in evals)  # tasks left out of the metrics, if any
    table = Table(["learner", "task", "episodes"] + (["diverged"] if diverged else []) + names
                  + [f"oracle {k}" for k in names])
    for e in evals:
        row = [f"`{e.learner}`", f"`{e.task}`", str(e.episodes)] + ([str(e.diverged)] if diverged else [])
        row += [fmt(e.metrics.get(k), percent=k == "accuracy") for k in names]
        row += [fmt((e.oracle or {}).get(k), percent=k == "accuracy") for k in names]
        table.rows.append(row)
    return table.markdown()


class Report:
    """What a study (or the tour) shows: text, tables, figures, checks and the evaluator's output.

    ``data`` holds study-specific results for ``report.json`` (JSON-ready values).
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[str] = []
        self.checks: dict[str, Check] = {}
        self.figures: list[Path] = []
        self.evaluations: list[Evaluation] = []
        self.data: dict[str, Any] = {}

    def text(self, text: str) -> None:
        self.blocks.append(text)

    def heading(self, text: str) -> None:
        self.blocks.append(f"## {text}")

    def table(self, table: Table) -> None:
        self.blocks.append(table.markdown())

    def check(self, name: str, check: Check) -> None:
        if name in self.checks:
            raise ValueError(f"check {name!r} is recorded twice")
        self.checks[name] = check

    def figure(self, path: Path | None) -> None:
        if path is not None:
            self.figures.append(Path(path))

    def checks_table(self) -> str:
        table = Table(["check", "value", "target", "holds"])
        for name, c in self.checks.items():
            value = f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value)
            table.rows.append([f"`{name}`", value, str(c.target), "yes" if c.holds else "**no**"])
        return table.markdown()

    def markdown(self, out: Path, *, preamble: Sequence[str] = ()) -> str:
        md = [f"# {self.title}", "", *[p for line in preamble for p in (line, "")]]
        if self.checks:
            held = sum(c.holds for c in self.checks.values())
            md += [f"## Checks ({held} of {len(self.checks)} hold)", "", self.checks_table(), ""]
        for block in self.blocks:
            md += [block, ""]
        if self.evaluations:
            md += ["## Evaluator output", "", metrics_table(self.evaluations), "", METRICS_NOTE, ""]
        for f in self.figures:
            md += [f"![{f.stem}]({f.relative_to(out).as_posix()})", ""]
        return "\n".join(md)

    def to_json(self, out: Path | None = None, **meta: Any) -> dict[str, Any]:
        return {"title": self.title, **meta,
                "checks": {k: c.to_json() for k, c in self.checks.items()},
                "evaluations": [e.to_json() for e in self.evaluations],
                "figures": [f.relative_to(out).as_posix() if out is not None else f.as_posix() for f in self.figures],
                **self.data}

    def write(self, out: str | Path, *, preamble: Sequence[str] = (), **meta: Any) -> Path:
        """Write ``report.md`` and ``report.json`` into ``out`` (atomically); returns the Markdown path.

        ``preamble``: paragraphs shown under the title (the command, the machine); ``meta``: their
        values for ``report.json`` (``command``, ``hardware``, ``seconds``, ...).
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "report.md"
        write_text_atomic(path, self.markdown(out, preamble=preamble))
        write_json_atomic(out / "report.json", self.to_json(out, **meta))
        return path
