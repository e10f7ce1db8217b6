"""Reading a source (a zip or a folder) into memory: the shipped Omniglot zips against their README,
folders and zips alike, zips without images skipped, links refused, and every bad file one DataError
naming it.

Bad data is generated in tmp_path; the shipped data lives at <repo>/../shared/data/omniglot (as in CI).
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalens.data import default_root, extract_zip, read_images, resolve_root, source_paths
from metalens.data import images as data_images
from metalens.data import sources
from metalens.errors import DataError

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
SMALL1, SMALL2 = DATA / "images_background_small1.zip", DATA / "images_background_small2.zip"
SEED = 20240611

# from ../shared/data/omniglot/README.md
README_SMALL1 = {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40, "Latin": 26}
README_SMALL2 = {"Greek": 24, "Japanese_(katakana)": 47, "Latin": 26, "Sanskrit": 42, "Tagalog": 17}

needs_data = pytest.mark.skipif(not SMALL1.exists(), reason=f"Omniglot minimal sets not found at {DATA}")


def png(seed: int = SEED, side: int = 28) -> bytes:
    ink = np.random.RandomState(seed).rand(side, side) < 0.3
    buf = io.BytesIO()
    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb() -> bytes:
    """A 1x1 PNG whose header declares 100000 x 100000 pixels."""
    data = bytearray(png(side=1))
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def toy_files(groups: int = 2, classes: int = 2, per_class: int = 3) -> dict[str, bytes]:
    return {f"g{g}/c{c}/{i}.png": png(100 * g + 10 * c + i)
            for g in range(groups) for c in range(classes) for i in range(per_class)}


def as_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def as_zip(path: Path, files: dict[str, bytes], top: str = "toy") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for rel, data in files.items():
            z.writestr(f"{top}/{rel}" if top else rel, data)
    return path


# -- the shipped data against its README --------------------------------------------------------------
@needs_data
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


@needs_data
def test_greek_and_latin_are_the_same_images_in_both_zips():
    a, b = read_images(SMALL1), read_images(SMALL2)
    for k in ("Greek/character01", "Latin/character26"):
        ia, ib = a.classes.index(k), b.classes.index(k)
        assert torch.equal(a.images[a.labels == ia], b.images[b.labels == ib]), k


@needs_data
def test_the_shipped_folder_stands_for_its_image_zips_and_skips_the_strokes():
    paths = source_paths(DATA, ())
    assert [p.name for p in paths] == ["images_background_small1.zip", "images_background_small2.zip"]


def test_folder_and_zip_read_the_same(tmp_path):
    path = as_zip(tmp_path / "toy.zip", toy_files())
    folder = extract_zip(path, tmp_path / "toy_folder")
    a, b = read_images(path), read_images(folder)
    assert a.classes == b.classes == ("g0/c0", "g0/c1", "g1/c0", "g1/c1")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_hidden_files_and_macos_forks_are_skipped(tmp_path):
    files = toy_files() | {"g0/c0/.hidden.png": b"junk", "__MACOSX/g0/c0/._0.png": b"junk", "g0/.DS_Store": b"x"}
    for s in (read_images(as_zip(tmp_path / "toy.zip", files)), read_images(as_folder(tmp_path / "f", files))):
        assert len(s.files) == 12 and s.classes == ("g0/c0", "g0/c1", "g1/c0", "g1/c1")


# -- a folder stands for the zips in it that hold images ---------------------------------------------
def test_a_folder_stands_for_the_zips_that_hold_images_and_skips_the_others(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    as_zip(root / "images_a.zip", toy_files(), top="images_a")
    as_zip(root / "strokes_a.zip", {"g0/c0/0.txt": b"START\n1,2,3\nBREAK\n", "g0/c0/.DS_Store": b"x",
                                   "../__MACOSX/g0/c0/._0.png": b"junk"}, top="strokes_a")
    as_zip(root / "images_b.zip", toy_files(groups=1), top="images_b")
    assert [p.name for p in source_paths(root, ())] == ["images_a.zip", "images_b.zip"]
    # only zips without images: an error naming them
    for p in ("images_a.zip", "images_b.zip"):
        (root / p).unlink()
    with pytest.raises(DataError, match=r"none of the zip files in .*data holds images \(strokes_a\.zip; looked for "
                                        r"\.png"):
        source_paths(root, ())


def test_a_broken_zip_in_a_folder_of_zips_is_an_error_not_skipped(tmp_path):
    as_zip(tmp_path / "a.zip", toy_files())
    (tmp_path / "b.zip").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match=r"b\.zip is not a zip file \(it starts '<html>404"):
        source_paths(tmp_path, ())


# -- where the data is ------------------------------------------------------------------------------------
def test_missing_and_empty_sources_say_where_they_looked(tmp_path):
    with pytest.raises(DataError, match=r"no image data at .*nowhere .*task\.root"):
        resolve_root(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty holds neither images in <group>/<class>/ folders nor zip files"):
        source_paths(tmp_path / "empty", ())
    with pytest.raises(DataError, match=r"source 'nope' not found: looked for .*nope and .*nope\.zip; .* holds empty"):
        source_paths(tmp_path, ("nope",))
    with pytest.raises(DataError, match="no such file or folder"):
        read_images(tmp_path / "nowhere")
    (tmp_path / "x.png").write_bytes(png())
    with pytest.raises(DataError, match=r"x\.png is neither a folder nor a zip file"):
        read_images(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"no images \(\.png, .*\) found in .*empty"):
        read_images(tmp_path / "empty")


def test_an_image_outside_a_class_folder_is_named(tmp_path):
    files = toy_files() | {"loose.png": png()}
    with pytest.raises(DataError, match=r"image 'loose\.png' in .*f is not in a <group>/<class>/ folder"):
        read_images(as_folder(tmp_path / "f", files))


def test_default_root_follows_metalens_data(monkeypatch, tmp_path):
    monkeypatch.setenv("METALENS_DATA", str(tmp_path))
    assert default_root() == tmp_path / "omniglot"
    with pytest.raises(DataError, match="METALENS_DATA="):
        resolve_root("")
    monkeypatch.delenv("METALENS_DATA")
    assert default_root() == Path("..") / "shared" / "data" / "omniglot"


# -- bad images, in a folder and in a zip -------------------------------------------------------------
BAD = {
    "text": (b"I am a note, not a picture\n", r"is not an image Pillow can read \(it starts 'I am a note"),
    "truncated": (png(side=105)[:300], "is truncated or damaged"),
    "bomb": (bomb(), "decompression bomb"),
}


@pytest.mark.parametrize("where", ["folder", "zip"])
@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_image_is_one_data_error_naming_the_file(tmp_path, where, bad):
    data, says = BAD[bad]
    files = toy_files() | {"g1/c1/bad.png": data}
    if where == "folder":
        path = as_folder(tmp_path / "f", files)
        named = str(path / "g1" / "c1" / "bad.png")
    else:
        path = as_zip(tmp_path / "t.zip", files)
        named = f"'toy/g1/c1/bad.png' in {path}"
    with pytest.raises(DataError, match=says) as e:
        read_images(path)
    message = str(e.value)
    assert f"image {named} " in message and "\n" not in message and len(message) < 400, message


# -- links are not followed ------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symbolic links")
@pytest.mark.parametrize("link", ["image", "class", "group"])
def test_a_symbolic_link_inside_a_folder_is_refused_naming_it(tmp_path, link):
    root = as_folder(tmp_path / "f", toy_files())
    outside = as_folder(tmp_path / "elsewhere", {"g9/c9/0.png": png(1)})
    at = {"image": root / "g0" / "c0" / "link.png", "class": root / "g0" / "c9", "group": root / "g9"}[link]
    target = {"image": outside / "g9" / "c9" / "0.png", "class": outside / "g9" / "c9", "group": outside / "g9"}[link]
    at.symlink_to(target)
    with pytest.raises(DataError, match=rf"^{at} is a symbolic link to a (file|folder); links inside a data folder "
                                        "are not followed") as e:
        read_images(root)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="is a symbolic link"):
        source_paths(root, ())
    at.unlink()
    assert len(read_images(root).files) == 12


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symbolic links")
def test_the_paths_given_may_be_links(tmp_path):
    real = as_folder(tmp_path / "real", toy_files())
    (tmp_path / "alias").symlink_to(real)
    assert len(read_images(tmp_path / "alias").files) == 12


# -- memory ----------------------------------------------------------------------------------------------
def test_images_that_cannot_fit_in_memory_are_refused_before_decoding(tmp_path, monkeypatch):
    path = as_zip(tmp_path / "toy.zip", toy_files())
    monkeypatch.setattr(data_images, "physical_memory", lambda: 1 << 30)

    def never(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(sources, "decode_u8", never)
    with pytest.raises(DataError, match=r"toy\.zip: decoding 12 image\(s\) at 100000x100000 needs 111\.8 GiB of "
                                        r"memory \(uint8\), more than the 1\.0 GiB this machine has; lower task\.size"):
        read_images(path, size=100_000)


def test_a_file_name_with_a_newline_is_quoted_on_one_line(tmp_path):
    root = as_folder(tmp_path / "f", toy_files() | {"g0/c0/bad\nname.png": b"not an image"})
    with pytest.raises(DataError, match=r"bad\\nname\.png' is not an image Pillow can read") as e:
        read_images(root)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_called_png_is_refused_without_hanging(tmp_path):
    root = as_folder(tmp_path / "f", toy_files())
    os.mkfifo(root / "g0" / "c0" / "pipe.png")
    with pytest.raises(DataError, match=r"refusing image .*pipe\.png: it is not a regular file"):
        read_images(root)
