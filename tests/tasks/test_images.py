"""The ``images`` family: splits, rotations, episodes, the default data (zips with and without
images), data that does not fit the options, and its options' declared constraints.

Decoding, archives and reading a source are tested in tests/data. The shipped data lives at
<repo>/../shared/data/omniglot (as in CI).
"""

from __future__ import annotations

import dataclasses
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metalens
from metalens.config import ConfigError, from_dict
from metalens.data import images as data_images
from metalens.data import load_image
from metalens.errors import DataError
from metalens.tasks.images import ImageFolder

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
SMALL1 = DATA / "images_background_small1.zip"
SEED = 20240611

needs_data = pytest.mark.skipif(not SMALL1.exists(), reason=f"Omniglot minimal sets not found at {DATA}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- splits ------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("by", ["class", "group"])
def test_seeded_splits_are_disjoint_complete_and_deterministic(by):
    def make(seed):
        return ImageFolder(ImageFolder.Config(root=str(DATA), split=by, split_seed=seed, val_size=0.15,
                                              test_size=0.25 if by == "class" else 2))

    a, b, c = make(SEED), make(SEED), make(SEED + 1)
    parts = {s: set(a.classes(s)) for s in ("train", "val", "test")}
    assert all(parts.values()), f"seed {SEED}: an empty split"
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert sum(map(len, parts.values())) == 242  # every character of the two zips, once
    assert all(a.classes(s) == b.classes(s) for s in parts), f"seed {SEED} gave two different splits"
    assert any(a.classes(s) != c.classes(s) for s in parts), f"seeds {SEED} and {SEED + 1} gave the same split"
    if by == "group":
        groups = {s: set(a.groups(s)) for s in parts}
        assert len(groups["test"]) == 2 and sum(map(len, groups.values())) == 8
        assert not (groups["train"] & groups["test"] or groups["val"] & groups["test"])


@needs_data
def test_named_split_errors_say_what_is_wrong():
    cfg = dict(root=str(DATA), split="named")
    with pytest.raises(ValueError, match="'Klingon' names no group"):
        ImageFolder(ImageFolder.Config(**cfg, train_groups="*", test_groups="Klingon"))
    with pytest.raises(ValueError, match="named by both"):
        ImageFolder(ImageFolder.Config(**cfg, train_groups="G*", test_groups="Greek"))
    with pytest.raises(ValueError, match="needs train_groups and test_groups"):
        ImageFolder.Config(**cfg, train_groups="*")


# -- a toy dataset whose every image is known ------------------------------------------------------
def _toy(tmp_path: Path, groups: int = 2, classes: int = 3, per_class: int = 6) -> tuple[Path, dict]:
    """A zip of random 28x28 binary images (ink black); returns it and {image bytes (as decoded): class}."""
    rs = np.random.RandomState(0)
    known = {}
    path = tmp_path / "toy.zip"
    with zipfile.ZipFile(path, "w") as z:
        for g in range(groups):
            for c in range(classes):
                for i in range(per_class):
                    ink = rs.rand(28, 28) < 0.3
                    buf = io.BytesIO()
                    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(buf, format="PNG")
                    z.writestr(f"toy/g{g}/c{c}/{i}.png", buf.getvalue())
                    known[torch.from_numpy(ink.astype(np.float32)).numpy().tobytes()] = (f"g{g}/c{c}", i)
    return path, known


def _identify(x: torch.Tensor, known: dict) -> tuple[str, int, int]:
    """(class, image, quarter turns) of one sampled image ``[1, 28, 28]``."""
    for r in range(4):
        key = torch.rot90(x[0], -r, dims=(-2, -1)).contiguous().numpy().tobytes()
        if key in known:
            return (*known[key], r)
    raise AssertionError("a sampled image is no (rotated) image of the dataset")


@pytest.mark.parametrize("rotations", ["none", "train", "all"])
def test_episodes_hold_distinct_images_of_one_class_per_label(tmp_path, rotations):
    path, known = _toy(tmp_path)
    f = ImageFolder(ImageFolder.Config(root=str(path), ways=3, shots=2, queries=3, split="named",
                                       train_groups="g0", test_groups="g1", rotations=rotations))
    turns_seen = set()
    for split in ("train", "test"):
        rotated = rotations == "all" or (rotations == "train" and split == "train")
        assert len(f.classes(split)) == 3 * (4 if rotated else 1), (split, f.classes(split))
        ep = f.sample(20, generator=gen(SEED), split=split)
        assert ep.support_x.shape == (20, 6, 1, 28, 28) and ep.query_x.shape == (20, 9, 1, 28, 28)
        assert ep.support_x.dtype == torch.float32 and set(ep.support_x.unique().tolist()) <= {0.0, 1.0}
        for t in range(20):
            xs = torch.cat([ep.support_x[t], ep.query_x[t]])
            ys = torch.cat([ep.support_y[t], ep.query_y[t]])
            ids = [_identify(x, known) for x in xs]
            assert len(set(ids)) == len(ids), f"seed {SEED}: an image twice in one class of a task"
            label_class = {}
            for (c, _, r), y in zip(ids, ys.tolist()):
                assert c.startswith("g0" if split == "train" else "g1")
                assert label_class.setdefault(y, (c, r)) == (c, r), f"seed {SEED}: label {y} mixes classes"
                turns_seen.add(r)
                assert rotated or r == 0
            assert len(set(label_class.values())) == 3  # three different (class, rotation) classes
            if split == "train":  # global ids: which of classes("train") each local label stands for
                names = f.classes("train")
                for y, (c, r) in label_class.items():
                    assert names[int(ep.classes[t, y])] == c + (f"/rot{90 * r:03d}" if rotated else "")
        if split != "train":
            assert ep.classes is None  # held-out classes have no global ids
    assert f.spec.train_classes == len(f.classes("train"))
    # rotations are classes of their own: every quarter turn turns up as a class
    assert turns_seen == ({0} if rotations == "none" else {0, 1, 2, 3})


# -- the default data: a folder standing for the zips in it that hold images ----------------------------
@needs_data
def test_the_default_root_reads_the_image_zips_and_skips_the_stroke_zips(monkeypatch):
    monkeypatch.delenv("METALENS_DATA", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the default root is ../shared/data/omniglot from here
    family = metalens.make_task("images")
    assert family.sources == ("images_background_small1", "images_background_small2")
    assert sum(len(family.classes(s)) for s in ("train", "val", "test")) == 242


def _png(i: int) -> bytes:
    ink = np.random.RandomState(i).rand(28, 28) < 0.3
    buf = io.BytesIO()
    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_folder_of_zips_reads_those_with_images_and_skips_the_others(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_toy.zip", "w") as z:
        for c in range(6):
            for i in range(4):
                z.writestr(f"images_toy/g{c // 3}/c{c}/{i}.png", _png(10 * c + i))
    with zipfile.ZipFile(tmp_path / "strokes_toy.zip", "w") as z:  # pen trajectories: text, no images
        for c in range(6):
            z.writestr(f"strokes_toy/g{c // 3}/c{c}/0.txt", "START\n10,20,0\nBREAK\n")
        z.writestr("__MACOSX/strokes_toy/g0/c0/._0.png", b"\0\5\26\7")  # a macOS fork named .png: not an image
    family = ImageFolder(ImageFolder.Config(root=str(tmp_path), ways=2, shots=1, queries=1, split="group",
                                            val_size=0, test_size=1))
    assert family.sources == ("images_toy",)
    assert len(family.classes("train")) == len(family.classes("test")) == 3
    (tmp_path / "images_toy.zip").unlink()
    with pytest.raises(DataError, match=r"none of the zip files in .* holds images \(strokes_toy\.zip"):
        ImageFolder(ImageFolder.Config(root=str(tmp_path)))


# -- data that does not fit the options: one error naming the split, the counts and the option ------------
@needs_data
@pytest.mark.parametrize("options,message", [
    ({"ways": 60, "split": "named", "train_groups": "*", "test_groups": "Tagalog"},
     "the test split has 17 classes, fewer than ways = 60; lower task.ways to at most 17, or name more groups in "
     "task.test_groups"),
    ({"ways": 200}, "the train split has 170 classes, fewer than ways = 200; lower task.ways to at most 170, or lower "
                    "task.val_size or task.test_size to leave more classes for meta-training"),
    ({"ways": 60, "test_size": 0.2}, "the test split has 48 classes, fewer than ways = 60; lower task.ways to at most "
                                     "48, or raise task.test_size"),
    ({"shots": 5, "queries": 16}, "the train split has 170 of its 170 classes with fewer than shots + queries = 21 "
                                  "images (e.g. 'Balinese/character01' has 20); lower task.shots + task.queries to at "
                                  "most 20"),
    ({"test_size": 300}, "val_size and test_size take 24 + 300 of the 242 classes in"),
    ({"split": "group", "val_size": 0, "test_size": 8}, "val_size and test_size take 0 + 8 of the 8 groups in"),
    ({"size": 100_000}, r"decoding 5840 image(s) at 100000x100000 needs 53.1 TiB of memory (uint8), more than the "),
], ids=["named_test_split", "train_split", "test_split", "shots_queries", "sizes_class", "sizes_group", "memory"])
def test_data_that_does_not_fit_the_options_is_refused_when_the_family_is_built(options, message, monkeypatch):
    monkeypatch.setattr(data_images, "physical_memory", lambda: 1 << 40)
    with pytest.raises(DataError, match=re.escape(message)) as e:
        metalens.make_task("images", root=str(DATA), **options)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


@needs_data
def test_a_validation_split_too_small_for_a_task_is_refused_when_sampled():
    family = metalens.make_task("images", root=str(DATA), ways=30, val_size=0.1)  # 24 validation classes
    with pytest.raises(DataError, match=r"the val split has 24 classes, fewer than ways = 30; lower task\.ways to at "
                                        r"most 24, or raise task\.val_size"):
        family.sample(1, generator=gen(SEED), split="val")


# -- options: declared constraints, rules between options ----------------------------------------------
# the options every image family shares, with the defaults that leave every episode as it was
IMAGE_DEFAULTS = {
    "channels": 1, "height": None, "width": None, "normalize": None, "augment": "none", "aug_crop": "pad",
    "aug_padding": 8, "aug_crop_scale": (0.08, 1.0), "aug_crop_ratio": (0.75, 4 / 3), "aug_flip": 0.5,
    "aug_jitter": 0.4, "aug_rotation": 10.0, "aug_shear": 10.0, "aug_scale": (0.9, 1.1), "aug_translate": 0.1}
def test_the_defaults_are_unchanged():
    assert dataclasses.asdict(ImageFolder.Config()) == {
        "root": "", "sources": "", "ways": 5, "shots": 1, "queries": 15, "split": "class", "split_seed": 0,
        "val_size": 0.1, "test_size": 0.2, "train_groups": "", "val_groups": "", "test_groups": "",
        "rotations": "none", "episodes": "any", "size": 28, "resample": "box", "invert": True, "fit": "pad",
        **IMAGE_DEFAULTS}


@pytest.mark.parametrize("options,message", [
    ({"ways": 1}, "task.ways must be >= 2, got 1"),
    ({"shots": 0}, "task.shots must be >= 1, got 0"),
    ({"queries": 0}, "task.queries must be >= 1, got 0"),
    ({"size": 0}, "task.size must be >= 1, got 0"),
    ({"split_seed": -1}, "task.split_seed must be >= 0, got -1"),
    ({"val_size": -0.1}, "task.val_size must be >= 0, got -0.1"),
    ({"test_size": 2.5}, "task.test_size must be a fraction < 1 or a whole count, got 2.5"),
    ({"split": "random"}, "task.split must be one of 'class', 'group', 'named', got 'random'"),
    ({"rotations": "some"}, "task.rotations must be one of 'none', 'train', 'all', got 'some'"),
    ({"resample": "bicubic"}, "task.resample must be one of 'box', 'lanczos', got 'bicubic'"),
    ({"root": 3}, "task.root must be a string, got 3"),
    ({"sources": ["a", "b"]}, "task.sources must be a string, got ['a', 'b']"),
    ({"val_size": 0.5, "test_size": 0.5}, "task.val_size + test_size must leave classes for meta-training, got "
                                          "0.5 + 0.5"),
    ({"split": "named", "train_groups": "*"}, "task.split = 'named' needs train_groups and test_groups"),
    ({"split": "named", "train_groups": "*", "val_groups": "*", "test_groups": "Tagalog"},
     "task.train_groups and val_groups are each '*'; only one split may be '*'"),
])
def test_bad_options_are_config_errors_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(ImageFolder.Config, options, prefix="task.", where="task 'images'")


# -- colour, sizes, normalisation, augmentation ---------------------------------------------------------
def _colour_folder(root: Path, groups: int = 2, classes: int = 4, per_class: int = 6, size=(40, 32)) -> Path:
    """``root/g<g>/c<c>/<i>.png|jpg``: random colour images (PNG and JPEG mixed), each class its own hue."""
    for g in range(groups):
        for c in range(classes):
            d = root / f"g{g}" / f"c{c}"
            d.mkdir(parents=True)
            rs = np.random.RandomState(100 * g + c)
            tint = rs.randint(0, 256, 3)
            for i in range(per_class):
                a = (0.5 * rs.randint(0, 256, (size[1], size[0], 3)) + 0.5 * tint).astype(np.uint8)
                fmt = "JPEG" if i % 2 else "PNG"
                Image.fromarray(a).save(d / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}", format=fmt)
    return root


@pytest.fixture()
def colour_root(tmp_path, monkeypatch):
    monkeypatch.setenv("METALENS_CACHE", str(tmp_path / "cache"))  # never the user's home
    return _colour_folder(tmp_path / "colour")


def _colour_family(root: Path, **options) -> ImageFolder:
    base = dict(root=str(root), channels=3, size=24, ways=3, shots=2, queries=2, split="group", val_size=0,
                test_size=1)
    return ImageFolder(ImageFolder.Config(**{**base, **options}))


def test_colour_images_are_normalised_with_the_meta_training_statistics_in_every_split(colour_root):
    f = _colour_family(colour_root)
    assert f.spec.x_shape == (3, 24, 24)
    # the reference: every meta-training image decoded by load_image, statistics in float64
    files = sorted(p for p in colour_root.rglob("*") if p.is_file() and p.parent.parent.name in f.groups("train"))
    train = (torch.stack([load_image(p, channels=3, size=24) for p in files]) * 255).round().double() / 255
    mean, std = train.mean((0, 2, 3)), train.transpose(0, 1).reshape(3, -1).std(1, unbiased=False)
    torch.testing.assert_close(torch.tensor(f.mean, dtype=torch.float64), mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(f.std, dtype=torch.float64), std, rtol=1e-9, atol=1e-12)
    for split in ("train", "test"):  # the same statistics undo every split's normalisation to whole 1/255 steps
        x = f.sample(4, generator=gen(SEED), split=split).query_x
        raw = (x * torch.tensor(f.std)[:, None, None] + torch.tensor(f.mean)[:, None, None]) * 255
        assert float((raw - raw.round()).abs().max()) < 1e-3, split
    ep = f.sample(8, generator=gen(SEED))
    both = torch.cat([ep.support_x, ep.query_x], 1)
    assert abs(float(both.mean())) < 0.5 and 0.5 < float(both.std()) < 2  # roughly standardised
    # a user's file, prepared as the family prepares an evaluation image
    test_files = sorted(p for p in colour_root.rglob("*") if p.is_file() and p.parent.parent.name in f.groups("test"))
    loaded = torch.stack([load_image(p, **f.image_options()) for p in test_files])
    ev = f.sample(3, generator=gen(SEED), split="test")
    for img in torch.cat([ev.support_x, ev.query_x], 1).flatten(0, 1):
        assert bool((loaded - img).abs().flatten(1).max(1).values.min() == 0), "an episode image no file gives"


def test_normalize_and_channels_options(colour_root, tmp_path):
    off = _colour_family(colour_root, normalize=False)
    assert off.mean is None and off.std is None
    x = off.sample(2, generator=gen(SEED)).support_x
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    grey = _colour_family(colour_root, channels=1)  # luminance; grey is not normalised by default
    assert grey.spec.x_shape == (1, 24, 24) and grey.mean is None
    normed = _colour_family(colour_root, channels=1, normalize=True)
    assert len(normed.mean) == len(normed.std) == 1
    # grey data as colour: three identical channels, never inverted (ink is 0 on paper 1 there)
    path, _ = _toy(tmp_path)
    as_grey = ImageFolder(ImageFolder.Config(root=str(path), ways=3, shots=1, queries=1, split="named",
                                             train_groups="g0", test_groups="g1"))
    as_rgb = ImageFolder(ImageFolder.Config(root=str(path), ways=3, shots=1, queries=1, split="named",
                                            train_groups="g0", test_groups="g1", channels=3, normalize=False))
    a, b = as_grey.episode(SEED, 0, 2), as_rgb.episode(SEED, 0, 2)
    assert b.support_x.shape[2] == 3 and torch.equal(b.support_x[:, :, 0], b.support_x[:, :, 2])
    assert torch.equal(b.support_x[:, :, :1], 1 - a.support_x)  # the same images, in the same order


def test_other_heights_and_widths(colour_root):
    f = _colour_family(colour_root, height=20, width=30, fit="stretch")
    ep = f.sample(2, generator=gen(SEED))
    assert f.spec.x_shape == (3, 20, 30) and ep.support_x.shape == (2, 6, 3, 20, 30)
    with pytest.raises(ConfigError, match=re.escape("rotations need square images, got height 20 and width 30")):
        _colour_family(colour_root, height=20, width=30, rotations="train")


@pytest.mark.parametrize("recipe", ["natural", "handwriting"])
def test_augmentation_is_deterministic_in_seed_and_step_and_never_in_evaluation(colour_root, recipe):
    plain = _colour_family(colour_root)
    opts = {"augment": recipe, "aug_crop": "resized"} if recipe == "natural" else {"augment": recipe}
    f = _colour_family(colour_root, **opts)
    a, b = f.episode(SEED, 3, 4), f.episode(SEED, 3, 4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x), f"seed {SEED}, step 3"
    assert not torch.equal(a.support_x, f.episode(SEED, 4, 4).support_x), f"seed {SEED}: steps 3 and 4"
    ref = plain.episode(SEED, 3, 4)  # the same images and labels, transformed
    assert torch.equal(a.support_y, ref.support_y) and torch.equal(a.classes, ref.classes)
    assert not torch.equal(a.support_x, ref.support_x)
    for split in ("val", "test"):  # evaluation: never augmented
        if split == "val" and not f.classes("val"):
            continue
        e1, e2 = f.eval_episodes(SEED, 5, split=split), plain.eval_episodes(SEED, 5, split=split)
        assert torch.equal(e1.support_x, e2.support_x) and torch.equal(e1.query_x, e2.query_x), split
    assert plain.mean == f.mean  # statistics of the unaugmented meta-training images


def test_augment_none_draws_nothing_more(colour_root):
    """The default leaves episodes bit for bit as they were: the generator is left where it was without augmentation."""
    f = _colour_family(colour_root)
    g1, g2 = gen(SEED), gen(SEED)
    f.sample(2, generator=g1)
    _colour_family(colour_root, aug_flip=0.9, aug_jitter=0.1).sample(2, generator=g2)  # strengths alone: no effect
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_image_families_propose_one_task_per_step_and_the_user_wins(colour_root):
    from metalens.run import RunConfig

    assert ImageFolder.train_defaults(ImageFolder.Config()) == {"batch_tasks": 1}
    opts = {"root": str(colour_root), "channels": 3, "size": 24, "ways": 3, "split": "group", "test_size": 1,
            "val_size": 0}
    assert RunConfig.resolve("images", "protonet", opts).train.batch_tasks == 1
    assert RunConfig.resolve("images", "protonet", opts, {}, {"batch_tasks": 25}).train.batch_tasks == 25
    assert RunConfig.resolve("sinusoid", "maml").train.batch_tasks == 25  # families without a proposal: unchanged


@pytest.mark.parametrize("options,message", [
    ({"channels": 2}, "task.channels must be one of 1, 3, got 2"),
    ({"height": 0}, "task.height must be >= 1, got 0"),
    ({"width": 2.5}, "task.width must be an integer (or null), got 2.5"),
    ({"normalize": "yes"}, "task.normalize must be true or false (or null), got 'yes'"),
    ({"augment": "strong"}, "task.augment must be one of 'none', 'natural', 'handwriting', got 'strong'"),
    ({"aug_crop": "center"}, "task.aug_crop must be one of 'pad', 'resized', 'none', got 'center'"),
    ({"aug_padding": 0}, "task.aug_padding must be >= 1, got 0"),
    ({"aug_crop_scale": [0.5, 0.1]}, "task.aug_crop_scale must be (low, high) with low <= high, got (0.5, 0.1)"),
    ({"aug_crop_scale": [0.5, 1.5]}, "task.aug_crop_scale values must be > 0 and <= 1, got (0.5, 1.5)"),
    ({"aug_flip": 1.5}, "task.aug_flip must be >= 0 and <= 1, got 1.5"),
    ({"aug_jitter": -0.1}, "task.aug_jitter must be >= 0 and <= 1, got -0.1"),
    ({"aug_rotation": 200}, "task.aug_rotation must be >= 0 and <= 180, got 200.0"),
    ({"aug_shear": 90}, "task.aug_shear must be >= 0 and < 90, got 90.0"),
    ({"aug_scale": [0, 1]}, "task.aug_scale values must be > 0, got (0.0, 1.0)"),
    ({"aug_translate": 2}, "task.aug_translate must be >= 0 and <= 1, got 2.0"),
    ({"fit": "zoom"}, "task.fit must be one of 'pad', 'crop', 'stretch', got 'zoom'"),
    ({"height": 20, "rotations": "all"}, "rotations need square images, got height 20 and width 28"),
])
def test_bad_image_options_are_config_errors_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(ImageFolder.Config, options, prefix="task.", where="task 'images'")


# -- within-group episodes ----------------------------------------------------------------------------------
def _groups_zip(tmp_path: Path, sizes: dict[str, int], per_class: int = 4) -> Path:
    """A zip with the groups ``sizes`` names, each with that many classes of distinct random images."""
    path = tmp_path / "groups.zip"
    with zipfile.ZipFile(path, "w") as z:
        for gi, (g, n) in enumerate(sizes.items()):
            for c in range(n):
                for i in range(per_class):
                    z.writestr(f"groups/{g}/c{c}/{i}.png", _png(10_000 * gi + 100 * c + i))
    return path


def _group_family(path: Path, **options) -> ImageFolder:
    base = dict(root=str(path), ways=3, shots=1, queries=2, split="named", train_groups="tr*",
                test_groups="te*", episodes="within_group")
    return ImageFolder(ImageFolder.Config(**{**base, **options}))


@pytest.mark.parametrize("rotations", ["none", "train"])
def test_within_group_episodes_draw_every_class_of_a_task_from_one_group(tmp_path, rotations):
    path = _groups_zip(tmp_path, {"tr_a": 3, "tr_b": 5, "tr_small": 2, "te_a": 4, "te_b": 2, "te_c": 3})
    f = _group_family(path, rotations=rotations)
    names = f.classes("train")
    ep = f.sample(60, generator=gen(SEED))
    seen = set()
    for t in range(60):
        groups = {names[i].split("/")[0] for i in ep.classes[t].tolist()}
        assert len(groups) == 1, f"seed {SEED}, task {t}: classes of {groups}"
        seen |= groups
        assert len(set(ep.classes[t].tolist())) == 3
    if rotations == "none":  # tr_small has 2 classes < 3 ways: skipped; the others are drawn
        assert seen == {"tr_a", "tr_b"}, f"seed {SEED}: {seen}"
    else:  # rotated characters count as classes of their character's group: tr_small has 8 and is drawn
        assert seen == {"tr_a", "tr_b", "tr_small"}, f"seed {SEED}: {seen}"
        rotated = [names[i] for i in ep.classes.flatten().tolist() if "/rot" in names[i]]
        assert rotated, f"seed {SEED}: no rotated class in 60 tasks"
    # held-out tasks: from one group each, never te_b (2 classes); the same tasks for the same seed
    a, b = f.eval_episodes(SEED, 40), f.eval_episodes(SEED, 40)
    assert torch.equal(a.query_x, b.query_x) and torch.equal(a.support_x, b.support_x)
    x_group = {}  # which group each test image belongs to, from the images themselves
    for g in ("te_a", "te_b", "te_c"):
        for c in range({"te_a": 4, "te_b": 2, "te_c": 3}[g]):
            for i in range(4):
                x_group[(1 - to_float_png(_png(10_000 * (3 + ("te_a", "te_b", "te_c").index(g)) + 100 * c + i)))
                        .numpy().tobytes()] = g
    test_seen = set()
    for t in range(40):
        gs = {x_group[x.numpy().tobytes()] for x in torch.cat([a.support_x[t], a.query_x[t]])}
        assert len(gs) == 1, f"seed {SEED}, held-out task {t}: {gs}"
        test_seen |= gs
    assert test_seen == {"te_a", "te_c"}, f"seed {SEED}: {test_seen}"


def to_float_png(data: bytes) -> torch.Tensor:
    """A PNG as the family decodes it at 28x28, ink 1: ``[1, 28, 28]`` (already 28x28: no resizing)."""
    return 1 - load_image(data)


def test_within_group_episodes_are_refused_when_no_group_has_enough_classes(tmp_path):
    path = _groups_zip(tmp_path, {"tr_a": 3, "tr_b": 5, "tr_c": 3, "te_a": 4, "te_b": 2})
    with pytest.raises(DataError, match=re.escape(
            "within-group episodes need a group with at least ways = 5 classes in the test split, and none has "
            "(classes per group: te_a 4, te_b 2); lower task.ways to at most 4, or set task.episodes = any")) as e:
        _group_family(path, ways=5)
    assert "\n" not in str(e.value)
    _group_family(path, ways=5, episodes="any")  # any: 6 test classes are enough
    with pytest.raises(DataError, match=re.escape("at least ways = 4 classes in the train split, and none has "
                                                  "(classes per group: tr_a 3, tr_c 3); lower task.ways to at most "
                                                  "3")):
        _group_family(path, ways=4, train_groups="tr_a,tr_c")  # 6 classes, but no alphabet with 4
    f = _group_family(path, ways=4)
    assert f.sample(3, generator=gen(SEED), split="test").support_x.shape == (3, 4, 1, 28, 28)


def test_any_episodes_are_the_default_and_unchanged(tmp_path):
    """``episodes = any`` (the default) draws exactly what the family drew before the option existed: the same
    generator calls, so the generator is left in the same place as a plain draw of the classes and images."""
    path = _groups_zip(tmp_path, {"tr_a": 3, "tr_b": 5, "te_a": 4, "te_b": 2})
    f = _group_family(path, episodes="any")
    assert ImageFolder.Config().episodes == "any"
    g = gen(SEED)
    ep = f.sample(2, generator=g)
    # the draws of the family before the option: classes, images, then the two orders
    ref = gen(SEED)
    C, N, K, Q = 8, 3, 1, 2
    pick = torch.argsort(torch.rand(2, C, generator=ref), dim=1)[:, :N]
    torch.rand(2, N, f._class_images.shape[1], generator=ref)
    torch.rand(2, N * K, generator=ref)
    torch.rand(2, N * Q, generator=ref)
    assert torch.equal(ep.classes, pick)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=ref))
