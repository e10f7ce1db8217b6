"""metalens: meta-learning through every lens, scored against the Bayes-optimal oracle.

The public API; everything not listed in ``__all__`` may change between releases.
"""

__version__ = "0.1.0"

from metalens.episode import Episode, TaskSpec
from metalens.errors import (CheckpointError, ConfigError, DataError, Interrupted, MetalensError, NumericalError,
                             RunFailed, RunFolderBusy, RunFolderError, TrainingDiverged)
from metalens.evaluate import Evaluation, Metric, evaluate
from metalens.learners.base import Learner
from metalens.registry import LEARNERS, TASKS
from metalens.run import Run, RunConfig, load_run, make_learner, make_task, start_run
from metalens.tasks.base import TaskFamily
from metalens.train import TrainConfig, train
from metalens.model_file import load_model

# the built-in task families, learners and studies register themselves on import
from metalens import tasks as _tasks, learners as _learners, experiments as _experiments  # noqa: E402,F401  isort: skip

__all__ = [
    "Episode", "TaskSpec", "TaskFamily", "Learner", "TASKS", "LEARNERS",
    "make_task", "make_learner", "TrainConfig", "train",
    "evaluate", "Evaluation", "Metric", "RunConfig", "Run", "start_run", "load_run",
    "MetalensError", "ConfigError", "RunFolderError", "RunFolderBusy", "CheckpointError", "DataError", "RunFailed",
    "NumericalError", "TrainingDiverged", "Interrupted",
    "FewShotClassifier", "FewShotRegressor", "load_model",
]


def __getattr__(name: str):  # the scikit-learn estimators import scikit-learn: only when they are asked for
    if name in ("FewShotClassifier", "FewShotRegressor"):
        from metalens import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'metalens' has no attribute {name!r}")
