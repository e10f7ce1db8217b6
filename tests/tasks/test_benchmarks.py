"""The benchmark families (mini_imagenet, tiered_imagenet, cifar_fs, fc100, cub): their published splits, and
episodes, checks and refusals on small copies of each data set in its real format, built here.

This machine has none of the data sets. The fixtures hold tiny images of the real class ids of
a few classes of each split (the families' split lists are patched down to those classes,
``small_splits``), CIFAR-100 records written with NumPy in the binary version's format, and a
CUB-200-2011-like ``.tgz``. Nothing is downloaded: the download tests fetch from ``file://``.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalens import rng
from metalens.cli import main
from metalens.data.archives import UnsafeArchiveError, md5sum
from metalens.errors import DataError
from metalens.registry import TASKS
from metalens.tasks import benchmarks, cifar, cub, mini_imagenet, tiered_imagenet
from metalens.tasks.benchmarks import SPLITS, DataNotFound, published_split
from metalens.tasks.cifar import FC100, CifarFS
from metalens.tasks.cub import CUB
from metalens.tasks.mini_imagenet import MiniImageNet
from metalens.tasks.tiered_imagenet import TieredImageNet

torch.set_num_threads(1)

SEED = 20240611
FAMILIES = ["mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100", "cub"]
PER_CLASS = 3  # images of each class in the fixtures: shots = 1 + queries = 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the published splits, as shipped --------------------------------------------------------------------------
def _disjoint(lists: dict) -> bool:
    sets = [set(lists[s]) for s in SPLITS]
    return sum(map(len, sets)) == len(set().union(*sets))


def test_mini_imagenet_split_is_ravi_and_larochelles_64_16_20():
    lists = MiniImageNet.published_classes()
    assert [len(lists[s]) for s in SPLITS] == [64, 16, 20]
    assert _disjoint(lists)
    assert all(re.fullmatch(r"n\d{8}", k) for s in SPLITS for k in lists[s])
    # the first class of each of twitter/meta-learning-lstm's data/miniImagenet/{train,val,test}.csv
    assert [lists[s][0] for s in SPLITS] == ["n01532829", "n01855672", "n01930112"]


def test_tiered_imagenet_split_is_351_97_160_classes_in_20_6_8_super_categories():
    raw = published_split("tiered_imagenet")
    assert [len(raw[s]) for s in SPLITS] == [20, 6, 8]  # super-categories
    assert [sum(map(len, raw[s].values())) for s in SPLITS] == [351, 97, 160]
    assert _disjoint({s: list(raw[s]) for s in SPLITS})  # no super-category in two splits
    lists = TieredImageNet.published_classes()
    assert [len(lists[s]) for s in SPLITS] == [351, 97, 160] and _disjoint(lists)
    assert len({k.split("/")[1] for s in SPLITS for k in lists[s]}) == 608
    assert set(raw["categories"]) == {g for s in SPLITS for g in raw[s]}


def test_cifar_fs_split_is_bertinettos_64_16_20_of_cifar_100():
    lists = CifarFS.published_classes()
    assert [len(lists[s]) for s in SPLITS] == [64, 16, 20] and _disjoint(lists)
    meta = published_split("cifar100")
    assert len(meta["fine"]) == 100 and meta["fine"] == sorted(meta["fine"])  # CIFAR-100's label order
    assert {k.split("/")[1] for s in SPLITS for k in lists[s]} == set(meta["fine"])
    assert "people/baby" in lists["test"] and "aquatic_mammals/dolphin" in lists["train"]


def test_fc100_split_is_12_4_4_super_classes_hence_60_20_20_classes():
    raw = published_split("fc100")
    assert [len(raw[s]) for s in SPLITS] == [12, 4, 4] and _disjoint(raw)
    lists = FC100.published_classes()
    assert [len(lists[s]) for s in SPLITS] == [60, 20, 20] and _disjoint(lists)
    for s in SPLITS:  # whole super-classes: no super-class in two splits
        assert {k.split("/")[0] for k in lists[s]} == set(raw[s])
    assert set(raw["test"]) == {"aquatic_mammals", "insects", "medium_mammals", "people"}


def test_cub_split_is_chens_100_50_50():
    lists = CUB.published_classes()
    assert [len(lists[s]) for s in SPLITS] == [100, 50, 50] and _disjoint(lists)
    every = sorted(k for s in SPLITS for k in lists[s])
    assert len(every) == 200 and every[0] == "001.Black_footed_Albatross"
    # Chen et al.'s rule: sorted folder i in train if i % 2 == 0, val if i % 4 == 1, test if i % 4 == 3
    assert lists["train"] == every[0::2] and lists["val"] == every[1::4] and lists["test"] == every[3::4]


def test_split_files_ship_with_the_package():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"metalens.tasks" = ["splits/*.json"]' in pyproject
    for name in ("mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100", "cifar100", "cub"):
        assert "github.com" in published_split(name)["about"] or "toronto" in published_split(name)["about"]


# -- small copies of each data set, in its real format -----------------------------------------------------
def _reduced(name: str) -> dict:
    """The published split ``name`` cut to a few real classes of each split (5; FC100: one super-class)."""
    real = published_split(name)
    if name == "fc100":
        return {**real, **{s: real[s][:1] for s in SPLITS}}
    if name == "tiered_imagenet":  # 5 classes from the first super-categories of each split
        out = {}
        for s in SPLITS:
            left, groups = 5, {}
            for g, wnids in real[s].items():
                if left == 0:
                    break
                groups[g] = wnids[: min(3, left)]
                left -= len(groups[g])
            out[s] = groups
        return {**real, **out}
    if name == "cifar100":
        return real
    return {**real, **{s: real[s][:5] for s in SPLITS}}


@pytest.fixture
def small_splits(monkeypatch):
    """Every benchmark family sees its published split cut to a few real classes (:func:`_reduced`)."""
    for module in (mini_imagenet, tiered_imagenet, cifar, cub):
        monkeypatch.setattr(module, "published_split", _reduced)


def _image(generator: np.random.Generator, fmt: str = "JPEG", size: tuple[int, int] = (10, 8)) -> bytes:
    a = generator.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _small_classes(name: str) -> dict[str, list[str]]:
    raw = _reduced(name)
    if name == "tiered_imagenet":
        return {s: [w for ws in raw[s].values() for w in ws] for s in SPLITS}
    return {s: list(raw[s]) for s in SPLITS}


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    """``<root>/<wnid>/*.jpg`` for the small split's classes, beside a folder that is not a miniImageNet class."""
    root = tmp_path_factory.mktemp("mini") / "mini_imagenet"
    g = np.random.default_rng(SEED)
    for wnids in _small_classes("mini_imagenet").values():
        for w in wnids:
            for k in range(PER_CLASS):
                _write(root / w / f"{w}{k:08d}.jpg", _image(g))
    _write(root / "n99999999" / "x.jpg", _image(g))  # not a class of the split: left alone
    _write(root / "README.txt", b"not an image")
    return root


@pytest.fixture(scope="module")
def tiered_root(tmp_path_factory) -> Path:
    """``<root>/{train,val,test}/<wnid>/*.png`` for the small split's classes."""
    root = tmp_path_factory.mktemp("tiered") / "tiered_imagenet"
    g = np.random.default_rng(SEED + 1)
    for s, wnids in _small_classes("tiered_imagenet").items():
        for w in wnids:
            for k in range(PER_CLASS):
                _write(root / s / w / f"{w}_{k}.png", _image(g, "PNG", (9, 12)))
    return root


def _cifar_bins(generator: np.random.Generator, fine: list[int], per_class: dict[str, int]) -> dict[str, bytes]:
    """``train.bin`` and ``test.bin`` in CIFAR-100's binary format: records (coarse, fine, 3072 pixels) of the
    classes ``fine``, ``per_class[name]`` records each, in a shuffled order."""
    meta = published_split("cifar100")
    coarse_of = [meta["coarse"].index(meta["coarse_of"][f]) for f in meta["fine"]]
    out = {}
    for name, n in per_class.items():
        labels = np.repeat(np.asarray(fine), n)
        generator.shuffle(labels)
        rec = np.empty((len(labels), 3074), dtype=np.uint8)
        rec[:, 0] = np.asarray(coarse_of)[labels]
        rec[:, 1] = labels
        rec[:, 2:] = generator.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        out[name] = rec.tobytes()
    return out


def _names_files() -> dict[str, bytes]:
    meta = published_split("cifar100")
    return {"fine_label_names.txt": "\n".join(meta["fine"]).encode() + b"\n",
            "coarse_label_names.txt": "\n".join(meta["coarse"]).encode() + b"\n"}


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def cifar_roots(tmp_path_factory) -> dict[str, Path]:
    """CIFAR-100's binary version for every class (2 records each in train.bin, 1 in test.bin): as the extracted
    ``cifar-100-binary/`` folder (``bins``) and as ``cifar-100-binary.tar.gz`` (``tar``)."""
    base = tmp_path_factory.mktemp("cifar")
    files = {**_cifar_bins(np.random.default_rng(SEED + 2), list(range(100)), {"train.bin": 2, "test.bin": 1}),
             **_names_files()}
    for name, data in files.items():
        _write(base / "bins" / "cifar-100-binary" / name, data)
    _tar_gz(base / "tar" / "cifar-100-binary.tar.gz", {f"cifar-100-binary/{k}": v for k, v in files.items()})
    return {"bins": base / "bins", "tar": base / "tar"}


def _cub_members(generator: np.random.Generator, classes: list[str]) -> dict[str, bytes]:
    members = {"attributes.txt": b"1 has_bill_shape::curved\n"}
    lines = []
    for i, c in enumerate(classes):
        lines.append(f"{i + 1} {c}")
        for k in range(PER_CLASS):
            members[f"CUB_200_2011/images/{c}/{c.split('.', 1)[1]}_{k:04d}.jpg"] = _image(generator, size=(12, 9))
    members["CUB_200_2011/classes.txt"] = ("\n".join(lines) + "\n").encode()
    return members


@pytest.fixture(scope="module")
def cub_roots(tmp_path_factory) -> dict[str, Path]:
    """A CUB-200-2011-like ``CUB_200_2011.tgz`` (``tgz``) and the folder it extracts to (``folder``)."""
    base = tmp_path_factory.mktemp("cub")
    classes = [c for cs in _small_classes("cub").values() for c in cs]
    members = _cub_members(np.random.default_rng(SEED + 3), classes)
    _tar_gz(base / "tgz" / "CUB_200_2011.tgz", members)
    for name, data in members.items():
        _write(base / "folder" / name, data)
    return {"tgz": base / "tgz", "folder": base / "folder"}


@pytest.fixture
def roots(mini_root, tiered_root, cifar_roots, cub_roots) -> dict[str, Path]:
    return {"mini_imagenet": mini_root, "tiered_imagenet": tiered_root, "cifar_fs": cifar_roots["tar"],
            "fc100": cifar_roots["bins"], "cub": cub_roots["tgz"]}


def build(name: str, root: Path, **options):
    cls = TASKS[name].cls
    return cls(cls.Config(root=str(root), **{"ways": 5, "shots": 1, "queries": 2, **options}))


# -- episodes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_episodes_have_the_benchmarks_shape_in_colour(name, roots, small_splits):
    family = build(name, roots[name])
    H = 32 if name in ("cifar_fs", "fc100") else 84
    for split in SPLITS:
        ep = family.sample(3, generator=gen(SEED), split=split)
        msg = f"{name} {split}, seed {SEED}"
        assert ep.support_x.shape == (3, 5, 3, H, H) and ep.query_x.shape == (3, 10, 3, H, H), msg
        assert ep.support_x.dtype == torch.float32 and bool(torch.isfinite(ep.query_x).all()), msg
        assert bool((torch.nn.functional.one_hot(ep.query_y, 5).sum(1) == 2).all()), msg
    assert family.spec.x_shape == (3, H, H) and family.spec.train_classes == 5
    assert family.mean is not None and len(family.std) == 3  # normalised by default, with training statistics
    split_of = {k: s for s, keys in type(family).published_classes().items() for k in keys}
    for s in SPLITS:
        assert [split_of[k] for k in family.classes(s)] == [s] * 5
        assert family.n_images(s) == 5 * PER_CLASS


def test_super_categories_are_the_groups(roots, small_splits):
    tiered = build("tiered_imagenet", roots["tiered_imagenet"], size=8)
    raw = _reduced("tiered_imagenet")
    assert tiered.groups("train") == sorted(raw["train"]) and tiered.groups("val") == sorted(raw["val"])
    assert build("fc100", roots["fc100"], size=8).groups("test") == ["aquatic_mammals"]
    assert build("mini_imagenet", roots["mini_imagenet"], size=8).groups("train") == []


@pytest.mark.parametrize("name", FAMILIES)
def test_episodes_depend_on_the_generator_only(name, roots, small_splits):
    family = build(name, roots[name], size=8)
    torch.manual_seed(SEED)
    state = torch.get_rng_state()
    a = family.sample(4, generator=gen(SEED))
    assert torch.equal(state, torch.get_rng_state()), f"{name} used the global RNG (seed {SEED})"
    b = family.sample(4, generator=gen(SEED))
    c = family.sample(4, generator=gen(SEED + 1))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y), f"{name}, seed {SEED}"
    assert not torch.equal(a.support_x, c.support_x), f"{name}: seeds {SEED} and {SEED + 1}"
    assert torch.equal(family.episode(SEED, 3, 2).support_x,
                       family.sample(2, generator=rng.generator(SEED, rng.Stream.TRAIN, 3)).support_x)
    e = family.eval_episodes(SEED, 60)
    assert torch.equal(e.query_x, family.eval_episodes(SEED, 120)[:60].query_x), f"{name}, seed {SEED}"


def test_natural_augmentation_changes_training_episodes_only(roots, small_splits):
    plain = build("mini_imagenet", roots["mini_imagenet"], size=16)
    aug = build("mini_imagenet", roots["mini_imagenet"], size=16, augment="natural")
    a, b = plain.episode(SEED, 0, 2), aug.episode(SEED, 0, 2)
    assert torch.equal(a.support_y, b.support_y) and not torch.equal(a.support_x, b.support_x), f"seed {SEED}"
    assert torch.equal(plain.eval_episodes(SEED, 3).query_x, aug.eval_episodes(SEED, 3).query_x)


def test_a_second_build_maps_the_decoded_images_from_the_cache(tmp_path, mini_root, small_splits, monkeypatch):
    root = tmp_path / "mini"
    shutil.copytree(mini_root, root, ignore=shutil.ignore_patterns(".metalens-cache"))
    first = build("mini_imagenet", root, size=12)
    assert any((root / ".metalens-cache").glob("*.npy")), "the decoded images were not cached beside the data"
    benchmarks._MEMORY.clear()  # as a new process starts
    monkeypatch.setattr(benchmarks, "_decode_listing", lambda *a, **k: pytest.fail("decoded again"))
    second = build("mini_imagenet", root, size=12)
    assert torch.equal(first.sample(2, generator=gen(SEED)).query_x, second.sample(2, generator=gen(SEED)).query_x)


# -- the layouts each family reads ----------------------------------------------------------------------------
def test_mini_imagenet_reads_split_folders_and_ravis_csv_layout_alike(tmp_path, mini_root, small_splits):
    flat = build("mini_imagenet", mini_root, size=12)
    by_split = tmp_path / "by_split"
    csv_root = tmp_path / "ravi"
    rows = {s: ["filename,label"] for s in SPLITS}
    for s, wnids in _small_classes("mini_imagenet").items():
        for w in wnids:
            shutil.copytree(mini_root / w, by_split / s / w)
            for f in sorted((mini_root / w).iterdir()):
                _write(csv_root / "images" / f.name, f.read_bytes())
                rows[s].append(f"{f.name},{w}")
    for s in SPLITS:
        (csv_root / f"{s}.csv").write_text("\n".join(rows[s]) + "\n")
    (csv_root / "images" / "n0000000100000001.jpg").write_bytes(b"not listed in any CSV: never read")
    ep = flat.sample(2, generator=gen(SEED), split="test")
    for root in (by_split, csv_root):
        other = build("mini_imagenet", root, size=12)
        assert other.classes("test") == flat.classes("test")
        assert torch.equal(other.sample(2, generator=gen(SEED), split="test").query_x, ep.query_x), root
    (csv_root / "val.csv").unlink()
    (csv_root / "test.csv").unlink()
    (csv_root / "train.csv").unlink()  # without the CSVs, the class of a file is the wnid it starts with
    (csv_root / "images" / "n0000000100000001.jpg").unlink()
    assert build("mini_imagenet", csv_root, size=12).classes("val") == flat.classes("val")


def test_mini_imagenet_refuses_another_split_and_more_images_than_it_has(tmp_path, mini_root, small_splits):
    lists = _small_classes("mini_imagenet")
    moved = tmp_path / "moved"
    for s, wnids in lists.items():
        for w in wnids:
            shutil.copytree(mini_root / w, moved / ("val" if w == lists["train"][0] else s) / w)
    with pytest.raises(DataError, match=f"class {lists['train'][0]} in train: this copy follows another split"):
        build("mini_imagenet", moved)
    ravi = tmp_path / "ravi"
    _write(ravi / "images" / "x.jpg", b"")
    (ravi / "train.csv").write_text(f"filename,label\nx.jpg,{lists['val'][0]}\n")
    with pytest.raises(DataError, match=f"lists class {lists['val'][0]} in train, but .* puts it in val"):
        build("mini_imagenet", ravi)
    big = tmp_path / "imagenet"
    shutil.copytree(mini_root, big)
    w = lists["test"][0]
    for k in range(601):
        (big / w / f"extra{k}.jpg").write_bytes((mini_root / w / f"{w}{0:08d}.jpg").read_bytes())
    with pytest.raises(DataError, match=f"604 images of class {w}, more than the 600 of miniImageNet"):
        build("mini_imagenet", big)


def test_tiered_imagenet_refuses_ren_et_als_pickles(tmp_path, small_splits):
    root = tmp_path / "tiered"
    _write(root / "train_images_png.pkl", b"\x80\x04\x95")
    with pytest.raises(DataError, match=r"train_images_png\.pkl: Ren et al\.'s pickled release, which metalens never "
                                        r"opens.*\{train,val,test\}/<wnid>/\*\.jpg"):
        build("tiered_imagenet", root)
    with pytest.raises(DataError, match="is a Python pickle, which metalens never opens"):
        build("tiered_imagenet", root / "train_images_png.pkl")


def test_cifar_reads_the_archive_and_the_extracted_files_alike(cifar_roots, small_splits):
    for name in ("cifar_fs", "fc100"):
        a = build(name, cifar_roots["tar"], size=32)
        b = build(name, cifar_roots["bins"] / "cifar-100-binary")
        c = build(name, cifar_roots["tar"] / "cifar-100-binary.tar.gz")
        ep = a.sample(2, generator=gen(SEED), split="val")
        for other in (b, c):
            assert other.classes("val") == a.classes("val")
            assert torch.equal(other.sample(2, generator=gen(SEED), split="val").support_x, ep.support_x), name
    # the records' own pixels, undecoded, at 32x32: the first test record of a class, un-normalised
    f = build("cifar_fs", cifar_roots["bins"], normalize=False)
    rec = np.frombuffer((cifar_roots["bins"] / "cifar-100-binary" / "test.bin").read_bytes(), np.uint8)
    rec = rec.reshape(-1, 3074)
    key = f._keys[0]
    fine = published_split("cifar100")["fine"].index(key.split("/")[1])
    first = rec[rec[:, 1] == fine][0, 2:].reshape(3, 32, 32)
    assert torch.equal(f._images[f._class_images[0, 0]], torch.from_numpy(first))


def test_cifar_refuses_the_python_version_and_what_is_not_cifar_100(tmp_path, small_splits):
    pickle_bytes = b"\x80\x03}q\x00."  # a pickled {} (protocol 3), never loaded
    python = tmp_path / "python"
    _tar_gz(python / "cifar-100-python.tar.gz", {"cifar-100-python/train": pickle_bytes,
                                                 "cifar-100-python/test": pickle_bytes,
                                                 "cifar-100-python/meta": pickle_bytes})
    for root in (python, python / "cifar-100-python.tar.gz"):
        with pytest.raises(DataError, match=r"python version, whose files are pickles, which metalens never opens "
                                            r"\(loading one can run any code\); use the binary version: put "
                                            r"cifar-100-binary\.tar\.gz"):
            build("cifar_fs", root)
    renamed = tmp_path / "renamed" / "cifar-100-binary.tar.gz"  # the python version under the binary's name
    renamed.parent.mkdir()
    shutil.copy(python / "cifar-100-python.tar.gz", renamed)
    with pytest.raises(DataError, match="python version.*use the binary version"):
        build("fc100", renamed.parent)
    bins = tmp_path / "bins"
    _write(bins / "train.bin", pickle_bytes)
    _write(bins / "test.bin", pickle_bytes)
    with pytest.raises(DataError, match="train.bin of .* is a Python pickle"):
        build("cifar_fs", bins)
    _write(bins / "train.bin", bytes(3073 * 4))
    with pytest.raises(DataError, match="3073-byte records: CIFAR-10's binary version, not CIFAR-100's"):
        build("cifar_fs", bins)
    _write(bins / "train.bin", bytes([3, 0]) + bytes(3072))  # coarse 3, fine 0 (apple, whose super-class is 4)
    with pytest.raises(DataError, match="record 0 has coarse label 3 and fine label 0, which CIFAR-100 does not pair"):
        build("cifar_fs", bins)
    text = tmp_path / "text" / "cifar-100-binary.tar.gz"
    _write(text, b"<html>not found</html>")
    with pytest.raises(DataError, match=r"is not a tar archive \(it starts '<html>"):
        build("cifar_fs", text.parent)


def test_cifar_names_the_classes_its_records_lack(tmp_path, small_splits):
    lists = _reduced("cifar_fs")
    fine = published_split("cifar100")["fine"]
    gone = lists["test"][2]
    keep = [fine.index(f) for s in SPLITS for f in lists[s] if f != gone]
    for name, data in _cifar_bins(np.random.default_rng(SEED), keep, {"train.bin": 2, "test.bin": 1}).items():
        _write(tmp_path / name, data)
    with pytest.raises(DataError) as e:
        build("cifar_fs", tmp_path)
    assert f"lacks 1 of the 15 classes of CIFAR-FS's published split: {gone} (test)" in str(e.value)
    assert "\n" not in str(e.value)


def test_cub_reads_the_archive_and_the_extracted_folder_alike(cub_roots, small_splits):
    a = build("cub", cub_roots["tgz"], size=16)
    ep = a.sample(2, generator=gen(SEED), split="test")
    for root in (cub_roots["tgz"] / "CUB_200_2011.tgz", cub_roots["folder"], cub_roots["folder"] / "CUB_200_2011"):
        b = build("cub", root, size=16)
        assert b.classes("test") == a.classes("test")
        assert torch.equal(b.sample(2, generator=gen(SEED), split="test").query_x, ep.query_x), root


def test_cub_refuses_unsafe_and_non_archives(tmp_path, small_splits):
    classes = [c for cs in _small_classes("cub").values() for c in cs]
    members = _cub_members(np.random.default_rng(SEED), classes)
    for bad in ("../evil.jpg", "/etc/evil.jpg"):
        _tar_gz(tmp_path / "bad" / "CUB_200_2011.tgz", {**members, bad: b"x"})
        with pytest.raises(UnsafeArchiveError, match="nothing was read or written"):
            build("cub", tmp_path / "bad")
    link = tmp_path / "link" / "CUB_200_2011.tgz"
    _tar_gz(link, members)
    with tarfile.open(link, "w:gz") as t:  # rewrite with a symbolic link among the images
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        sym = tarfile.TarInfo(f"CUB_200_2011/images/{classes[0]}/link.jpg")
        sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(sym)
    with pytest.raises(UnsafeArchiveError, match="link.jpg' is a symbolic link"):
        build("cub", link)
    _write(tmp_path / "zip" / "CUB_200_2011.tgz", b"PK\x03\x04 a zip")
    with pytest.raises(DataError, match="is a zip file, not a tar archive"):
        build("cub", tmp_path / "zip")
    _write(tmp_path / "empty" / "CUB_200_2011.tgz", b"")
    with pytest.raises(DataError, match="is empty, not a tar archive"):
        build("cub", tmp_path / "empty")


# -- what is missing ------------------------------------------------------------------------------------------
def test_a_missing_class_is_one_line_naming_it_and_where_it_belongs(tmp_path, mini_root, small_splits):
    root = tmp_path / "mini"
    gone = _small_classes("mini_imagenet")["test"][3]
    shutil.copytree(mini_root, root, ignore=shutil.ignore_patterns(gone, ".metalens-cache"))
    with pytest.raises(DataError) as e:
        build("mini_imagenet", root)
    msg = str(e.value)
    assert "\n" not in msg and not isinstance(e.value, DataNotFound)
    assert f"lacks 1 of the 15 classes of miniImageNet's published split: {gone} (test)" in msg
    assert "<root>/<wnid>/" in msg and "docs/benchmarks-data/mini-imagenet.md" in msg


def test_many_missing_classes_are_counted(tmp_path, tiered_root, small_splits):
    root = tmp_path / "tiered"
    for w in _small_classes("tiered_imagenet")["train"][:3]:
        shutil.copytree(tiered_root / "train" / w, root / "train" / w)
    with pytest.raises(DataError) as e:
        build("tiered_imagenet", root)
    msg = str(e.value)
    assert "lacks 12 of the 15 classes of tieredImageNet's published split: " in msg and "\n" not in msg
    assert msg.count("(val)") == 5 and msg.count("(test)") == 3 and "and 2 more" in msg
    assert "<root>/<split>/<wnid>/" in msg


@pytest.mark.parametrize("name", FAMILIES)
def test_without_data_each_family_says_what_to_put_where(name, tmp_path, monkeypatch):
    monkeypatch.setenv("METALENS_DATA", str(tmp_path))
    (tmp_path / "cub").mkdir()  # an empty folder is no copy either
    with pytest.raises(DataNotFound) as e:
        TASKS[name].cls()
    msg = str(e.value)
    assert "\n" not in msg and "docs/benchmarks-data/" in msg and str(tmp_path) in msg
    if name in ("cifar_fs", "fc100", "cub"):
        assert "task.download=true" in msg
    assert not any(tmp_path.rglob("*.tgz")) and not any(tmp_path.rglob("*.tar.gz")), "nothing is downloaded"


# -- downloads, only when asked ------------------------------------------------------------------------------
def test_downloads_only_when_asked_and_checks_the_md5(tmp_path, monkeypatch, cifar_roots, cub_roots, small_splits):
    for module, url, md5, source, name in (
            (cifar, "CIFAR100_URL", "CIFAR100_MD5", cifar_roots["tar"] / "cifar-100-binary.tar.gz", "fc100"),
            (cub, "CUB_URL", "CUB_MD5", cub_roots["tgz"] / "CUB_200_2011.tgz", "cub")):
        monkeypatch.setattr(module, url, source.as_uri())
        monkeypatch.setattr(module, md5, md5sum(source))
        root = tmp_path / name
        with pytest.raises(DataNotFound, match="task.download=true"):
            build(name, root, size=8)
        assert not root.exists()
        family = build(name, root, size=8, download=True)
        assert (root / source.name).read_bytes() == source.read_bytes()
        assert len(family.classes("test")) == 5
        monkeypatch.setattr(module, md5, "0" * 32)  # a copy already there with another checksum is refused
        fetch = cifar.download_cifar100 if module is cifar else cub.download_cub
        with pytest.raises(DataError, match="its md5 is not the published 0{32}; delete it"):
            fetch(root)


# -- the command line --------------------------------------------------------------------------------------
def test_the_cli_trains_and_scores_a_learner_on_a_benchmark(tmp_path, mini_root, small_splits, capsys):
    run = tmp_path / "run"
    code = main(["train", "--task", "mini_imagenet", "--learner", "protonet", "--set", f"task.root={mini_root}",
                 "--set", "task.queries=2", "--set", "task.size=16", "--steps", "2", "--out", str(run), "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code = main(["eval", str(run), "--episodes", "4", "--set", "task.ways=3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "accuracy" in json.dumps(json.loads(out))
    code = main(["train", "--task", "cub", "--learner", "protonet", "--set", f"task.root={tmp_path / 'none'}",
                 "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no CUB-200-2011 at" in err and not (tmp_path / "refused").exists()
