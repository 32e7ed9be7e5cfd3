"""Tests of bh_models.evaluation.permutation: p-values, block permutations, a real finding and its null."""

from __future__ import annotations

import numpy as np
import pytest

from bh_models.evaluation.baselines import chance_cross_validated_scores
from bh_models.evaluation.permutation import permutation_p_value, permutation_test, permuted_labels
from bh_models.evaluation.probe import PRIMARY_METRIC, cross_validated_scores, make_splits

N_SUBJECTS, N_FEATURES = 20, 768


def test_p_value_counts_ties_and_the_observed_value():
    null = np.array([0.5, 0.95, 0.9, 0.6])
    assert permutation_p_value(observed=0.9, null=null) == pytest.approx(3 / 5)
    assert permutation_p_value(observed=0.99, null=null) == pytest.approx(1 / 5)
    # Error metrics: lower is better.
    assert permutation_p_value(observed=0.55, null=null, greater_is_better=False) == pytest.approx(2 / 5)
    # An undefined null value counts against the observed one; no permutations, no p.
    assert permutation_p_value(observed=0.99, null=np.array([np.nan, 0.1])) == pytest.approx(2 / 3)
    assert np.isnan(permutation_p_value(observed=0.9, null=np.array([])))
    assert np.isnan(permutation_p_value(observed=np.nan, null=null))


def test_labels_are_permuted_within_blocks_only():
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    blocks = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    labels = permuted_labels(y=y, blocks=blocks, n_permutations=50, seed=3)
    assert labels.shape == (10, 51)
    np.testing.assert_array_equal(labels[:, 0], y)
    for block in range(3):
        members = blocks == block
        assert (labels[members].sum(axis=0) == y[members].sum()).all()
    assert len({tuple(column) for column in labels.T}) > 10  # real shuffling
    np.testing.assert_array_equal(labels, permuted_labels(y=y, blocks=blocks, n_permutations=50, seed=3))


def _synthetic(task_type: str, *, shuffled: bool, seed: int = 0):
    """~20 subjects whose 768-d features carry the label (or, shuffled, do not).

    Like an embedding, the label moves every feature a little along one direction.
    """
    rng = np.random.default_rng(seed)
    if task_type == "classification":
        y = np.array([0, 1] * (N_SUBJECTS // 2))
        effect = 2.0 * y - 1.0
    else:
        y = rng.normal(size=N_SUBJECTS)
        effect = y
    direction = rng.normal(size=N_FEATURES)
    features = rng.normal(size=(N_SUBJECTS, N_FEATURES)) + 0.3 * effect[:, None] * direction
    if shuffled:
        y = _decorrelated_shuffle(y, rng)
    return features, y


def _decorrelated_shuffle(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shuffle of ``y`` uncorrelated with ``y``, hence with the features' signal.

    A random shuffle of 20 labels keeps, by chance, some correlation with the
    originals (which the features carry), so it could be predictable for real.
    """
    while True:
        shuffled = rng.permutation(y)
        if abs(np.corrcoef(shuffled, y)[0, 1]) < 0.05:
            return shuffled


def _probe_test(task_type: str, *, shuffled: bool):
    features, y = _synthetic(task_type, shuffled=shuffled)
    splits = make_splits(y=y, task_type=task_type, n_folds=5, n_repeats=1, seed=0)

    def score(labels, folds):
        return cross_validated_scores(features=features, row_subject=np.arange(N_SUBJECTS),
                                      labels=labels, splits=folds, task_type=task_type)

    return permutation_test(score=score, y=y, splits=splits, task_type=task_type,
                            metric=PRIMARY_METRIC[task_type], n_permutations=200, seed=1)


@pytest.mark.parametrize("task_type", ["classification", "regression"])
def test_probe_beats_chance_when_labels_depend_on_features(task_type):
    result = _probe_test(task_type, shuffled=False)
    assert result.n_permutations == 200
    assert result.p_value < 0.05
    assert result.observed > result.null_mean + 2 * result.null_sd


@pytest.mark.parametrize("task_type", ["classification", "regression"])
def test_probe_does_not_beat_chance_with_shuffled_labels(task_type):
    result = _probe_test(task_type, shuffled=True)
    assert result.p_value > 0.05


def test_chance_model_is_never_significant():
    _, y = _synthetic("classification", shuffled=False)
    splits = make_splits(y=y, task_type="classification", n_repeats=1)
    result = permutation_test(
        score=lambda labels, folds: chance_cross_validated_scores(
            labels=labels, splits=folds, task_type="classification"),
        y=y, splits=splits, task_type="classification", metric="auroc", n_permutations=50, seed=0)
    assert result.observed == 0.5 and result.p_value == 1.0


@pytest.mark.parametrize("task_type", ["classification", "regression"])
def test_observed_and_permuted_fits_the_first_repeat_once_and_equals_the_two_calls(task_type):
    from bh_models.evaluation.permutation import observed_and_permuted

    rng = np.random.default_rng(11)
    n = 30
    y = np.repeat([0, 1], n // 2) if task_type == "classification" else rng.normal(size=n)
    features = rng.normal(size=(n, 40)) + (y[:, None] if task_type == "classification" else 0.5 * y[:, None])
    splits = make_splits(y=y, task_type=task_type, n_folds=3, n_repeats=3, seed=2)
    fitted = []

    def score(labels, folds):
        fitted.extend((s.repeat, s.fold) for s in folds)
        return cross_validated_scores(features=features, row_subject=np.arange(n), labels=labels, splits=folds,
                                      task_type=task_type)

    metric = PRIMARY_METRIC[task_type]
    observed, test = observed_and_permuted(score=score, y=y, splits=splits, task_type=task_type, metric=metric,
                                           n_permutations=30, seed=5)
    assert sorted(fitted) == sorted((s.repeat, s.fold) for s in splits)  # every split once
    fitted.clear()
    reference = score(y, splits)
    reference_test = permutation_test(score=score, y=y, splits=splits, task_type=task_type, metric=metric,
                                      n_permutations=30, seed=5)
    np.testing.assert_allclose(observed.scores, reference.scores, atol=1e-9)
    np.testing.assert_array_equal(observed.selected, reference.selected)
    assert test.p_value == reference_test.p_value and test.observed == pytest.approx(reference_test.observed)
