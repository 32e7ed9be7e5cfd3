"""Prediction targets named in the config, read from a dataset's participants.tsv.

A dataset's config lists its downstream tasks, each naming a participants.tsv
column::

    tasks:
      diagnosis: {column: diagnosis, type: classification, positive: patient}
      score:     {column: score, type: regression, covariates: [age, sex]}

Classification is binary: the ``positive`` value against every other value, or
against the values listed in ``negative`` when given (anything else is then
invalid). A subject whose target is missing or invalid, or who misses a
covariate, is left out of that task only, and counted.

Covariates are removed from the *features* by ordinary least squares fitted on
the training fold only (:func:`fit_covariate_regression`) and then applied
unchanged to the held-out fold (:func:`apply_covariate_regression`). Removing them
from the features rather than from the target keeps the reported metrics in the
target's own units and works the same way for both task types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.core.errors import BHConfigError, BHInputError

__desc__ = (
    "Downstream targets were read from each dataset's participants.tsv; subjects with a "
    "missing or invalid target value, or a missing covariate, were excluded from that task "
    "only, and covariates were regressed out of the features with ordinary least squares "
    "fitted within each training fold."
)

TASK_TYPES = ("classification", "regression")
_TASK_KEYS = frozenset({"column", "type", "positive", "negative", "covariates"})
_SUBJECT_PREFIX = re.compile(r"^sub-")


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task as configured.

    Attributes
    ----------
    name : str
        Task name (the config key), used in result tables and figures.
    column : str
        participants.tsv column holding the target.
    type : str
        ``"classification"`` or ``"regression"``.
    positive : str or None
        Value of ``column`` coded 1 (classification only).
    negative : tuple of str
        Values coded 0; empty means "every value other than ``positive``".
    covariates : tuple of str
        participants.tsv columns regressed out of the features.
    """

    name: str
    column: str
    type: str
    positive: str | None = None
    negative: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskTarget:
    """Target values of one task, for the subjects it keeps.

    Attributes
    ----------
    subjects : numpy.ndarray of str, shape (n_subjects,)
        Subject labels without the ``sub-`` prefix, in participants.tsv order.
    y : numpy.ndarray, shape (n_subjects,)
        int64 0/1 for classification, float64 for regression.
    covariates : numpy.ndarray or None, shape (n_subjects, n_covariate_columns)
        Numeric covariates as they are, categorical ones one-hot coded (first level
        dropped); ``None`` when the task has no covariates.
    covariate_columns : tuple of str
        Names of the columns of ``covariates``.
    excluded : dict of str to list of str
        Excluded subject labels by reason: ``missing_target``, ``invalid_target``,
        ``missing_covariate``.
    """

    subjects: np.ndarray
    y: np.ndarray
    covariates: np.ndarray | None
    covariate_columns: tuple[str, ...]
    excluded: dict[str, list[str]] = field(default_factory=dict)

    def subset(self, *, keep: np.ndarray) -> TaskTarget:
        """The same target restricted to the subjects where ``keep`` is true."""
        return TaskTarget(
            subjects=self.subjects[keep],
            y=self.y[keep],
            covariates=None if self.covariates is None else self.covariates[keep],
            covariate_columns=self.covariate_columns,
            excluded=self.excluded,
        )


def subject_label(value: str) -> str:
    """Subject label without the BIDS ``sub-`` prefix (``"sub-01"`` -> ``"01"``)."""
    return _SUBJECT_PREFIX.sub("", str(value).strip())


def parse_tasks(*, tasks: Mapping[str, Mapping], config_key: str = "tasks") -> list[TaskSpec]:
    """Validate a dataset's ``tasks`` config into :class:`TaskSpec` objects.

    Parameters
    ----------
    tasks : mapping
        Task name -> ``{column, type, positive?, negative?, covariates?}``.
    config_key : str
        Where ``tasks`` lives in config.yaml, for error messages.

    Returns
    -------
    list of TaskSpec
        In config order.
    """
    if not isinstance(tasks, Mapping) or not tasks:
        raise BHConfigError(config_key, "no downstream task is configured",
                            "add e.g. `diagnosis: {column: diagnosis, type: classification, "
                            "positive: patient}`")
    specs = []
    for name, entry in tasks.items():
        key = f"{config_key}.{name}"
        if not isinstance(entry, Mapping):
            raise BHConfigError(key, "a task must be a mapping", "give column and type")
        unknown = sorted(set(entry) - _TASK_KEYS)
        if unknown:
            raise BHConfigError(key, f"unknown key(s) {unknown}",
                                f"use only {sorted(_TASK_KEYS)}")
        if "column" not in entry:
            raise BHConfigError(f"{key}.column", "missing", "name the participants.tsv column")
        task_type = entry.get("type")
        if task_type not in TASK_TYPES:
            raise BHConfigError(f"{key}.type", f"{task_type!r} is not a task type",
                                f"use one of {list(TASK_TYPES)}")
        positive = entry.get("positive")
        negative = entry.get("negative") or ()
        if task_type == "classification" and positive is None:
            raise BHConfigError(f"{key}.positive", "a classification task needs its positive class",
                                "set `positive:` to the participants.tsv value coded 1")
        if task_type == "regression" and (positive is not None or negative):
            raise BHConfigError(f"{key}.positive", "positive/negative only apply to classification",
                                "remove them or set `type: classification`")
        if isinstance(negative, (str, int, float)):
            negative = [negative]
        covariates = entry.get("covariates") or ()
        if isinstance(covariates, str):
            covariates = [covariates]
        if entry["column"] in covariates:
            raise BHConfigError(f"{key}.covariates", "the target column is also a covariate",
                                "remove it from covariates")
        specs.append(TaskSpec(
            name=str(name),
            column=str(entry["column"]),
            type=task_type,
            positive=None if positive is None else str(positive),
            negative=tuple(str(v) for v in negative),
            covariates=tuple(str(c) for c in covariates),
        ))
    return specs


def read_participants(*, path: Path) -> pd.DataFrame:
    """Read participants.tsv as strings, indexed by subject label (no ``sub-``).

    Parameters
    ----------
    path : Path
        BIDS participants.tsv; ``n/a`` and empty cells become missing.

    Returns
    -------
    pandas.DataFrame
        One row per participant, index ``subject``, all cells strings or NA.
    """
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "participants.tsv not found",
                           "add participants.tsv to the dataset root")
    # Strings everywhere: labels like "01" and classes like "1" must not turn into numbers.
    table = pd.read_csv(path, sep="\t", dtype=str)
    if "participant_id" not in table.columns:
        raise BHInputError(path, "no participant_id column", "add the BIDS participant_id column")
    table["subject"] = table["participant_id"].map(subject_label)
    duplicated = table["subject"][table["subject"].duplicated()].tolist()
    if duplicated:
        raise BHInputError(path, f"participants listed twice: {duplicated[:5]}",
                           "keep one row per participant")
    return table.set_index("subject", drop=True)


def build_task_target(*, participants: pd.DataFrame, task: TaskSpec,
                      source: Path | str = "participants.tsv") -> TaskTarget:
    """Code one task's target and covariates; exclude and count unusable subjects.

    Parameters
    ----------
    participants : pandas.DataFrame
        Output of :func:`read_participants`.
    task : TaskSpec
        The task to code.
    source : Path or str
        The participants.tsv path, for error messages.

    Returns
    -------
    TaskTarget
        Kept subjects with coded ``y`` (and covariates), plus the excluded labels.
    """
    for column in (task.column, *task.covariates):
        if column not in participants.columns:
            raise BHInputError(source,
                               f"task '{task.name}' needs column '{column}', which is absent",
                               f"add '{column}' to participants.tsv or fix the task config")
    raw = participants[task.column].str.strip()
    missing = raw.isna()
    if task.type == "classification":
        y = (raw == task.positive).astype(np.int64)
        valid = ~missing
        if task.negative:
            valid &= raw.isin([task.positive, *task.negative])
    else:
        numeric = pd.to_numeric(raw, errors="coerce").astype(float)
        valid = ~missing & np.isfinite(numeric)
        y = numeric
    cov_missing = np.zeros(len(raw), dtype=bool)
    for column in task.covariates:
        cov_missing |= participants[column].isna().to_numpy()
    missing_np, valid_np = missing.to_numpy(), valid.to_numpy()
    keep = valid_np & ~cov_missing
    labels = participants.index.to_numpy().astype(str)
    excluded = {
        "missing_target": labels[missing_np].tolist(),
        "invalid_target": labels[~missing_np & ~valid_np].tolist(),
        "missing_covariate": labels[valid_np & cov_missing].tolist(),
    }
    target = TaskTarget(subjects=labels[keep], y=y.to_numpy()[keep], covariates=None,
                        covariate_columns=(), excluded=excluded)
    if task.type == "classification":
        n_positive = int(target.y.sum())
        if n_positive == 0 or n_positive == len(target.y):
            raise BHInputError(source, f"task '{task.name}' has only one class after exclusions "
                               f"({n_positive} '{task.positive}' of {len(target.y)})",
                               "check `positive:` against the values in the column")
    if task.covariates:
        covariates, names = encode_covariates(table=participants.loc[keep, list(task.covariates)])
        target = TaskTarget(subjects=target.subjects, y=target.y, covariates=covariates,
                            covariate_columns=names, excluded=excluded)
    return target


def encode_covariates(*, table: pd.DataFrame) -> tuple[np.ndarray, tuple[str, ...]]:
    """Numeric covariates as floats; categorical ones one-hot, first level dropped.

    Parameters
    ----------
    table : pandas.DataFrame
        String covariate columns without missing values.

    Returns
    -------
    matrix : numpy.ndarray, shape (n_rows, n_columns)
    names : tuple of str
        ``age`` for numeric, ``sex[M]`` for the indicator of level ``M``.
    """
    blocks, names = [], []
    for column in table.columns:
        values = table[column].str.strip()
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all():
            blocks.append(numeric.to_numpy(dtype=float)[:, None])
            names.append(column)
            continue
        # Sorted levels: the coding does not depend on row order.
        levels = sorted(values.unique())
        for level in levels[1:]:
            blocks.append((values == level).to_numpy(dtype=float)[:, None])
            names.append(f"{column}[{level}]")
    if not blocks:
        return np.zeros((len(table), 0)), ()
    return np.hstack(blocks), tuple(names)


def fit_covariate_regression(*, features: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of the features on the covariates (training fold only).

    Parameters
    ----------
    features : numpy.ndarray, shape (n_train, n_features)
    covariates : numpy.ndarray, shape (n_train, n_covariates)

    Returns
    -------
    numpy.ndarray, shape (1 + n_covariates, n_features)
        Intercept row first.
    """
    design = np.hstack([np.ones((len(covariates), 1)), covariates])  # (n_train, 1 + c)
    coefficients, *_ = np.linalg.lstsq(design, features, rcond=None)
    return coefficients


def apply_covariate_regression(*, features: np.ndarray, covariates: np.ndarray,
                               coefficients: np.ndarray) -> np.ndarray:
    """Features minus the covariates' fitted contribution (fold-fitted coefficients).

    Parameters
    ----------
    features : numpy.ndarray, shape (n_rows, n_features)
    covariates : numpy.ndarray, shape (n_rows, n_covariates)
    coefficients : numpy.ndarray, shape (1 + n_covariates, n_features)
        From :func:`fit_covariate_regression` on the training fold.

    Returns
    -------
    numpy.ndarray, shape (n_rows, n_features)
    """
    design = np.hstack([np.ones((len(covariates), 1)), covariates])  # (n_rows, 1 + c)
    return features - design @ coefficients


def exclusion_counts(*, excluded: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Number of excluded subjects per reason."""
    return {reason: len(labels) for reason, labels in excluded.items()}
