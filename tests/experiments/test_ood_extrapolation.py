"""The ood-extrapolation study: a smoke run from the CLI with its checks, a bad option, and the image shifts."""

from __future__ import annotations

import json

import pytest
import torch

import metalens
from metalens.cli import main
from metalens.experiments.ood_extrapolation import AffineShift, OODExtrapolation, affine_images, sinusoid_shift
from metalens.registry import STUDIES

torch.set_num_threads(1)

SEED = 0


def test_quick_study_writes_every_check_and_its_curves(tmp_path):
    out = tmp_path / "ood"
    assert main(["study", "ood-extrapolation", "--out", str(out), "--quiet", "--set", "study.quick=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    learners = {"images": ["maml", "protonet", "lstm", "transformer", "mann"],
                "sinusoid": ["maml", "lstm", "transformer", "mann"]}
    expected = {f"{part}.{name}.learns" for part, names in learners.items() for name in names}
    expected |= {f"{part}.{axis}.maml_degrades_least" for part, axes in (("images", ("shear", "scale")),
                                                                          ("sinusoid", ("amplitude", "phase")))
                 for axis in axes}
    assert set(report["checks"]) == expected
    for c in report["checks"].values():
        assert set(c) == {"value", "target", "holds"} and isinstance(c["holds"], bool)
    curves = report["curves"]
    assert set(curves["images"]["shear"]) == set(learners["images"])
    assert [p["shift"] for p in curves["images"]["scale"]["maml"]] == [1.0, 0.85, 0.7, 0.55]
    # the unshifted tasks are scored once and shared by both axes
    assert curves["sinusoid"]["phase"]["mann"][0] == curves["sinusoid"]["amplitude"]["mann"][0]
    assert sorted(report["figures"]) == ["figures/examples.png", "figures/shift.png"]
    assert all((out / f).is_file() for f in report["figures"])


def test_a_bad_option_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["study", "ood-extrapolation", "--out", str(tmp_path / "bad"), "--quiet",
                 "--set", "study.shears=[0.5, 1.0]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "study.shears" in err and "must start with 0" in err, err
    assert not (tmp_path / "bad").exists()


def test_options_are_checked():
    assert STUDIES["ood-extrapolation"].cls is OODExtrapolation
    for options, message in [({"scales": (1.0, 0.5, 0.8)}, "scales must move away from 1"),
                             ({"learners": ("maml", "anil")}, "learners must be among"),
                             ({"test_queries": 20}, r"shots \+ queries must be <= 20")]:
        with pytest.raises(metalens.ConfigError, match=message):
            OODExtrapolation.Config(**options)


def test_no_shear_and_unit_scale_are_the_identity_exactly():
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(2, 3, 1, 28, 28, generator=g)
    assert affine_images(x) is x and torch.equal(affine_images(x, shear=0.0, scale=1.0), x)
    family = metalens.make_task("omniglot", ways=3, shots=1, queries=2)
    shifted = AffineShift(family)  # shear 0, scale 1
    a, b = family.eval_episodes(SEED, 4), shifted.eval_episodes(SEED, 4)
    for k in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, k), getattr(b, k)), f"{k}, seed {SEED}"
    sheared = AffineShift(family, AffineShift.Config(shear=0.4)).eval_episodes(SEED, 4)
    assert torch.equal(sheared.support_y, a.support_y) and not torch.equal(sheared.support_x, a.support_x)
    assert torch.equal(sheared.query_x, AffineShift(family, AffineShift.Config(shear=0.4)).eval_episodes(SEED, 4)
                       .query_x), f"seed {SEED}: the shift is not deterministic"


def test_shear_moves_rows_sideways_and_scale_shrinks_the_ink():
    x = torch.zeros(1, 1, 21, 21)
    x[..., 15, 8:13] = 1.0  # a short stroke below the centre (v > 0)
    sheared = affine_images(x, shear=0.5)
    cols = sheared[0, 0, 15].nonzero().flatten().float()
    assert cols.mean() > 12.0, cols  # moved right by ~ shear * v (v = 5/10.5 of the half-width: ~2.5 pixels)
    torch.testing.assert_close(sheared.sum(), x.sum(), rtol=0.05, atol=0)  # a shear keeps the area
    square = torch.zeros(1, 1, 28, 28)
    square[..., 8:20, 8:20] = 1.0
    torch.testing.assert_close(affine_images(square, scale=0.5).sum(), square.sum() / 4, rtol=0.05, atol=0)


def test_sinusoid_shifts_move_the_ranges_up():
    assert sinusoid_shift("amplitude", 0.0) == {"amplitude_range": [0.1, 5.0]}
    family = metalens.make_task("sinusoid", **sinusoid_shift("phase", 1.0))
    assert family.config.phase_range == pytest.approx((1.0, 1.0 + 3.141592653589793), abs=1e-6)
