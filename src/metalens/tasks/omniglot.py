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

Images are 28x28 grey with ink as 1 by default; the options every image family shares
(:class:`~metalens.tasks.images.ImageOptions`: ``channels``, ``size`` or ``height`` and
``width``, ``normalize``, ``augment`` with its ``aug_*`` strengths) apply here too, e.g.
``augment=handwriting`` for small random affine maps of the meta-training characters.

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

from metalens.config import opt
from metalens.data.archives import download, md5sum
from metalens.data.sources import default_root, resolve_root
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
        protocol: Literal["small", "lake", "finn", "vinyals"] = opt(
            "small", "small: train on images_background_small1, test on the small2-only alphabets; lake: "
                     "background vs evaluation set; finn: 1100/100/423 characters; vinyals: 1028/172/423")
        ways: int = opt(5, "characters per task (N)", ge=2)
        shots: int = opt(1, "support images per character (K)", ge=1)
        queries: int = opt(15, "query images per character (shots + queries <= 20)", ge=1)
        rotations: Literal["none", "train", "all"] = opt(
            "train", "rotations by 90/180/270 degrees as new classes: none, meta-train only, or every split")
        split_seed: int = opt(0, "seed of the character split of the finn and vinyals protocols", ge=0)
        download: bool = opt(False, "fetch the protocol's official zips into root if missing (MD5-checked)")

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
