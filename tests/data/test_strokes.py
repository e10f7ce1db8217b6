"""Omniglot's pen strokes (:mod:`metalens.data.strokes`): parsing, reading a zip safely, matching with the images,
perturbing and rendering; the ``omniglot`` family's ``strokes`` option on a toy set and on the shipped zips."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalens.data import load_image
from metalens.data import strokes as pen
from metalens.data.sources import read_images
from metalens.errors import DataError
from metalens.tasks.omniglot import Omniglot

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
SEED = 20240611
needs_data = pytest.mark.skipif(not (DATA / "strokes_background_small1.zip").exists(),
                                reason=f"Omniglot strokes not found at {DATA}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- parsing ----------------------------------------------------------------------------------------------
def test_start_and_break_delimit_the_strokes_and_y_points_down():
    text = "START\n1.5,-2,0\n3,-4,10\nBREAK\n\n7,-8,20\nBREAK\n9,-9,30\n10,-9,40\n"  # last stroke without BREAK
    strokes = pen.parse_strokes(text)
    assert [s.tolist() for s in strokes] == [[[1.5, 2.0], [3.0, 4.0]], [[7.0, 8.0]], [[9.0, 9.0], [10.0, 9.0]]]
    assert [s.tolist() for s in pen.parse_strokes("START\r\n5,-5,0\r\nBREAK\r\n")] == [[[5.0, 5.0]]]  # CRLF


@pytest.mark.parametrize("text,message", [
    ("START\n1,2,3\nPAUSE\n", "line 3: 'PAUSE' is neither START, BREAK nor x,y,t"),
    ("START\n1\n", "line 2: '1' is neither START, BREAK nor x,y,t"),
    ("START\nnan,2,0\n", "line 2: 'nan,2,0' is not a finite position"),
    ("START\nBREAK\n", "holds no pen positions"),
    ("", "holds no pen positions"),
])
def test_a_damaged_strokes_file_is_one_data_error_naming_the_file_and_line(text, message):
    with pytest.raises(DataError, match=re.escape(message)) as e:
        pen.parse_strokes(text, where="'a/b/c.txt' in x.zip")
    assert "'a/b/c.txt' in x.zip" in str(e.value) and "\n" not in str(e.value)


def test_resampling_is_uniform_along_each_stroke():
    strokes = [np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 5.0]]), np.array([[3.0, 3.0], [3.0, 3.0]])]
    a, dot = pen.resample(strokes, spacing=1.0)
    steps = np.sqrt((np.diff(a, axis=0) ** 2).sum(1))
    assert len(a) == 16 and np.allclose(steps, 1.0) and a[0].tolist() == [0, 0] and a[-1].tolist() == [10, 5]
    assert dot.tolist() == [[3.0, 3.0]]  # a stroke that never moves: one point


# -- reading a zip: safe, macOS entries skipped -------------------------------------------------------------
def _drawing(i: int) -> str:
    """A strokes file: two strokes that differ with ``i``."""
    return (f"START\n{10 + i},-20,0\n{60 + i},-25,50\n{80},-{30 + i},90\nBREAK\n"
            f"50,-60,120\n50,-{90 - i},160\nBREAK\n")


def _png_of(text: str) -> bytes:
    """The drawing rendered as Omniglot's scans are stored: 105x105, black ink on white."""
    pts, sid = pen.pad([pen.resample(pen.parse_strokes(text))])
    ink = pen.render(pts, sid, 5.0, size=105)[0]
    buf = io.BytesIO()
    Image.fromarray(255 - ink).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _toy_omniglot(root: Path, *, drop_stroke: str | None = None, extra_stroke: str | None = None) -> Path:
    """Omniglot's minimal-set zips in small: ``images_background_small{1,2}.zip`` (alphabet ``alpha``, then ``beta``:
    3 characters x 4 drawers each) and their ``strokes_background_small{1,2}.zip``, with macOS's ``__MACOSX/`` and
    ``.DS_Store`` entries in the strokes zips (as in Omniglot's)."""
    root.mkdir(parents=True, exist_ok=True)
    for part, a in (("small1", "alpha"), ("small2", "beta")):
        with zipfile.ZipFile(root / f"images_background_{part}.zip", "w") as zi, \
                zipfile.ZipFile(root / f"strokes_background_{part}.zip", "w") as zs:
            top = f"strokes_background_{part}"
            zs.writestr(f"{top}/.DS_Store", b"\0\0\0\1Bud1\0")
            zs.writestr(f"__MACOSX/{top}/._.DS_Store", b"\0\5\26\7")
            zs.writestr(f"{top}/{a}/.DS_Store", b"\0\0\0\1Bud1\0")
            for c in range(3):
                for d in range(1, 5):
                    name = f"{a}/character0{c + 1}/{10 * c:04d}_{d:02d}"
                    text = _drawing(7 * c + d + (20 if a == "beta" else 0))
                    zi.writestr(f"images_background_{part}/{name}.png", _png_of(text))
                    if name != drop_stroke:
                        zs.writestr(f"{top}/{name}.txt", text)
                        folder, file = name.rsplit("/", 1)
                        zs.writestr(f"__MACOSX/{top}/{folder}/._{file}.txt", b"\0\5\26\7 not text")
            if extra_stroke and extra_stroke.startswith(a):
                zs.writestr(f"{top}/{extra_stroke}.txt", _drawing(0))
    return root


def test_read_strokes_skips_macos_entries_and_resamples(tmp_path):
    root = _toy_omniglot(tmp_path / "toy")
    s = pen.read_strokes(root / "strokes_background_small1.zip")
    assert s.name == "strokes_background_small1" and len(s.keys) == 12
    assert s.keys[0] == "alpha/character01/0000_01" and s.keys[-1] == "alpha/character03/0020_04"
    assert s.points.shape[0] == 12 and s.points.dtype == torch.float32 and s.stroke.shape == s.points.shape[:2]
    assert set(s.stroke.unique().tolist()) == {-1, 0, 1}  # two strokes each, padded to the longest
    first = s.points[0][s.stroke[0] == 0]
    assert first[0].tolist() == [11.0, 20.0] and torch.allclose((first[1:] - first[:-1]).norm(dim=1),
                                                                 torch.tensor(1.0), atol=0.05)
    # read again: from memory; in a new process the disk cache gives the same points (to 1/32 pixel)
    assert pen.read_strokes(root / "strokes_background_small1.zip") is s
    pen._read_cached.cache_clear()
    again = pen.read_strokes(root / "strokes_background_small1.zip")
    assert again.cached and again.keys == s.keys and torch.equal(again.stroke, s.stroke)
    assert float((again.points - s.points).abs().max()) <= 1 / 64 + 1e-6


def test_an_unsafe_strokes_zip_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "strokes_bad.zip", "w") as z:
        z.writestr("../evil/a/b.txt", _drawing(0))
    with pytest.raises(DataError, match=r"refusing the archive .*'\.\./evil/a/b\.txt' contains '\.\.'"):
        pen.read_strokes(tmp_path / "strokes_bad.zip")
    with zipfile.ZipFile(tmp_path / "strokes_none.zip", "w") as z:
        z.writestr("__MACOSX/a/b/._c.txt", b"\0\5")
    with pytest.raises(DataError, match="no strokes files"):
        pen.read_strokes(tmp_path / "strokes_none.zip")


# -- matching with the images ----------------------------------------------------------------------------------
@pytest.mark.parametrize("drop,extra,message", [
    ("alpha/character02/0010_03", None,
     "1 image(s) of images_background_small1 have no strokes file (alpha/character02/0010_03)"),
    (None, "beta/character09/0090_01",
     "1 strokes file(s) of strokes_background_small2 have no image (beta/character09/0090_01)"),
])
def test_strokes_that_do_not_match_the_images_are_refused_naming_what_differs(tmp_path, drop, extra, message):
    root = _toy_omniglot(tmp_path / "toy", drop_stroke=drop, extra_stroke=extra)
    part = "small1" if drop else "small2"
    images = read_images(root / f"images_background_{part}.zip", cache="off")
    with pytest.raises(DataError, match=re.escape(message)) as e:
        pen.check_match(images.files, pen.read_strokes(root / f"strokes_background_{part}.zip"),
                        images_name=images.name)
    assert "set task.strokes = none" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match=re.escape(message)):  # the family refuses them when it is built
        _toy_family(root)


def _toy_family(root: Path, **options) -> Omniglot:
    """The omniglot family on the toy minimal sets: meta-train on alpha, test on beta."""
    return Omniglot(Omniglot.Config(root=str(root), ways=3, shots=1, queries=2, strokes="perturb", **options))


def test_the_family_redraws_meta_training_images_from_perturbed_strokes(tmp_path):
    root = _toy_omniglot(tmp_path / "toy")
    f = _toy_family(root)
    assert f.groups("train") == ["alpha"] and f.groups("test") == ["beta"]
    a, b = f.episode(SEED, 0, 4), f.episode(SEED, 0, 4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x), f"seed {SEED}, step 0"
    assert not torch.equal(a.query_x, f.episode(SEED, 1, 4).query_x)
    plain = _toy_family(root, strokes_fraction=0.0)  # nothing redrawn: the scans, the same characters and drawers
    ref = plain.episode(SEED, 0, 4)
    assert torch.equal(a.classes, ref.classes) and torch.equal(a.query_y, ref.query_y)
    assert not torch.equal(a.query_x, ref.query_x)
    assert a.query_x.shape == ref.query_x.shape and float(a.query_x.min()) >= 0 and float(a.query_x.max()) <= 1
    ink, ink_ref = float(a.query_x.mean()), float(ref.query_x.mean())
    assert 0.5 * ink_ref < ink < 1.5 * ink_ref  # about as much ink as the scans
    e1, e2 = f.eval_episodes(SEED, 6), plain.eval_episodes(SEED, 6)
    assert torch.equal(e1.query_x, e2.query_x), "evaluation tasks must not be redrawn"
    (root / "strokes_background_small2.zip").unlink()
    with pytest.raises(DataError, match=r"strokes_background_small2 \(a zip or a folder\) is not in .*set "
                                        r"task\.strokes = none"):
        _toy_family(root)


# -- perturbing and rendering ------------------------------------------------------------------------------------
def test_perturbation_is_deterministic_in_the_generator_and_rendering_has_the_family_shape():
    pts, sid = pen.pad([pen.resample(pen.parse_strokes(_drawing(i))) for i in range(5)])
    a = pen.perturb(pts, sid, generator=gen(SEED))
    b = pen.perturb(pts, sid, generator=gen(SEED))
    c = pen.perturb(pts, sid, generator=gen(SEED + 1))
    assert torch.equal(a.points, b.points) and torch.equal(a.widths, b.widths), f"seed {SEED}"
    assert not torch.equal(a.points, c.points)
    assert torch.equal(a.points[sid < 0], pts[sid < 0])  # padding untouched
    moved = (a.points - pts)[sid >= 0].norm(dim=-1)
    assert 0 < float(moved.mean()) < 20  # pixels of the 105x105 canvas: a new drawing, the same character
    same = pen.perturb(pts, sid, generator=gen(SEED), p=pen.Perturbation(strength=0.0))
    assert torch.allclose(same.points, pts, atol=1e-4)  # strength 0: the drawing itself
    for size, shape in ((28, (5, 28, 28)), (105, (5, 105, 105)), (140, (5, 140, 140))):
        im = pen.render(a.points, sid, a.widths, size=size)
        assert im.shape == shape and im.dtype == np.uint8 and im.max() == 255 and im.min() == 0
        assert np.array_equal(im, pen.render(b.points, sid, b.widths, size=size))
    wide = pen.render(pts, sid, 7.0, size=20, height=20, width=30)
    assert wide.shape == (5, 20, 30) and wide[:, :, :4].max() == 0  # padded to the aspect: blank margins
    grey = pen.render(pts, sid, 5.0, size=28)
    assert ((grey > 0) & (grey < 255)).any()  # anti-aliased by the box filter, as the scans are


# -- the shipped zips ---------------------------------------------------------------------------------------------
@needs_data
def test_the_shipped_strokes_are_read_and_match_the_images():
    for part, n in {"small1": 2720, "small2": 3120}.items():
        s = pen.read_strokes(DATA / f"strokes_background_{part}.zip")
        with zipfile.ZipFile(DATA / f"images_background_{part}.zip") as z:
            files = [f for f in z.namelist() if f.endswith(".png")]
        assert len(s.keys) == n == len(files)
        pen.check_match(files, s, images_name=f"images_background_{part}")
    # a rendering of the unperturbed trajectory covers the scan it comes from
    rows = list(range(0, 2720, 97))
    drawn = pen.render(s.points[rows], s.stroke[rows], 5.0, size=105) > 127
    with zipfile.ZipFile(DATA / "images_background_small2.zip") as z:
        scans = np.stack([load_image(z.read(f"images_background_small2/{s.keys[r]}.png"), size=105)[0].numpy() > 0.5
                          for r in rows])  # ink 1
    iou = (drawn & scans).sum((1, 2)) / (drawn | scans).sum((1, 2))
    assert float(np.median(iou)) > 0.6, iou


@needs_data
def test_the_omniglot_family_with_strokes_on_the_shipped_sets():
    f = Omniglot(Omniglot.Config(root=str(DATA), protocol="small_within", ways=20, strokes="perturb",
                                 strokes_fraction=0.5))
    plain = Omniglot(Omniglot.Config(root=str(DATA), protocol="small_within", ways=20))
    slot = f._pen[0]
    assert int((slot >= 0).sum()) == f.n_images("train") == 2720  # every meta-training image has its strokes
    a, ref = f.episode(SEED, 0, 1), plain.episode(SEED, 0, 1)
    assert torch.equal(a.classes, ref.classes) and torch.equal(a.support_y, ref.support_y)
    same = (a.query_x == ref.query_x).flatten(2).all(2).float().mean()
    assert 0.2 < float(same) < 0.8, f"seed {SEED}: {float(same)} of the images kept (strokes_fraction = 0.5)"
    assert torch.equal(f.eval_episodes(SEED, 3).query_x, plain.eval_episodes(SEED, 3).query_x)
