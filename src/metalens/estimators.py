"""scikit-learn estimators around a meta-trained learner: ``fit`` reads a support set, ``predict`` the queries.

:class:`FewShotClassifier` and :class:`FewShotRegressor` take a run folder, a model file
(``metalens export``), a :class:`~metalens.model_file.Model` or a :class:`~metalens.Learner`, and
evaluation-time options of the learner (``eval_inner_steps=5``, ``finetune_steps=20``, ...). They
are ordinary scikit-learn estimators: ``get_params`` / ``set_params`` (so ``sklearn.base.clone``,
pipelines, ``cross_val_score`` and grid searches work), ``score`` (accuracy, R²), labels of any
discrete type (strings, integers, booleans; ``classes_``).

``fit(X, y)`` is the support set: ``X`` in the learner's input layout (``[n, 1, 28, 28]`` images,
``[n, d]`` table rows; see :func:`metalens.use.prepare`), ``y`` its labels or targets. Nothing is
trained: the learner reads the support set when it predicts, as it did in meta-training (metric,
Bayesian and in-context learners read it; gradient learners adapt their parameters to it, the same
steps on the same support set, so the same adapted parameters, at each ``predict``). Inputs are
prepared exactly as :mod:`metalens.use` prepares them (padding, standardisation), and the number of
classes is handled as it says (a learner whose parameters do not depend on it accepts any number;
a ``synthetic_tables`` learner up to its ``max_classes``; otherwise exactly the trained number).

**scikit-learn's estimator checks.** ``tests/test_estimators.py`` runs
``sklearn.utils.estimator_checks.check_estimator`` on both. Every learner has a fixed input width
and some a fixed number of classes, while most checks feed small tables of their own (1 to 10
columns, 2 or 3 classes). So:

- a classifier whose model pads features (trained on ``synthetic_tables``) and takes any number of
  classes passes every check (the test uses ``protonet`` with ``backbone = "identity"``);
- for other models, the checks that cannot apply are :data:`CLASSIFIER_CHECKS_NOT_APPLICABLE` and
  :data:`REGRESSOR_CHECKS_NOT_APPLICABLE` (check name -> why): the :data:`WIDTH_CHECKS`, which feed
  widths other than the learner's; ``check_classifiers_train`` / ``check_regressors_train``, which
  also need a given accuracy (or R²) on scikit-learn's toy problems, whatever the meta-training
  gave; and ``check_estimators_overwrite_params`` with ``model`` given as an object holding
  tensors (``joblib.hash`` of a deep-copied tensor differs from the original's: give a path). The
  test runs the regressor's checks at widths 1, 2, 3, 4, 5 and 10: each check passes at some width.

**Pickling.** Fitted or not, the estimators can be pickled (``pickle``, ``joblib``: what
``cross_val_score(n_jobs=2)`` does), like every scikit-learn estimator: the learner, an
``nn.Module``, is pickled with them. Unpickle only files you trust. metalens' own files (run folders,
checkpoints, model files) never use pickle: ship a model as a model file (``metalens export``).

>>> import numpy as np, metalens
>>> from metalens.model_file import Model
>>> family = metalens.make_task("synthetic_tables", max_features=4, max_classes=5)
>>> clf = FewShotClassifier(Model.of(metalens.make_learner("protonet", family, backbone="identity"), family))
>>> X = np.array([[0.0, 0.1], [0.2, 0.0], [5.0, 5.1], [4.8, 5.0]]); y = ["cat", "cat", "dog", "dog"]
>>> clf.fit(X, y).predict([[4.9, 4.7], [0.1, 0.3]]).tolist(), clf.classes_.tolist()
(['dog', 'cat'], ['cat', 'dog'])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d

from metalens.learners.base import Learner
from metalens.model_file import Model, load_model
from metalens.use import classifier_for, classify, prepare, regress

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est: Any, *args: Any, **kwargs: Any) -> Any:
        return est._validate_data(*args, **kwargs)

__all__ = ["FewShotClassifier", "FewShotRegressor", "CLASSIFIER_CHECKS_NOT_APPLICABLE",
           "REGRESSOR_CHECKS_NOT_APPLICABLE", "WIDTH_CHECKS"]

# scikit-learn's estimator checks that cannot apply to every model, and why (see the module docstring)
_WIDTH = ("it feeds tables of widths (1 to 10 columns) other than the learner's input width; it applies to models "
          "whose family pads features (synthetic_tables), and to the others at the width it uses")
WIDTH_CHECKS: tuple[str, ...] = (
    "check_dict_unchanged", "check_dont_overwrite_parameters", "check_dtype_object", "check_estimators_dtypes",
    "check_estimators_fit_returns_self", "check_estimators_nan_inf", "check_estimators_overwrite_params",
    "check_estimators_pickle", "check_f_contiguous_array_estimator", "check_fit2d_1feature", "check_fit2d_1sample",
    "check_fit2d_predict1d", "check_fit_check_is_fitted", "check_fit_idempotent", "check_fit_score_takes_y",
    "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_n_features_in",
    "check_n_features_in_after_fitting", "check_pipeline_consistency", "check_positive_only_tag_during_fit",
    "check_readonly_memmap_input", "check_supervised_y_2d")
CLASSIFIER_CHECKS_NOT_APPLICABLE: dict[str, str] = {
    **{name: _WIDTH for name in WIDTH_CHECKS},
    "check_classifier_data_not_an_array": _WIDTH,
    "check_classifiers_classes": _WIDTH + "; with a learner whose parameters depend on the number of classes, also "
                                          "its 2- and 3-class problems (the learner takes its trained number only)",
    "check_classifiers_one_label": _WIDTH,
    "check_classifiers_train": "it needs >= 83% accuracy on a few hundred points of scikit-learn's toy problems: a "
                               "meta-trained learner's accuracy there is whatever its meta-training gives (protonet "
                               "with backbone=identity reaches it; an untrained transformer does not)",
}
CLASSIFIER_CHECKS_NOT_APPLICABLE["check_estimators_overwrite_params"] = (
    _WIDTH + "; with `model` given as a Model or Learner object holding tensors, also: it compares joblib.hash of "
             "the parameters with that of their deep copy, which differs for any torch tensor (give a path instead)")
REGRESSOR_CHECKS_NOT_APPLICABLE: dict[str, str] = {
    **{name: _WIDTH for name in WIDTH_CHECKS},
    "check_regressor_data_not_an_array": _WIDTH,
    "check_regressors_int": _WIDTH,
    "check_regressors_no_decision_function": _WIDTH,
    "check_regressors_train": _WIDTH + "; it also needs R^2 > 0.5 on a 10-feature problem (the linear family's "
                                       "oracle reaches it at width 10)",
}


def _require_y(est: Any, y: Any) -> None:
    if y is None:
        raise ValueError(f"{type(est).__name__} requires y to be passed, but the target y is None: fit reads a "
                         "labelled support set")


class _FewShot(BaseEstimator):
    """What both estimators share: the model, evaluation-time options, reading inputs."""

    _required_parameters = ["model"]
    _KIND = ""

    def __init__(self, model: Any = None, *, query_batch: int | None = None, **eval_options: Any) -> None:
        self.model = model
        self.query_batch = query_batch
        self._eval_options = dict(eval_options)

    # -- parameters: the two named ones and the learner's evaluation-time options --------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"model": self.model, "query_batch": self.query_batch, **self._eval_options}

    def set_params(self, **params: Any) -> _FewShot:
        for key, value in params.items():
            if key in ("model", "query_batch"):
                setattr(self, key, value)
            else:
                self._eval_options[key] = value
        return self

    def __sklearn_clone__(self) -> _FewShot:
        from sklearn.base import clone

        params = {k: clone(v, safe=False) for k, v in self.get_params(deep=False).items()}
        return type(self)(**params)

    # -- helpers ------------------------------------------------------------------------------------------
    def _load(self) -> Model:
        m = self.model
        if isinstance(m, Model):  # a copy: the rebuilt learners it caches stay off the parameter
            model = dataclasses.replace(m, _by_classes={}).with_options(self._eval_options)
        elif isinstance(m, Learner):
            model = Model.of(m).with_options(self._eval_options)
        elif isinstance(m, (str, os.PathLike)):
            model = load_model(m, **self._eval_options)
        else:
            raise ValueError(f"model must be a run folder, a model file, a metalens Model or a Learner, got "
                             f"{type(m).__name__}")
        want = "classification" if self._KIND == "classifier" else "regression"
        if model.spec.kind != want:
            other = "FewShotRegressor" if want == "classification" else "FewShotClassifier"
            raise ValueError(f"{model.name} is a {model.spec.kind} learner: use {other}")
        if self.query_batch is not None and (not isinstance(self.query_batch, int) or self.query_batch < 1):
            raise ValueError(f"query_batch must be None or an integer >= 1, got {self.query_batch!r}")
        return model

    def _inputs(self, model: Model, X: Any, y: Any = None, *, reset: bool) -> Any:
        """Validate ``X`` (and ``y``) as scikit-learn does; tables as 2-D arrays, images as [n, ...]."""
        if model.inputs.image is None and len(model.inputs.x_shape) == 1:
            if y is None:
                return _validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
            return _validate_data(self, X, y, reset=reset, dtype=[np.float64, np.float32],
                                  multi_output=self._KIND == "regressor", y_numeric=self._KIND == "regressor")
        X = check_array(X, allow_nd=True, ensure_2d=False, dtype=[np.float64, np.float32])
        if X.ndim < 2:
            raise ValueError(f"X must be [n, ...] with n examples, got an array of shape {list(X.shape)}")
        if reset:
            self.n_features_in_ = int(np.prod(X.shape[1:]))
        return X if y is None else (X, y)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


class FewShotClassifier(ClassifierMixin, _FewShot):
    """A meta-trained classifier as a scikit-learn estimator: ``fit`` on the labelled support set, ``predict``
    and ``predict_proba`` the queries (see the module docstring).

    Parameters: ``model`` (a run folder, a model file, a :class:`~metalens.model_file.Model` or a Learner),
    ``query_batch`` (queries predicted together; None: all, see :mod:`metalens.use`) and the learner's
    evaluation-time options as keywords. Attributes after ``fit``: ``classes_`` (the labels, sorted),
    ``model_`` (the loaded model), ``n_features_in_``.

    scikit-learn's ``check_estimator`` passes in full for a model whose family pads features
    (``synthetic_tables``) and a learner that takes any number of classes; the checks that cannot apply
    to other models are :data:`CLASSIFIER_CHECKS_NOT_APPLICABLE` (see the module docstring).
    """

    _KIND = "classifier"

    def fit(self, X: Any, y: Any) -> FewShotClassifier:
        """Read the support set: inputs ``X [n, ...]`` and labels ``y [n]`` (any hashable values)."""
        _require_y(self, y)
        model = self._load()
        X, y = self._inputs(model, X, y, reset=True)
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} examples but y has {len(y)} labels")
        classes, y_idx = np.unique(y, return_inverse=True)
        x = prepare(model, torch.from_numpy(np.ascontiguousarray(X)), what="X")
        if len(classes) < 2:
            raise ValueError(f"the support set has {len(classes)} class; a few-shot classifier needs at least 2 "
                             "classes")
        classifier_for(model, len(classes))  # refuses a number of classes the learner cannot take, now
        self.classes_ = classes
        self.model_ = model
        self.support_x_ = x
        self.support_y_ = torch.from_numpy(y_idx.astype(np.int64).reshape(-1))
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``[n, n_classes]``, columns in the order of ``classes_``."""
        check_is_fitted(self, "classes_")
        X = self._inputs(self.model_, X, reset=False)
        q = prepare(self.model_, torch.from_numpy(np.ascontiguousarray(X)), what="X")
        return classify(self.model_, self.support_x_, self.support_y_, len(self.classes_), q,
                        query_batch=self.query_batch).numpy()

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``log`` of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable label of each row of ``X``."""
        probs = self.predict_proba(X)
        return self.classes_[np.argmax(probs, axis=1)]


class FewShotRegressor(RegressorMixin, _FewShot):
    """A meta-trained regressor as a scikit-learn estimator: ``fit`` on the support set, ``predict`` the
    predictive mean of the queries, and with ``return_std=True`` its standard deviation (probabilistic
    learners: Neural Processes, the oracle, ``loss = nll`` transformers; an MSE-trained learner predicts a
    mean only, and ``return_std`` is refused).

    Parameters as :class:`FewShotClassifier`. ``y`` is ``[n]`` (predictions ``[n]``) or ``[n, y_dim]``.
    Every regression learner has a fixed input width, so the scikit-learn checks that feed tables of other
    widths cannot apply to it: :data:`REGRESSOR_CHECKS_NOT_APPLICABLE` (see the module docstring).
    """

    _KIND = "regressor"

    def fit(self, X: Any, y: Any) -> FewShotRegressor:
        """Read the support set: inputs ``X [n, ...]`` and targets ``y [n]`` or ``[n, y_dim]``."""
        _require_y(self, y)
        model = self._load()
        X, y = self._inputs(model, X, y, reset=True)
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 2 and y.shape[1] == 1 and model.spec.y_dim == 1:
            y = column_or_1d(y, warn=True)  # one target: [n, 1] is read as [n], with scikit-learn's warning
        if y.ndim > 2 or len(y) != len(X):
            raise ValueError(f"y must be [n] or [n, y_dim] with n = {len(X)}, got shape {list(y.shape)}")
        if not np.isfinite(y).all():
            raise ValueError("y holds non-finite values (nan or inf)")
        self.model_ = model
        self.support_x_ = prepare(model, torch.from_numpy(np.ascontiguousarray(X)), what="X")
        self.support_y_ = torch.from_numpy(y.reshape(len(y), -1)).float()
        if self.support_y_.shape[1] != model.spec.y_dim:
            raise ValueError(f"y has {self.support_y_.shape[1]} target(s) per example; {model.name} predicts "
                             f"{model.spec.y_dim}")
        self.y_1d_ = y.ndim == 1
        return self

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """Predictive means ``[n]`` (or ``[n, y_dim]``); with ``return_std``, also their standard deviations."""
        check_is_fitted(self, "support_y_")
        X = self._inputs(self.model_, X, reset=False)
        q = prepare(self.model_, torch.from_numpy(np.ascontiguousarray(X)), what="X")
        mean, std = regress(self.model_, self.support_x_, self.support_y_, q, query_batch=self.query_batch)
        out = mean.numpy()[:, 0] if self.y_1d_ else mean.numpy()
        if not return_std:
            return out
        if std is None:
            raise ValueError(f"{self.model_.name} is MSE-trained: it predicts a mean only, no standard deviation")
        return out, (std.numpy()[:, 0] if self.y_1d_ else std.numpy())
