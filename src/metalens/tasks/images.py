"""Few-shot image classification from a folder or zip files laid out as ``<group>/<class>/*.png``.

The ``images`` family: any dataset in that layout (Omniglot's ``<alphabet>/<character>/``),
read straight from a folder or from zip files (:mod:`metalens.data.sources` says where the
data is and how a source is read); classes split into disjoint meta-train / validation /
test sets by a seed (over classes or over whole groups) or by naming the groups of each
split. The ``omniglot`` family (:mod:`metalens.tasks.omniglot`) is this one preconfigured
for Omniglot's protocols.

An N-way K-shot task draws ``ways`` classes of the split, then ``shots + queries``
distinct images of each class; the support set holds ``shots`` images per class and
the query set ``queries``, each in a random order, labelled ``0..N-1`` in the order the
classes were drawn. Images are ``[1, size, size]`` float32 in ``[0, 1]`` with ink as 1
(:func:`metalens.data.load_image`) by default; see "Images" below for colour, other sizes,
normalisation and augmentation. With ``rotations`` the rotations of every class by 90,
180 and 270 degrees are classes of their own (Santoro et al. 2016; Vinyals et al. 2016),
in the meta-train split only (``train``) or in every split (``all``); the rotations of a
character always fall in the same split as the character. With ``episodes = "within_group"``
every task's classes come from one group (Omniglot's within-alphabet tasks, Lake et al.
2015): a task draws a group among those with at least ``ways`` classes in its split
(uniformly; smaller groups are skipped, and a split with none is a
:class:`~metalens.errors.DataError` listing each group's classes), then ``ways`` of its
classes, both from the task's generator; a rotated class belongs to its character's group.

Where the data is. ``root`` names a folder, or one zip file; left empty it is
``$METALENS_DATA/omniglot``, else ``../shared/data/omniglot``. ``sources`` names zips or
folders inside it; left empty, the root is read, and a root folder with no images in it
stands for the zip files in it that hold images (zips without images, such as Omniglot's
``strokes_*.zip``, are skipped). A class found in several sources (Omniglot's Greek and
Latin are in both minimal sets) is read from the first. Every source is decoded once
(cached in memory), so that sampling an episode is pure indexing; rotations are applied
with ``torch.rot90`` to the drawn images.

Images (:class:`ImageOptions`, shared with ``omniglot``). ``channels`` 1 (grey; colour
converted by luminance; ``invert`` makes dark ink 1) or 3 (colour; grey images become three
identical channels); ``size``, or ``height`` and ``width`` (``fit`` says how an image of
another aspect meets them). ``normalize`` (on by default for colour, off for grey, so grey
images keep ink as 1 on 0) subtracts each channel's mean and divides by its standard
deviation, both computed once on the meta-training split's images (:attr:`ImageFolder.mean`,
:attr:`ImageFolder.std`) and applied to every split. ``augment`` (``none`` by default:
episodes unchanged) transforms the images of meta-training episodes only (``split =
"train"``; evaluation is never augmented), with parameters drawn from the episode's own
generator after the images are chosen, so a training episode is still a function of (seed,
step) and holds the same images as without augmentation, transformed
(:mod:`metalens.data.augment`): ``natural`` (pad-and-crop or random resized crop, horizontal
flip, colour jitter) or ``handwriting`` (random rotation, shear, scale and translation),
with the strengths of the ``aug_*`` options. Decoded images are cached on disk beside the
data (:mod:`metalens.data.cache`), written once the family has passed its checks, so a
later start maps them instead of decoding. :meth:`ImageFolder.image_options` gives the
options of :func:`~metalens.data.load_image` that prepare a user's file exactly as the
family prepares an evaluation image.

Training settings. Image families propose one task per meta-training step
(:meth:`ImageFolder.train_defaults`, used where a run's configuration sets no
``train.batch_tasks``), as Snell et al. (2017) train on one episode per update: a task of
N ways and K + Q images per class is already a batch of N (K + Q) images.

Bad data is one :class:`~metalens.errors.DataError` naming the file and what to do
(see :mod:`metalens.data`), raised when the family is built, as are data that do not fit
the options: a split with fewer classes than ``ways``, a class with fewer images than
``shots + queries``, images that would not fit in memory at ``size``.

>>> import io, tempfile, zipfile
>>> from PIL import Image, ImageDraw
>>> def png(i):  # a dark stroke on white, drawn differently for every class
...     im = Image.new("L", (105, 105), 255)
...     ImageDraw.Draw(im).line([(10, 10 + 8 * i), (95, 95 - 8 * i)], fill=0, width=9)
...     buf = io.BytesIO(); im.save(buf, format="PNG"); return buf.getvalue()
>>> tmp = tempfile.mkdtemp()
>>> with zipfile.ZipFile(f"{tmp}/toy.zip", "w") as z:
...     for g in range(2):
...         for c in range(5):
...             for k in range(4):
...                 z.writestr(f"toy/group{g}/class{c}/{k}.png", png(5 * g + c))
>>> family = ImageFolder(ImageFolder.Config(root=f"{tmp}/toy.zip", ways=3, shots=1, queries=2,
...                                         split="named", train_groups="group0", test_groups="group1"))
>>> ep = family.sample(4, generator=torch.Generator().manual_seed(0))
>>> ep.support_x.shape, ep.support_y.shape, ep.query_x.shape
(torch.Size([4, 3, 1, 28, 28]), torch.Size([4, 3]), torch.Size([4, 6, 1, 28, 28]))
>>> family.classes("test")[:2]
['group1/class0', 'group1/class1']
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from metalens import rng
from metalens.config import Options, opt
from metalens.data import augment as aug
from metalens.data.images import check_fits, image_shape, load_image, normalize, to_float
from metalens.data.sources import count_images, read_images, resolve_root, save_cache, source_paths
from metalens.episode import Episode, TaskSpec
from metalens.errors import DataError
from metalens.registry import TASKS
from metalens.tasks.base import Split, TaskFamily

__all__ = ["ImageFolder", "ImageOptions", "Plan", "load_image"]

SPLITS: tuple[Split, ...] = ("train", "val", "test")
_SPLIT_KEY = 0x5B17  # seeds the class split: rng.derive_seed(split_seed, _SPLIT_KEY), apart from rng.Stream


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------
def _size(value: float, n: int) -> int:
    """``value < 1``: a fraction of ``n``; ``>= 1``: a count (scikit-learn's test_size convention)."""
    return int(round(value * n)) if value < 1 else int(value)


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _named_split(groups: dict[str, set[str]], lists: dict[str, list[str]]) -> dict[str, list[str]]:
    """Assign groups to splits by name patterns (``group`` or ``source/group``, shell wildcards).

    A split whose only pattern is ``*`` (at most one) gets every group no other split names.
    A group named by two splits, or a pattern that names no group, is a :class:`DataError`.
    """
    def matches(pattern: str, group: str) -> bool:
        if "/" in pattern:
            src, grp = pattern.split("/", 1)
            return fnmatch.fnmatchcase(group, grp) and any(fnmatch.fnmatchcase(s, src) for s in groups[group])
        return fnmatch.fnmatchcase(group, pattern)

    rest = [s for s, pats in lists.items() if pats == ["*"]]
    out: dict[str, list[str]] = {s: [] for s in lists}
    owner: dict[str, str] = {}
    for split, pats in lists.items():
        if split in rest:
            continue
        for pat in pats:
            hit = [g for g in sorted(groups) if matches(pat, g)]
            if not hit:
                raise DataError(f"task.{split}_groups: {pat!r} names no group; groups: {', '.join(sorted(groups))}")
            for g in hit:
                if owner.get(g, split) != split:
                    raise DataError(f"group {g!r} is named by both task.{owner[g]}_groups and task.{split}_groups; "
                                    "the splits must be disjoint")
                owner[g] = split
    for g in sorted(groups):
        if g in owner:
            out[owner[g]].append(g)
        elif rest:
            out[rest[0]].append(g)
    return out


@dataclass(frozen=True)
class Plan:
    """What a family reads and how it splits it, resolved from its options (Omniglot's from its protocol)."""

    root: str
    sources: tuple[str, ...]
    split: str
    split_seed: int
    val_size: float
    test_size: float
    groups: dict[str, str]  # split -> comma-separated patterns ("named")
    rotations: str
    size: int
    resample: str
    invert: bool
    channels: int = 1
    height: int | None = None  # None: size
    width: int | None = None
    fit: str = "pad"


# ------------------------------------------------------------------------------------------------
# The family
# ------------------------------------------------------------------------------------------------
def _fraction_or_count(value: float) -> None:
    if value >= 1 and not float(value).is_integer():
        raise ValueError("must be a fraction < 1 or a whole count")


@dataclass(frozen=True)
class ImageOptions(Options):
    """The options every image family shares: the images' channels and size, normalisation and augmentation."""

    channels: Literal[1, 3] = opt(1, "1: grey (colour converted by luminance); 3: colour (grey images become three "
                                     "identical channels)")
    size: int = opt(28, "images are resized to size x size (unless height and width say otherwise)", ge=1)
    height: int | None = opt(None, "height of the images in pixels (null: size)", ge=1)
    width: int | None = opt(None, "width of the images in pixels (null: size)", ge=1)
    normalize: bool | None = opt(
        None, "subtract each channel's mean and divide by its standard deviation, both computed on the meta-training "
              "split, in every split (null: on for colour, off for grey, whose ink stays 1 on 0)")
    augment: Literal["none", "natural", "handwriting"] = opt(
        "none", "augmentation of meta-training episodes (never in evaluation): none, natural (crop, horizontal flip, "
                "colour jitter) or handwriting (random rotation, shear, scale, translation)")
    aug_crop: Literal["pad", "resized", "none"] = opt(
        "pad", "natural: pad-and-crop (aug_padding), random resized crop (aug_crop_scale, aug_crop_ratio) or none")
    aug_padding: int = opt(8, "natural, aug_crop = pad: zero pixels added on every side before the random crop",
                           ge=1)
    aug_crop_scale: tuple[float, float] = opt(
        (0.08, 1.0), "natural, aug_crop = resized: (low, high) fraction of the area a crop covers", gt=0, le=1,
        nondecreasing=True)
    aug_crop_ratio: tuple[float, float] = opt(
        (0.75, 4 / 3), "natural, aug_crop = resized: (low, high) aspect (width / height) of a crop", gt=0,
        nondecreasing=True)
    aug_flip: float = opt(0.5, "natural: probability of a horizontal flip", ge=0, le=1)
    aug_jitter: float = opt(0.4, "natural: brightness, contrast and saturation factors drawn from "
                                 "[1 - aug_jitter, 1 + aug_jitter] (0: no jitter)", ge=0, le=1)
    aug_rotation: float = opt(10.0, "handwriting: rotations drawn from [-aug_rotation, aug_rotation] degrees",
                              ge=0, le=180)
    aug_shear: float = opt(10.0, "handwriting: horizontal shear angles drawn from [-aug_shear, aug_shear] degrees",
                           ge=0, lt=90)
    aug_scale: tuple[float, float] = opt((0.9, 1.1), "handwriting: (low, high) range of the scale factors", gt=0,
                                         nondecreasing=True)
    aug_translate: float = opt(0.1, "handwriting: translations drawn from [-aug_translate, aug_translate] of the "
                                    "width and height", ge=0, le=1)

    def check(self) -> None:
        h, w = image_shape(self.size, self.height, self.width)
        if getattr(self, "rotations", "none") != "none" and h != w:
            raise ValueError(f"rotations need square images, got height {h} and width {w}; set task.rotations = "
                             "none, or height = width")


@TASKS.register("images")
class ImageFolder(TaskFamily):
    """N-way K-shot classification of images laid out as <group>/<class>/*.png (a folder or zips)."""

    @dataclass(frozen=True)
    class Config(ImageOptions):
        root: str = opt("", "a folder or a zip file ('': $METALENS_DATA/omniglot, else ../shared/data/omniglot); "
                            "a folder without images stands for the zips in it that hold images (others skipped)")
        sources: str = opt("", "comma-separated zips or folders inside root to read ('': root itself)")
        ways: int = opt(5, "classes per task (N)", ge=2)
        shots: int = opt(1, "support images per class (K)", ge=1)
        queries: int = opt(15, "query images per class", ge=1)
        split: Literal["class", "group", "named"] = opt(
            "class", "how classes are split into train/val/test: by a seed over classes (class) or over "
                     "whole groups (group), or by the groups each split names (named)")
        split_seed: int = opt(0, "seed of the random split (split = class or group)", ge=0)
        val_size: float = opt(0.1, "class/group split: validation classes or groups, a fraction (< 1) or a count",
                              ge=0, check=_fraction_or_count)
        test_size: float = opt(0.2, "class/group split: test classes or groups, a fraction (< 1) or a count",
                               ge=0, check=_fraction_or_count)
        train_groups: str = opt("", "named split: comma-separated groups (or source/group, wildcards) of "
                                    "meta-train; '*' alone: every group no other split names")
        val_groups: str = opt("", "named split: the validation groups (as train_groups)")
        test_groups: str = opt("", "named split: the test groups (as train_groups)")
        rotations: Literal["none", "train", "all"] = opt(
            "none", "rotations by 90/180/270 degrees as new classes: none, meta-train only, or every split")
        episodes: Literal["any", "within_group"] = opt(
            "any", "which classes a task draws: any of its split, or all from one group (within_group: a group "
                   "with at least ways classes in the split, then ways of its classes)")
        resample: Literal["box", "lanczos"] = opt("box", "resizing filter: box (area average) or lanczos")
        invert: bool = opt(True, "dark ink on light paper: invert so that ink is 1 (grey images, channels = 1)")
        fit: Literal["pad", "crop", "stretch"] = opt(
            "pad", "an image of another aspect than height:width is padded to it (centred; white paper, or black for "
                   "colour), centre-cropped to it, or stretched")

        def check(self) -> None:
            super().check()
            if self.val_size < 1 and self.test_size < 1 and self.val_size + self.test_size >= 1:
                raise ValueError(f"val_size + test_size must leave classes for meta-training, got "
                                 f"{self.val_size} + {self.test_size}")
            if self.split == "named" and not (_patterns(self.train_groups) and _patterns(self.test_groups)):
                raise ValueError("split = 'named' needs train_groups and test_groups (e.g. train_groups='*' "
                                 "test_groups='Tagalog'); val_groups may be empty")
            rest = [f"{s}_groups" for s in SPLITS if _patterns(getattr(self, f"{s}_groups")) == ["*"]]
            if len(rest) > 1:
                raise ValueError(f"{' and '.join(rest)} are each '*'; only one split may be '*' (the groups no "
                                 "other split names)")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        self.plan = self._plan()
        self._build(self.plan)

    @classmethod
    def train_defaults(cls, config: Any) -> dict[str, Any]:
        """One task per meta-training step (Snell et al. 2017 train on one episode per update): an image task
        is already a batch of ``ways * (shots + queries)`` images."""
        return {"batch_tasks": 1}

    # -- what to read and how to split it (Omniglot overrides these) ------------------------------
    def _plan(self) -> Plan:
        c = self.config
        return Plan(c.root, tuple(_patterns(c.sources)), c.split, c.split_seed, c.val_size, c.test_size,
                    {"train": c.train_groups, "val": c.val_groups, "test": c.test_groups},
                    c.rotations, c.size, c.resample, c.invert, channels=c.channels, height=c.height,
                    width=c.width, fit=c.fit)

    def _more_classes(self, split: str) -> str:
        """What to change for ``split`` to hold more classes (the end of an error message)."""
        if self.config.split == "named":
            return f"name more groups in task.{split}_groups"
        what = "groups" if self.config.split == "group" else "classes"
        if split == "train":
            return f"lower task.val_size or task.test_size to leave more {what} for meta-training"
        return f"raise task.{split}_size"

    def _build(self, plan: Plan) -> None:
        c = self.config
        root = resolve_root(plan.root)
        paths = source_paths(root, plan.sources)
        check_fits(sum(count_images(p) for p in paths), plan.size, where=str(root), channels=plan.channels,
                   height=plan.height, width=plan.width)
        # mapped from the disk cache if an earlier process decoded them; written to it once every check passed
        sets = [read_images(p, size=plan.size, resample=plan.resample, invert=plan.invert, channels=plan.channels,
                            height=plan.height, width=plan.width, fit=plan.fit, cache="read") for p in paths]
        self.root = root
        self.sources = tuple(s.name for s in sets)
        # merge the sources: the first source that has a class provides its images
        keys: list[str] = []
        images: list[Tensor] = []
        members: list[Tensor] = []  # image indices of each class
        groups: dict[str, set[str]] = {}  # group -> names of the sources it appears in
        seen: set[str] = set()
        n_images = 0
        for s in sets:
            whole = not any(k in seen for k in s.classes)  # every class new: take its images as they are, uncopied
            for i, k in enumerate(s.classes):
                groups.setdefault(k.split("/", 1)[0], set()).add(s.name)
                if k in seen:
                    continue
                seen.add(k)
                idx = (s.labels == i).nonzero().flatten()
                if whole:
                    members.append(n_images + idx)
                else:
                    members.append(torch.arange(n_images, n_images + len(idx)))
                    images.append(s.images[idx])
                    n_images += len(idx)
                keys.append(k)
            if whole:
                images.append(s.images)
                n_images += len(s.images)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self._keys = [keys[i] for i in order]
        # uint8 [n_images, H, W] (grey, ink high) or [n_images, 3, H, W]; one source: its (mapped) array itself
        self._images = images[0] if len(images) == 1 else torch.cat(images)
        counts = torch.tensor([len(members[i]) for i in order])
        table = torch.zeros(len(order), int(counts.max()), dtype=torch.int64)
        for row, i in enumerate(order):
            table[row, : len(members[i])] = members[i]
        self._class_images, self._counts = table, counts  # [n_classes, max images], [n_classes]
        group_of = [k.split("/", 1)[0] for k in self._keys]

        # split the (base) classes
        if plan.split == "named":
            lists = {s: _patterns(plan.groups[s]) for s in SPLITS}
            by_group = _named_split(groups, lists)
            split_classes = {s: [i for i, g in enumerate(group_of) if g in set(by_group[s])] for s in SPLITS}
        else:
            units = sorted(groups) if plan.split == "group" else list(self._keys)
            n = len(units)
            n_val, n_test = _size(plan.val_size, n), _size(plan.test_size, n)
            if n_val + n_test >= n:
                what = "groups" if plan.split == "group" else "classes"
                raise DataError(f"val_size and test_size take {n_val} + {n_test} of the {n} {what} in {root}, "
                                "leaving none for meta-training; lower task.val_size or task.test_size")
            g = torch.Generator().manual_seed(rng.derive_seed(plan.split_seed, _SPLIT_KEY))
            perm = torch.randperm(n, generator=g).tolist()
            part = {"test": perm[:n_test], "val": perm[n_test: n_test + n_val], "train": perm[n_test + n_val:]}
            if plan.split == "group":
                chosen = {s: {units[i] for i in part[s]} for s in SPLITS}
                split_classes = {s: [i for i, g_ in enumerate(group_of) if g_ in chosen[s]] for s in SPLITS}
            else:
                split_classes = {s: sorted(part[s]) for s in SPLITS}

        # with rotations: (base class, quarter turns) pairs
        self._split_base: dict[str, Tensor] = {}  # [C] base class of each class of the split
        self._split_rot: dict[str, Tensor] = {}  # [C] its quarter turns (0..3)
        self._rotated: dict[str, bool] = {}
        for s in SPLITS:
            base = torch.tensor(split_classes[s], dtype=torch.int64)
            turns = 4 if plan.rotations == "all" or (plan.rotations == "train" and s == "train") else 1
            self._split_base[s] = base.repeat_interleave(turns)
            self._split_rot[s] = torch.arange(turns).repeat(len(base))
            self._rotated[s] = turns == 4
        # the group of every class (a rotated class is in its character's group), for within-group episodes
        self._group_names = sorted(groups)
        gid = torch.tensor([self._group_names.index(g_) for g_ in group_of], dtype=torch.int64)
        self._split_group = {s: gid[self._split_base[s]] for s in SPLITS}  # [C] group index of each class
        need = c.shots + c.queries
        for s in SPLITS:
            used = torch.tensor(split_classes[s], dtype=torch.int64)
            short = [i for i in used.tolist() if self._counts[i] < need]
            if short:
                fewest = min(int(self._counts[i]) for i in short)
                raise DataError(
                    f"the {s} split has {len(short)} of its {len(used)} classes with fewer than shots + queries = "
                    f"{need} images (e.g. {self._keys[short[0]]!r} has {int(self._counts[short[0]])}); lower "
                    f"task.shots + task.queries to at most {fewest}")
        # the splits the trainer and the evaluator use must hold a task; val is checked when sampled
        for s in ("train", "test"):
            n = len(self._split_base[s])
            if n < c.ways:
                raise DataError(self._too_few(s, n))
            if self._episodes(s) == "within_group":
                self._groups_with_ways(s)  # a DataError if no group has ways classes
        # per-channel statistics of the meta-training images, applied to every split
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        on = c.normalize if c.normalize is not None else plan.channels == 3
        if on:
            train_images = torch.cat([self._class_images[i, : self._counts[i]] for i in split_classes["train"]])
            self.mean, self.std = _channel_stats(self._images, train_images)
        for source in sets:  # the data passed every check: keep it decoded for the next start
            save_cache(source)

    def _too_few(self, split: str, n: int) -> str:
        ways = self.config.ways
        fix = f"lower task.ways to at most {n}, or {self._more_classes(split)}" if n >= 2 else \
            self._more_classes(split)
        return f"the {split} split has {n} classes, fewer than ways = {ways}; {fix}"

    def _episodes(self, split: str) -> str:
        """How the tasks of ``split`` draw their classes: ``any`` or ``within_group`` (Omniglot's protocols may
        say within_group for the held-out splits whatever the option)."""
        return getattr(self.config, "episodes", "any")

    def _any_episodes(self, split: str) -> str:
        """How to have the tasks of ``split`` draw from any group (the fix a within-group refusal names)."""
        return "set task.episodes = any"

    def _groups_with_ways(self, split: str) -> Tensor:
        """The indices of the groups with at least ``ways`` classes in ``split`` (within-group episodes draw from
        these); a :class:`DataError` listing each group's classes if there is none."""
        ways = self.config.ways
        counts = torch.bincount(self._split_group[split], minlength=len(self._group_names))
        eligible = (counts >= ways).nonzero().flatten()
        if len(eligible) == 0:
            have = ", ".join(f"{g} {int(n)}" for g, n in zip(self._group_names, counts.tolist()) if n > 0) or "none"
            other = self._any_episodes(split)
            fix = f"lower task.ways to at most {int(counts.max())}, or {other}" if int(counts.max()) >= 2 else other
            raise DataError(f"within-group episodes need a group with at least ways = {ways} classes in the {split} "
                            f"split, and none has (classes per group: {have}); {fix}")
        return eligible

    # -- what is in each split ---------------------------------------------------------------------
    def classes(self, split: Split = "train") -> list[str]:
        """The classes of ``split``: ``"<group>/<class>"``, with ``"/rot090"`` etc. where rotations apply."""
        self._check_split(split)
        keys = [self._keys[i] for i in self._split_base[split].tolist()]
        if not self._rotated[split]:
            return keys
        return [f"{k}/rot{90 * r:03d}" for k, r in zip(keys, self._split_rot[split].tolist())]

    def groups(self, split: Split = "train") -> list[str]:
        """The groups (alphabets) that have classes in ``split``, sorted."""
        self._check_split(split)
        return sorted({self._keys[i].split("/", 1)[0] for i in self._split_base[split].tolist()})

    def n_images(self, split: Split = "train") -> int:
        """Distinct images (before rotation) of the classes of ``split``."""
        self._check_split(split)
        return int(self._counts[self._split_base[split].unique()].sum())

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")

    def image_options(self) -> dict[str, Any]:
        """The options of :func:`~metalens.data.load_image` that prepare an image file as this family prepares an
        evaluation image: decoding, size, channels and normalisation (never augmentation).

        ``load_image(path, **family.image_options())`` is ``[C, H, W]``, one point of a task.
        """
        p = self.plan
        return {"size": p.size, "height": p.height, "width": p.width, "channels": p.channels,
                "resample": p.resample, "invert": p.invert, "fit": p.fit, "mean": self.mean, "std": self.std}

    # -- the contract -------------------------------------------------------------------------------
    @property
    def spec(self) -> TaskSpec:
        shape = tuple(self._images.shape[1:])
        return TaskSpec(kind="classification", x_shape=shape if len(shape) == 3 else (1, *shape),
                        num_classes=self.config.ways, train_classes=len(self._split_base["train"]))

    def sample(self, n_tasks: int, *, generator: torch.Generator, split: Split = "train") -> Episode:
        """Draw ``n_tasks`` N-way K-shot tasks from the classes of ``split``.

        Returns ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]`` (int64),
        ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``, each set in a random order.
        Meta-training tasks also carry ``classes [T, N]``, the index in :meth:`classes`
        of each local label's class (rotations count as classes). Meta-training images are
        augmented (``augment``), with parameters drawn from ``generator`` after everything
        else; every split is normalised (``normalize``).
        """
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        self._check_split(split)
        c = self.config
        g, T, N, K, Q = generator, n_tasks, c.ways, c.shots, c.queries
        base, rot = self._split_base[split], self._split_rot[split]
        C = len(base)
        if C < N:
            raise DataError(self._too_few(split, C))
        if self._episodes(split) == "within_group":
            eligible = self._groups_with_ways(split)
            chosen = eligible[torch.randint(len(eligible), (T,), generator=g)]  # [T] the group of each task
            keys = torch.rand(T, C, generator=g).masked_fill(self._split_group[split] != chosen[:, None], 2.0)
            pick = torch.argsort(keys, dim=1)[:, :N]  # [T, N] classes of the chosen group (others sort last)
        else:
            pick = torch.argsort(torch.rand(T, C, generator=g), dim=1)[:, :N]  # [T, N] classes of each task
        cls, turns = base[pick], rot[pick]  # [T, N]
        M = self._class_images.shape[1]
        keys = torch.rand(T, N, M, generator=g)
        keys = keys.masked_fill(torch.arange(M) >= self._counts[cls][..., None], 2.0)  # padding sorts last
        slots = torch.argsort(keys, dim=2)[..., : K + Q]  # [T, N, K+Q] distinct images of each class
        idx = self._class_images[cls[..., None], slots]  # [T, N, K+Q]
        x = self._images[idx]  # uint8 [T, N, K+Q, H, W] (grey) or [T, N, K+Q, 3, H, W]
        for r in (1, 2, 3):
            sel = turns == r
            if bool(sel.any()):
                x[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        x = to_float(x)
        if x.dim() == 5:
            x = x[:, :, :, None]  # [T, N, K+Q, 1, H, W]

        def shuffled(part: Tensor, per_class: int) -> tuple[Tensor, Tensor, Tensor]:
            y = torch.arange(N).repeat_interleave(per_class).expand(T, -1)  # [T, P] class-major
            xs = part.reshape(T, N * per_class, *part.shape[3:])
            perm = torch.argsort(torch.rand(T, N * per_class, generator=g), dim=1)
            return xs[torch.arange(T)[:, None], perm], y.gather(1, perm), perm

        sx, sy, s_perm = shuffled(x[:, :, :K], K)
        qx, qy, q_perm = shuffled(x[:, :, K:], Q)
        if split == "train":  # a family may draw its training images anew (Omniglot: from perturbed pen strokes)
            which = torch.cat([idx[:, :, :K].reshape(T, -1).gather(1, s_perm),
                               idx[:, :, K:].reshape(T, -1).gather(1, q_perm)], 1)  # [T, N(K+Q)] image indices
            drawn = self._redraw(which, turns.gather(1, torch.cat([s_perm // K, q_perm // Q], 1)), g)
            if drawn is not None:
                sx, qx = drawn[:, : N * K].contiguous(), drawn[:, N * K:].contiguous()
        if split == "train" and c.augment != "none":  # drawn last: the same images as unaugmented, transformed
            both = self._augment(torch.cat([sx, qx], 1).flatten(0, 1), g).reshape(T, N * (K + Q), *sx.shape[2:])
            sx, qx = both[:, : N * K].contiguous(), both[:, N * K:].contiguous()
        if self.mean is not None and self.std is not None:
            sx, qx = normalize(sx, self.mean, self.std), normalize(qx, self.mean, self.std)
        return Episode(sx, sy, qx, qy, num_classes=N, classes=pick if split == "train" else None)

    def _redraw(self, images: Tensor, turns: Tensor, g: torch.Generator) -> Tensor | None:
        """Meta-training images drawn anew: ``images [T, P]`` (indices of the images a training task holds, in
        its order: support, then query), ``turns [T, P]`` (their quarter turns) -> float ``[T, P, C, H, W]``, or
        None to keep the decoded images (the default, which draws nothing from ``g``)."""
        return None

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        """``augment`` on a batch of images ``[B, C, H, W]`` in ``[0, 1]``, parameters drawn from ``g``."""
        c = self.config
        if c.augment == "natural":
            return aug.natural(x, generator=g, crop=c.aug_crop, padding=c.aug_padding, scale=c.aug_crop_scale,
                               ratio=c.aug_crop_ratio, flip_p=c.aug_flip, jitter_strength=c.aug_jitter)
        return aug.handwriting(x, generator=g, rotation=c.aug_rotation, shear=c.aug_shear, scale=c.aug_scale,
                               translate=c.aug_translate)


def _channel_stats(images: Tensor, index: Tensor, chunk: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation, in ``[0, 1]`` units, of ``images[index]`` (``uint8 [n, H, W]`` or
    ``[n, C, H, W]``), exactly: integer sums of the pixels and of their squares, chunk by chunk."""
    a = images.numpy()
    idx = np.sort(index.numpy())
    C = a.shape[1] if a.ndim == 4 else 1
    s1, s2 = np.zeros(C, dtype=np.int64), np.zeros(C, dtype=np.int64)
    for i in range(0, len(idx), chunk):
        block = a[idx[i: i + chunk]].reshape(-1, C, a.shape[-2] * a.shape[-1])
        s1 += block.sum(axis=(0, 2), dtype=np.int64)
        s2 += np.square(block, dtype=np.uint16).sum(axis=(0, 2), dtype=np.int64)
    n = len(idx) * a.shape[-2] * a.shape[-1]
    mean = tuple(int(t) / (n * 255) for t in s1)
    var = [(int(q) * n - int(t) ** 2) / (n * n * 255 * 255) for t, q in zip(s1, s2)]  # exact up to the division
    std = tuple(math.sqrt(v) if v > 0 else 1.0 for v in var)  # a constant channel: centred, not scaled
    return mean, std


