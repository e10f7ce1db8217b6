"""FewShotClassifier and FewShotRegressor: scikit-learn estimators (shapes, probabilities, clone, pickling,
cross_val_score, the estimator checks that apply) around meta-trained learners."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_iris
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import check_estimator

import metalens
from metalens import FewShotClassifier, FewShotRegressor
from metalens.estimators import CLASSIFIER_CHECKS_NOT_APPLICABLE, REGRESSOR_CHECKS_NOT_APPLICABLE
from metalens.model_file import Model
from metalens.run import RunConfig, start_run

torch.set_num_threads(1)


def nearest_mean_model(max_classes: int = 10) -> Model:
    """protonet with the identity embedding on synthetic_tables: nearest class mean on standardised features,
    any width (padded to 32), any number of classes."""
    family = metalens.make_task("synthetic_tables", max_features=32, max_classes=max_classes)
    return Model.of(metalens.make_learner("protonet", family, backbone="identity"), family)


def failed_checks(estimator) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None)
    assert len(results) > 40  # the checks did run
    return {r["check_name"] for r in results if r["status"] == "failed"}


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("est") / "tr"
    cfg = RunConfig.resolve("synthetic_tables", "transformer", {"max_features": 8, "max_classes": 5, "min_classes": 2},
                            {"dim": 16, "layers": 1, "heads": 2}, {"steps": 3, "batch_tasks": 4})
    start_run(cfg, out).train(progress=False)
    return out


def test_fit_predict_shapes_probabilities_and_labels_of_any_type():
    X, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"], dtype=object)[y]
    support = np.r_[0:5, 50:55, 100:105]
    clf = FewShotClassifier(nearest_mean_model()).fit(X[support], names[support])
    assert clf.classes_.tolist() == ["setosa", "versicolor", "virginica"] and clf.n_features_in_ == 4
    proba = clf.predict_proba(X)
    assert proba.shape == (150, 3) and np.allclose(proba.sum(1), 1.0) and (proba >= 0).all()
    pred = clf.predict(X)
    assert pred.shape == (150,) and set(pred) <= set(clf.classes_)
    assert clf.score(X, names) > 0.8  # nearest class mean on iris from 5 examples per class
    assert np.array_equal(pred, clf.classes_[proba.argmax(1)])
    clf2 = FewShotClassifier(nearest_mean_model()).fit(X[[0, 1, 50, 51]], [10, 10, -3, -3])
    assert clf2.predict(X[[2, 52]]).tolist() == [10, -3] and clf2.classes_.tolist() == [-3, 10]
    clf3 = FewShotClassifier(nearest_mean_model()).fit(X[[0, 1, 50, 51]], [True, True, False, False])
    assert clf3.predict(X[[2, 52]]).tolist() == [True, False]


def test_clone_get_set_params_and_cross_val_score(transformer_run):
    clf = FewShotClassifier(str(transformer_run), query_batch=7, min_scale=0.05)
    params = clf.get_params()
    assert params == {"model": str(transformer_run), "query_batch": 7, "min_scale": 0.05}
    twin = clone(clf)
    assert twin.get_params() == params and twin is not clf and not hasattr(twin, "classes_")
    twin.set_params(query_batch=None, min_scale=0.2)
    assert twin.get_params()["min_scale"] == 0.2 and clf.get_params()["min_scale"] == 0.05
    X, y = load_iris(return_X_y=True)
    rows = np.r_[0:10, 50:60, 100:110]
    scores = cross_val_score(FewShotClassifier(nearest_mean_model()), X[rows], y[rows], cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.8
    fitted = twin.fit(X[rows], y[rows])
    assert fitted.model_.learner.config.min_scale == 0.2 and fitted.predict(X[:4]).shape == (4,)
    with pytest.raises(metalens.ConfigError, match="the options dim change the shapes"):
        FewShotClassifier(str(transformer_run), dim=32).fit(X[rows], y[rows])


def test_pickling_round_trip(transformer_run, tmp_path):
    X, y = load_iris(return_X_y=True)
    rows = np.r_[0:3, 50:53, 100:103]
    clf = FewShotClassifier(str(transformer_run)).fit(X[rows], y[rows])
    back = pickle.loads(pickle.dumps(clf))
    assert np.array_equal(back.predict_proba(X), clf.predict_proba(X))


def test_classes_beyond_what_the_learner_takes_are_refused(transformer_run):
    X = np.random.default_rng(0).normal(size=(12, 3))
    with pytest.raises(ValueError, match="the support set has 6 classes, more than the 5"):
        FewShotClassifier(str(transformer_run)).fit(X, np.arange(12) % 6)
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        FewShotClassifier(str(transformer_run)).fit(X, np.zeros(12))
    with pytest.raises(ValueError, match="is a classification learner: use FewShotClassifier"):
        FewShotRegressor(str(transformer_run)).fit(X, np.zeros(12))


def test_images_in_their_layout():
    spec = metalens.TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=3)
    model = Model.of(metalens.make_learner("protonet", spec, channels=4))
    X = torch.rand(6, 1, 28, 28).numpy()
    clf = FewShotClassifier(model).fit(X, ["a", "b", "c"] * 2)
    assert clf.predict_proba(X).shape == (6, 3) and clf.predict(X[:, 0]).shape == (6,)  # [n, 28, 28] too
    with pytest.raises(ValueError, match=r"3 channel\(s\) instead of 1"):
        clf.predict(np.zeros((2, 3, 28, 28)))
    with pytest.raises(ValueError, match=r"32x32 pixels instead of 28x28"):
        clf.predict(np.zeros((2, 1, 32, 32)))


def test_regressor_mean_std_and_score():
    family = metalens.make_task("sinusoid")
    reg = FewShotRegressor(Model.of(metalens.make_learner("oracle", family), family))
    x = np.linspace(-4, 4, 15)[:, None]
    y = 3 * np.sin(x[:, 0] - 1.0)
    reg.fit(x, y)
    mean, std = reg.predict(x, return_std=True)
    assert mean.shape == std.shape == (15,) and (std > 0).all()
    assert reg.score(x, y) > 0.99
    mse = FewShotRegressor(Model.of(metalens.make_learner("pretrain", family), family)).fit(x, y)
    assert mse.predict(x).shape == (15,)
    with pytest.raises(ValueError, match="MSE-trained: it predicts a mean only"):
        mse.predict(x, return_std=True)


def test_sklearn_checks_all_pass_for_a_padding_model_that_takes_any_number_of_classes():
    assert failed_checks(FewShotClassifier(nearest_mean_model())) == set()


def test_sklearn_checks_that_fail_for_a_fixed_width_classifier_are_the_documented_ones():
    family = metalens.make_task("clusters")  # 2 features, 5-way
    failed = failed_checks(FewShotClassifier(Model.of(metalens.make_learner("transformer", family, dim=16,
                                                                            layers=1, heads=2), family)))
    assert failed and failed <= set(CLASSIFIER_CHECKS_NOT_APPLICABLE), failed - set(CLASSIFIER_CHECKS_NOT_APPLICABLE)


def test_sklearn_checks_of_the_regressor_fail_only_at_widths_other_than_the_learners():
    failed = {}
    for width in (1, 2, 3, 4, 5, 10):
        family = metalens.make_task("linear", dim=width)
        failed[width] = failed_checks(FewShotRegressor(Model.of(metalens.make_learner("oracle", family), family)))
        assert failed[width] <= set(REGRESSOR_CHECKS_NOT_APPLICABLE), (width, failed[width])
    assert not set.intersection(*failed.values())  # each check passes at some width
