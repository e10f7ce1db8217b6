"""The ``omniglot`` family: its protocols on the shipped minimal sets, episodes, downloads only when
asked, and its options' declared constraints.

The shipped data lives at <repo>/../shared/data/omniglot (as in CI).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import metalens
from metalens.config import ConfigError, from_dict
from metalens.data import default_root
from metalens.errors import DataError
from metalens.tasks import omniglot as omniglot_module
from metalens.tasks.omniglot import Omniglot, download_omniglot

torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()
SMALL1 = DATA / "images_background_small1.zip"
SEED = 20240611

# from ../shared/data/omniglot/README.md
README_SMALL1 = {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40, "Latin": 26}

pytestmark = pytest.mark.skipif(not SMALL1.exists(), reason=f"Omniglot minimal sets not found at {DATA}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def omniglot(**options) -> Omniglot:
    return Omniglot(Omniglot.Config(root=str(DATA), **options))


# -- the small protocol on the shipped minimal sets -----------------------------------------------------
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


def test_missing_root_says_where_it_looked_and_how_to_fix_it(tmp_path):
    with pytest.raises(ValueError, match=r"no image data at .*nowhere.*task\.root"):
        Omniglot(Omniglot.Config(root=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="lacks images_background, images_evaluation.*task.download=true"):
        omniglot(protocol="lake")


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


# -- downloads, only when asked ------------------------------------------------------------------
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
    monkeypatch.setattr(omniglot_module, "OMNIGLOT_URL", DATA.as_uri())
    f = Omniglot(Omniglot.Config(root=str(other), download=True))
    # the zips, and the decoded images' disk cache beside them (metalens.data.cache)
    assert sorted(p.name for p in other.iterdir()) == [".metalens-cache", "images_background_small1.zip",
                                                       "images_background_small2.zip"]
    assert len(f.classes("test")) == 106


def test_default_root_follows_metalens_data(monkeypatch, tmp_path):
    monkeypatch.setenv("METALENS_DATA", str(DATA.parent))
    assert default_root() == DATA.parent / "omniglot"
    assert len(Omniglot().classes("test")) == 106
    monkeypatch.setenv("METALENS_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="METALENS_DATA="):
        Omniglot()


# -- data that does not fit the options ----------------------------------------------------------------
def test_more_ways_than_the_small_protocol_has_test_characters_is_refused():
    with pytest.raises(DataError, match=re.escape(
            "the test split has 106 classes, fewer than ways = 107; lower task.ways to at most 106, or choose a "
            "protocol with more test characters (task.protocol; 'small' now)")):
        metalens.make_task("omniglot", root=str(DATA), ways=107)
    assert len(metalens.make_task("omniglot", root=str(DATA), ways=106).classes("test")) == 106


def test_a_zip_with_the_wrong_checksum_is_not_used(tmp_path):
    (tmp_path / "images_background_small1.zip").write_bytes(b"not the published zip")
    with pytest.raises(DataError, match=r"images_background_small1\.zip exists but its md5 is not the published "
                                        r"e704a628b5459e08445c13499850abc4; delete it to download again"):
        download_omniglot(tmp_path, ["images_background_small1"])


# -- options -----------------------------------------------------------------------------------------------
def test_the_defaults_are_unchanged():
    assert dataclasses.asdict(Omniglot.Config()) == {
        "root": "", "protocol": "small", "ways": 5, "shots": 1, "queries": 15, "rotations": "train",
        "split_seed": 0, "download": False, "size": 28, "channels": 1, "height": None, "width": None,
        "normalize": None, "augment": "none", "aug_crop": "pad", "aug_padding": 8, "aug_crop_scale": (0.08, 1.0),
        "aug_crop_ratio": (0.75, 4 / 3), "aug_flip": 0.5, "aug_jitter": 0.4, "aug_rotation": 10.0,
        "aug_shear": 10.0, "aug_scale": (0.9, 1.1), "aug_translate": 0.1, "episodes": "any", "strokes": "none",
        "strokes_fraction": 1.0, "strokes_strength": 1.0}


@pytest.mark.parametrize("options,message", [
    ({"ways": 1}, "task.ways must be >= 2, got 1"),
    ({"shots": 0}, "task.shots must be >= 1, got 0"),
    ({"queries": 0}, "task.queries must be >= 1, got 0"),
    ({"split_seed": -1}, "task.split_seed must be >= 0, got -1"),
    ({"protocol": "snell"}, "task.protocol must be one of 'small', 'lake', 'finn', 'vinyals', 'small_within', "
                              "'lake_within', got 'snell'"),
    ({"rotations": 1}, "task.rotations must be one of 'none', 'train', 'all', got 1"),
    ({"download": "yes"}, "task.download must be true or false, got 'yes'"),
])
def test_bad_options_are_config_errors_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(Omniglot.Config, options, prefix="task.", where="task 'omniglot'")


# -- the image options: size, channels, handwriting augmentation ---------------------------------------------
def test_omniglot_at_another_size_and_in_three_channels(monkeypatch, tmp_path):
    monkeypatch.setenv("METALENS_CACHE", str(tmp_path / "cache"))
    f = omniglot(size=32, channels=3, normalize=False, rotations="none")
    ep = f.sample(2, generator=gen(SEED), split="test")
    assert f.spec.x_shape == (3, 32, 32) and ep.support_x.shape == (2, 5, 3, 32, 32)
    assert torch.equal(ep.support_x[:, :, 0], ep.support_x[:, :, 1])  # grey: three identical channels
    assert float(ep.support_x.mean()) > 0.7, "colour is never inverted: white paper, dark strokes"
    assert f.image_options()["channels"] == 3 and f.image_options()["invert"] is True  # invert applies to grey only


def test_omniglot_handwriting_augmentation_in_meta_training_only():
    plain, f = omniglot(), omniglot(augment="handwriting", aug_rotation=15.0)
    a, b = f.episode(SEED, 0, 3), f.episode(SEED, 0, 3)
    assert torch.equal(a.support_x, b.support_x), f"seed {SEED}: the same step gave other images"
    ref = plain.episode(SEED, 0, 3)
    assert torch.equal(a.classes, ref.classes) and torch.equal(a.query_y, ref.query_y)
    assert not torch.equal(a.support_x, ref.support_x)
    assert float(a.support_x.min()) >= 0 and float(a.support_x.max()) <= 1 + 1e-6  # ink stays in [0, 1]
    assert abs(float(a.support_x.mean()) - float(ref.support_x.mean())) < 0.05  # about as much ink
    e1, e2 = f.eval_episodes(SEED, 10), plain.eval_episodes(SEED, 10)
    assert torch.equal(e1.query_x, e2.query_x), "evaluation tasks must not be augmented"
    assert f.mean is None  # grey: not normalised by default, ink stays 1 on 0


def test_a_within_protocol_with_too_many_ways_names_the_protocol_not_the_episodes_option():
    with pytest.raises(DataError, match=re.escape(
            "lower task.ways to at most 47, or choose a protocol whose held-out tasks draw from any alphabet "
            "(task.protocol; 'small_within' now)")):
        metalens.make_task("omniglot", root=str(DATA), protocol="small_within", ways=60)
