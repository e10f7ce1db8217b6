"""A trained learner on a user's data: read a support set and queries, prepare them as in training, predict.

``metalens predict RUN --support S --query Q`` and the scikit-learn estimators
(:mod:`metalens.estimators`) go through this module:

- :func:`prepare` brings inputs to what the learner expects (:class:`~metalens.model_file.Inputs`):
  images to ``[channels, size, size]``, table rows to the learner's width (matched by column name
  for a ``table``-trained learner, zero-padded or truncated for a ``synthetic_tables``-trained
  one, else the same number of columns), standardised as its family standardised them;
- :func:`classify` and :func:`regress` run the learner's ``predict`` on one task (the support set
  and the queries) and return class probabilities, or the predictive mean and standard deviation;
- :func:`read_support`, :func:`read_queries` read folders of images (decoded by
  :func:`metalens.data.load_image` with the family's size, exactly as in training) and CSV files.

**The number of classes.** A support set with ``n`` classes is used as it is when ``n`` is the
learner's ``spec.num_classes``; when the learner's parameters do not depend on the number of
classes (``protonet``, ``matching``, ``pretrain`` on an image or table family) it is rebuilt for
``n`` with the same weights; a learner trained on tasks with a varying number of classes
(``synthetic_tables``) accepts up to its ``max_classes`` (the outputs of absent classes are
dropped and the rest renormalised). Anything else is refused with one line naming the numbers.

**Queries.** The queries go through the learner's ``predict`` together, ``query_batch`` at a
time (default: all at once). For learners whose queries never interact (the in-context
transformer, MLP embeddings, Neural Processes, gradient learners with an MLP) the predictions do
not depend on it; learners with Conv-4's batch norm normalise each task's support and query
images together (as in their evaluation), so a query's prediction depends on the others in its
batch: ``query_batch = 1`` predicts each on its own.

Every problem with the data is a :class:`~metalens.errors.DataError` whose one-line message names
what differs (the CLI exits with code 2).

>>> import torch, metalens
>>> from metalens.model_file import Model
>>> family = metalens.make_task("synthetic_tables", max_features=3, max_classes=4)
>>> model = Model.of(metalens.make_learner("protonet", family, backbone="identity"), family)
>>> sx = prepare(model, torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.1, 0.2], [5.2, 4.9]]))
>>> classify(model, sx, torch.tensor([0, 1, 0, 1]), 2, prepare(model, torch.tensor([[4.0, 4.5]]))).argmax(-1)
tensor([1])
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalens.data.images import IMAGE_SUFFIXES, load_image
from metalens.errors import ConfigError, DataError, NumericalError, RunFailed
from metalens.files import write_text_atomic
from metalens.learners.base import Learner
from metalens.model_file import Model, load_model
from metalens.tasks.synthetic_tables import fit_width, standardize_by_support
from metalens.tasks.table import LABEL_COLUMNS, CsvTable, read_csv, sort_labels

__all__ = ["prepare", "classifier_for", "classify", "regress", "read_support", "read_queries", "predict_files",
           "write_output", "Support"]


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def prepare(model: Model, x: Any, *, what: str = "X") -> Tensor:
    """Inputs ``[n, ...]`` (an array or tensor) as the learner's ``[n, *x_shape]`` float32.

    Images: ``[n, C, H, W]`` as the learner's ``(C, H, W)``; ``[n, H, W]`` for grey images;
    ``[n, C*H*W]`` (rows of pixels). Tables: ``[n, F]``; ``F`` must be the learner's width, except
    for learners whose family pads features (then zero-padded or truncated). A ``fixed``
    standardisation (the ``table`` family's) is applied here; a per-task one (``support``) by
    :func:`classify` and :func:`regress`, which see the support set. ``what`` names the inputs in
    errors.
    """
    inp = model.inputs
    try:
        x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"{what} must be an array of numbers, got {type(x).__name__}") from None
    if x.is_complex() or x.dtype == torch.bool:
        raise DataError(f"{what} must hold real numbers, got {x.dtype}")
    x = x.to(torch.float32)
    if x.dim() < 2 or x.shape[0] < 1:
        raise DataError(f"{what} must hold at least one example in its first dimension, got shape {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} holds non-finite values (nan or inf)")
    n, shape = x.shape[0], inp.x_shape
    if inp.image is not None:
        C, H, W = shape
        if x.dim() == 2 and x.shape[1] == C * H * W:
            return x.view(n, C, H, W)
        if x.dim() == 3 and C == 1 and tuple(x.shape[1:]) == (H, W):
            return x[:, None]
        if x.dim() == 4 and tuple(x.shape[1:]) == tuple(shape):
            return x
        if x.dim() == 4 or (x.dim() == 3 and C == 1):
            got = tuple(x.shape[1:]) if x.dim() == 4 else (1, *x.shape[1:])
            diff = []
            if got[0] != C:
                diff.append(f"{got[0]} channel(s) instead of {C}")
            if got[1:] != (H, W):
                diff.append(f"{_dims(got[1:])} pixels instead of {_dims((H, W))}")
            raise DataError(f"{what} holds images of {_dims(got)} (channels x height x width): {', '.join(diff)}; "
                            f"{model.name} takes {_dims(shape)} images: decode image files with "
                            f"metalens.data.load_image(path, size={H}), which converts them as in training")
        if x.dim() == 2:
            F = int(x.shape[1])
            side = round((F / C) ** 0.5)
            looks = (f" (as {F // (H * W)}-channel {_dims((H, W))} images would)" if F % (H * W) == 0 else
                     f" (as {C}-channel {side}x{side} images would)" if C * side * side == F else "")
            raise DataError(f"{what} has {F} values per row{looks}; {model.name} takes {_dims(shape)} images "
                            f"({C * H * W} values per row)")
        raise DataError(f"{what} has shape {list(x.shape)}; {model.name} takes images "
                        f"[n, {', '.join(map(str, shape))}]")
    if len(shape) != 1:  # a family with other inputs: the exact layout
        if tuple(x.shape[1:]) != tuple(shape):
            raise DataError(f"{what} has inputs of shape {list(x.shape[1:])}; {model.name} takes {list(shape)}")
        return x
    (d,) = shape
    if x.dim() != 2:
        raise DataError(f"{what} has shape {list(x.shape)}; {model.name} takes rows of {d} features, not images")
    F = x.shape[1]
    if F != d:
        if not inp.pad_features:
            raise DataError(f"{what} has {F} feature column(s); {model.name} takes {d}")
        x = fit_width(x, d)
    if inp.standardize == "fixed":
        x = (x - torch.tensor(inp.mean, dtype=x.dtype)) / torch.tensor(inp.std, dtype=x.dtype)
    return x


def _standardized(model: Model, sx: Tensor, qx: Tensor) -> tuple[Tensor, Tensor]:
    if model.inputs.standardize != "support":
        return sx, qx
    s, q = standardize_by_support(sx[None], qx[None], clip=model.inputs.clip)
    return s[0], q[0]


# ------------------------------------------------------------------------------------------------
# Running the learner
# ------------------------------------------------------------------------------------------------
def classifier_for(model: Model, n: int) -> Learner:
    """The learner that classifies among ``n`` classes (see the module docstring), or a one-line refusal."""
    spec = model.spec
    if not spec.is_classification:
        raise ConfigError(f"{model.name} is a regression learner: give the support set a numeric target (a 'target' "
                          "column), or use FewShotRegressor")
    if n < 2:
        raise DataError(f"the support set has {n} class; a few-shot classifier needs at least 2 classes")
    N = spec.num_classes
    assert N is not None
    if n == N:
        return model.learner
    other = model.for_classes(n)  # parameters that do not depend on the number of classes: any n
    if other is not None:
        return other
    limits = model.inputs.class_range
    if limits is not None:
        if n > limits[1]:
            raise DataError(f"the support set has {n} classes, more than the {limits[1]} that {model.name} was "
                            f"trained for")
        return model.learner  # the outputs of classes beyond n are dropped (see classify)
    raise DataError(f"the support set has {n} classes, but {model.name} was trained {N}-way and its parameters "
                    f"depend on the number of classes: give exactly {N} classes")


def _chunks(qx: Tensor, query_batch: int | None) -> list[Tensor]:
    size = qx.shape[0] if not query_batch else int(query_batch)
    return [qx[i: i + size] for i in range(0, qx.shape[0], size)]


def classify(model: Model, support_x: Tensor, support_y: Tensor, n_classes: int, query_x: Tensor, *,
             query_batch: int | None = None) -> Tensor:
    """Class probabilities ``[Q, n_classes]`` (float64) of the queries given the support set.

    ``support_x [S, *x]`` and ``query_x [Q, *x]`` from :func:`prepare`; ``support_y [S]`` int64 labels in
    ``[0, n_classes)``, every class present.
    """
    support_y = torch.as_tensor(support_y, dtype=torch.int64)
    learner = classifier_for(model, n_classes)
    if support_y.dim() != 1 or support_y.shape[0] != support_x.shape[0]:
        raise DataError(f"support_y must hold one label per support example ({support_x.shape[0]}), got shape "
                        f"{list(support_y.shape)}")
    if int(support_y.min()) < 0 or int(support_y.max()) >= n_classes:
        raise DataError(f"support labels must lie in [0, {n_classes}), got "
                        f"{int(support_y.min())}..{int(support_y.max())}")
    present = torch.bincount(support_y, minlength=n_classes)
    if bool((present == 0).any()):
        raise DataError(f"class {int((present == 0).nonzero()[0, 0])} has no example in the support set")
    sx, qx = _standardized(model, support_x, query_x)
    out = []
    with torch.no_grad():
        for q in _chunks(qx, query_batch):
            dist = learner.predict(sx[None], support_y[None], q[None])
            logits = dist.logits[0, :, :n_classes].double()  # classes absent from the support set dropped
            out.append(torch.softmax(logits, -1))
    probs = torch.cat(out)
    if not bool(torch.isfinite(probs).all()):
        raise NumericalError(f"{model.name} gave non-finite predictions on this support set")
    return probs


def regress(model: Model, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
            query_batch: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Predictive mean ``[Q, dy]`` and standard deviation ``[Q, dy]`` (None for an MSE-trained learner, whose
    prediction is a mean only) of the queries given the support set ``support_y [S, dy]``."""
    spec = model.spec
    if spec.is_classification:
        raise ConfigError(f"{model.name} is a classifier: give the support set labels, or use FewShotClassifier")
    support_y = torch.as_tensor(support_y, dtype=torch.float32)
    if support_y.dim() == 1:
        support_y = support_y[:, None]
    if support_y.shape[-1] != spec.y_dim:
        raise DataError(f"the support set has {support_y.shape[-1]} target(s) per example; {model.name} predicts "
                        f"{spec.y_dim}")
    sx, qx = _standardized(model, support_x, query_x)
    means, stds = [], []
    with torch.no_grad():
        for q in _chunks(qx, query_batch):
            dist = model.learner.predict(sx[None], support_y[None], q[None])
            means.append(dist.mean[0].double())
            if model.learner.probabilistic:
                stds.append(dist.stddev[0].double())
    mean = torch.cat(means)
    std = torch.cat(stds) if stds else None
    if not bool(torch.isfinite(mean).all()) or (std is not None and not bool(torch.isfinite(std).all())):
        raise NumericalError(f"{model.name} gave non-finite predictions on this support set")
    return mean, std


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Support:
    """A support set read from files: inputs ``x [S, *x]`` (prepared) and ``y``: the index in ``classes`` (the
    labels, in their natural order) of each example's label ``[S]``, or, for a regression (``classes`` None),
    the targets ``[S, 1]``; ``columns``: a CSV file's feature columns, which a query file must have too."""

    x: Tensor
    y: Tensor
    classes: list[str] | None
    columns: list[str] | None = None  # a CSV support set's feature columns


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name != "__MACOSX"


def _image_files(folder: Path, *, recursive: bool) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if not _visible(p):
            continue
        if p.is_symlink():
            raise DataError(f"{p} is a symbolic link; links inside a data folder are not followed (their target "
                            "could be anything): replace it with the file it points to")
        if p.is_dir():
            if recursive:
                out += _image_files(p, recursive=True)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)
    return out


def _need_images(model: Model, what: str) -> dict[str, Any]:
    if model.inputs.image is None:
        width = model.inputs.x_shape[-1] if len(model.inputs.x_shape) == 1 else _dims(model.inputs.x_shape)
        raise DataError(f"{what} holds images, but {model.name} takes rows of {width} features: give a CSV file")
    return model.inputs.image


def _decode(model: Model, files: list[Path]) -> Tensor:
    img = model.inputs.image
    assert img is not None
    x = torch.stack([load_image(f, **img) for f in files])  # decoded as the family decodes an evaluation image
    return prepare(model, x, what=str(files[0].parent))


def _rows(model: Model, table: CsvTable, drop: Sequence[str],
          like: Sequence[str] | None = None) -> tuple[Tensor, list[str]]:
    """The feature columns of ``table`` (all but ``drop``) and their names, matched by name to the learner's
    columns (a ``table``-trained learner) or else to ``like`` (the support set's, for a query file)."""
    names = [c for c in table.columns if c not in drop]
    if not names:
        raise DataError(f"{table.path} has no feature column")
    want, whose = (model.inputs.columns, model.name) if model.inputs.columns is not None else (like, "the support set")
    if want is not None:
        missing = [c for c in want if c not in names]
        if missing:
            raise DataError(f"{table.path} has no column {missing[0]!r}; {whose} has the columns "
                            f"{', '.join(repr(c) for c in want[:6])}{', ...' if len(want) > 6 else ''}")
        extra = [c for c in names if c not in want]
        if extra:
            raise DataError(f"{table.path} has a column {extra[0]!r} that {whose} does not have; remove it")
        names = list(want)
    return prepare(model, torch.from_numpy(table.numeric(names)), what=table.path), names


def read_support(model: Model, path: str | os.PathLike) -> Support:
    """A support set: a folder ``<label>/<image files>`` (images; the folder names are the labels) or a CSV file
    (feature columns and a ``label`` or ``target`` column; a numeric target for a regression learner)."""
    path = Path(path)
    classification = model.spec.is_classification
    if path.is_dir():
        _need_images(model, f"support folder {path}")
        if not classification:
            raise DataError(f"{model.name} is a regression learner: give --support a CSV file with a 'target' column")
        loose = _image_files(path, recursive=False)
        if loose:
            raise DataError(f"support folder {path} holds image files outside class folders ({loose[0].name}); put "
                            "each class's images in a folder named after its label")
        folders = [p for p in sorted(path.iterdir()) if _visible(p) and p.is_dir()]
        if not folders:
            raise DataError(f"support folder {path} holds no class folders; lay it out as {path}/<label>/<images>")
        names = sort_labels([p.name for p in folders])
        files, labels = [], []
        for i, name in enumerate(names):
            found = _image_files(path / name, recursive=True)
            if not found:
                raise DataError(f"class folder {path / name} holds no images ({', '.join(IMAGE_SUFFIXES)}); every "
                                "class needs at least one example")
            files += found
            labels += [i] * len(found)
        return Support(_decode(model, files), torch.tensor(labels), names)
    if not path.exists():
        raise DataError(f"support set {path} does not exist")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise DataError(f"support set {path} is one image; give a folder <label>/<images> or a CSV file")
    table = read_csv(path, what="support set")
    col = table.label_column("")  # label, else target; neither is ever a feature
    x, columns = _rows(model, table, drop=LABEL_COLUMNS)
    if not classification:
        if model.spec.y_dim != 1:
            raise DataError(f"{model.name} predicts {model.spec.y_dim} targets; a CSV support set holds one")
        return Support(x, torch.from_numpy(table.numeric([col])).float(), None, columns)
    values = table.cells[col]
    empty = [i for i, v in enumerate(values) if not v]
    if empty:
        raise DataError(f"{table.path}: the label column {col!r} is empty in row {empty[0] + 2}")
    names = sort_labels(values)
    index = {c: i for i, c in enumerate(names)}
    return Support(x, torch.tensor([index[v] for v in values]), names, columns)


def read_queries(model: Model, paths: Sequence[str | os.PathLike], *,
                 columns: Sequence[str] | None = None) -> tuple[Tensor, list[str]]:
    """Query inputs ``[Q, *x]`` and their names: a folder of images (searched recursively), image files, or one
    CSV file of feature columns (a ``label`` or ``target`` column in it is ignored), matched by name to
    ``columns`` (the support file's) when given."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no query given")
    if len(paths) == 1 and paths[0].is_file() and paths[0].suffix.lower() not in IMAGE_SUFFIXES:
        table = read_csv(paths[0], what="query set")
        x, _ = _rows(model, table, drop=LABEL_COLUMNS, like=columns)
        return x, [str(i + 1) for i in range(x.shape[0])]
    files: list[Path] = []
    names: list[str] = []
    for p in paths:
        if p.is_dir():
            found = _image_files(p, recursive=True)
            if not found:
                raise DataError(f"query folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
            names += [f.relative_to(p).as_posix() if len(paths) == 1 else str(f) for f in found]
        elif not p.exists():
            raise DataError(f"query {p} does not exist")
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
            names.append(str(p))
        else:
            raise DataError(f"query {p} is not an image ({', '.join(IMAGE_SUFFIXES)}); give image files, a folder of "
                            "images, or one CSV file")
    _need_images(model, f"query {paths[0]}")
    return _decode(model, files), names


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def _number(v: float) -> float:
    return round(float(v), 6)


def predict_files(run: str | os.PathLike, support: str | os.PathLike, queries: Sequence[str | os.PathLike], *,
                  fmt: str = "csv", learner_options: dict[str, Any] | None = None,
                  query_batch: int | None = None) -> tuple[str, int]:
    """``metalens predict``: the predictions for ``queries`` given ``support``, as CSV or JSON text, and their
    number. Classification: one row per query with the predicted label and the probability of every class
    (columns ``p_<label>``); regression: the predictive mean (and standard deviation, for a probabilistic
    learner)."""
    model = load_model(run, **(learner_options or {}))
    sup = read_support(model, support)
    qx, names = read_queries(model, queries, columns=sup.columns)
    rows: list[dict[str, Any]] = []
    if sup.classes is not None:
        probs = classify(model, sup.x, sup.y, len(sup.classes), qx, query_batch=query_batch)
        for name, p in zip(names, probs.tolist()):
            rows.append({"query": name, "label": sup.classes[max(range(len(p)), key=p.__getitem__)],
                         "probabilities": {c: _number(v) for c, v in zip(sup.classes, p)}})
    else:
        mean, std = regress(model, sup.x, sup.y, qx, query_batch=query_batch)
        for i, name in enumerate(names):
            row: dict[str, Any] = {"query": name, "mean": _number(mean[i, 0])}
            if std is not None:
                row["std"] = _number(std[i, 0])
            rows.append(row)
    if fmt == "json":
        head = {"model": model.name, "source": model.source, "step": model.step}
        if sup.classes is not None:
            head["classes"] = sup.classes
        return json.dumps({**head, "predictions": rows}) + "\n", len(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if sup.classes is not None:
        w.writerow(["query", "label", *[f"p_{c}" for c in sup.classes]])
        for r in rows:
            w.writerow([r["query"], r["label"], *[f"{v:.6f}" for v in r["probabilities"].values()]])
    else:
        cols = ["query", "mean"] + (["std"] if rows and "std" in rows[0] else [])
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
    return buf.getvalue(), len(rows)


def write_output(path: str | os.PathLike, text: str) -> None:
    """Write predictions to ``path`` atomically (an existing file is replaced)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name")
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise RunFailed(f"cannot write {path}: {e.strerror or e}") from None
