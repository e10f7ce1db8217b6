"""The disk cache of decoded images (metalens.data.cache): a second build maps the array instead of decoding it
(identical images, much faster), a changed file invalidates it, a read-only data folder falls back to
$METALENS_CACHE, no writable place means decoding in memory, and a damaged entry is decoded again.

Fixtures are generated in tmp_path; the shipped Omniglot data lives at <repo>/../shared/data/omniglot (as in CI).
Every test clears the in-memory cache of read_images, as a new process would start.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metalens
from metalens.data import read_images, save_cache, sources
from metalens.data.cache import CACHE_DIR
from metalens.errors import DataError

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
SMALL1 = DATA / "images_background_small1.zip"
SEED = 20240611


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """A new process: no image set decoded in memory; the fallback cache in tmp_path (never the user's home)."""
    sources._read_images_cached.cache_clear()
    monkeypatch.setenv("METALENS_CACHE", str(tmp_path / "fallback"))
    yield
    sources._read_images_cached.cache_clear()


def image(seed: int, side: int = 96, fmt: str = "JPEG") -> bytes:
    a = np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, quality=90) if fmt == "JPEG" else Image.fromarray(a).save(buf, fmt)
    return buf.getvalue()


def colour_folder(root: Path, groups: int = 2, classes: int = 4, per_class: int = 12) -> Path:
    """``root/g<g>/c<c>/<i>.jpg|png``: random colour images, PNG and JPEG mixed."""
    for g in range(groups):
        for c in range(classes):
            d = root / f"g{g}" / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                fmt = "PNG" if i % 3 == 0 else "JPEG"
                (d / f"{i}.{fmt.lower()}").write_bytes(image(1000 * g + 100 * c + i, fmt=fmt))
    return root


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_a_second_build_maps_the_cached_array_identical_and_much_faster(tmp_path):
    root = colour_folder(tmp_path / "data")
    opts = dict(channels=3, size=64)
    t0 = time.perf_counter()
    first = read_images(root, **opts)
    t_first = time.perf_counter() - t0
    cache = root / CACHE_DIR  # beside the data: inside the source folder (hidden, so never read as data)
    names = entries(cache)
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".npy"), names
    assert first.cached == "" and first.images.shape == (96, 3, 64, 64)
    index = json.loads((cache / names[0]).read_text())
    assert index["classes"] == list(first.classes) and index["counts"] == [12] * 8 and index["shape"] == [96, 3, 64, 64]
    assert np.load(cache / names[1], allow_pickle=False).dtype == np.uint8  # a plain array, no pickle

    sources._read_images_cached.cache_clear()  # a new process
    t0 = time.perf_counter()
    second = read_images(root, **opts)
    t_second = time.perf_counter() - t0
    print(f"seed={SEED}: decoded in {t_first * 1000:.1f} ms, mapped in {t_second * 1000:.1f} ms")
    assert second.cached == str(cache / names[1])
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.classes == second.classes and first.files == second.files and first.name == second.name
    assert t_second < t_first / 3, (t_first, t_second)
    # the family reads the same images from the cache and gives the same episodes
    sources._read_images_cached.cache_clear()
    fam = metalens.make_task("images", root=str(root), split="group", val_size=0, test_size=1, ways=3, shots=2,
                             queries=3, **opts)
    assert entries(cache) == names
    ep = fam.episode(SEED, 0, 2)
    sources._read_images_cached.cache_clear()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("METALENS_CACHE", "off")  # decoded afresh, nothing read from the cache
        fresh = metalens.make_task("images", root=str(root), split="group", val_size=0, test_size=1, ways=3,
                                   shots=2, queries=3, **opts)
    assert torch.equal(ep.support_x, fresh.episode(SEED, 0, 2).support_x)


def test_a_changed_file_invalidates_the_entry_and_the_stale_one_is_removed(tmp_path):
    root = colour_folder(tmp_path / "data", groups=1, classes=2, per_class=3)
    a = read_images(root, channels=3, size=16)
    old = entries(root / CACHE_DIR)
    target = root / "g0" / "c1" / "2.jpeg"
    target.write_bytes(image(99, fmt="JPEG"))
    os.utime(target, ns=(1, 1))  # a new modification time whatever the clock's resolution
    sources._read_images_cached.cache_clear()
    b = read_images(root, channels=3, size=16)
    assert b.cached == "", "a changed file must be decoded again"
    i = b.files.index("g0/c1/2.jpeg")
    assert not torch.equal(a.images[i], b.images[i]) and torch.equal(a.images[:i], b.images[:i])
    new = entries(root / CACHE_DIR)
    assert len(new) == 2 and set(new).isdisjoint(old), (old, new)  # the stale entry is gone
    # an added file, other options: other keys
    sources._read_images_cached.cache_clear()
    assert read_images(root, channels=1, size=16).cached == ""
    assert len(entries(root / CACHE_DIR)) == 4


def test_a_read_only_data_folder_falls_back_to_metalens_cache_then_to_memory(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    z = data / "set.zip"
    with zipfile.ZipFile(z, "w") as f:
        for c in range(3):
            for i in range(4):
                f.writestr(f"set/g0/c{c}/{i}.png", image(10 * c + i, side=40, fmt="PNG"))
    data.chmod(0o555)
    try:
        a = read_images(z, channels=3, size=20)
        assert entries(data) == ["set.zip"], "nothing may be written into a read-only data folder"
        fallback = tmp_path / "fallback"
        assert len(entries(fallback)) == 2
        sources._read_images_cached.cache_clear()
        b = read_images(z, channels=3, size=20)
        assert b.cached.startswith(str(fallback)) and torch.equal(a.images, b.images)
        # no writable place at all: decoded in memory, as without a cache
        blocked = tmp_path / "blocked"
        blocked.mkdir(mode=0o555)
        monkeypatch.setenv("METALENS_CACHE", str(blocked / "cache"))
        sources._read_images_cached.cache_clear()
        c = read_images(z, channels=3, size=20)
        assert c.cached == "" and torch.equal(a.images, c.images)
        assert entries(blocked) == [] and entries(data) == ["set.zip"]
        assert save_cache(c) is None
    finally:
        data.chmod(0o755)


def test_metalens_cache_off_reads_and_writes_nothing(tmp_path, monkeypatch):
    root = colour_folder(tmp_path / "data", groups=1, classes=2, per_class=2)
    read_images(root, size=16)  # cached
    monkeypatch.setenv("METALENS_CACHE", "off")
    sources._read_images_cached.cache_clear()
    s = read_images(root, size=16, channels=3)
    assert s.cached == "" and save_cache(s) is None
    sources._read_images_cached.cache_clear()
    assert read_images(root, size=16).cached == ""  # the entry on disk is not read either
    assert len(entries(root / CACHE_DIR)) == 2


def test_a_damaged_entry_is_decoded_again(tmp_path):
    root = colour_folder(tmp_path / "data", groups=1, classes=2, per_class=2)
    a = read_images(root, size=16)
    npy = next((root / CACHE_DIR).glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:200])  # truncated
    sources._read_images_cached.cache_clear()
    b = read_images(root, size=16)
    assert b.cached == "" and torch.equal(a.images, b.images)
    index = next((root / CACHE_DIR).glob("*.json"))
    index.write_text("{not json")
    sources._read_images_cached.cache_clear()
    assert read_images(root, size=16).cached == ""


def test_a_family_that_refuses_its_data_writes_no_cache(tmp_path):
    root = colour_folder(tmp_path / "data", groups=1, classes=4, per_class=2)
    with pytest.raises(DataError, match="fewer than ways = 5"):
        metalens.make_task("images", root=str(root), ways=5, shots=1, queries=1, val_size=0, test_size=2)
    assert not (root / CACHE_DIR).exists(), "a refused family must leave the data folder as it was"
    metalens.make_task("images", root=str(root), ways=2, shots=1, queries=1, val_size=0, test_size=2)
    assert len(entries(root / CACHE_DIR)) == 2


@pytest.mark.skipif(not SMALL1.exists(), reason=f"Omniglot minimal sets not found at {DATA}")
def test_omniglot_starts_from_the_cache_with_the_same_episodes():
    t0 = time.perf_counter()
    a = metalens.make_task("omniglot", root=str(DATA))
    t_first = time.perf_counter() - t0
    sources._read_images_cached.cache_clear()
    t0 = time.perf_counter()
    b = metalens.make_task("omniglot", root=str(DATA))
    t_second = time.perf_counter() - t0
    print(f"omniglot small: first build {t_first:.3f} s, second {t_second:.3f} s")
    for split in ("train", "test"):
        ea, eb = a.eval_episodes(SEED, 20, split=split), b.eval_episodes(SEED, 20, split=split)
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
    assert t_second < t_first / 3, (t_first, t_second)
