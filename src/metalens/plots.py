"""Figures for reports, drawn with matplotlib on its file backend (no screen needed).

Every figure of metalens is made here or through :func:`pyplot`, which selects the
non-interactive ``Agg`` backend once, and written by :func:`save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from metalens.episode import Episode
from metalens.learners.base import Learner
from metalens.tasks.base import TaskFamily

__all__ = ["pyplot", "save_figure", "plot_regression_tasks", "plot_decision_regions", "plot_training_curves",
           "plot_image_task", "draw_regression_panel", "draw_decision_regions", "plot_panels", "plot_adaptation_steps",
           "plot_curve_grid", "plot_metric_curves"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the ``Agg`` backend (files only), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write (as PNG, creating folders) and close a matplotlib figure."""
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_regression_tasks(
    path: str | Path,
    family: TaskFamily,
    learners: dict[str, Learner],
    *,
    n_tasks: int = 4,
    seed: int = 0,
    title: str = "",
) -> Path | None:
    """Predictions of each learner on a few held-out 1-D tasks, against the oracle.

    The oracle's predictive mean and a ±2 standard-deviation band are drawn on a
    dense grid over the family's input range. Returns None for families that are
    not 1-D regression.
    """
    spec = family.spec
    if spec.is_classification or spec.x_shape != (1,) or spec.x_range is None:
        return None
    plt = pyplot()
    ep = family.eval_episodes(seed, n_tasks)
    lo, hi = spec.x_range
    grid = torch.linspace(lo, hi, 200, dtype=ep.query_x.dtype).view(1, -1, 1).expand(n_tasks, -1, -1)
    fig, axes = plt.subplots(1, n_tasks, figsize=(4 * n_tasks, 3.2), sharey=True, squeeze=False)
    with torch.no_grad():
        preds = {name: lrn.predict(ep.support_x, ep.support_y, grid, support_mask=ep.support_mask).mean
                 for name, lrn in learners.items()}
        oracle = spec.oracle(ep.support_x, ep.support_y, grid, support_mask=ep.support_mask) if spec.oracle else None
    xs = grid[0, :, 0].numpy()
    for t, ax in enumerate(axes[0]):
        if oracle is not None:
            mean, sd = oracle.mean[t, :, 0].numpy(), oracle.variance[t, :, 0].sqrt().numpy()
            ax.fill_between(xs, mean - 2 * sd, mean + 2 * sd, color="0.85", label="oracle ±2 sd")
            ax.plot(xs, mean, color="k", lw=1.5, label="oracle mean")
        for name, p in preds.items():
            ax.plot(xs, p[t, :, 0].numpy(), lw=1.2, label=name)
        m = ep.support_mask[t] if ep.support_mask is not None else slice(None)
        ax.scatter(ep.support_x[t][m][:, 0].numpy(), ep.support_y[t][m][:, 0].numpy(), color="crimson",
                   zorder=5, s=18, label="support")
        ax.set_title(f"held-out task {t}")
        ax.set_xlabel("x")
    axes[0][0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_decision_regions(
    path: str | Path,
    episode: Episode,
    predictors: Mapping[str, Callable[..., Distribution]],
    *,
    task: int = 0,
    resolution: int = 200,
    margin: float = 1.0,
    title: str = "",
) -> Path:
    """The decision regions of 2-D classifiers on one task, side by side.

    ``predictors`` maps a name to a ``predict``-like callable (a learner's ``predict``, or a
    family's ``oracle``). Each panel colours the plane by the predicted class (lighter
    where the prediction is less sure), with the support points as large outlined markers
    and the query points as small dots, and gives the accuracy on the task's queries.
    """
    if episode.support_x.shape[2:] != (2,) or not episode.is_classification:
        raise ValueError("plot_decision_regions needs a 2-D classification episode (x_shape (2,))")
    plt = pyplot()
    from matplotlib.colors import to_rgb

    ep = episode[task: task + 1]
    N = ep.num_classes
    pts = torch.cat([ep.support_x[0], ep.query_x[0]])
    lo, hi = pts.min(0).values - margin, pts.max(0).values + margin
    xs = torch.linspace(float(lo[0]), float(hi[0]), resolution)
    ys = torch.linspace(float(lo[1]), float(hi[1]), resolution)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], -1)[None].to(ep.support_x.dtype)  # [1, R*R, 2]
    colours = torch.tensor([to_rgb(f"C{n % 10}") for n in range(N)])  # [N, 3]
    fig, axes = plt.subplots(1, len(predictors), figsize=(4.2 * len(predictors), 4.2), squeeze=False)
    with torch.no_grad():
        for ax, (name, predict) in zip(axes[0], predictors.items()):
            probs = predict(ep.support_x, ep.support_y, grid, support_mask=ep.support_mask).probs[0]  # [R*R, N]
            conf, cls = probs.max(-1)
            rgb = colours[cls] * conf[:, None] + (1 - conf[:, None])  # fade to white when unsure
            ax.imshow(rgb.reshape(resolution, resolution, 3).numpy(), origin="lower", interpolation="nearest",
                      extent=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])), alpha=0.55)
            q = predict(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask).probs[0]
            acc = float((q.argmax(-1) == ep.query_y[0]).double().mean())
            for n in range(N):
                s = ep.support_y[0] == n
                ax.scatter(*ep.support_x[0][s].T.numpy(), s=110, color=f"C{n % 10}", edgecolors="k",
                           linewidths=1.5, zorder=4)
                qn = ep.query_y[0] == n
                ax.scatter(*ep.query_x[0][qn].T.numpy(), s=14, color=f"C{n % 10}", edgecolors="k",
                           linewidths=0.4, zorder=3)
            ax.set_title(f"{name}: query accuracy {100 * acc:.0f}%", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_training_curves(path: Path, curves: dict[str, list[tuple[int, float]]]) -> Path | None:
    """The training loss of each run against its step (a running mean over a tenth of the run; log scale)."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        steps, losses = zip(*points)
        k = max(1, len(losses) // 10)  # one logged step each
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(-1).tolist() if len(losses) >= k else list(losses)
        ax.plot(steps[k - 1:], smooth, label=label, lw=1.2)
    ax.set_xlabel("meta-training step")
    ax.set_ylabel("meta-training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_image_task(path: Path, ep: Episode, predict: Any, *, title: str) -> Path:
    """Task 0 of a classification episode of 1-channel images: the support images on top (one per class,
    in class order), each class's queries below it, coloured by whether ``predict`` gets them right."""
    plt = pyplot()
    with torch.no_grad():
        pred = predict(ep.support_x, ep.support_y, ep.query_x).probs[0].argmax(-1)
    N = ep.num_classes
    order = ep.support_y[0].argsort()
    q_order = ep.query_y[0].argsort()
    per = ep.n_query // N
    fig, axes = plt.subplots(1 + per, N, figsize=(1.3 * N, 1.3 * (1 + per)), squeeze=False)
    for n in range(N):
        ax = axes[0, n]
        ax.imshow(ep.support_x[0, order[n], 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"class {n}", fontsize=8)
        for j in range(per):
            i = q_order[n * per + j]
            ok = bool(pred[i] == ep.query_y[0, i])
            ax = axes[1 + j, n]
            ax.imshow(ep.query_x[0, i, 0].numpy(), cmap="Greens" if ok else "Reds", vmin=0, vmax=1)
            ax.set_title(f"-> {int(pred[i])}", fontsize=7, color="green" if ok else "red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Panels: drawing functions that fill one matplotlib axis, and a figure made of them
# --------------------------------------------------------------------------------------------
Band = tuple[Tensor, "Tensor | None"]  # a predictive mean [G] and standard deviation [G] (None: the mean only)


def draw_regression_panel(ax: Any, xs: Tensor, support_x: Tensor, support_y: Tensor, *,
                          predictions: Mapping[str, Band], oracle: Band | None = None, title: str = "") -> None:
    """One 1-D regression task on ``ax``: the oracle's mean and ±2 sd band (grey), each prediction's mean and, where
    it has one, its own ±2 sd band (coloured, translucent), and the support points. ``xs [G]``; ``support_x [S]``,
    ``support_y [S]`` (the real points only)."""
    x = xs.numpy()
    if oracle is not None:
        mean, sd = oracle
        if sd is not None:
            ax.fill_between(x, (mean - 2 * sd).numpy(), (mean + 2 * sd).numpy(), color="0.85", label="oracle ±2 sd")
        ax.plot(x, mean.numpy(), color="k", lw=1.5, label="oracle mean")
    for i, (name, (mean, sd)) in enumerate(predictions.items()):
        colour = f"C{i}"
        if sd is not None:
            ax.fill_between(x, (mean - 2 * sd).numpy(), (mean + 2 * sd).numpy(), color=colour, alpha=0.2,
                            label=f"{name} ±2 sd")
        ax.plot(x, mean.numpy(), color=colour, lw=1.2, label=name)
    ax.scatter(support_x.numpy(), support_y.numpy(), color="crimson", zorder=5, s=18, label="support")
    ax.set_xlabel("x")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, loc="best")


def draw_decision_regions(ax: Any, episode: Episode, predict: Callable[..., Distribution], *, task: int = 0,
                          resolution: int = 150, margin: float = 1.0, title: str = "") -> float:
    """The decision regions of one 2-D classifier on task ``task`` of ``episode`` (as in
    :func:`plot_decision_regions`, on one axis); returns its accuracy on the task's queries."""
    if episode.support_x.shape[2:] != (2,) or not episode.is_classification:
        raise ValueError("draw_decision_regions needs a 2-D classification episode (x_shape (2,))")
    from matplotlib.colors import to_rgb

    ep = episode[task: task + 1]
    N = ep.num_classes
    pts = torch.cat([ep.support_x[0], ep.query_x[0]])
    lo, hi = pts.min(0).values - margin, pts.max(0).values + margin
    gx, gy = torch.meshgrid(torch.linspace(float(lo[0]), float(hi[0]), resolution),
                            torch.linspace(float(lo[1]), float(hi[1]), resolution), indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], -1)[None].to(ep.support_x.dtype)  # [1, R*R, 2]
    colours = torch.tensor([to_rgb(f"C{n % 10}") for n in range(N)])  # [N, 3]
    with torch.no_grad():
        probs = predict(ep.support_x, ep.support_y, grid, support_mask=ep.support_mask).probs[0]  # [R*R, N]
        q = predict(ep.support_x, ep.support_y, ep.query_x, support_mask=ep.support_mask).probs[0]
    conf, cls = probs.max(-1)
    rgb = colours[cls] * conf[:, None] + (1 - conf[:, None])  # fade to white when unsure
    ax.imshow(rgb.reshape(resolution, resolution, 3).numpy(), origin="lower", interpolation="nearest",
              extent=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])), alpha=0.55)
    acc = float((q.argmax(-1) == ep.query_y[0]).double().mean())
    for n in range(N):
        s, qn = ep.support_y[0] == n, ep.query_y[0] == n
        ax.scatter(*ep.support_x[0][s].T.numpy(), s=110, color=f"C{n % 10}", edgecolors="k", linewidths=1.5, zorder=4)
        ax.scatter(*ep.query_x[0][qn].T.numpy(), s=14, color=f"C{n % 10}", edgecolors="k", linewidths=0.4, zorder=3)
    ax.set_title(f"{title}{': ' if title else ''}query accuracy {100 * acc:.0f}%", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return acc


def plot_panels(path: str | Path, drawers: Sequence[Callable[[Any], Any]], *, ncols: int | None = None,
                panel_size: tuple[float, float] = (4.4, 3.6), title: str = "") -> Path:
    """A figure of panels: ``drawers[i](ax)`` fills the i-th axis (e.g. with :func:`draw_regression_panel` or
    :func:`draw_decision_regions`), ``ncols`` to a row (default: all in one row)."""
    plt = pyplot()
    n = len(drawers)
    cols = ncols or n
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            drawers[i](ax)
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_adaptation_steps(path: str | Path, xs: Tensor, episode: Episode, predictions: Mapping[int, Tensor], *,
                          truth: Tensor | None = None, title: str = "") -> Path:
    """Predictions after 0, 1, ..., N adaptation steps on a few 1-D tasks (Finn et al. 2017, fig. 2): one panel per
    task of ``episode``, one line per step count (darker: more steps). ``predictions[n]``: means ``[T, G]`` on the
    grid ``xs [G]``; ``truth [T, G]``: the function to recover (dashed)."""
    plt = pyplot()
    T = episode.n_tasks
    fig, axes = plt.subplots(1, T, figsize=(4.2 * T, 3.3), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    steps = sorted(predictions)
    x = xs.numpy()
    for t, ax in enumerate(axes[0]):
        if truth is not None:
            ax.plot(x, truth[t].numpy(), color="k", ls="--", lw=1.4, label="true function")
        for j, n in enumerate(steps):
            ax.plot(x, predictions[n][t].numpy(), color=cmap(j / max(1, len(steps) - 1)), lw=1.1,
                    label=f"{n} step{'s' * (n != 1)}")
        m = episode.support_mask[t] if episode.support_mask is not None else slice(None)
        ax.scatter(episode.support_x[t][m][:, 0].numpy(), episode.support_y[t][m][:, 0].numpy(), color="crimson",
                   zorder=5, s=20, label="support")
        ax.set_title(f"held-out task {t}", fontsize=10)
        ax.set_xlabel("x")
    axes[0][0].legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_curve_grid(path: str | Path, curves: Mapping[tuple[Any, Any], list[tuple[int, float]]], rows: Sequence[Any],
                    cols: Sequence[Any], *, row_label: str, col_label: str, ylabel: str = "meta-training loss",
                    title: str = "") -> Path:
    """A grid of training curves (``curves[(row, col)]``: (step, loss) points; a running mean over a tenth of each
    curve, log scale, shared axes), one panel per (row, col)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.6 * len(cols), 2.7 * len(rows)), sharex=True,
                             sharey=True, squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            points = curves.get((r, c)) or []
            points = [(s, v) for s, v in points if math.isfinite(v)]
            if points:
                steps, losses = zip(*points)
                k = max(1, len(losses) // 10)
                smooth = torch.tensor(losses).unfold(0, k, 1).mean(-1).tolist() if len(losses) >= k else list(losses)
                ax.plot(steps[k - 1:], smooth, lw=1.2)
            ax.set_yscale("log")
            ax.set_title(f"{row_label} = {r}, {col_label} = {c}", fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("meta-training step")
            if j == 0:
                ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_metric_curves(path: str | Path, panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]], *,
                       xlabel: Mapping[str, str] | str, ylabel: Mapping[str, str] | str,
                       logy: bool | Sequence[str] = False) -> Path:
    """Curves of a metric against a setting, one panel per key of ``panels``: ``panels[panel][name]`` is a list of
    ``(x, mean, ci95)``; a name starting with ``oracle`` is drawn dashed in black. ``logy``: every panel on a log
    scale, or the names of those that are."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (panel, by_name) in zip(axes[0], panels.items()):
        for name, pts in by_name.items():
            if not pts:
                continue
            x, m, ci = zip(*pts)
            style = {"color": "k", "ls": "--"} if name.startswith("oracle") else {}
            ax.errorbar(x, m, yerr=ci, marker="o", ms=3, capsize=2, label=name, **style)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel[panel])
        ax.set_ylabel(ylabel if isinstance(ylabel, str) else ylabel[panel])
        if logy is True or (not isinstance(logy, bool) and panel in logy):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    return save_figure(fig, path)
