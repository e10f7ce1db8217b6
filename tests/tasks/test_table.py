"""table: episodes built from a user's CSV, split over classes or tasks without leaks, standardised with the
meta-training rows only; data problems are one DataError naming the file and the column."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import metalens
from metalens.errors import DataError
from metalens.tasks.table import Table, read_csv, sort_labels

torch.set_num_threads(1)

SEED = 20240611


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_table(path, n_classes=8, rows_per_class=12, features=3, task_of=None, seed=0):
    """A CSV whose feature 0 encodes the class (class c has values near 10 c) and whose other features are noise."""
    r = np.random.default_rng(seed)
    lines = ["f0," + ",".join(f"f{j}" for j in range(1, features)) + ",label" + (",task" if task_of else "")]
    for c in range(n_classes):
        for _ in range(rows_per_class):
            cells = [f"{10 * c + r.normal():.4f}"] + [f"{r.normal():.4f}" for _ in range(features - 1)]
            cells.append(f"class{c}")
            if task_of:
                cells.append(task_of(c))
            lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def csv_path(tmp_path):
    return write_table(tmp_path / "t.csv")


def test_class_split_holds_out_classes_and_labels_follow_the_drawn_classes(csv_path):
    family = metalens.make_task("table", path=str(csv_path), ways=3, shots=2, queries=4, test_size=3)
    train, test = family.classes("train"), family.classes("test")
    assert len(train) == 5 and len(test) == 3 and not set(train) & set(test)
    assert family.spec.x_shape == (3,) and family.spec.num_classes == 3 and family.spec.train_classes == 5
    ep = family.sample(20, generator=gen(SEED), split="train")
    # feature 0 encodes the class: standardised, the class of each point is recoverable from it
    mean, std = family.data.mean[0], family.data.std[0]
    raw0 = torch.cat([ep.support_x, ep.query_x], 1)[..., 0] * std + mean  # [T, P]
    cls_of_point = torch.round(raw0 / 10).long()  # the class index c of "class{c}"
    y = torch.cat([ep.support_y, ep.query_y], 1)
    names = [f"class{int(c)}" for c in cls_of_point.flatten()]
    drawn = [[train[i] for i in row] for row in ep.classes.tolist()]  # Episode.classes indexes classes("train")
    for t in range(ep.n_tasks):
        for p in range(y.shape[1]):
            assert names[t * y.shape[1] + p] == drawn[t][int(y[t, p])], f"seed {SEED}, task {t}, point {p}"
    test_ep = family.sample(20, generator=gen(SEED), split="test")
    raw_test = test_ep.query_x[..., 0] * std + mean
    seen = {f"class{int(c)}" for c in torch.round(raw_test / 10).long().flatten()}
    assert seen <= set(test) and test_ep.classes is None


def test_standardised_with_the_meta_training_rows_only(csv_path):
    family = metalens.make_task("table", path=str(csv_path), ways=2, test_size=3)
    train_rows = torch.cat([family.data.rows[i][family.data.rows[i] >= 0]
                            for i in family.data.task_classes["train"][0].tolist()])
    x = family.data.x[train_rows]
    assert torch.allclose(x.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert abs(float(family.data.x.mean(0)[0])) > 0.1  # the held-out classes are not centred: no leak
    inputs = family.user_inputs()
    assert inputs["columns"] == ["f0", "f1", "f2"] and inputs["standardize"] == "fixed"
    assert np.allclose(inputs["mean"], family.data.mean) and len(inputs["std"]) == 3


def test_task_split_keeps_each_episode_inside_one_task(tmp_path):
    path = write_table(tmp_path / "t.csv", n_classes=12, task_of=lambda c: f"t{c // 3}")  # 4 tasks of 3 classes
    family = metalens.make_task("table", path=str(path), task_column="task", ways=2, shots=1, queries=2,
                                test_size=1)
    assert len(family.tasks("train")) == 3 and len(family.tasks("test")) == 1
    assert not set(family.tasks("train")) & set(family.tasks("test"))
    train = family.classes("train")
    assert all(name.split("/")[0] in family.tasks("train") for name in train)
    ep = family.sample(30, generator=gen(SEED))
    for row in ep.classes.tolist():
        tasks = {train[i].split("/")[0] for i in row}
        assert len(tasks) == 1, f"seed {SEED}: an episode mixed tasks {tasks}"


def test_labels_sort_naturally_and_the_default_is_digits():
    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_labels(["b", "10", "a"]) == ["10", "a", "b"]
    family = Table()
    assert family.spec.x_shape == (64,) and family.features[0] == "pixel_0_0"
    assert len(family.classes("train")) == 7 and len(family.classes("test")) == 3


@pytest.mark.parametrize("content, options, match", [
    ("a,b\n1,2\n", {}, r"has no label column: name one 'label' or 'target'"),
    ("a,kind\n1,x\n", {"label_column": "label"}, r"has no column 'label' \(the label column\)"),
    ("a,label\n1,x\nfoo,y\n", {}, r"column 'a' must hold numbers, but row 3 holds 'foo'"),
    ("a,label\n1,x\n,y\n", {}, r"column 'a' must hold numbers, but row 3 is empty"),
    ("a,label\n1,x\n2\n", {}, r"row 3 has 1 cells, the header 2"),
    ("a,a,label\n1,2,x\n", {}, r"names column 'a' twice"),
    ("", {}, r"is empty"),
    ("a,label\n" + "".join(f"{i},c{i % 4}\n" for i in range(40)) + "1,c9\n", {"ways": 2},
     r"class 'c9' \(column 'label'\) has 1 rows, fewer than shots \+ queries = 6"),
    ("a,label\n" + "".join(f"{i},c{i % 5}\n" for i in range(40)), {"ways": 3, "test_size": 2},
     r"the test split has 2 classes \(column 'label'\), fewer than ways = 3"),
    ("a,label,task\n" + "".join(f"{i},c{i % 4},t{i % 2}\n" for i in range(80)), {"ways": 3, "task_column": "task",
                                                                                 "test_size": 1},
     r"task 't\d' \(column 'task'\) of the \w+ split has 2 classes"),
])
def test_data_problems_name_the_file_and_the_column(tmp_path, content, options, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        metalens.make_task("table", path=str(path), **options)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_read_csv():
    with pytest.raises(DataError, match="does not exist"):
        metalens.make_task("table", path="/nonexistent/t.csv")
    with pytest.raises(DataError, match=re.escape("table /nonexistent/x.csv does not exist")):
        read_csv("/nonexistent/x.csv")
