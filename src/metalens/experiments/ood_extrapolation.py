"""Out-of-distribution extrapolation (``metalens study ood-extrapolation``).

Every learner is meta-trained on its training distribution, then scored on held-out tasks
shifted step by step away from it, the same tasks for every learner at every shift:

- **images** (``omniglot``, the ``small`` protocol of the ``omniglot`` study: meta-train on
  ``images_background_small1`` with rotations, test on the alphabets only
  ``images_background_small2`` has): every image of a held-out task is sheared, or scaled,
  about its centre (:func:`affine_images`, through :class:`AffineShift`); shear 0 and scale
  1 are the training distribution. Learners: ``maml``, ``protonet``, ``lstm``,
  ``transformer``, ``mann`` (Conv-4 each, the ``omniglot`` study's options).
- **sinusoid** (Finn et al.'s protocol, amplitude ~ U[0.1, 5], phase ~ U[0, pi] in
  training): the held-out tasks' amplitude range, or phase range, moves up by a shift
  ``d`` (``amplitude_range = (0.1 + d, 5 + d)``, ``phase_range = (d, pi + d)``). Learners:
  ``maml``, ``lstm``, ``transformer``, ``mann`` (their ``tour`` recipes).

Skill is what a learner does better than knowing nothing: accuracy minus chance (``1/N``)
for images, ``1 - MSE / MSE_0`` for regression, where ``MSE_0`` is the zero predictor's on
the same tasks. A learner's **degradation** along an axis is the fraction of its unshifted
skill lost at the largest shift, ``(skill(0) - skill(max)) / skill(0)``.

Checks: for every part and axis, ``<part>.<axis>.maml_degrades_least``: maml's degradation
is smaller than that of each black-box learner (``lstm``, ``transformer``, ``mann``) -- the
claim that optimisation-based methods degrade more gracefully out of distribution (maml
keeps taking gradient steps on the shifted support set; a black-box learner's forward pass
only ever saw the training distribution); and ``<part>.<learner>.learns``: each learner has
skill on unshifted tasks beyond its 95% CI and a margin (5 accuracy points; 0.1 of the zero
predictor's MSE), without which its degradation means nothing (a
black-box learner that fails it is left out of the comparison, and said so; the comparison
fails if maml fails it or no black-box learner is left).

Runs live in ``OUT/runs/<part>-<learner>``; running the study again reuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal

from metalens.config import Options, opt
from metalens.episode import Episode, TaskSpec
from metalens.evaluate import summarize
from metalens.experiments.omniglot import learner_options as omniglot_options
from metalens.experiments.recipes import TOUR
from metalens.experiments.spine import Context, Study
from metalens.plots import pyplot, save_figure
from metalens.registry import STUDIES
from metalens.report import Check, Report, Table, fmt
from metalens.run import RunConfig, make_task
from metalens.tasks.base import Split, TaskFamily

__all__ = ["OODExtrapolation", "AffineShift", "affine_images", "degradation"]

BLACK_BOX = ("lstm", "transformer", "mann")
DEFAULT_LEARNERS = ("maml", "protonet", *BLACK_BOX)
IMAGE_ONLY = ("protonet",)  # learners that only classify
# Meta-training steps of the image runs (batch_tasks tasks each), the study within 10 minutes on one CPU thread:
# the transformer starts to learn in context after ~300 steps; the lstm and mann need far more (not affordable here).
IMAGE_STEPS = {"maml": 200, "protonet": 200, "lstm": 300, "transformer": 600, "mann": 200}
# Meta-training steps of the sinusoid runs (their tour recipes' budgets).
SINUSOID_STEPS = {"maml": 2000, "lstm": 1500, "transformer": 600, "mann": 500}
AXES = {"images": ("shear", "scale"), "sinusoid": ("amplitude", "phase")}
# How much skill on unshifted tasks a learner needs, beyond its 95% CI, for its degradation to be compared: 5
# accuracy points above chance, or an MSE 10% below the zero predictor's (the margins of icl-phase-transition).
LEARNS_MARGIN = {"images": 0.05, "sinusoid": 0.1}


# --------------------------------------------------------------------------------------------
# The shifts
# --------------------------------------------------------------------------------------------
def affine_images(x: Tensor, *, shear: float = 0.0, scale: float = 1.0) -> Tensor:
    """Shear, then scale, every image of ``x [..., C, H, W]`` about its centre.

    In image coordinates ``(u, v)`` in ``[-1, 1]`` (``u`` across, ``v`` down), the image content at
    ``(u, v)`` moves to ``scale * (u + shear * v, v)``; pixels are resampled bilinearly, and what
    comes from outside the image is 0 (no ink). Shear 0 and scale 1 return ``x`` itself, exactly.
    Deterministic: the same transform for every image.

    >>> x = torch.zeros(1, 1, 5, 5); x[..., 2, 2] = 1.0  # one ink dot at the centre
    >>> affine_images(x) is x, float(affine_images(x, shear=0.5)[..., 2, 2])  # the centre stays put
    (True, 1.0)
    """
    if shear == 0.0 and scale == 1.0:
        return x
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    C, H, W = x.shape[-3:]
    flat = x.reshape(-1, C, H, W)
    # grid_sample reads the output pixel at p from the input at A^-1 p, A = scale [[1, shear], [0, 1]]
    theta = torch.tensor([[1.0, -shear, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device) / scale
    grid = F.affine_grid(theta.expand(flat.shape[0], 2, 3), list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(x.shape)


class AffineShift(TaskFamily):
    """The tasks of an image family with every image sheared and scaled (:func:`affine_images`).

    Task ``i`` drawn from a seed is the base family's task ``i``, transformed: every shift is
    scored on the same characters, the same images, the same labels. Not registered: built
    around a family object, for evaluation.
    """

    registry_name = "affine-shift"  # what the evaluator calls its tasks (the study names them per shift)

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the shift."""

        shear: float = opt(0.0, "horizontal shear of every image (0: none)")
        scale: float = opt(1.0, "scale of every image about its centre (1: none)", gt=0)

    def __init__(self, base: TaskFamily, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        self.base = base

    @property
    def spec(self) -> TaskSpec:
        return self.base.spec

    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        ep = self.base.sample(n_tasks, generator=generator, split=split)
        c = self.config
        return replace(ep, support_x=affine_images(ep.support_x, shear=c.shear, scale=c.scale),
                       query_x=affine_images(ep.query_x, shear=c.shear, scale=c.scale))


def sinusoid_shift(axis: str, d: float) -> dict[str, Any]:
    """The ``sinusoid`` options of shift ``d`` along ``axis`` (amplitude or phase), from Finn et al.'s ranges.

    >>> sinusoid_shift("amplitude", 2.0)
    {'amplitude_range': [2.1, 7.0]}
    """
    if axis == "amplitude":
        return {"amplitude_range": [round(0.1 + d, 6), round(5.0 + d, 6)]}
    return {"phase_range": [round(d, 6), round(math.pi + d, 6)]}


def degradation(skill_unshifted: float, skill_shifted: float) -> float | None:
    """The fraction of the unshifted skill lost at a shift: ``(s0 - s1) / s0``; None when ``s0 <= 0``.

    >>> degradation(0.6, 0.15), degradation(0.0, 0.1)
    (0.75, None)
    """
    if not skill_unshifted > 0:
        return None
    return (skill_unshifted - skill_shifted) / skill_unshifted


def _zero(support_x: Tensor, support_y: Tensor, query_x: Tensor, *, support_mask: Tensor | None = None) -> Normal:
    """The zero predictor (what knowing nothing about a sine wave predicts), as ``Normal(0, 1)``."""
    mean = query_x.new_zeros(*query_x.shape[:2], support_y.shape[-1])
    return Normal(mean, torch.ones_like(mean))


def _starts_at_zero(values: tuple[float, ...]) -> None:
    """the first value is 0 (the training distribution)"""
    if values and values[0] != 0:
        raise ValueError(f"must start with 0 (the training distribution), got {list(values)}")


def _scale_first(values: tuple[float, ...]) -> None:
    """the first value is 1 (the training distribution)"""
    if values and values[0] != 1:
        raise ValueError(f"must start with 1 (the training distribution), got {list(values)}")


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------
@STUDIES.register("ood-extrapolation")
class OODExtrapolation(Study):
    """Accuracy and MSE as held-out tasks move away from the training distribution, for every lens."""

    title = "Out-of-distribution extrapolation: gradient, metric and black-box learners"

    @dataclass(frozen=True)
    class Config(Options):
        """Options of the ood-extrapolation study (``--set study.KEY=VALUE``)."""

        parts: tuple[Literal["images", "sinusoid"], ...] = opt(("images", "sinusoid"), "what to shift: omniglot "
                                                               "images (shear, scale), sinusoid tasks (amplitude, "
                                                               "phase)", min_len=1)
        learners: tuple[str, ...] = opt(DEFAULT_LEARNERS, "learners (protonet on images only)", min_len=1)
        shears: tuple[float, ...] = opt((0.0, 0.2, 0.4, 0.6), "image shears, from the training distribution's 0",
                                        ge=0, min_len=2, increasing=True, check=_starts_at_zero)
        scales: tuple[float, ...] = opt((1.0, 0.85, 0.7, 0.55), "image scales, from the training distribution's 1",
                                        gt=0, min_len=2, check=_scale_first)
        amplitude_shifts: tuple[float, ...] = opt(
            (0.0, 2.0, 4.0, 8.0), "sinusoid: amplitude ~ U[0.1 + d, 5 + d] for each d, from 0 (training)", ge=0,
            min_len=2, increasing=True, check=_starts_at_zero)
        phase_shifts: tuple[float, ...] = opt(
            (0.0, 0.7854, 1.5708, 3.1416), "sinusoid: phase ~ U[d, pi + d] for each d, from 0 (training)", ge=0,
            min_len=2, increasing=True, check=_starts_at_zero)
        ways: int = opt(5, "images: classes per task (N)", ge=2)
        shots: int = opt(1, "images: support images per class (K)", ge=1)
        train_queries: int = opt(5, "images: query images per class in meta-training tasks", ge=1)
        test_queries: int = opt(10, "images: query images per class in held-out tasks (shots + queries <= 20)", ge=1)
        channels: int = opt(16, "images: Conv-4 channels of every learner", ge=1)
        image_steps: dict[str, int] = opt(dict(IMAGE_STEPS), "images: meta-training steps per learner", ge=1)
        image_batch_tasks: int = opt(4, "images: tasks per meta-training step", ge=1)
        image_lr: float = opt(1e-3, "images: Adam learning rate", gt=0)
        sinusoid_steps: dict[str, int] = opt(dict(SINUSOID_STEPS), "sinusoid: meta-training steps per learner (the "
                                             "other options: its tour recipe)", ge=1)
        image_episodes: int = opt(200, "images: held-out tasks per shift", ge=2)
        sinusoid_episodes: int = opt(500, "sinusoid: held-out tasks per shift", ge=2)
        seed: int = opt(0, "training seed of every run", ge=0)
        eval_seed: int = opt(0, "seed of the held-out tasks", ge=0)
        root: str = opt("", "folder with the Omniglot minimal zips ('': the omniglot family's default)")
        quick: bool = opt(False, "smoke test: 2 steps per run, 4 held-out tasks per shift, tiny models")

        def check(self) -> None:
            unknown = [n for n in self.learners if n not in DEFAULT_LEARNERS]
            if unknown:
                raise ValueError(f"learners must be among {', '.join(DEFAULT_LEARNERS)}, got {unknown[0]!r}")
            if self.shots + max(self.train_queries, self.test_queries) > 20:
                raise ValueError(f"Omniglot has 20 images per character: shots + queries must be <= 20, got "
                                 f"{self.shots} + {max(self.train_queries, self.test_queries)}")
            if list(self.scales) != sorted(self.scales, key=lambda s: abs(math.log(s))) or \
                    len(set(self.scales)) != len(self.scales):
                raise ValueError(f"scales must move away from 1 step by step, got {list(self.scales)}")
            for name, steps in (("image_steps", self.image_steps), ("sinusoid_steps", self.sinusoid_steps)):
                extra = sorted(set(steps) - set(DEFAULT_LEARNERS))
                if extra:
                    raise ValueError(f"{name} names {extra[0]!r}, which is not a learner of this study")

    def effective(self) -> OODExtrapolation.Config:
        """The options actually run: ``quick`` shrinks every budget and the networks."""
        c = self.config
        if not c.quick:
            return c
        return replace(c, image_steps={k: 2 for k in IMAGE_STEPS}, sinusoid_steps={k: 2 for k in SINUSOID_STEPS},
                       image_episodes=4, sinusoid_episodes=4, channels=4, image_batch_tasks=2, test_queries=2)

    # -- the runs -------------------------------------------------------------------------------------
    def learners_of(self, part: str) -> list[str]:
        c = self.effective()
        return [n for n in c.learners if part == "images" or n not in IMAGE_ONLY]

    def image_task(self, queries: int) -> dict[str, Any]:
        c = self.effective()
        return {"root": c.root, "protocol": "small", "ways": c.ways, "shots": c.shots, "queries": queries}

    def image_learner(self, name: str) -> dict[str, Any]:
        c = self.effective()
        opts = omniglot_options(name, c.ways, c.channels)
        if c.quick and name in ("lstm", "mann"):
            opts.update(hidden=8)
        if c.quick and name == "mann":
            opts.update(slots=6, width=4, heads=1)
        if c.quick and name == "transformer":
            opts.update(dim=8, layers=1, heads=2)
        return opts

    def sinusoid_learner(self, name: str) -> dict[str, Any]:
        opts = dict(TOUR[name].learner_options)
        if self.effective().quick and name in BLACK_BOX:
            opts.update({"lstm": {"hidden": 8}, "transformer": {"dim": 8, "layers": 1, "heads": 2},
                         "mann": {"hidden": 8, "slots": 6, "width": 4}}[name])
        return opts

    def runs(self) -> dict[str, RunConfig]:
        c = self.effective()
        out: dict[str, RunConfig] = {}
        if "images" in c.parts:
            for name in self.learners_of("images"):
                steps = c.image_steps.get(name, IMAGE_STEPS[name])
                train = {"steps": steps, "batch_tasks": c.image_batch_tasks, "lr": c.image_lr, "seed": c.seed,
                         "log_every": 10, "checkpoint_every": max(100, steps)}
                out[f"images-{name}"] = RunConfig.resolve("omniglot", name, self.image_task(c.train_queries),
                                                          self.image_learner(name), train)
        if "sinusoid" in c.parts:
            for name in self.learners_of("sinusoid"):
                recipe = TOUR[name]
                train = {**recipe.train, "steps": c.sinusoid_steps.get(name, SINUSOID_STEPS[name]), "seed": c.seed}
                out[f"sinusoid-{name}"] = RunConfig.resolve("sinusoid", name, recipe.task_options,
                                                            self.sinusoid_learner(name), train)
        return out

    # -- the analysis ---------------------------------------------------------------------------------
    def shifts(self, part: str) -> dict[str, tuple[float, ...]]:
        c = self.effective()
        if part == "images":
            return {"shear": c.shears, "scale": c.scales}
        return {"amplitude": c.amplitude_shifts, "phase": c.phase_shifts}

    def analyse(self, ctx: Context, report: Report) -> None:
        c = self.effective()
        curves: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}  # part -> axis -> learner -> points
        for part in c.parts:
            curves[part] = self._score_part(ctx, report, part)
        self._checks(report, curves)
        self._text(ctx, report, curves)
        report.data["curves"] = curves
        report.figure(_plot(ctx.figure("shift.png"), curves, c))
        if "images" in c.parts:
            report.figure(self._plot_examples(ctx))

    def _score_part(self, ctx: Context, report: Report, part: str) -> dict[str, dict[str, list[dict[str, float]]]]:
        """Every learner of ``part`` at every shift: ``{axis: {learner: [{shift, mean, ci95, skill, ...}]}}``."""
        c = self.effective()
        out: dict[str, dict[str, list[dict[str, float]]]] = {}
        base = make_task("omniglot", **self.image_task(c.test_queries)) if part == "images" else None
        cache: dict[tuple[str, str], dict[str, float]] = {}  # (learner, setting) -> point: the unshifted tasks once
        for axis, values in self.shifts(part).items():
            out[axis] = {}
            for name in self.learners_of(part):
                label = f"{part}-{name}"
                points = []
                for v in values:
                    setting = self._setting(part, axis, v)
                    key = (name, setting)
                    if key not in cache:
                        cache[key] = self._score(ctx, report, label, part, axis, v, base)
                    points.append({"shift": v, **cache[key]})
                out[axis][name] = points
                ctx.say(f"{part} {axis}: {name} " + ", ".join(f"{p['shift']:g}: {p['mean']:.3f}" for p in points))
        return out

    @staticmethod
    def _setting(part: str, axis: str, v: float) -> str:
        unshifted = v == (1.0 if axis == "scale" else 0.0)
        return "unshifted" if unshifted else f"{axis}={v:g}"

    def _score(self, ctx: Context, report: Report, label: str, part: str, axis: str, v: float,
               base: TaskFamily | None) -> dict[str, float]:
        """One learner on the tasks of one shift: its metric (mean, 95% CI) and its skill (mean, 95% CI)."""
        c = self.effective()
        setting = self._setting(part, axis, v)
        if part == "images":
            assert base is not None
            shift = AffineShift(base, AffineShift.Config(shear=v if axis == "shear" else 0.0,
                                                         scale=v if axis == "scale" else 1.0))
            ev = ctx.evaluate(label, shift, episodes=c.image_episodes, seed=c.eval_seed, with_oracle=False,
                              batch_tasks=4)
            acc = ev.per_task["accuracy"]
            skill = summarize(acc - 1.0 / c.ways)
            m = ev.metrics["accuracy"]
        else:
            family = make_task("sinusoid", **sinusoid_shift(axis, v))
            ev = ctx.evaluate(label, family, episodes=c.sinusoid_episodes, seed=c.eval_seed, with_oracle=False)
            tasks = family.eval_episodes(c.eval_seed, c.sinusoid_episodes)
            zero = ctx.score(_zero, tasks, with_nll=False)["mse"]
            mse = ev.per_task["mse"]
            if ev.diverged_tasks is not None:  # the evaluator left diverged tasks out
                zero = zero[~ev.diverged_tasks]
            ratio = float(np.mean(mse) / np.mean(zero))
            skill = summarize(1.0 - mse / np.mean(zero))
            m = ev.metrics["mse"]
        ev.task = f"{'omniglot' if part == 'images' else 'sinusoid'} {setting}"
        report.evaluations.append(ev)
        point = {"mean": m.mean, "ci95": m.ci95, "skill": skill.mean, "skill_ci95": skill.ci95}
        if part == "sinusoid":
            point["normalised_mse"] = ratio
        return point

    def _checks(self, report: Report, curves: dict[str, dict[str, dict[str, list[dict[str, float]]]]]) -> None:
        learns: dict[tuple[str, str], bool] = {}
        for part, axes in curves.items():
            first_axis = next(iter(axes.values()))
            for name, points in first_axis.items():
                p0 = points[0]
                needed = max(p0["skill_ci95"], LEARNS_MARGIN[part])
                learns[(part, name)] = bool(p0["skill"] > needed)
                report.check(f"{part}.{name}.learns", Check(
                    round(p0["skill"], 4), f"> {needed:.2g} (skill on unshifted tasks, "
                    + ("accuracy - 1/N" if part == "images" else "1 - MSE / zero predictor's MSE")
                    + f": beyond its 95% CI {p0['skill_ci95']:.2g} and the margin {LEARNS_MARGIN[part]:g})",
                    learns[(part, name)]))
            for axis, by_learner in axes.items():
                lost = {n: degradation(p[0]["skill"], p[-1]["skill"]) for n, p in by_learner.items()}
                for points in by_learner.values():
                    for p in points:
                        p["degradation"] = degradation(points[0]["skill"], p["skill"])
                if "maml" not in lost or not any(n in BLACK_BOX for n in lost):
                    continue
                # a learner without skill on unshifted tasks has no degradation to compare (its `learns` check fails)
                others = {n: v for n, v in lost.items() if n in BLACK_BOX and learns[(part, n)]}
                left_out = [n for n in lost if n in BLACK_BOX and not learns[(part, n)]]
                mine = lost["maml"] if learns[(part, "maml")] else None
                holds = mine is not None and bool(others) and all(v is not None and mine < v for v in others.values())
                last = by_learner["maml"][-1]["shift"]
                report.check(f"{part}.{axis}.maml_degrades_least", Check(
                    None if mine is None else round(mine, 4),
                    "< " + (", ".join(f"{n} {'–' if v is None else f'{v:.4g}'}" for n, v in others.items()) or "–")
                    + f" (fraction of the unshifted skill lost at {axis} {last:g}, every black-box learner that "
                      "learns" + (f"; left out, no skill unshifted: {', '.join(left_out)}" if left_out else "") + ")",
                    bool(holds)))

    def _text(self, ctx: Context, report: Report,
              curves: dict[str, dict[str, dict[str, list[dict[str, float]]]]]) -> None:
        c = self.effective()
        report.text(
            "Skill is accuracy minus chance (images) or 1 - MSE / MSE_0 (sinusoid; MSE_0: the zero predictor's on "
            "the same tasks); a learner's degradation along an axis is the fraction of its unshifted skill lost at "
            "the largest shift. The `maml_degrades_least` checks test the claim that optimisation-based learners "
            "degrade more gracefully out of distribution than black-box ones; a learner whose unshifted skill is not "
            "beyond its 95% CI and a margin (5 accuracy points; 0.1) fails its `learns` check and is left out. Tasks "
            "on which a learner's predictions diverge (are non-finite) are left out of its metrics by the evaluator "
            "(the `diverged` column of the evaluator output).")
        for part, axes in curves.items():
            report.heading("Omniglot, sheared and scaled" if part == "images" else "Sinusoid, amplitude and phase "
                                                                                   "beyond training")
            if part == "images":
                report.text(
                    f"Meta-trained on {c.ways}-way {c.shots}-shot tasks of `images_background_small1` (with "
                    f"rotations), {c.train_queries} queries per class; Conv-4 with {c.channels} channels for every "
                    f"learner (the `omniglot` study's options), {c.image_batch_tasks} tasks a step, Adam "
                    f"lr {c.image_lr}, steps: " + ", ".join(f"{n} {c.image_steps.get(n, IMAGE_STEPS[n])}"
                                                            for n in self.learners_of("images"))
                    + f". Scored on {c.image_episodes} held-out tasks (alphabets of small2 only, {c.test_queries} "
                    f"queries per class, evaluation seed {c.eval_seed}) at every shift: the same tasks, every image "
                    "sheared (x -> x + shear * y) or scaled about its centre.")
            else:
                report.text(
                    "Meta-trained on Finn et al.'s sinusoids (amplitude ~ U[0.1, 5], phase ~ U[0, pi], 10 shots) "
                    "with each learner's `tour` recipe, steps: " + ", ".join(
                        f"{n} {c.sinusoid_steps.get(n, SINUSOID_STEPS[n])}" for n in self.learners_of("sinusoid"))
                    + f". Scored on {c.sinusoid_episodes} held-out tasks per shift d (evaluation seed "
                    f"{c.eval_seed}): amplitude ~ U[0.1 + d, 5 + d], or phase ~ U[d, pi + d].")
            metric = "accuracy" if part == "images" else "MSE (MSE / MSE_0)"
            for axis, by_learner in axes.items():
                shifts = [p["shift"] for p in next(iter(by_learner.values()))]
                table = Table([f"learner: {metric}"] + [f"{axis} {s:g}" for s in shifts] + ["degradation"])
                for name, points in by_learner.items():
                    cells = []
                    for p in points:
                        if part == "images":
                            cells.append(fmt(p, percent=True))
                        else:
                            cells.append(f"{fmt(p, 3)} ({p['normalised_mse']:.3f})")
                    d = points[-1].get("degradation")
                    table.rows.append([f"`{name}`", *cells, "–" if d is None else f"{d:.3f}"])
                report.table(table)

    def _plot_examples(self, ctx: Context) -> Path:
        """One held-out support set at every shear and scale of the study."""
        c = self.effective()
        base = make_task("omniglot", **self.image_task(1))
        ep = base.eval_episodes(c.eval_seed, 1)
        x = ep.support_x[0, : min(5, ep.n_support)]  # [n, 1, H, W]
        rows = [("shear", v) for v in c.shears] + [("scale", v) for v in c.scales[1:]]
        plt = pyplot()
        fig, axes = plt.subplots(len(rows), x.shape[0], figsize=(1.2 * x.shape[0], 1.2 * len(rows)), squeeze=False)
        for r, (axis, v) in enumerate(rows):
            shifted = affine_images(x, shear=v if axis == "shear" else 0.0, scale=v if axis == "scale" else 1.0)
            for j in range(x.shape[0]):
                ax = axes[r][j]
                ax.imshow(shifted[j, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{axis} {v:g}", fontsize=7)
        fig.suptitle("held-out characters at every shift", fontsize=8)
        return save_figure(fig, ctx.figure("examples.png"))


def _plot(path: Path, curves: dict[str, dict[str, dict[str, list[dict[str, float]]]]], c: Any) -> Path:
    """Accuracy (images) and MSE / MSE_0 (sinusoid) against each shift, one panel per axis."""
    plt = pyplot()
    panels = [(part, axis) for part, axes in curves.items() for axis in axes]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (part, axis) in zip(axes[0], panels):
        for name, points in curves[part][axis].items():
            xs = [p["shift"] for p in points]
            if part == "images":
                ys, err = [100 * p["mean"] for p in points], [100 * p["ci95"] for p in points]
            else:  # log scale: the lower error bar stops above 0
                ys = [p["normalised_mse"] for p in points]
                up = [p["ci95"] / p["mean"] * p["normalised_mse"] if p["mean"] > 0 else 0.0 for p in points]
                err = [[min(e, 0.9 * y) for e, y in zip(up, ys)], up]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=name,
                        ls="-" if name not in BLACK_BOX else "--")
        if part == "images":
            ax.axhline(100.0 / c.ways, color="k", lw=0.8, ls=":", label="chance")
            ax.set_ylabel("accuracy (%)")
            if axis == "scale":
                ax.invert_xaxis()
        else:
            ax.axhline(1.0, color="k", lw=0.8, ls=":", label="zero predictor")
            ax.set_yscale("log")
            ax.set_ylabel("MSE / zero predictor's MSE (log)")
        ax.set_xlabel(f"{axis}" + (" shift d" if part == "sinusoid" else ""))
        ax.set_title(f"{'omniglot' if part == 'images' else 'sinusoid'}: {axis}", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
