"""Tests of bh_models.evaluation.targets: task config, target coding, exclusions, covariates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.evaluation.targets import (
    TaskSpec,
    apply_covariate_regression,
    build_task_target,
    encode_covariates,
    exclusion_counts,
    fit_covariate_regression,
    parse_tasks,
    read_participants,
    subject_label,
)


@pytest.fixture
def participants_path(tmp_path):
    table = pd.DataFrame({
        "participant_id": ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-06", "sub-07"],
        "diagnosis": ["patient", "control", "n/a", "patient", "other", "control", "patient"],
        "score": ["1.5", "2.0", "3.5", "abc", "inf", "", "0.5"],
        "age": ["30", "40", "50", "n/a", "35", "45", "25"],
        "sex": ["M", "F", "F", "M", "M", "F", "F"],
    })
    path = tmp_path / "participants.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


def test_parse_tasks_reads_both_task_types():
    specs = parse_tasks(tasks={
        "diagnosis": {"column": "dx", "type": "classification", "positive": 1},
        "score": {"column": "score", "type": "regression", "covariates": ["age", "sex"]},
    })
    assert specs[0] == TaskSpec(name="diagnosis", column="dx", type="classification", positive="1")
    assert specs[1].covariates == ("age", "sex") and specs[1].positive is None


@pytest.mark.parametrize("tasks, key", [
    ({}, "tasks"),
    ({"t": {"column": "c", "type": "ordinal"}}, "tasks.t.type"),
    ({"t": {"column": "c", "type": "classification"}}, "tasks.t.positive"),
    ({"t": {"column": "c", "type": "regression", "positive": "x"}}, "tasks.t.positive"),
    ({"t": {"column": "c", "type": "regression", "covarites": ["age"]}}, "tasks.t"),
    ({"t": {"type": "regression"}}, "tasks.t.column"),
    ({"t": {"column": "c", "type": "regression", "covariates": ["c"]}}, "tasks.t.covariates"),
])
def test_parse_tasks_names_the_bad_key(tasks, key):
    with pytest.raises(BHConfigError) as error:
        parse_tasks(tasks=tasks)
    assert error.value.key == key


def test_read_participants_keeps_labels_as_strings(participants_path):
    table = read_participants(path=participants_path)
    assert list(table.index[:2]) == ["01", "02"]
    assert table.loc["03", "diagnosis"] is np.nan or pd.isna(table.loc["03", "diagnosis"])
    assert subject_label("sub-001") == "001" and subject_label("17") == "17"


def test_read_participants_rejects_duplicates_and_missing_file(tmp_path):
    path = tmp_path / "participants.tsv"
    path.write_text("participant_id\tage\nsub-01\t3\nsub-01\t4\n")
    with pytest.raises(BHInputError, match="listed twice"):
        read_participants(path=path)
    with pytest.raises(BHInputError, match="not found"):
        read_participants(path=tmp_path / "absent.tsv")


def test_classification_target_counts_missing_subjects(participants_path):
    table = read_participants(path=participants_path)
    spec = TaskSpec(name="dx", column="diagnosis", type="classification", positive="patient")
    target = build_task_target(participants=table, task=spec)
    # "other" counts as negative when no negative list is given.
    assert list(target.subjects) == ["01", "02", "04", "05", "06", "07"]
    assert list(target.y) == [1, 0, 1, 0, 0, 1]
    assert exclusion_counts(excluded=target.excluded) == {
        "missing_target": 1, "invalid_target": 0, "missing_covariate": 0}


def test_negative_list_makes_other_values_invalid(participants_path):
    table = read_participants(path=participants_path)
    spec = TaskSpec(name="dx", column="diagnosis", type="classification", positive="patient",
                    negative=("control",))
    target = build_task_target(participants=table, task=spec)
    assert target.excluded["invalid_target"] == ["05"]
    assert target.excluded["missing_target"] == ["03"]
    assert "05" not in target.subjects


def test_regression_target_excludes_invalid_and_missing_covariates(participants_path):
    table = read_participants(path=participants_path)
    spec = TaskSpec(name="score", column="score", type="regression", covariates=("age", "sex"))
    target = build_task_target(participants=table, task=spec)
    # "abc" and "inf" are invalid, "" is missing, sub-04's age is missing but its score is invalid.
    assert target.excluded == {"missing_target": ["06"], "invalid_target": ["04", "05"],
                               "missing_covariate": []}
    assert list(target.subjects) == ["01", "02", "03", "07"]
    np.testing.assert_allclose(target.y, [1.5, 2.0, 3.5, 0.5])
    assert target.covariate_columns == ("age", "sex[M]")
    np.testing.assert_allclose(target.covariates, [[30, 1], [40, 0], [50, 0], [25, 0]])


def test_missing_covariate_is_counted(participants_path):
    table = read_participants(path=participants_path)
    spec = TaskSpec(name="dx", column="diagnosis", type="classification", positive="patient",
                    covariates=("age",))
    target = build_task_target(participants=table, task=spec)
    assert target.excluded["missing_covariate"] == ["04"]
    assert target.covariates.shape == (len(target.subjects), 1)


def test_absent_column_and_single_class_are_errors(participants_path):
    table = read_participants(path=participants_path)
    with pytest.raises(BHInputError, match="'iq'"):
        build_task_target(participants=table, task=TaskSpec(name="t", column="iq", type="regression"),
                          source=participants_path)
    with pytest.raises(BHInputError, match="only one class"):
        build_task_target(participants=table, task=TaskSpec(
            name="t", column="diagnosis", type="classification", positive="healthy"))


def test_encode_covariates_is_independent_of_row_order():
    table = pd.DataFrame({"site": ["b", "a", "c", "a"], "age": ["1", "2", "3", "4"]})
    matrix, names = encode_covariates(table=table)
    assert names == ("site[b]", "site[c]", "age")
    reversed_matrix, _ = encode_covariates(table=table.iloc[::-1])
    np.testing.assert_array_equal(reversed_matrix, matrix[::-1])


def test_covariate_regression_uses_training_coefficients_on_test_rows():
    rng = np.random.default_rng(0)
    covariates = rng.normal(size=(40, 2))
    features = covariates @ np.array([[2.0, -1.0, 0.0], [0.5, 3.0, 0.0]]) + 0.01 * rng.normal(size=(40, 3))
    train, test = np.arange(30), np.arange(30, 40)
    coefficients = fit_covariate_regression(features=features[train], covariates=covariates[train])
    assert coefficients.shape == (3, 3)
    residual = apply_covariate_regression(features=features[test], covariates=covariates[test],
                                          coefficients=coefficients)
    # The covariates explained the features; the held-out residual is only the noise.
    assert np.abs(residual).max() < 0.1
    # Training residuals are orthogonal to the covariates (least squares).
    train_residual = apply_covariate_regression(features=features[train], covariates=covariates[train],
                                                coefficients=coefficients)
    np.testing.assert_allclose(covariates[train].T @ train_residual, 0.0, atol=1e-10)
