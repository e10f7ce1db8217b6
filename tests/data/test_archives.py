"""Safe zip archives (names that escape, links, zips that lie or are damaged) and checksummed downloads.

Every bad archive is generated here in tmp_path; the download tests read the shipped
Omniglot zips through file:// URLs (<repo>/../shared/data/omniglot, as in CI).
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from metalens.data import (UnsafeArchiveError, download, extract_zip, md5sum, open_zip, read_images,
                           read_member)
from metalens.errors import DataError

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
SMALL1 = DATA / "images_background_small1.zip"


def load_png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (105, 105), 1).save(buf, format="PNG")
    return buf.getvalue()


def _zip_with(tmp_path: Path, members: list[tuple[str, bytes]], name: str = "bad.zip", **kw) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", **kw) as z:
        for n, data in members:
            z.writestr(n, data)
    return path


def _declare_size(path: Path, size: int) -> None:
    """Rewrite the uncompressed size in the local and central headers of a one-member zip (a lying header)."""
    raw = bytearray(path.read_bytes())
    assert raw[:4] == b"PK\x03\x04"
    raw[22:26] = struct.pack("<I", size)  # local file header: uncompressed size
    at = raw.index(b"PK\x01\x02")
    raw[at + 24: at + 28] = struct.pack("<I", size)  # central directory: uncompressed size
    path.write_bytes(bytes(raw))


def _corrupt_second_member(tmp_path: Path) -> Path:
    """A stored zip whose second member's data disagrees with its CRC (the first stays intact)."""
    png = load_png_bytes()
    path = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("top/g/c/0.png", png)
        z.writestr("top/g/c/1.png", png[:-8] + b"CORRUPT!")
    raw = bytearray(path.read_bytes())
    at = raw.rindex(b"CORRUPT!")
    raw[at: at + 8] = b"corrupt?"
    path.write_bytes(bytes(raw))
    return path


# -- names that could escape -------------------------------------------------------------------------
@pytest.mark.parametrize("evil", ["../evil.png", "a/../../evil.png", "/tmp/evil.png", "C:/evil.png"])
def test_a_zip_with_an_escaping_member_is_refused_and_nothing_is_written(tmp_path, evil):
    good = load_png_bytes()
    path = _zip_with(tmp_path, [("top/g/c/0.png", good), (evil, good), ("top/g/c/1.png", good)])
    dest = tmp_path / "out" / "data"
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match="refusing the archive"):
        extract_zip(path, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "evil.png").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no partial folder left behind
    with pytest.raises(UnsafeArchiveError):
        read_images(path)
    assert issubclass(UnsafeArchiveError, DataError)


def test_a_symlink_member_is_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("top/g/c/link.png")
        info.external_attr = (0o120777 << 16)  # a symbolic link
        z.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(path, tmp_path / "data")
    assert not (tmp_path / "data").exists()


# -- damaged archives, zips that lie, files that are not zips ------------------------------------------
def test_a_failing_extraction_leaves_no_half_written_folder(tmp_path):
    path = _corrupt_second_member(tmp_path)
    with pytest.raises(DataError, match=r"cannot read member 'top/g/c/1\.png' of .*corrupt\.zip: the archive is "
                                        r"damaged \(Bad CRC-32"):
        extract_zip(path, tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.zip"]


def test_a_bad_crc_is_a_data_error_naming_the_member(tmp_path):
    path = _corrupt_second_member(tmp_path)
    with zipfile.ZipFile(path) as z:
        assert read_member(z, z.getinfo("top/g/c/0.png")) == load_png_bytes()
        with pytest.raises(DataError, match=r"'top/g/c/1\.png' of .*corrupt\.zip: the archive is damaged"):
            read_member(z, z.getinfo("top/g/c/1.png"))
    with pytest.raises(DataError, match=r"'top/g/c/1\.png' of .*corrupt\.zip"):
        read_images(path)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_a_member_that_decompresses_larger_than_its_header_says_is_refused(tmp_path, compression):
    big = load_png_bytes() + b"\0" * 100_000
    path = _zip_with(tmp_path, [("top/g/c/0.png", big)], compression=compression)
    _declare_size(path, 100)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("top/g/c/0.png")
        assert info.file_size == 100
        with pytest.raises(DataError, match=r"member 'top/g/c/0\.png' of .*bad\.zip"):
            read_member(z, info)
    with pytest.raises(DataError, match=r"member 'top/g/c/0\.png' of .*bad\.zip"):
        read_images(path)


def test_a_member_whose_header_declares_too_much_is_refused_unread(tmp_path):
    path = _zip_with(tmp_path, [("top/g/c/0.png", load_png_bytes())])
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("top/g/c/0.png")
        with pytest.raises(DataError, match=rf"refusing member 'top/g/c/0\.png' of .*: its header declares "
                                            rf"{info.file_size} bytes, more than 10 bytes for one file"):
            read_member(z, info, limit=10)


@pytest.mark.parametrize("content,says", [
    (b"this is a text file, not a zip\n", r"is not a zip file \(it starts 'this is a text file"),
    (b"", "is empty, not a zip file"),
    (None, r"is a damaged zip file \(File is not a zip file\)"),  # a real zip cut short: no central directory
], ids=["text", "empty", "cut_short"])
def test_a_file_named_zip_that_is_not_one_is_a_data_error(tmp_path, content, says):
    path = tmp_path / "data.zip"
    if content is None:
        whole = _zip_with(tmp_path, [("top/g/c/0.png", load_png_bytes())], name="whole.zip").read_bytes()
        content = whole[: len(whole) // 2]
    path.write_bytes(content)
    for call in (open_zip, read_images, lambda p: extract_zip(p, tmp_path / "out")):
        with pytest.raises(DataError, match=says) as e:
            call(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# -- downloads ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not SMALL1.exists(), reason=f"Omniglot minimal sets not found at {DATA}")
def test_download_verifies_the_checksum_before_writing(tmp_path):
    url = SMALL1.as_uri()  # file://: no network needed
    dest = tmp_path / "dl" / "x.zip"
    with pytest.raises(DataError, match="checksum mismatch"):
        download(url, dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    download(url, dest, md5="e704a628b5459e08445c13499850abc4")
    assert md5sum(dest) == "e704a628b5459e08445c13499850abc4"


def test_an_address_that_cannot_be_fetched_is_a_data_error(tmp_path):
    dest = tmp_path / "dl" / "x.zip"
    with pytest.raises(DataError, match=r"cannot download file://.*nowhere\.zip: .*put the file at"):
        download((tmp_path / "nowhere.zip").as_uri(), dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
