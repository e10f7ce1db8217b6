"""Omniglot N-way K-shot classification (Lake et al. 2015) with the field's standard protocols.

The ``omniglot`` family is the ``images`` family (:mod:`metalens.tasks.images`, which
describes tasks, rotations and where the data is) preconfigured for Omniglot: 28x28
images, ink as 1, rotations as new classes in meta-training by default, and a
``protocol`` that says which sources are read and how the characters are split:

- ``small`` (the default): the two "minimal" background sets shipped in
  ``../shared/data/omniglot``; meta-train on ``images_background_small1``, test on the
  alphabets of ``images_background_small2`` that are not in it (Japanese (katakana),
  Sanskrit, Tagalog: 106 characters); no validation split.
- ``lake``: the background set (30 alphabets, 964 characters) against the evaluation set
  (20 alphabets, 659 characters), as in Lake et al. (2015).
- ``finn``: all 1623 characters, 1100 / 100 / 423 for meta-train / validation / test,
  drawn by ``split_seed`` (Finn et al. 2017).
- ``vinyals``: the sizes of Vinyals et al. (2016), 1028 / 172 / 423 characters, drawn by
  ``split_seed``.
- ``small_within`` and ``lake_within``: ``small`` and ``lake`` with held-out tasks drawn
  within one alphabet, Lake et al.'s (2015) one-shot task: every class of a validation or
  test task is a character of one alphabet, among the alphabets with at least ``ways``
  characters (``small_within`` at 20 ways: Japanese (katakana), 47 characters, and
  Sanskrit, 42; Tagalog, 17, is skipped). Meta-training tasks follow ``episodes``.

``episodes = "within_group"`` draws every task (meta-training too) within one alphabet
(:mod:`metalens.tasks.images`); ``any``, the default, draws characters of any alphabet of
the split.

Images are 28x28 grey with ink as 1 by default; the options every image family shares
(:class:`~metalens.tasks.images.ImageOptions`: ``channels``, ``size`` or ``height`` and
``width``, ``normalize``, ``augment`` with its ``aug_*`` strengths) apply here too, e.g.
``augment=handwriting`` for small random affine maps of the meta-training characters.

Pen strokes. ``strokes = "perturb"`` reads the pen trajectories behind the images (the
``strokes_*`` zip or folder beside each ``images_*`` source, e.g. ``strokes_background_small1.zip``;
:mod:`metalens.data.strokes`), refuses them unless they match the images (the same characters
and drawers), and draws the images of meta-training tasks anew from perturbed strokes, as if
other people had drawn the characters: per-stroke jitter, a smooth local warp and a random
global affine map of the trajectories, and a stroke width per drawing, rendered on the
scans' 105x105 canvas and brought to ``size`` as the scans are. ``strokes_fraction`` of the
images are redrawn (the others stay the scans), ``strokes_strength`` scales the
perturbation. The parameters are drawn from the episode's generator after its images and
orders (before ``augment``, which applies on top): a training episode is a function of
(seed, step) and holds the same characters and drawers as without strokes. Evaluation
tasks are never redrawn. The resampled trajectories are parsed once and kept in the data
cache, as decoded images are; the perturbation and rendering are per episode.

The full dataset is read as folders or as the official zips; ``download=true`` fetches
the zips a protocol lacks (:func:`download_omniglot`) and verifies their MD5 checksums
before they are moved into place. Nothing is downloaded unless asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from metalens.config import opt
from metalens.data import strokes as pen
from metalens.data.archives import download, md5sum
from metalens.data.images import IMAGE_SUFFIXES, to_float
from metalens.data.sources import default_root, read_images, resolve_root, source_paths
from metalens.errors import DataError
from metalens.registry import TASKS
from metalens.tasks.images import ImageFolder, ImageOptions, Plan

__all__ = ["Omniglot", "download_omniglot", "OMNIGLOT_FILES", "OMNIGLOT_URL", "OMNIGLOT_PROTOCOLS"]

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
# name -> (bytes, md5) of the official zips (the MD5s published with torchvision's Omniglot
# and, for the minimal sets, in ../shared/data/omniglot/README.md).
OMNIGLOT_FILES: dict[str, tuple[int | None, str]] = {
    "images_background": (None, "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": (None, "6b91aef0f799c5bb55b94e3f2daec811"),
    "images_background_small1": (1_319_022, "e704a628b5459e08445c13499850abc4"),
    "images_background_small2": (1_580_917, "b75a71a51d3b13f821f212756fe481fd"),
}

OMNIGLOT_PROTOCOLS: dict[str, dict[str, Any]] = {
    # the protocol on the two minimal sets: meta-train on small1, test on the alphabets of
    # small2 that are not in small1 (Japanese (katakana), Sanskrit, Tagalog)
    "small": {"sources": ("images_background_small1", "images_background_small2"), "split": "named",
              "groups": {"train": "images_background_small1/*", "val": "", "test": "*"}},
    # Lake et al. (2015): background set (30 alphabets, 964 characters) vs evaluation set (20, 659)
    "lake": {"sources": ("images_background", "images_evaluation"), "split": "named",
             "groups": {"train": "images_background/*", "val": "", "test": "images_evaluation/*"}},
    # Finn et al. (2017): all 1623 characters, 1200 for meta-training (100 of them held out for
    # validation, as in their code) and 423 for test, drawn by split_seed
    "finn": {"sources": ("images_background", "images_evaluation"), "split": "class",
             "val_size": 100, "test_size": 423},
    # Vinyals et al. (2016) sizes, 1028 / 172 / 423 characters, drawn by split_seed; the published
    # lists (whole alphabets; Snell et al.'s splits/vinyals/*.txt) are not shipped here: name their
    # alphabets with the `images` family's named split to use them exactly
    "vinyals": {"sources": ("images_background", "images_evaluation"), "split": "class",
                "val_size": 172, "test_size": 423},
    # Lake et al.'s (2015) one-shot task: held-out tasks within one alphabet (alphabets with fewer characters than
    # ways are skipped), on the minimal sets and on the full background / evaluation sets
    "small_within": {"sources": ("images_background_small1", "images_background_small2"), "split": "named",
                     "groups": {"train": "images_background_small1/*", "val": "", "test": "*"},
                     "held_out": "within_group"},
    "lake_within": {"sources": ("images_background", "images_evaluation"), "split": "named",
                    "groups": {"train": "images_background/*", "val": "", "test": "images_evaluation/*"},
                    "held_out": "within_group"},
}


def download_omniglot(
    root: str | os.PathLike,
    names: Sequence[str] = ("images_background", "images_evaluation"),
    *,
    base_url: str | None = None,
    opener: Callable[[str], Any] | None = None,
) -> list[Path]:
    """Download the official Omniglot zips ``names`` into ``root`` (MD5-checked; see :func:`~metalens.data.download`).

    ``base_url`` defaults to :data:`OMNIGLOT_URL` (Lake's repository); a mirror, or a local
    ``file://`` folder, works the same.

    A zip already in ``root`` is kept if its checksum is right; a wrong one is a
    :class:`~metalens.errors.DataError` (delete it to fetch it again). Returns the paths of the zips.
    """
    root = Path(root)
    out = []
    for name in names:
        if name not in OMNIGLOT_FILES:
            raise ValueError(f"unknown Omniglot file {name!r}; known: {', '.join(OMNIGLOT_FILES)}")
        md5 = OMNIGLOT_FILES[name][1]
        path = root / f"{name}.zip"
        if path.exists():
            if md5sum(path) != md5:
                raise DataError(f"{path} exists but its md5 is not the published {md5}; delete it to download again")
        else:
            download(f"{(base_url or OMNIGLOT_URL).rstrip('/')}/{name}.zip", path, md5=md5, opener=opener)
        out.append(path)
    return out


@TASKS.register("omniglot")
class Omniglot(ImageFolder):
    """Omniglot N-way K-shot (Lake et al. 2015) with the standard protocols; rotations as new classes."""

    @dataclass(frozen=True)
    class Config(ImageOptions):
        root: str = opt("", "folder with the Omniglot zips or their folders ('': $METALENS_DATA/omniglot, "
                            "else ../shared/data/omniglot)")
        protocol: Literal["small", "lake", "finn", "vinyals", "small_within", "lake_within"] = opt(
            "small", "small: train on images_background_small1, test on the small2-only alphabets; lake: "
                     "background vs evaluation set; finn: 1100/100/423 characters; vinyals: 1028/172/423; "
                     "small_within, lake_within: small, lake with held-out tasks within one alphabet")
        ways: int = opt(5, "characters per task (N)", ge=2)
        shots: int = opt(1, "support images per character (K)", ge=1)
        queries: int = opt(15, "query images per character (shots + queries <= 20)", ge=1)
        rotations: Literal["none", "train", "all"] = opt(
            "train", "rotations by 90/180/270 degrees as new classes: none, meta-train only, or every split")
        split_seed: int = opt(0, "seed of the character split of the finn and vinyals protocols", ge=0)
        download: bool = opt(False, "fetch the protocol's official zips into root if missing (MD5-checked)")
        episodes: Literal["any", "within_group"] = opt(
            "any", "which characters a task draws: any of its split, or all from one alphabet (within_group); the "
                   "*_within protocols draw held-out tasks within one alphabet whatever this says")
        strokes: Literal["none", "perturb"] = opt(
            "none", "perturb: draw meta-training images anew from perturbed pen strokes (the strokes_* zips beside "
                    "the images; never in evaluation)")
        strokes_fraction: float = opt(1.0, "strokes = perturb: the fraction of meta-training images redrawn (the "
                                           "others stay the scans)", ge=0, le=1)
        strokes_strength: float = opt(1.0, "strokes = perturb: scales every magnitude of the perturbation (1: "
                                           "metalens.data.strokes.Perturbation's)", ge=0)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        self._pen: tuple[Tensor, Tensor, Tensor] | None = None  # (slot of each image, points, stroke ids)
        if self.config.strokes != "none":
            self._pen = self._read_strokes()

    def _plan(self) -> Plan:
        c = self.config
        p = OMNIGLOT_PROTOCOLS[c.protocol]
        if c.download:
            root = Path(c.root).expanduser() if c.root else default_root()
            missing = [s for s in p["sources"] if not (root / s).exists() and not (root / f"{s}.zip").exists()]
            if missing:
                download_omniglot(root, missing)
        else:
            root = resolve_root(c.root)
            missing = [s for s in p["sources"] if not (root / s).exists() and not (root / f"{s}.zip").exists()]
            if missing:
                raise DataError(
                    f"the {c.protocol!r} protocol reads {' and '.join(p['sources'])} (zips or folders) from "
                    f"{root.resolve()}, which lacks {', '.join(missing)}; add --set task.download=true to fetch "
                    "the official zips (MD5-checked), or point task.root at a folder that has them")
        groups = p.get("groups", {"train": "", "val": "", "test": ""})
        return Plan(c.root, p["sources"], p["split"], c.split_seed, p.get("val_size", 0), p.get("test_size", 0),
                    groups, c.rotations, c.size, "box", True, channels=c.channels, height=c.height, width=c.width)

    def _more_classes(self, split: str) -> str:
        return f"choose a protocol with more {split} characters (task.protocol; {self.config.protocol!r} now)"

    def _any_episodes(self, split: str) -> str:
        if split != "train" and OMNIGLOT_PROTOCOLS[self.config.protocol].get("held_out") == "within_group":
            return f"choose a protocol whose held-out tasks draw from any alphabet (task.protocol; {self.config.protocol!r} now)"
        return super()._any_episodes(split)

    def _episodes(self, split: str) -> str:
        if split != "train" and OMNIGLOT_PROTOCOLS[self.config.protocol].get("held_out") == "within_group":
            return "within_group"
        return self.config.episodes

    # -- pen strokes ------------------------------------------------------------------------------------
    def _read_strokes(self) -> tuple[Tensor, Tensor, Tensor]:
        """The resampled trajectories of every meta-training image: ``(slot [n_images], points [n, L, 2], stroke
        [n, L])``, ``slot`` the row of each image of the family (-1 for images no training task holds), after
        checking that the strokes of every source match its images."""
        p = self.plan
        sets = []
        for path in source_paths(self.root, p.sources):
            images = read_images(path, size=p.size, resample=p.resample, invert=p.invert, channels=p.channels,
                                 height=p.height, width=p.width, fit=p.fit, cache="read")  # in memory already
            name = path.name[: -len(".zip")] if path.name.lower().endswith(".zip") else path.name
            found = None
            if name.startswith("images_"):
                stem = "strokes_" + name[len("images_"):]
                found = next((q for q in (path.parent / stem, path.parent / f"{stem}.zip") if q.exists()), None)
            if found is None:
                want = f"strokes_{name[len('images_'):]}" if name.startswith("images_") else f"the strokes of {name}"
                raise DataError(f"task.strokes = perturb reads the pen strokes beside each image source, and "
                                f"{want} (a zip or a folder) is not in {path.parent}; put it there (Omniglot's "
                                "strokes_*.zip), or set task.strokes = none")
            strokes = pen.read_strokes(found)
            pen.check_match(images.files, strokes, images_name=images.name)
            sets.append((images, strokes))
        # the image of the family at class_images[row, j] is the j-th file (in name order) of its class in the first
        # source that has the class (metalens.tasks.images reads sources so); its strokes have the same key
        by_class: list[dict[str, list[str]]] = []  # per source: class -> drawing keys of its files, in name order
        for images, _ in sets:
            files: dict[str, list[str]] = {}
            for f in sorted(images.files):
                key = pen.drawing_key(f, IMAGE_SUFFIXES, images.name)
                if key is not None:
                    files.setdefault(key.rsplit("/", 1)[0], []).append(key)
            by_class.append(files)
        train = set(self._split_base["train"].unique().tolist())
        rows: list[tuple[int, int, int]] = []  # (image index, stroke set, row in it)
        for r, key in enumerate(self._keys):
            if r not in train:
                continue
            i = next(i for i, files in enumerate(by_class) if key in files)
            index = sets[i][1].index()
            rows += [(int(self._class_images[r, j]), i, index[k]) for j, k in enumerate(by_class[i][key])]
        slot = torch.full((len(self._images),), -1, dtype=torch.int64)
        L = max(int((s.stroke >= 0).sum(1).max()) for _, s in sets)
        points = torch.zeros(len(rows), L, 2)
        stroke = torch.full((len(rows), L), -1, dtype=torch.int64)
        for n, (image, i, row) in enumerate(rows):
            s = sets[i][1]
            slot[image] = n
            k = min(L, s.points.shape[1])  # each set is padded to its own longest drawing
            points[n, :k] = s.points[row, :k]
            stroke[n, :k] = s.stroke[row, :k]
        return slot, points, stroke

    def _redraw(self, images: Tensor, turns: Tensor, g: torch.Generator) -> Tensor | None:
        """``strokes_fraction`` of the images drawn anew from perturbed strokes (:mod:`metalens.data.strokes`),
        rotated as their classes are; the draws: which images (one uniform each), then the perturbation."""
        if self._pen is None:
            return None
        c, p = self.config, self.plan
        slot, points, stroke = self._pen
        T, P = images.shape
        flat, quarter = images.flatten(), turns.flatten()
        chosen = torch.rand(len(flat), generator=g) < c.strokes_fraction  # [T P]
        x = self._images[flat]  # uint8 [T P, H, W] (grey) or [T P, 3, H, W]
        which = chosen.nonzero().flatten()
        if len(which):
            rows = slot[flat[which]]
            pts, sid = points[rows], stroke[rows]
            L = int((sid >= 0).sum(1).max())
            moved = pen.perturb(pts[:, :L], sid[:, :L], generator=g,
                                p=pen.Perturbation(strength=c.strokes_strength))
            drawn = torch.from_numpy(pen.render(moved.points, sid[:, :L], moved.widths, size=p.size,
                                                height=p.height, width=p.width, fit=p.fit, resample=p.resample))
            if x.dim() == 4:  # colour: grey paper-white images in three channels, never inverted
                drawn = (255 - drawn)[:, None].expand(-1, 3, -1, -1)
            x[which] = drawn
        for r in (1, 2, 3):
            sel = quarter == r
            if bool(sel.any()):
                x[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        x = to_float(x)
        if x.dim() == 3:
            x = x[:, None]
        return x.reshape(T, P, *x.shape[1:])
