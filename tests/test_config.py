"""Typed configs from dicts, TOML files and --set overrides."""

from dataclasses import dataclass
from typing import Literal

import pytest

from metalens.config import ConfigError, from_dict, load_file, opt, parse_set, to_dict


@dataclass(frozen=True)
class C:
    shots: int = opt(5, "support points")
    noise_std: float = opt(0.0, "noise")
    hidden: tuple[int, ...] = opt((40, 40), "widths")
    kind: Literal["a", "b"] = opt("a", "a or b")
    flag: bool = opt(False, "a flag")
    span: tuple[float, float] | None = opt(None, "optional range")

    def __post_init__(self):
        if self.shots < 1:
            raise ValueError(f"shots must be >= 1, got {self.shots}")


def test_coercion_and_roundtrip():
    c = from_dict(C, {"shots": 7, "noise_std": 1, "hidden": [10], "span": [0, 2]})
    assert c == C(shots=7, noise_std=1.0, hidden=(10,), span=(0.0, 2.0))
    assert isinstance(c.noise_std, float)
    assert from_dict(C, to_dict(c)) == c


@pytest.mark.parametrize("data, match", [
    ({"shot": 1}, "unknown option 'shot' for C; valid options: flag, hidden, kind, noise_std, shots, span"),
    ({"shots": "five"}, "option 'shots' expects an integer"),
    ({"shots": 1.5}, "option 'shots' expects an integer"),
    ({"shots": True}, "option 'shots' expects an integer"),
    ({"noise_std": "x"}, "expects a number"),
    ({"kind": "c"}, "must be one of 'a', 'b'"),
    ({"flag": 1}, "expects true or false"),
    ({"hidden": 3}, "expects a list"),
    ({"span": [1, 2, 3]}, "expects 2 values"),
    ({"shots": 0}, "shots must be >= 1, got 0"),
])
def test_errors(data, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        from_dict(C, data)


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
