"""Tests of bh_models.evaluation.baselines: embedding tables, FC features, the chance model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bh_models.evaluation.baselines import (
    chance_cross_validated_scores,
    connectivity_features,
    fc_feature_table,
    read_embedding_table,
    subject_from_filename,
)
from bh_models.core.errors import BHInputError
from bh_models.evaluation.probe import make_splits, metrics_by_repeat


def _write_timeseries(path, values, names=None):
    names = names or [f"7Networks_LH_Vis_{i}" for i in range(values.shape[1])]
    pd.DataFrame(values, columns=names).to_csv(path, sep="\t", index=False)


def test_connectivity_features_are_fisher_z_of_the_upper_triangle():
    rng = np.random.default_rng(0)
    series = rng.normal(size=(50, 6))
    features = connectivity_features(timeseries=series)
    assert features.shape == (15,)
    expected = np.arctanh(np.corrcoef(series.T)[np.triu_indices(6, k=1)])
    np.testing.assert_allclose(features, expected, atol=1e-12)


def test_empty_parcel_has_zero_connectivity_and_duplicates_stay_finite():
    rng = np.random.default_rng(1)
    series = rng.normal(size=(30, 4))
    series[:, 1] = 0.0  # an empty parcel
    series[:, 3] = series[:, 2]  # a duplicated parcel (r = 1)
    features = connectivity_features(timeseries=series)
    pairs = list(zip(*np.triu_indices(4, k=1)))
    for (i, j), value in zip(pairs, features):
        if 1 in (i, j):
            assert value == 0.0
    assert np.isfinite(features).all() and features[pairs.index((2, 3))] > 7


def test_fc_table_averages_runs_in_fisher_z(tmp_path):
    rng = np.random.default_rng(2)
    runs = [rng.normal(size=(40, 5)) for _ in range(3)]
    _write_timeseries(tmp_path / "sub-01_task-rest_run-1_timeseries.tsv", runs[0])
    _write_timeseries(tmp_path / "sub-01_task-rest_run-2_timeseries.tsv", runs[1])
    _write_timeseries(tmp_path / "sub-02_task-rest_timeseries.tsv", runs[2])
    paths = sorted(tmp_path.glob("*.tsv"))
    table = fc_feature_table(timeseries=paths)
    assert list(table.subjects) == ["01", "02"] and table.n_features == 10
    expected = (connectivity_features(timeseries=runs[0]) + connectivity_features(timeseries=runs[1])) / 2
    np.testing.assert_allclose(table.values[0], expected, rtol=1e-5)
    only = fc_feature_table(timeseries=paths, subjects=["02"])
    assert list(only.subjects) == ["02"]


def test_fc_table_rejects_mismatched_parcels_and_bad_names(tmp_path):
    rng = np.random.default_rng(3)
    _write_timeseries(tmp_path / "sub-01_bold_timeseries.tsv", rng.normal(size=(20, 3)))
    _write_timeseries(tmp_path / "sub-02_bold_timeseries.tsv", rng.normal(size=(20, 3)), ["a", "b", "c"])
    with pytest.raises(BHInputError, match="parcel columns differ"):
        fc_feature_table(timeseries=sorted(tmp_path.glob("*.tsv")))
    with pytest.raises(BHInputError, match="sub-<label>_"):
        subject_from_filename(path=tmp_path / "timeseries.tsv")
    assert subject_from_filename(path=tmp_path / "sub-ABC12_task-rest_timeseries.tsv") == "ABC12"


def test_embedding_table_filters_dataset_and_groups_rows(tmp_path):
    path = tmp_path / "embeddings.tsv"
    pd.DataFrame({
        "dataset": ["a", "a", "a", "b"],
        "subject": ["sub-01", "sub-01", "02", "01"],
        "hub_000": [1.0, 3.0, 5.0, 7.0],
        "hub_001": [0.0, 0.0, 1.0, 1.0],
    }).to_csv(path, sep="\t", index=False)
    table = read_embedding_table(path=path, name="fused", dataset="a")
    assert list(table.subjects) == ["01", "01", "02"] and table.n_features == 2
    features, row_subject = table.rows_for(subjects=np.array(["02", "01"]))
    np.testing.assert_array_equal(row_subject, [1, 1, 0])
    np.testing.assert_array_equal(features[:, 0], [1.0, 3.0, 5.0])
    with pytest.raises(ValueError, match="no rows"):
        table.rows_for(subjects=np.array(["01", "03"]))
    with pytest.raises(BHInputError, match="no rows for dataset"):
        read_embedding_table(path=path, name="fused", dataset="c")


def test_embedding_table_rejects_non_finite_features(tmp_path):
    path = tmp_path / "embeddings.tsv"
    path.write_text("dataset\tsubject\thub_000\na\t01\tnan\n")
    with pytest.raises(BHInputError, match="non-finite"):
        read_embedding_table(path=path, name="fused")


def test_chance_model_is_the_bias_only_probe():
    y = np.array([0, 1] * 10)
    splits = make_splits(y=y, task_type="classification", n_repeats=2)
    balanced = chance_cross_validated_scores(labels=y, splits=splits, task_type="classification")
    assert (balanced.scores == 0.5).all()
    metrics = metrics_by_repeat(labels=y, scores=balanced.scores, task_type="classification")
    assert (metrics["auroc"] == 0.5).all() and (metrics["balanced_accuracy"] == 0.5).all()
    prior = chance_cross_validated_scores(labels=y, splits=splits, task_type="classification",
                                          class_weight=None)
    np.testing.assert_allclose(prior.scores, 0.5)  # stratified folds keep the prior at 0.5
    values = np.arange(20, dtype=float)
    regression = chance_cross_validated_scores(
        labels=values, splits=make_splits(y=values, task_type="regression", n_repeats=1),
        task_type="regression")
    for split in make_splits(y=values, task_type="regression", n_repeats=1):
        np.testing.assert_allclose(regression.scores[0, split.test, 0], values[split.train].mean())


def test_constant_parcels_are_counted_and_reported(tmp_path, caplog):
    """A parcel without signal in a run gives no correlation: its pairs are 0, counted and logged."""
    import logging

    import pandas as pd

    from bh_models.evaluation.baselines import constant_parcels, fc_feature_table

    rng = np.random.default_rng(0)
    names = [f"p{i}" for i in range(6)]
    paths = []
    for subject, flat in (("01", []), ("02", [2]), ("03", [0, 5])):
        series = rng.normal(size=(30, 6))
        series[:, flat] = 0.0
        path = tmp_path / f"sub-{subject}_task-rest_timeseries.tsv"
        pd.DataFrame(series, columns=names).to_csv(path, sep="\t", index=False)
        paths.append(path)
    assert constant_parcels(timeseries=np.c_[np.ones(5), np.arange(5)]).tolist() == [True, False]
    with caplog.at_level(logging.WARNING, logger="bh_models"):
        table = fc_feature_table(timeseries=paths)
    notes = table.notes
    assert notes["runs"] == 3 and notes["runs_with_constant_parcels"] == 2
    assert notes["constant_parcels"] == {"02": ["p2"], "03": ["p0", "p5"]}
    assert notes["pairs_set_to_zero"] == 5 + (2 * 4 + 1)  # 1 of 6 parcels: 5 pairs; 2 of 6: 8 + 1
    assert notes["fraction_of_features_set_to_zero"] == pytest.approx(14 / (3 * 15))
    assert "set to 0" in caplog.text
    row = table.values[list(table.subjects).index("03")]
    assert np.count_nonzero(row == 0) == 9
