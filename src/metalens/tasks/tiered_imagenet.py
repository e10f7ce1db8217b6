"""tieredImageNet N-way K-shot classification (Ren et al. 2018) with its published split.

608 ImageNet (ILSVRC-12) classes grouped into 34 super-categories of the WordNet hierarchy,
split by super-category so that meta-train, validation and test classes are far apart:
351 classes in 20 super-categories / 97 in 6 / 160 in 8. The lists are
``fewshot/data/tiered_imagenet_split/{train,val,test}.csv`` (rows: class WordNet id,
super-category WordNet id) of https://github.com/renmengye/few-shot-ssl-public (commit
4ce8726c036ae2811050e9571e8d2b4b46b2acac), with the super-categories' names from
``words.txt`` beside them, shipped as ``metalens/tasks/splits/tiered_imagenet.json``. A class
is ``"<super-category wnid>/<class wnid>"`` (:meth:`~TieredImageNet.classes`), and
:meth:`~TieredImageNet.groups` lists the super-categories of a split. Images are 84x84 colour
by default, stretched to that size as Ren et al. resized them; see
:mod:`metalens.tasks.benchmarks` for the checks, decoding and cache every benchmark shares.

What it reads (``task.root``; left empty, ``$METALENS_DATA/tiered_imagenet``, else
``../shared/data/tiered_imagenet``): an image folder by split,
``<root>/{train,val,test}/<wnid>/*.jpg`` (any depth: the class of an image is its folder's
WordNet id, and a class in another split's folder than the published one is refused), or all
class folders in one, ``<root>/<wnid>/*.jpg``. The classes' images are ImageNet's ILSVRC-12
training images of those classes (779,165 images; about 16.5 GB decoded at 84x84, checked
against the memory before decoding). The ``.pkl`` files of Ren et al.'s release are pickles,
which metalens never opens: they are refused with a message saying to lay out the images.
tieredImageNet has no official download address; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metalens.config import opt
from metalens.errors import DataError
from metalens.registry import TASKS
from metalens.tasks.benchmarks import (
    SPLITS,
    Benchmark,
    BenchmarkOptions,
    Source,
    folder_source,
    published_split,
    refuse_file_root,
)

__all__ = ["TieredImageNet"]


@TASKS.register("tiered_imagenet")
class TieredImageNet(Benchmark):
    """tieredImageNet N-way K-shot (Ren et al. 2018): 351/97/160 classes in 20/6/8 super-categories, 84x84 colour."""

    TITLE = "tieredImageNet"
    FOLDER = "tiered_imagenet"
    DOCS = "docs/benchmarks-data/tiered-imagenet.md"

    @dataclass(frozen=True)
    class Config(BenchmarkOptions):
        root: str = opt("", "tieredImageNet's folder: {train,val,test}/<wnid>/*.jpg (or <wnid>/*.jpg) ('': "
                            "$METALENS_DATA/tiered_imagenet, else ../shared/data/tiered_imagenet)")
        size: int = opt(84, "images are resized to size x size (unless height and width say otherwise)", ge=1)

    @classmethod
    def published_classes(cls) -> dict[str, list[str]]:
        lists = published_split("tiered_imagenet")
        return {s: [f"{group}/{wnid}" for group, wnids in lists[s].items() for wnid in wnids] for s in SPLITS}

    def _belongs(self) -> str:
        return "put each class's ILSVRC-12 training images in <root>/<split>/<wnid>/"

    def _locate(self, path: Path, how: str) -> Source:
        if not path.exists():
            raise self._absent(path, how, "put the ILSVRC-12 training images of its 608 classes there as "
                                          "{train,val,test}/<wnid>/*.jpg")
        if not path.is_dir():
            refuse_file_root(path, self.TITLE, self.DOCS)
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".pkl", ".pickle"))
        lists = self.published_classes()
        split_of = {k: s for s in SPLITS for k in lists[s]}
        source = folder_source(path, {k.split("/", 1)[1]: k for k in split_of}, layout="class-folders",
                               split_of=split_of)
        if pickles and not source.stamp:
            raise DataError(f"{path} holds {', '.join(pickles[:3])}: Ren et al.'s pickled release, which metalens "
                            "never opens (loading a pickle can run any code); lay out the images as "
                            f"<root>/{{train,val,test}}/<wnid>/*.jpg instead ({self.DOCS})")
        return source
