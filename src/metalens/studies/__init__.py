"""Studies: the experiments of the literature, each one command that writes a report.

A study is a class registered in :data:`STUDIES` with a nested ``Config`` dataclass
(its options, ``study.*`` keys of ``--set``) and a ``run(out, *, progress, echo)``
method that writes ``report.md``, ``report.json`` and figures into ``out`` and
returns the Markdown path. ``metalens study NAME --out DIR`` runs one.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

from metalens.registry import STUDIES

__all__ = ["Study", "STUDIES", "toml_value", "set_arg"]


def toml_value(v: Any) -> str:
    """``v`` as the TOML that ``--set study.KEY=...`` reads (tables inline).

    >>> toml_value({"cnp": 100, "lnp": 65}), toml_value(("rbf", "matern52")), toml_value(False)
    ('{cnp = 100, lnp = 65}', '["rbf", "matern52"]', 'false')
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def set_arg(name: str, value: Any) -> str:
    """``--set 'study.NAME=VALUE'`` as one shell word (VALUE in TOML).

    >>> print(set_arg("kernels", ["rbf"]))
    --set 'study.kernels=["rbf"]'
    """
    arg = f"study.{name}={toml_value(value)}".replace("'", "'\\''")
    return f"--set '{arg}'"


class Study(ABC):
    """Base class of studies (see the module docstring)."""

    Config: ClassVar[type]
    registry_name: ClassVar[str]

    def __init__(self, config: Any, *, device: str = "cpu") -> None:
        self.config = config
        self.device = device  # where runs train (and, where a study says so, are scored)

    def hardware(self) -> str:
        """Where this invocation computed, for the report: ``cuda (NVIDIA H100 ...)`` or ``2 CPU thread(s)``."""
        import torch

        if self.device.startswith("cuda") and torch.cuda.is_available():
            return f"{self.device} ({torch.cuda.get_device_name(torch.device(self.device))})"
        return f"{torch.get_num_threads()} CPU thread(s)"

    def device_flag(self) -> str:
        """The ``--device`` part of the study's command line ('' for the default CPU)."""
        return "" if self.device == "cpu" else f" --device {self.device}"

    def command(self) -> str:
        """The command line that reproduces this study: its non-default options as ``--set``."""
        defaults = type(self.config)()
        sets = [f" {set_arg(f.name, getattr(self.config, f.name))}" for f in fields(self.config)
                if getattr(self.config, f.name) != getattr(defaults, f.name)]
        return f"metalens study {self.registry_name}{self.device_flag()} --out OUT" + "".join(sets)

    @abstractmethod
    def run(self, out: Path, *, progress: bool | None = None, echo: Callable[[str], None] = print) -> Path:
        """Run the study into folder ``out``; returns the path of its ``report.md``."""



import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

for _m in _pkgutil.iter_modules(__path__):  # transitional: the studies not yet moved to metalens.experiments
    _importlib.import_module(f"{__name__}.{_m.name}")
