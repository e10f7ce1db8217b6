"""Task families. Importing this package registers the built-in families."""

from metalens.tasks.base import EVAL_CHUNK, Split, TaskFamily
from metalens.tasks import sinusoid, gp, linear, clusters  # noqa: F401  (registration)
from metalens.tasks import images, omniglot  # noqa: F401
from metalens.tasks import random_mlp, projected  # noqa: F401

__all__ = ["TaskFamily", "Split", "EVAL_CHUNK"]
from metalens.tasks import table, synthetic_tables  # noqa: F401,E402  (registration)
from metalens.tasks import mini_imagenet, tiered_imagenet, cifar, cub  # noqa: F401,E402  (registration)
