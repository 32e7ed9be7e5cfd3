"""The evaluation stage's side of fine-tuning: the folds it hands out, and the scores it reads back.

Fine-tuning itself is a models-stage job (:mod:`bh_models.models.finetune`, rule
``finetune``, on a GPU when the job has one): the evaluation stage never builds or
trains a network. For every task it writes the probes' own folds (which subjects
each outer fold holds out, per repeat, and their labels:
:func:`folds_table`, rule ``finetune_folds``), and reads the job's out-of-fold
scores back into the ``fused_finetuned`` row (:func:`finetuned_scores`), after
checking that they were made on exactly these folds. The file formats are in
:mod:`bh_models.core.finetuneformat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.core.errors import BHInputError
from bh_models.evaluation.probe import Split

def split_label(label: str, *, dataset: str | None) -> tuple[str, str]:
    """``(dataset, subject)`` of an evaluation label: ``01`` of ``dataset``, or a pooled ``siteA/01``."""
    owner, _, subject = str(label).rpartition("/")
    if owner:
        return owner, subject
    if dataset is None:
        raise ValueError(f"subject label {label!r} names no dataset")
    return dataset, subject


def folds_table(*, task: str, task_type: str, subjects: np.ndarray, y: np.ndarray, splits: Sequence[Split],
                dataset: str | None) -> pd.DataFrame:
    """One line per repeat and subject: the outer fold that holds the subject out, and its label.

    Parameters
    ----------
    task, task_type : str
    subjects : numpy.ndarray of str
        The task's subject labels (``01``, or ``siteA/01`` in the pooled evaluation).
    y : numpy.ndarray
        Their labels, in the same order.
    splits : sequence of Split
        The probes' folds (:func:`bh_models.evaluation.probe.make_splits`).
    dataset : str or None
        Dataset of plain labels (None for pooled labels).

    Returns
    -------
    pandas.DataFrame
        Columns of :data:`bh_models.core.finetuneformat.FOLDS_COLUMNS`.
    """
    owners = [split_label(s, dataset=dataset) for s in subjects]
    rows = []
    for split in splits:
        for position in split.test:
            owner, subject = owners[position]
            rows.append({"task": task, "task_type": task_type, "repeat": split.repeat, "fold": split.fold,
                         "dataset": owner, "subject": subject, "label": float(y[position])})
    return pd.DataFrame(rows).sort_values(["repeat", "fold", "dataset", "subject"], kind="stable")


def finetuned_scores(*, predictions: pd.DataFrame, task: str, subjects: np.ndarray, splits: Sequence[Split],
                     dataset: str | None, source: Path | str) -> np.ndarray:
    """The fine-tuning job's held-out scores of one task, as ``(n_repeats, n_subjects)``.

    Every subject must be scored once per repeat, by the model of the fold that held
    it out in ``splits``; anything else means the job ran on other folds (a stale
    file), and is refused.
    """
    n_repeats = max(split.repeat for split in splits) + 1
    fold_of = np.full((n_repeats, len(subjects)), -1)
    for split in splits:
        fold_of[split.repeat, split.test] = split.fold
    position = {split_label(s, dataset=dataset): i for i, s in enumerate(subjects)}
    table = predictions[predictions["task"] == task]
    scores = np.full((n_repeats, len(subjects)), np.nan)
    for row in table.itertuples(index=False):
        i = position.get((row.dataset, row.subject))
        if i is None or row.repeat >= n_repeats or fold_of[row.repeat, i] != row.fold:
            raise BHInputError(source, f"task {task}: {row.dataset}/sub-{row.subject} repeat {row.repeat} fold "
                               f"{row.fold} is not a fold of this evaluation",
                               "rerun the finetune_folds and finetune rules (the folds changed)")
        scores[row.repeat, i] = row.score
    if np.isnan(scores).any():
        repeat, i = np.argwhere(np.isnan(scores))[0]
        raise BHInputError(source, f"task {task}: no fine-tuned score for {subjects[i]} in repeat {repeat}",
                           "rerun the finetune_folds and finetune rules")
    return scores
