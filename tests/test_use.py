"""metalens predict on a user's data: image folders (a protonet trained on the shipped Omniglot zips), CSV files
(a table-trained and a sinusoid learner); label names round-trip; every mismatch is one line and exit code 2."""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image

import metalens
from metalens.cli import main
from metalens.errors import DataError
from metalens.model_file import Model, load_model
from metalens.run import RunConfig, start_run
from metalens.use import prepare

torch.set_num_threads(1)

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
SMALL2 = OMNIGLOT / "images_background_small2.zip"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(out: Path, task: str, learner: str, task_options: dict, learner_options: dict, steps: int = 2,
          batch_tasks: int = 2) -> Path:
    cfg = RunConfig.resolve(task, learner, task_options, learner_options, {"steps": steps, "batch_tasks": batch_tasks})
    start_run(cfg, out).train(progress=False)
    return out


def one_line_exit_2(capsys, argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("metalens: error: "), err
    assert match in err, err
    return err


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory):
    if not SMALL2.exists():
        pytest.skip(f"the Omniglot minimal sets are not in {OMNIGLOT}")
    root = tmp_path_factory.mktemp("omni")
    folder = train(root / "proto", "omniglot", "protonet", {"queries": 1, "ways": 5}, {"channels": 8})
    # support: 3 characters of an alphabet the run never trained on, 2 drawings each, under label names of ours
    with zipfile.ZipFile(SMALL2) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png") and "/Tagalog/" in n)
        chars = sorted({str(PurePosixPath(n).parent) for n in names})[:3]
        labels = ["ba", "ka", "da"]
        for label, char in zip(labels, chars):
            files = [n for n in names if n.startswith(char + "/")]
            (root / "support" / label).mkdir(parents=True)
            for j, f in enumerate(files[:2]):
                (root / "support" / label / f"{j}.png").write_bytes(z.read(f))
            (root / "query").mkdir(exist_ok=True)
            (root / "query" / f"{label}.png").write_bytes(z.read(files[3]))
    return folder, root


def read_csv_text(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_on_image_folders_round_trips_label_names(omniglot_run, capsys):
    folder, root = omniglot_run
    code, out, err = run(capsys, "predict", folder, "--support", root / "support", "--query", root / "query")
    assert code == 0, err
    rows = read_csv_text(out)
    assert [r["query"] for r in rows] == ["ba.png", "da.png", "ka.png"]
    assert list(rows[0]) == ["query", "label", "p_ba", "p_da", "p_ka"]  # the user's names, in their sorted order
    for r in rows:
        p = [float(r[f"p_{c}"]) for c in ("ba", "da", "ka")]
        assert abs(sum(p) - 1) < 1e-4 and r["label"] == ("ba", "da", "ka")[int(np.argmax(p))]
    # the same through a model file, as JSON, into a file; single image files as queries
    model = root / "proto.safetensors"
    assert run(capsys, "export", folder, model)[0] == 0
    out_file = root / "pred.json"
    code, out, err = run(capsys, "predict", model, "--support", root / "support", "--query", root / "query",
                         "--format", "json", "--out", out_file)
    assert code == 0 and out == f"wrote 3 predictions to {out_file}\n", err
    res = json.loads(out_file.read_text())
    assert res["classes"] == ["ba", "da", "ka"] and res["model"] == "protonet trained on omniglot"
    assert [p["label"] for p in res["predictions"]] == [r["label"] for r in rows]
    for p, r in zip(res["predictions"], rows):
        assert all(abs(p["probabilities"][c] - float(r[f"p_{c}"])) < 1e-5 for c in ("ba", "da", "ka"))
    code, out, _ = run(capsys, "predict", model, "--support", root / "support", "--query", root / "query" / "ka.png",
                       "--query", root / "query" / "ba.png", "--query-batch", "1")
    assert code == 0 and [r["query"] for r in read_csv_text(out)] == [str(root / "query" / "ka.png"),
                                                                      str(root / "query" / "ba.png")]


def test_images_of_another_size_and_colour_are_converted_as_in_training(omniglot_run, capsys, tmp_path):
    folder, root = omniglot_run
    src = Image.open(root / "query" / "ka.png").convert("L")
    big = src.resize((150, 100)).convert("RGB")  # a colour photo of another shape
    big.save(tmp_path / "big.png")
    model = load_model(folder)
    x = metalens.data.load_image(tmp_path / "big.png")
    assert x.shape == (1, 28, 28)  # what predict feeds the learner
    code, out, err = run(capsys, "predict", folder, "--support", root / "support", "--query", tmp_path / "big.png")
    assert code == 0, err
    family = metalens.load_run(folder).family  # predict decodes a file exactly as the family decodes its images
    assert model.inputs.image == {**family.image_options(), "mean": None, "std": None}


def test_image_inputs_that_cannot_be_converted_are_named(omniglot_run, capsys, tmp_path):
    folder, root = omniglot_run
    model = load_model(folder)
    with pytest.raises(DataError, match=r"images of 3x28x28 .*: 3 channel\(s\) instead of 1; protonet trained on "
                                        r"omniglot takes 1x28x28 images"):
        prepare(model, np.zeros((2, 3, 28, 28)))
    with pytest.raises(DataError, match=r"images of 1x32x32 .*: 32x32 pixels instead of 28x28"):
        prepare(model, np.zeros((2, 1, 32, 32)))
    assert prepare(model, np.zeros((2, 28, 28))).shape == (2, 1, 28, 28)
    # on the command line: rows of pixels of the wrong size or channel count
    for side, channels, match in ((32, 1, "1024 values per row (as 1-channel 32x32 images would)"),
                                  (28, 3, "2352 values per row (as 3-channel 28x28 images would)")):
        path = tmp_path / f"{side}-{channels}.csv"
        n = side * side * channels
        path.write_text(",".join(f"p{i}" for i in range(n)) + ",label\n"
                        + "".join(",".join(["0"] * n) + f",{c}\n" for c in "ab"))
        one_line_exit_2(capsys, ["predict", folder, "--support", path, "--query", root / "query"], match)


def test_image_folder_mistakes_are_one_line(omniglot_run, capsys, tmp_path):
    folder, root = omniglot_run
    empty = tmp_path / "support"
    for label in ("a", "b"):
        (empty / label).mkdir(parents=True)
    (empty / "a" / "0.png").write_bytes((root / "support" / "ba" / "0.png").read_bytes())
    one_line_exit_2(capsys, ["predict", folder, "--support", empty, "--query", root / "query"],
                    f"class folder {empty / 'b'} holds no images")
    (tmp_path / "noimages").mkdir()
    (tmp_path / "noimages" / "notes.txt").write_text("x")
    one_line_exit_2(capsys, ["predict", folder, "--support", root / "support", "--query", tmp_path / "noimages"],
                    f"query folder {tmp_path / 'noimages'} holds no images")
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "x.png").write_bytes((root / "support" / "ba" / "0.png").read_bytes())
    one_line_exit_2(capsys, ["predict", folder, "--support", loose, "--query", root / "query"],
                    "holds image files outside class folders (x.png)")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    one_line_exit_2(capsys, ["predict", folder, "--support", root / "support", "--query", tmp_path / "broken.png"],
                    "is not an image Pillow can read")


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def wine_csv(path: Path, rows: np.ndarray, labels, columns) -> Path:
    lines = [",".join([*columns, "label"])]
    lines += [",".join([*(f"{v:.4f}" for v in x), str(y)]) for x, y in zip(rows, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """A transformer meta-trained 3-way on the table family (a class split of a 9-class table)."""
    root = tmp_path_factory.mktemp("table")
    r = np.random.default_rng(0)
    x = np.concatenate([r.normal(loc=3 * c, size=(10, 4)) for c in range(9)])
    y = [f"k{c}" for c in range(9) for _ in range(10)]
    data = wine_csv(root / "train.csv", x, y, ["a", "b", "c", "d"])
    folder = train(root / "tr", "table", "transformer", {"path": str(data), "ways": 3, "test_size": 3},
                   {"dim": 16, "layers": 1, "heads": 2})
    return folder, root


def test_predict_on_csv_files_with_a_table_learner(table_run, capsys):
    folder, root = table_run
    r = np.random.default_rng(1)
    names = ["red", "white", "rosé"]
    xs = np.concatenate([r.normal(loc=3 * c, size=(2, 4)) for c in range(3)])
    sup = wine_csv(root / "s.csv", xs, [n for n in names for _ in range(2)], ["a", "b", "c", "d"])
    qry = wine_csv(root / "q.csv", r.normal(size=(4, 4)), ["?"] * 4, ["d", "c", "b", "a"])  # columns by name
    code, out, err = run(capsys, "predict", folder, "--support", sup, "--query", qry)
    assert code == 0, err
    rows = read_csv_text(out)
    assert [r["query"] for r in rows] == ["1", "2", "3", "4"] and list(rows[0])[2:] == ["p_red", "p_rosé", "p_white"]
    assert {r["label"] for r in rows} <= set(names)


def test_table_mismatches_are_one_line(table_run, capsys, tmp_path):
    folder, root = table_run
    r = np.random.default_rng(2)
    good = wine_csv(tmp_path / "good.csv", r.normal(size=(6, 4)), list("aabbcc"), ["a", "b", "c", "d"])
    cases = [
        (wine_csv(tmp_path / "s1.csv", r.normal(size=(6, 3)), list("aabbcc"), ["a", "b", "c"]), good,
         "has no column 'd'; transformer trained on table has the columns 'a', 'b', 'c', 'd'"),
        (wine_csv(tmp_path / "s2.csv", r.normal(size=(6, 5)), list("aabbcc"), ["a", "b", "c", "d", "e"]), good,
         "has a column 'e' that transformer trained on table does not have"),
        (wine_csv(tmp_path / "s3.csv", r.normal(size=(8, 4)), list("aabbccdd"), ["a", "b", "c", "d"]), good,
         "the support set has 4 classes, but transformer trained on table was trained 3-way and its parameters "
         "depend on the number of classes: give exactly 3 classes"),
    ]
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("a,b,c,d\n1,2,3,4\n")
    cases.append((nolabel, good, "has no label column: name one 'label' or 'target'"))
    for sup, qry, match in cases:
        one_line_exit_2(capsys, ["predict", folder, "--support", sup, "--query", qry], match)
    # image inputs for a table learner
    img = tmp_path / "imgs" / "a"
    img.mkdir(parents=True)
    Image.new("L", (28, 28), 255).save(img / "0.png")
    one_line_exit_2(capsys, ["predict", folder, "--support", tmp_path / "imgs", "--query", good],
                    "holds images, but transformer trained on table takes rows of 4 features: give a CSV file")


def test_predict_regression_csv_with_a_sinusoid_learner(capsys, tmp_path):
    folder = train(tmp_path / "oracle", "sinusoid", "oracle", {}, {}, steps=1, batch_tasks=1)
    x = np.linspace(-4.5, 4.5, 12)
    (tmp_path / "s.csv").write_text("x,target\n" + "".join(f"{v},{2 * math.sin(v - 0.5)}\n" for v in x))
    xq = [-2.0, 0.3, 3.7]
    (tmp_path / "q.csv").write_text("x\n" + "".join(f"{v}\n" for v in xq))
    code, out, err = run(capsys, "predict", folder, "--support", tmp_path / "s.csv", "--query", tmp_path / "q.csv")
    assert code == 0, err
    rows = read_csv_text(out)
    assert list(rows[0]) == ["query", "mean", "std"]
    for v, r in zip(xq, rows):  # the exact posterior predictive recovers the sine from 12 points
        assert abs(float(r["mean"]) - 2 * math.sin(v - 0.5)) < 0.05 and 0 < float(r["std"]) < 0.2
    (tmp_path / "w.csv").write_text("x,y,target\n1,2,3\n")
    one_line_exit_2(capsys, ["predict", folder, "--support", tmp_path / "w.csv", "--query", tmp_path / "q.csv"],
                    "has 2 feature column(s); oracle trained on sinusoid takes 1")


def test_more_classes_than_a_synthetic_tables_learner_was_trained_for(capsys, tmp_path):
    folder = train(tmp_path / "st", "synthetic_tables", "transformer",
                   {"max_features": 5, "max_classes": 3, "min_classes": 2, "shots": 2, "queries": 1},
                   {"dim": 16, "layers": 1, "heads": 2})
    r = np.random.default_rng(3)
    two = wine_csv(tmp_path / "two.csv", r.normal(size=(4, 7)), list("aabb"), [f"f{i}" for i in range(7)])
    code, out, err = run(capsys, "predict", folder, "--support", two, "--query", two)  # 7 columns, truncated to 5
    assert code == 0 and list(read_csv_text(out)[0]) == ["query", "label", "p_a", "p_b"], err
    three = wine_csv(tmp_path / "three.csv", r.normal(size=(2, 3)), list("ab"), ["x", "y", "z"])
    one_line_exit_2(capsys, ["predict", folder, "--support", two, "--query", three],
                    "has no column 'f0'; the support set has the columns 'f0', 'f1'")
    four = wine_csv(tmp_path / "four.csv", r.normal(size=(8, 3)), list("aabbccdd"), ["x", "y", "z"])
    one_line_exit_2(capsys, ["predict", folder, "--support", four, "--query", four],
                    "the support set has 4 classes, more than the 3 that transformer trained on synthetic_tables "
                    "was trained for")


def test_a_colour_normalised_family_is_replayed_on_user_images():
    """predict decodes a user's file with the family's channels, size and normalisation (not grey defaults)."""
    family = metalens.make_task("omniglot", channels=3, size=20, normalize=True, ways=5)
    learner = metalens.make_learner("protonet", family, backbone="identity")
    inputs = Model.of(learner, family).inputs
    options = family.image_options()
    assert inputs.image["channels"] == 3 and inputs.image["size"] == 20
    assert inputs.image["mean"] == list(options["mean"]) and inputs.image["std"] == list(options["std"])
    assert inputs.image["mean"] is not None and len(inputs.image["mean"]) == 3
