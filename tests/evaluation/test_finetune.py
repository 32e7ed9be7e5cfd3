"""The evaluation stage's side of fine-tuning: folds out, the job's scores back in, stale files refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bh_models.core.errors import BHInputError
from bh_models.core.finetuneformat import read_folds, read_predictions, write_folds, write_predictions
from bh_models.evaluation.finetune import finetuned_scores, folds_table, split_label
from bh_models.evaluation.probe import make_splits


def task(n: int = 12, n_repeats: int = 2):
    y = np.array([i % 2 for i in range(n)])
    subjects = np.array([f"{i:02d}" for i in range(n)])
    return subjects, y, make_splits(y=y, task_type="classification", n_folds=3, n_repeats=n_repeats, seed=4)


def test_split_label():
    assert split_label("01", dataset="abide") == ("abide", "01")
    assert split_label("siteA/01", dataset=None) == ("siteA", "01")
    with pytest.raises(ValueError):
        split_label("01", dataset=None)


def test_folds_round_trip_and_hold_every_subject_out_once_per_repeat(tmp_path):
    subjects, y, splits = task()
    table = folds_table(task="dx", task_type="classification", subjects=subjects, y=y, splits=splits,
                        dataset="abide")
    write_folds(table, tmp_path / "folds.tsv")
    back = read_folds(tmp_path / "folds.tsv")
    assert len(back) == 2 * len(subjects)
    assert back.groupby("repeat")["subject"].apply(lambda s: sorted(s)).tolist() == [sorted(subjects)] * 2
    for split in splits:  # each split's test subjects are exactly the fold's
        held = back[(back["repeat"] == split.repeat) & (back["fold"] == split.fold)]
        assert sorted(held["subject"]) == sorted(subjects[split.test])
    assert set(back["label"]) == {0.0, 1.0} and set(back["dataset"]) == {"abide"}


def scores_for(table: pd.DataFrame) -> pd.DataFrame:
    out = table[["task", "repeat", "fold", "dataset", "subject"]].copy()
    out["score"] = table["label"] * 0.5 + 0.25 + 0.01 * table["repeat"]
    return out


def test_scores_come_back_in_the_evaluation_order(tmp_path):
    subjects, y, splits = task()
    table = folds_table(task="dx", task_type="classification", subjects=subjects, y=y, splits=splits,
                        dataset="abide")
    write_predictions(scores_for(table).sample(frac=1, random_state=0), tmp_path / "p.tsv")
    scores = finetuned_scores(predictions=read_predictions(tmp_path / "p.tsv"), task="dx", subjects=subjects,
                              splits=splits, dataset="abide", source=tmp_path / "p.tsv")
    assert scores.shape == (2, len(subjects))
    assert np.allclose(scores, y[None, :] * 0.5 + 0.25 + 0.01 * np.arange(2)[:, None])


def test_pooled_labels_are_matched_by_dataset_and_subject():
    subjects = np.array([f"{d}/{i:02d}" for d in ("siteA", "siteB") for i in range(6)])
    y = np.array([i % 2 for i in range(12)])
    splits = make_splits(y=y, task_type="classification", n_folds=3, n_repeats=1, seed=0)
    table = folds_table(task="dx", task_type="classification", subjects=subjects, y=y, splits=splits, dataset=None)
    assert set(table["dataset"]) == {"siteA", "siteB"} and set(table["subject"]) == {f"{i:02d}" for i in range(6)}
    scores = finetuned_scores(predictions=scores_for(table), task="dx", subjects=subjects, splits=splits,
                              dataset=None, source="p.tsv")
    assert np.allclose(scores[0], y * 0.5 + 0.25)


def test_scores_made_on_other_folds_or_missing_are_refused():
    subjects, y, splits = task()
    table = folds_table(task="dx", task_type="classification", subjects=subjects, y=y, splits=splits,
                        dataset="abide")
    stale = scores_for(table)
    stale.loc[stale.index[0], "fold"] = (stale.loc[stale.index[0], "fold"] + 1) % 3
    with pytest.raises(BHInputError, match="not a fold of this evaluation.*finetune_folds"):
        finetuned_scores(predictions=stale, task="dx", subjects=subjects, splits=splits, dataset="abide",
                         source="p.tsv")
    with pytest.raises(BHInputError, match="no fine-tuned score"):
        finetuned_scores(predictions=scores_for(table).iloc[1:], task="dx", subjects=subjects, splits=splits,
                         dataset="abide", source="p.tsv")
