"""Episode validation: every malformed batch gets a specific error."""

import pytest
import torch

from metalens.episode import Episode, TaskSpec


def reg(T=2, S=5, Q=3, dx=1, dy=1):
    return dict(support_x=torch.zeros(T, S, dx), support_y=torch.zeros(T, S, dy),
                query_x=torch.zeros(T, Q, dx), query_y=torch.zeros(T, Q, dy))


def cls(T=2, N=3, K=1, Q=2):
    sy = torch.arange(N).repeat(K).expand(T, -1).clone()
    qy = torch.arange(N).repeat(Q).expand(T, -1).clone()
    return dict(support_x=torch.zeros(T, N * K, 2), support_y=sy, query_x=torch.zeros(T, N * Q, 2),
                query_y=qy, num_classes=N)


def test_valid_regression_and_classification():
    e = Episode(**reg())
    assert (e.n_tasks, e.n_support, e.n_query, e.is_classification) == (2, 5, 3, False)
    c = Episode(**cls())
    assert c.is_classification and c.num_classes == 3


@pytest.mark.parametrize("change, error, match", [
    (dict(support_x=torch.zeros(2, 0, 1), support_y=torch.zeros(2, 0, 1)), ValueError, "zero shots"),
    (dict(query_x=torch.zeros(2, 0, 1), query_y=torch.zeros(2, 0, 1)), ValueError, "no query points"),
    (dict(query_x=torch.zeros(3, 3, 1)), ValueError, "2 tasks but query_x has 3"),
    (dict(support_y=torch.zeros(2, 4, 1)), ValueError, r"support_y must be \[tasks, points, y_dim\]"),
    (dict(query_x=torch.zeros(2, 3, 2)), ValueError, "differ in shape"),
    (dict(query_y=torch.zeros(2, 3, 2)), ValueError, "differ in y_dim"),
    (dict(support_x=torch.zeros(2, 5, 1, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(support_y=torch.full((2, 5, 1), float("nan"))), ValueError, "non-finite"),
    (dict(query_x=torch.full((2, 3, 1), float("inf"))), ValueError, "non-finite"),
    (dict(support_x=torch.zeros(2, 5)), ValueError, "at least one feature"),
    (dict(support_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"support_mask must have shape"),
    (dict(support_mask=torch.ones(2, 5)), TypeError, "bool"),
    (dict(query_mask=torch.tensor([[True, False, False], [False, False, False]])), ValueError, "task 1 has no real points"),
])
def test_regression_errors(change, error, match):
    with pytest.raises(error, match=match):
        Episode(**{**reg(), **change})


def test_label_out_of_range():
    kw = cls()
    kw["query_y"][1, 0] = 3
    with pytest.raises(ValueError, match=r"label 3, outside \[0, 3\)"):
        Episode(**kw)
    kw = cls()
    kw["support_y"][0, 0] = -1
    with pytest.raises(ValueError, match="label -1"):
        Episode(**kw)


def test_class_missing_from_support():
    kw = cls(K=1)
    kw["support_y"][1] = torch.tensor([0, 0, 2])
    with pytest.raises(ValueError, match="class 1 is missing from the support set of task 1"):
        Episode(**kw)


def test_masked_support_point_does_not_count_as_present():
    kw = cls(K=1)
    kw["support_mask"] = torch.tensor([[True, True, True], [True, False, True]])
    with pytest.raises(ValueError, match="class 1 is missing from the support set of task 1"):
        Episode(**kw)


def test_classification_labels_must_be_int64():
    kw = cls()
    kw["support_y"] = kw["support_y"].float()
    with pytest.raises(TypeError, match="int64"):
        Episode(**kw)


def test_slice_cat_roundtrip():
    g = torch.Generator().manual_seed(0)
    e = Episode(torch.randn(4, 5, 1, generator=g), torch.randn(4, 5, 1, generator=g),
                torch.randn(4, 3, 1, generator=g), torch.randn(4, 3, 1, generator=g),
                query_mask=torch.tensor([[True, True, False]] * 4))
    back = Episode.cat([e[:1], e[1:3], e[3:]])
    for k, v in e.tensors().items():
        w = back.tensors()[k]
        assert (v is None and w is None) or torch.equal(v, w), k
    with pytest.raises(TypeError, match="slice"):
        e[0]


def test_cat_fills_missing_masks():
    a = Episode(**reg())
    b = Episode(**reg(), query_mask=torch.tensor([[True, False, True]] * 2))
    c = Episode.cat([a, b])
    assert c.query_mask.tolist() == [[True] * 3] * 2 + [[True, False, True]] * 2


def test_spec_validation():
    with pytest.raises(ValueError, match="num_classes >= 2"):
        TaskSpec(kind="classification", x_shape=(2,))
    with pytest.raises(ValueError, match="kind must be"):
        TaskSpec(kind="ranking", x_shape=(2,))
    assert TaskSpec(kind="regression", x_shape=(1, 28, 28)).x_dim == 784


def test_global_class_ids_are_checked_sliced_and_kept_only_when_every_part_has_them():
    ids = torch.tensor([[7, 2, 4], [0, 1, 5]])
    e = Episode(**cls(), classes=ids)
    assert torch.equal(e[1:].classes, ids[1:]) and torch.equal(Episode.cat([e[:1], e[1:]]).classes, ids)
    assert Episode.cat([e, Episode(**cls())]).classes is None  # a part without ids: none for the whole
    with pytest.raises(ValueError, match=r"classes must be \[tasks, num_classes\] = \[2, 3\], got \[2, 2\]"):
        Episode(**cls(), classes=ids[:, :2])
    with pytest.raises(TypeError, match="int64"):
        Episode(**cls(), classes=ids.float())
    with pytest.raises(ValueError, match="negative id"):
        Episode(**cls(), classes=-ids)
    with pytest.raises(ValueError, match="only go with a classification episode"):
        Episode(**reg(), classes=ids)
    with pytest.raises(ValueError, match="train_classes"):
        TaskSpec(kind="regression", x_shape=(1,), train_classes=5)


def test_slicing_and_moving_skip_the_checks_and_equal_a_checked_episode(monkeypatch):
    e = Episode(**cls(), support_mask=torch.tensor([[True, True, True]] * 2), classes=torch.tensor([[7, 2, 4], [0, 1, 5]]))
    calls = []
    monkeypatch.setattr(Episode, "__post_init__", lambda self: calls.append(1))
    parts = [e[1:], e[:1].to("cpu"), e.to("cpu")]
    assert calls == []  # built from a validated episode: not validated again
    monkeypatch.undo()
    for part, idx in zip(parts, (slice(1, None), slice(0, 1), slice(None))):
        checked = Episode(**{k: (v[idx] if v is not None else None) for k, v in e.tensors().items()},
                          num_classes=e.num_classes)
        assert part.num_classes == checked.num_classes
        for (k, a), b in zip(part.tensors().items(), checked.tensors().values()):
            assert (a is None and b is None) or torch.equal(a, b), k
    with pytest.raises(ValueError, match="selects no task"):
        e[2:]
    assert e.to(dtype=torch.float64).support_x.dtype == torch.float64  # a dtype change is checked again
