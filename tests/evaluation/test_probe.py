"""Tests of bh_models.evaluation.probe: folds without leakage, solvers against sklearn, metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    roc_auc_score,
)
from sklearn.preprocessing import StandardScaler

from bh_models.core.errors import BHConfigError
from bh_models.evaluation.probe import (
    _logistic_scores,
    _prepare_fold,
    _ridge_scores,
    classification_metrics,
    cross_validated_scores,
    fold_of_subjects,
    make_splits,
    mean_sd,
    metrics_by_repeat,
    probe_parameter_count,
    regression_metrics,
    rows_of_subjects,
    subject_means,
)


def _labels(n_subjects: int = 20) -> np.ndarray:
    return np.array([0, 1] * (n_subjects // 2))


def test_probe_size_matches_the_paper():
    # 768-d hub-token embedding, 2 classes: 768 x 2 + 2.
    assert probe_parameter_count(n_features=768, task_type="classification") == 1538
    assert probe_parameter_count(n_features=768, task_type="regression") == 769
    assert probe_parameter_count(n_features=0, task_type="classification") == 2


@pytest.mark.parametrize("task_type", ["classification", "regression"])
def test_splits_partition_subjects_without_leakage(task_type):
    y = _labels(23) if task_type == "classification" else np.random.default_rng(0).normal(size=23)
    y = np.r_[y, 1] if task_type == "classification" else y  # 23 -> 24 subjects for classes
    splits = make_splits(y=y, task_type=task_type, n_folds=5, n_repeats=3, seed=4)
    assert len(splits) == 15
    for repeat in range(3):
        tests = np.concatenate([s.test for s in splits if s.repeat == repeat])
        np.testing.assert_array_equal(np.sort(tests), np.arange(len(y)))  # each subject once
    for split in splits:
        assert not set(split.train) & set(split.test)
        assert len(split.train) + len(split.test) == len(y)
        validation = np.concatenate([val for _, val in split.inner])
        np.testing.assert_array_equal(np.sort(validation), split.train)  # inner folds tile train
        for fit, val in split.inner:
            assert set(fit) | set(val) == set(split.train) and not set(fit) & set(val)
            assert not set(fit) & set(split.test) and not set(val) & set(split.test)


def test_splits_are_stratified_and_seeded():
    y = np.r_[np.ones(8), np.zeros(17)].astype(int)
    splits = make_splits(y=y, task_type="classification", n_folds=4, n_repeats=2, seed=0)
    for split in splits:
        assert y[split.test].sum() == 2  # 8 positives over 4 folds
    again = make_splits(y=y, task_type="classification", n_folds=4, n_repeats=2, seed=0)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(splits, again))
    assert not np.array_equal(splits[0].test, splits[4].test)  # repeats differ
    # Inner validation folds are whole outer folds (what makes the permutation test exact).
    folds = fold_of_subjects(splits=splits, repeat=0)
    for split in splits[:4]:
        for _, val in split.inner:
            assert len(set(folds[val])) == 1


def test_too_few_subjects_per_class_is_a_config_error():
    with pytest.raises(BHConfigError) as error:
        make_splits(y=np.r_[np.ones(3), np.zeros(10)], task_type="classification", n_folds=5)
    assert error.value.key == "evaluate.n_folds"


def test_rows_of_one_subject_never_straddle_a_split():
    # Three TR-augmented rows per subject, interleaved.
    n_subjects = 20
    row_subject = np.tile(np.arange(n_subjects), 3)
    for split in make_splits(y=_labels(n_subjects), task_type="classification", n_repeats=2):
        train = rows_of_subjects(subjects=split.train, row_subject=row_subject)
        test = rows_of_subjects(subjects=split.test, row_subject=row_subject)
        assert not set(row_subject[train]) & set(row_subject[test])
        assert len(train) + len(test) == len(row_subject)
        assert len(test) == 3 * len(split.test)


def test_test_labels_never_reach_the_fitted_model():
    rng = np.random.default_rng(1)
    y = _labels(20)
    features = rng.normal(size=(20, 30)) + y[:, None] * 0.5
    split = make_splits(y=y, task_type="classification", n_repeats=1, seed=0)[0]
    changed = y.copy()
    changed[split.test] = 1 - changed[split.test]  # flip every held-out label
    runs = [cross_validated_scores(features=features, row_subject=np.arange(20), labels=labels,
                                   splits=[split], task_type="classification")
            for labels in (y, changed)]
    np.testing.assert_array_equal(runs[0].scores, runs[1].scores)
    np.testing.assert_array_equal(runs[0].selected, runs[1].selected)


def test_test_features_do_not_change_the_selected_penalty():
    rng = np.random.default_rng(2)
    y = rng.normal(size=20)
    features = rng.normal(size=(20, 15)) + y[:, None]
    split = make_splits(y=y, task_type="regression", n_repeats=1)[0]
    corrupted = features.copy()
    corrupted[split.test] = 1e3 * rng.normal(size=(len(split.test), 15))
    runs = [cross_validated_scores(features=f, row_subject=np.arange(20), labels=y, splits=[split],
                                   task_type="regression") for f in (features, corrupted)]
    np.testing.assert_array_equal(runs[0].selected, runs[1].selected)


@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0])
def test_logistic_solver_matches_sklearn(c):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 60))
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0.3).astype(int)
    train, test = np.arange(30), np.arange(30, 40)
    design = _prepare_fold(features=x, covariates=None, train_rows=train, test_rows=test)
    ours = _logistic_scores(design, y[train][:, None], np.array([c]), "balanced")[:, 0]
    scaler = StandardScaler().fit(x[train])
    reference = LogisticRegression(C=c, class_weight="balanced", tol=1e-12, max_iter=100_000).fit(
        scaler.transform(x[train]), y[train])
    np.testing.assert_allclose(ours, reference.predict_proba(scaler.transform(x[test]))[:, 1],
                               atol=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 10.0, 1e4])
def test_ridge_solver_matches_sklearn(alpha):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 80))
    y = x[:, 0] + rng.normal(size=30)
    train, test = np.arange(22), np.arange(22, 30)
    design = _prepare_fold(features=x, covariates=None, train_rows=train, test_rows=test)
    ours = _ridge_scores(design, y[train][:, None], np.array([alpha]))[:, 0]
    scaler = StandardScaler().fit(x[train])
    reference = Ridge(alpha=alpha).fit(scaler.transform(x[train]), y[train])
    np.testing.assert_allclose(ours, reference.predict(scaler.transform(x[test])), atol=1e-8)


def test_batched_columns_equal_separate_fits():
    rng = np.random.default_rng(5)
    y = _labels(20)
    features = rng.normal(size=(20, 25)) + y[:, None]
    labels = np.column_stack([y, rng.permutation(y), rng.permutation(y)])
    splits = make_splits(y=y, task_type="classification", n_repeats=1)
    together = cross_validated_scores(features=features, row_subject=np.arange(20), labels=labels,
                                      splits=splits, task_type="classification")
    for column in range(3):
        alone = cross_validated_scores(features=features, row_subject=np.arange(20),
                                       labels=labels[:, column], splits=splits,
                                       task_type="classification")
        np.testing.assert_allclose(together.scores[..., column], alone.scores[..., 0], atol=1e-9)


def test_probe_finds_signal_and_covariates_remove_it():
    rng = np.random.default_rng(6)
    n = 40
    y = _labels(n)
    age = y * 2.0 + rng.normal(size=n)  # the label is confounded with age
    features = rng.normal(size=(n, 5))
    features[:, 0] += 3 * age  # the features only carry age
    splits = make_splits(y=y, task_type="classification", n_repeats=2)
    plain = cross_validated_scores(features=features, row_subject=np.arange(n), labels=y,
                                   splits=splits, task_type="classification")
    adjusted = cross_validated_scores(features=features, row_subject=np.arange(n), labels=y,
                                      splits=splits, task_type="classification",
                                      covariates=age[:, None])
    auroc = {name: metrics_by_repeat(labels=y, scores=r.scores, task_type="classification")["auroc"]
             for name, r in (("plain", plain), ("adjusted", adjusted))}
    assert auroc["plain"].mean() > 0.8
    assert auroc["adjusted"].mean() < 0.7


def test_several_rows_per_subject_give_one_score_per_subject():
    rng = np.random.default_rng(7)
    y = _labels(20)
    base = rng.normal(size=(20, 10)) + y[:, None]
    features = np.vstack([base + 0.1 * rng.normal(size=base.shape) for _ in range(3)])
    row_subject = np.tile(np.arange(20), 3)
    result = cross_validated_scores(features=features, row_subject=row_subject, labels=y,
                                    splits=make_splits(y=y, task_type="classification", n_repeats=2),
                                    task_type="classification")
    assert result.scores.shape == (2, 20, 1)
    assert np.isfinite(result.scores).all()


def test_subject_means_average_rows_in_requested_order():
    values = np.array([[1.0], [3.0], [10.0], [5.0]])
    means = subject_means(values=values, row_subject=np.array([4, 4, 2, 4]), subjects=np.array([4, 2]))
    np.testing.assert_allclose(means[:, 0], [3.0, 10.0])


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, size=(30, 4))
    scores = np.round(rng.uniform(size=(30, 4)), 1)  # rounding creates ties
    ours = classification_metrics(y_true=y, scores=scores)
    for b in range(4):
        predicted = (scores[:, b] > 0.5).astype(int)
        assert ours["accuracy"][b] == pytest.approx(accuracy_score(y[:, b], predicted))
        assert ours["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(y[:, b], predicted))
        assert ours["f1"][b] == pytest.approx(f1_score(y[:, b], predicted))
        assert ours["f1_weighted"][b] == pytest.approx(f1_score(y[:, b], predicted, average="weighted"))
        assert ours["auroc"][b] == pytest.approx(roc_auc_score(y[:, b], scores[:, b]))


def test_regression_metrics_match_scipy_and_sklearn():
    rng = np.random.default_rng(9)
    y = rng.normal(size=25)
    predictions = rng.normal(size=(25, 3)) + y[:, None]
    ours = regression_metrics(y_true=y, predictions=predictions)
    for b in range(3):
        assert ours["pearson_r"][b] == pytest.approx(pearsonr(y, predictions[:, b])[0])
        assert ours["mae"][b] == pytest.approx(mean_absolute_error(y, predictions[:, b]))
    constant = regression_metrics(y_true=y, predictions=np.full(25, 2.0))
    assert np.isnan(constant["pearson_r"][0])


def test_mean_sd_uses_sample_sd():
    assert mean_sd(values=np.array([1.0, 3.0])) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert mean_sd(values=np.array([0.7])) == (0.7, 0.0)
