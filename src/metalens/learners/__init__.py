"""Learners. Importing this package registers the built-in learners."""

from metalens.learners.base import Learner
from metalens.learners import baselines  # noqa: F401  (registration)
from metalens.learners import gradient  # noqa: F401
from metalens.learners import neural_process  # noqa: F401
from metalens.learners import metric  # noqa: F401
from metalens.learners import in_context  # noqa: F401

__all__ = ["Learner"]
from metalens.learners import pac_bayes  # noqa: F401
from metalens.learners import memory  # noqa: F401
