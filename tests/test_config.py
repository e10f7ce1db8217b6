"""Typed configs from dicts, TOML files and --set overrides."""

from dataclasses import dataclass
from typing import Literal

import re

import pytest

from metalens.config import ConfigError, Options, field_docs, from_dict, load_file, opt, parse_set, to_dict


@dataclass(frozen=True)
class C(Options):
    shots: int = opt(5, "support points", ge=1)
    noise_std: float = opt(0.0, "noise", ge=0)
    hidden: tuple[int, ...] = opt((40, 40), "widths", ge=1, min_len=1)
    kind: Literal["a", "b"] = opt("a", "a or b")
    flag: bool = opt(False, "a flag")
    span: tuple[float, float] | None = opt(None, "optional range", increasing=True)
    steps: int | dict[str, int] = opt(3, "one count or a table", ge=1)
    lr: float = opt(1e-3, "a rate", gt=0)

    def check(self):
        if self.flag and self.kind == "b":
            raise ValueError("flag needs kind 'a'")


def test_coercion_and_roundtrip():
    c = from_dict(C, {"shots": 7, "noise_std": 1, "hidden": [10], "span": [0, 2], "steps": {"x": 2.0}})
    assert c == C(shots=7, noise_std=1.0, hidden=(10,), span=(0.0, 2.0), steps={"x": 2})
    assert isinstance(c.noise_std, float) and isinstance(c.steps["x"], int)
    assert from_dict(C, to_dict(c)) == c
    # the constructor enforces the same rules as from_dict
    assert C(hidden=[3]).hidden == (3,)
    with pytest.raises(ConfigError, match="shots must be >= 1, got 0"):
        C(shots=0)


@pytest.mark.parametrize("data, match", [
    ({"shot": 1}, "unknown option 'task.shot' for task 'c'; valid options: flag, hidden, kind, lr, noise_std, shots, "
                  "span, steps"),
    ({"shots": "five"}, "task.shots must be an integer, got 'five'"),
    ({"shots": 1.5}, "task.shots must be an integer, got 1.5"),
    ({"shots": True}, "task.shots must be an integer, got True"),
    ({"noise_std": "x"}, "task.noise_std must be a number, got 'x'"),
    ({"noise_std": float("nan")}, "task.noise_std must be finite, got nan"),
    ({"lr": float("inf")}, "task.lr must be finite, got inf"),
    ({"lr": 0}, "task.lr must be > 0, got 0.0"),
    ({"kind": "c"}, "task.kind must be one of 'a', 'b', got 'c'"),
    ({"flag": 1}, "task.flag must be true or false, got 1"),
    ({"hidden": 3}, "task.hidden must be a list of integers, got 3"),
    ({"hidden": []}, "task.hidden must hold at least 1 value(s), got ()"),
    ({"hidden": [4, 0]}, "task.hidden values must be >= 1, got (4, 0)"),
    ({"span": [1, 2, 3]}, "task.span must be a list of 2 numbers (or null), got [1, 2, 3]"),
    ({"span": [2, 1]}, "task.span must be increasing (low < high), got (2.0, 1.0)"),
    ({"steps": {"x": 0}}, "task.steps values must be >= 1, got {'x': 0}"),
    ({"steps": "x"}, "task.steps must be an integer or a table {name = integer, ...}, got 'x'"),
    ({"flag": True, "kind": "b"}, "task.flag needs kind 'a'"),  # a rule's message naming an option
])
def test_errors(data, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        from_dict(C, data, prefix="task.", where="task 'c'")


def test_requirement_shown():
    docs = field_docs(C)
    assert docs["shots"] == (5, "support points", "an integer >= 1")
    assert docs["hidden"][2] == "a list of integers, each >= 1, at least 1 long"
    assert docs["span"][2] == "a list of 2 numbers (or null), increasing"
    assert docs["kind"][2] == "one of 'a', 'b'"
    assert docs["lr"][2] == "a number > 0"


def test_parse_set():
    assert parse_set("task.shots=5") == ("task", "shots", 5)
    assert parse_set("learner.hidden=[40, 40]") == ("learner", "hidden", [40, 40])
    assert parse_set("train.optimizer=sgd") == ("train", "optimizer", "sgd")
    assert parse_set("task.kernel='rbf'") == ("task", "kernel", "rbf")
    assert parse_set("train.lr=1e-3") == ("train", "lr", 1e-3)
    for bad, match in [("task.shots", "section.key=value"), ("shots=5", "section one of"),
                       ("model.x=1", "section must be one of")]:
        with pytest.raises(ConfigError, match=match):
            parse_set(bad)


def test_load_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('task = "sinusoid"\n[learner]\nname = "pretrain"\nhidden = [20]\n[train]\nsteps = 3\n')
    assert load_file(p) == {"task": {"name": "sinusoid"}, "learner": {"name": "pretrain", "hidden": [20]},
                            "train": {"steps": 3}, "study": {}}
    p.write_text("[task\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(p)
    p.write_text("steps = 3\n")
    with pytest.raises(ConfigError, match="unexpected top-level key 'steps'"):
        load_file(p)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_file(tmp_path)
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_file(p)
    p.write_bytes("\ufeff[train]\nsteps = 3\n".encode("utf-8"))  # a byte-order mark is fine
    assert load_file(p)["train"] == {"steps": 3}
