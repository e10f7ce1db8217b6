"""Figures for reports, drawn with matplotlib on its file backend (no screen needed).

Every figure of metalens is made here or through :func:`pyplot`, which selects the
non-interactive ``Agg`` backend once, and written by :func:`save_figure`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributions import Distribution

from metalens.episode import Episode
from metalens.learners.base import Learner
from metalens.tasks.base import TaskFamily

__all__ = ["pyplot", "save_figure", "plot_regression_tasks", "plot_decision_regions", "plot_training_curves",
           "plot_image_task"]


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
