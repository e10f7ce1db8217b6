"""Image families: the Omniglot zips against their README, splits, rotations, episodes,
image decoding, and safe extraction and download.

The shipped data lives at <repo>/../shared/data/omniglot (as in CI).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalens.tasks import images
from metalens.tasks.images import (
    ImageFolder, Omniglot, UnsafeArchiveError, download, download_omniglot, extract_zip, load_image, md5sum,
    read_images,
)

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
SMALL1, SMALL2 = DATA / "images_background_small1.zip", DATA / "images_background_small2.zip"
SEED = 20240611

# from ../shared/data/omniglot/README.md
README_SMALL1 = {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40, "Latin": 26}
README_SMALL2 = {"Greek": 24, "Japanese_(katakana)": 47, "Latin": 26, "Sanskrit": 42, "Tagalog": 17}

pytestmark = pytest.mark.skipif(not SMALL1.exists(), reason=f"Omniglot minimal sets not found at {DATA}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def omniglot(**options) -> Omniglot:
    return Omniglot(Omniglot.Config(root=str(DATA), **options))


# -- the data against its README ------------------------------------------------------------------
@pytest.mark.parametrize("path,readme,n_images", [(SMALL1, README_SMALL1, 2720), (SMALL2, README_SMALL2, 3120)],
                         ids=["small1", "small2"])
def test_zip_counts_match_the_readme(path, readme, n_images):
    s = read_images(path)
    assert s.groups == tuple(sorted(readme))
    per_group = {g: sum(k.startswith(g + "/") for k in s.classes) for g in s.groups}
    assert per_group == readme
    assert len(s.classes) == sum(readme.values()) and s.images.shape == (n_images, 28, 28)
    assert s.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(s.labels), torch.full((len(s.classes),), 20))  # 20 drawers each


def test_greek_and_latin_are_the_same_images_in_both_zips():
    a, b = read_images(SMALL1), read_images(SMALL2)
    for k in ("Greek/character01", "Latin/character26"):
        ia, ib = a.classes.index(k), b.classes.index(k)
        assert torch.equal(a.images[a.labels == ia], b.images[b.labels == ib]), k


def test_omniglot_small_protocol_holds_out_the_small2_only_alphabets():
    f = omniglot(rotations="none")
    assert f.groups("train") == sorted(README_SMALL1)
    assert f.groups("test") == ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
    assert len(f.classes("train")) == 136 and f.n_images("train") == 2720
    assert len(f.classes("test")) == 47 + 42 + 17 and f.n_images("test") == 2120
    assert f.classes("val") == []
    assert len(f.classes("train")) + len(f.classes("test")) == 242  # the README's union: 242 characters
    assert f.n_images("train") + f.n_images("test") == 4840
    with pytest.raises(ValueError, match="the val split has 0 classes"):
        f.sample(1, generator=gen(SEED), split="val")


# -- splits ------------------------------------------------------------------------------------
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


def test_named_split_errors_say_what_is_wrong():
    cfg = dict(root=str(DATA), split="named")
    with pytest.raises(ValueError, match="'Klingon' names no group"):
        ImageFolder(ImageFolder.Config(**cfg, train_groups="*", test_groups="Klingon"))
    with pytest.raises(ValueError, match="named by both"):
        ImageFolder(ImageFolder.Config(**cfg, train_groups="G*", test_groups="Greek"))
    with pytest.raises(ValueError, match="needs train_groups and test_groups"):
        ImageFolder.Config(**cfg, train_groups="*")


def test_missing_root_says_where_it_looked_and_how_to_fix_it(tmp_path):
    with pytest.raises(ValueError, match=r"no image data at .*nowhere.*task\.root"):
        Omniglot(Omniglot.Config(root=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="lacks images_background, images_evaluation.*task.download=true"):
        omniglot(protocol="lake")


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


def test_folder_and_zip_read_the_same(tmp_path):
    path, _ = _toy(tmp_path)
    folder = extract_zip(path, tmp_path / "toy_folder")
    a, b = read_images(path), read_images(folder)
    assert a.classes == b.classes
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_omniglot_episode_shapes_labels_and_ink():
    f = omniglot(ways=20, shots=5, queries=15)
    ep = f.sample(3, generator=gen(SEED), split="test")
    assert ep.support_x.shape == (3, 100, 1, 28, 28) and ep.query_x.shape == (3, 300, 1, 28, 28)
    counts = torch.nn.functional.one_hot(ep.query_y, 20).sum(1)
    assert bool((counts == 15).all())
    x = ep.support_x
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert float(x.mean()) < 0.2, "ink should be 1 on a 0 background (mostly background)"
    with pytest.raises(ValueError, match="shots \\+ queries = 21"):
        omniglot(shots=5, queries=16)


# -- one image -> tensor ------------------------------------------------------------------------
def test_load_image_gives_the_same_tensor_for_a_file_and_its_bytes(tmp_path):
    with zipfile.ZipFile(SMALL1) as z:
        name = "images_background_small1/Korean/character07/0649_03.png"
        data = z.read(name)
    (tmp_path / "x.png").write_bytes(data)
    a, b = load_image(tmp_path / "x.png"), load_image(data)
    assert a.shape == (1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(load_image(str(tmp_path / "x.png")), a)
    s = read_images(SMALL1)  # the family decodes with the same function
    cached = s.images[s.files.index(name)].float() / 255
    assert torch.equal(a[0], cached)
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64) / 255
    assert float(a.max()) == 1.0 and abs(float(a.mean()) - (1 - raw.mean())) < 0.01  # ink coverage preserved
    big = load_image(data, size=105)  # no resizing: exactly the inverted 1-bit image
    assert torch.equal(big[0].double(), torch.from_numpy(1 - raw))


# -- archives and downloads ---------------------------------------------------------------------
def _zip_with(tmp_path: Path, members: list[tuple[str, bytes]], name: str = "bad.zip") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members:
            z.writestr(n, data)
    return path


@pytest.mark.parametrize("evil", ["../evil.png", "a/../../evil.png", "/tmp/evil.png", "C:/evil.png"])
def test_a_zip_with_an_escaping_member_is_refused_and_nothing_is_written(tmp_path, evil):
    good = load_png_bytes()
    path = _zip_with(tmp_path, [("top/g/c/0.png", good), (evil, good), ("top/g/c/1.png", good)])
    dest = tmp_path / "out" / "data"
    with pytest.raises(UnsafeArchiveError, match="refusing the archive"):
        extract_zip(path, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "evil.png").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no partial folder left behind
    with pytest.raises(UnsafeArchiveError):
        read_images(path)


def test_a_symlink_member_is_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("top/g/c/link.png")
        info.external_attr = (0o120777 << 16)  # a symbolic link
        z.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(path, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_a_failing_extraction_leaves_no_half_written_folder(tmp_path):
    png = load_png_bytes()
    path = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("top/g/c/0.png", png)
        z.writestr("top/g/c/1.png", png[:-8] + b"CORRUPT!")
    raw = bytearray(path.read_bytes())
    # make the second member's data disagree with its CRC (the first stays intact)
    at = raw.rindex(b"CORRUPT!")
    raw[at: at + 8] = b"corrupt?"
    path.write_bytes(bytes(raw))
    with pytest.raises(zipfile.BadZipFile):
        extract_zip(path, tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.zip"]


def load_png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (105, 105), 1).save(buf, format="PNG")
    return buf.getvalue()


def test_download_verifies_the_checksum_before_writing(tmp_path):
    url = SMALL1.as_uri()  # file://: no network needed
    dest = tmp_path / "dl" / "x.zip"
    with pytest.raises(ValueError, match="checksum mismatch"):
        download(url, dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    download(url, dest, md5="e704a628b5459e08445c13499850abc4")
    assert md5sum(dest) == "e704a628b5459e08445c13499850abc4"


def test_omniglot_downloads_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def opener(url):
        calls.append(url)
        return open(DATA / url.rsplit("/", 1)[1], "rb")

    root = tmp_path / "omniglot"
    with pytest.raises(ValueError, match="no image data at"):
        Omniglot(Omniglot.Config(root=str(root)))
    assert calls == [] and not root.exists()
    paths = download_omniglot(root, ["images_background_small1", "images_background_small2"],
                              base_url="https://example.invalid/omniglot", opener=opener)
    assert [p.name for p in paths] == ["images_background_small1.zip", "images_background_small2.zip"]
    assert calls == ["https://example.invalid/omniglot/images_background_small1.zip",
                     "https://example.invalid/omniglot/images_background_small2.zip"]
    download_omniglot(root, ["images_background_small1"], opener=opener)  # present and right: not fetched again
    assert len(calls) == 2
    # the family with download=true fetches what its protocol lacks, from OMNIGLOT_URL
    other = tmp_path / "other"
    monkeypatch.setattr(images, "OMNIGLOT_URL", DATA.as_uri())
    f = Omniglot(Omniglot.Config(root=str(other), download=True))
    assert sorted(p.name for p in other.iterdir()) == ["images_background_small1.zip", "images_background_small2.zip"]
    assert len(f.classes("test")) == 106


def test_default_root_follows_metalens_data(monkeypatch, tmp_path):
    monkeypatch.setenv("METALENS_DATA", str(DATA.parent))
    assert images.default_root() == DATA.parent / "omniglot"
    assert len(Omniglot().classes("test")) == 106
    monkeypatch.setenv("METALENS_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="METALENS_DATA="):
        Omniglot()
