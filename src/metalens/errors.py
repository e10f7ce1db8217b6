"""The exceptions metalens raises for what a user can fix, and the exit code each one maps to.

Every failure a user can meet is one of these; the command line prints its message as
one line on stderr and exits with its ``exit_code``: 2 for bad input (arguments, config
files, run folders, data), 1 for a run that fails while running (divergence, a full disk,
a dead peer process), ``128 + signal`` after a signal. The Python API raises the same
classes, so a caller can tell a bad option from a corrupted run folder without parsing
messages. Messages say what was wrong and what to do, and quote at most a short excerpt of
any file (:func:`excerpt`).

>>> try:
...     raise ConfigError("task.shots must be >= 1, got 0")
... except MetalensError as e:
...     (type(e).__name__, e.exit_code, str(e))
('ConfigError', 2, 'task.shots must be >= 1, got 0')
"""

from __future__ import annotations

import signal

__all__ = ["MetalensError", "ConfigError", "RunFolderError", "CheckpointError", "RunFolderBusy", "DataError",
           "RunFailed", "NumericalError", "TrainingDiverged", "Interrupted", "excerpt", "reason"]


class MetalensError(Exception):
    """Base of every error metalens reports to a user; ``exit_code`` is the command line's exit status."""

    exit_code: int = 1


class ConfigError(MetalensError, ValueError):
    """An option, a name or a config file is invalid. The message says how to fix it."""

    exit_code = 2


class RunFolderError(MetalensError, ValueError):
    """A run folder cannot be used as asked: it holds another run, no run, or damaged files."""

    exit_code = 2


class CheckpointError(RunFolderError):
    """A checkpoint is missing, incomplete, damaged, or does not fit the run's learner."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock (one writer per run folder)."""


class DataError(MetalensError, ValueError):
    """Input data (an image, an archive, a data folder) cannot be read or does not fit the options."""

    exit_code = 2


class RunFailed(MetalensError, RuntimeError):
    """A run failed while running, for a reason outside the user's options: a full or read-only disk,
    a process that died. The last complete checkpoint is intact."""

    exit_code = 1


class NumericalError(RunFailed, FloatingPointError):
    """A computation produced non-finite numbers: a diverged inner loop, non-finite weights or predictions."""


class TrainingDiverged(NumericalError):
    """The meta-loss or the meta-gradient became non-finite; training stopped at the last good checkpoint."""


class Interrupted(MetalensError):
    """A run stopped on a signal (SIGINT, SIGTERM, SIGHUP); ``exit_code`` is ``128 + signal``."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def excerpt(data: bytes | str, limit: int = 40) -> str:
    r"""A short, printable quote of file content for an error message.

    >>> print(excerpt(b"root:x:0:0:root:/root:/bin/bash\n" * 10))
    'root:x:0:0:root:/root:/bin/bash\nroot:x:0'...
    >>> print(excerpt(b"\xff\xfe"))
    '\\xff\\xfe'
    """
    if isinstance(data, bytes):
        data = data[: limit * 4].decode("utf-8", errors="backslashreplace")
    short = data[:limit]
    return repr(short) + ("..." if len(data) > limit else "")


def reason(e: BaseException) -> str:
    """An exception's message on one short line (its type's name when it has none).

    >>> reason(OSError("no space\tleft  on device"))
    'no space left on device'
    """
    return " ".join(str(e).split())[:120] or type(e).__name__
