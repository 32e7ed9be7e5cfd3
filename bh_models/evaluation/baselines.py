"""Feature sets compared on the same folds, and the baselines among them.

* Embedding tables (fused hub tokens, fMRI-only harmonix-F, T1-only harmonix-S):
  TSVs with columns ``dataset, subject, <features...>``; several rows per subject
  (e.g. TR variants) are allowed and are kept together by the probe's folds.
* Functional connectivity: per run, the Pearson correlation between the cleaned
  parcel time series, Fisher z-transformed, upper triangle (400 parcels -> 79,800
  features); runs of a subject are averaged in z. The same linear probe is then fitted.
  A parcel whose series is constant in a run (no usable voxel in the field of view:
  the functional step fills it with 0 and lists it in the run's sidecar) has no
  correlation; its pairs are set to 0, and how many runs, parcels and features that
  touched is counted, logged and reported with the results (:attr:`FeatureTable.notes`).
* Chance: the bias-only probe fitted on the training fold without features (a
  constant 0.5 under balanced class weights, else the training class frequency;
  the training mean for regression).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from bh_models.core.errors import BHInputError
from bh_models.evaluation.probe import ProbeResult, Split
from bh_models.evaluation.targets import subject_label

__desc__ = (
    "Baselines were evaluated on the same folds: a functional-connectivity probe on the "
    "Fisher z-transformed Pearson correlations between the parcel time series of the "
    "{atlas.name} atlas (Schaefer et al. 2018; {atlas.parcels} parcels in the "
    "{atlas.networks}-network order, resampled to {template.name}; upper triangle, averaged "
    "over runs; pairs with a parcel that had no signal in a run were set to 0 and counted), "
    "probes on the fMRI-only and T1-only embeddings, and a feature-free chance model fitted "
    "on the training labels alone (a constant 0.5 under balanced class weights; the training "
    "mean for regression)."
)

log = logging.getLogger("bh_models")

_SUBJECT_IN_NAME = re.compile(r"^sub-([A-Za-z0-9]+)_")
# arctanh(0.999999) ~ 7.25: keeps a perfectly correlated pair (duplicate parcel) finite.
_MAX_ABS_R = 0.999999


@dataclass(frozen=True)
class FeatureTable:
    """Feature rows of one model, labelled by subject.

    Attributes
    ----------
    name : str
        Model name used in the results (``fused``, ``fc``, ...).
    subjects : numpy.ndarray of str, shape (n_rows,)
        Subject label (no ``sub-``) of every row; a label may repeat.
    values : numpy.ndarray, shape (n_rows, n_features)
    source : str
        Where the features came from, for error messages.
    notes : dict
        What the results should report about these features (e.g. the FC pairs set
        to 0 because a parcel was constant); empty when there is nothing to say.
    """

    name: str
    subjects: np.ndarray
    values: np.ndarray
    source: str
    notes: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.values.shape[1])

    def rows_for(self, *, subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feature rows of the given subjects, with each row's subject position.

        Parameters
        ----------
        subjects : numpy.ndarray of str, shape (n_subjects,)
            Every label must have at least one row.

        Returns
        -------
        features : numpy.ndarray, shape (n_rows_kept, n_features)
        row_subject : numpy.ndarray of int, shape (n_rows_kept,)
            Position in ``subjects`` of each row.
        """
        keep, row_subject = match_rows(row_labels=self.subjects, subjects=subjects, name=self.name)
        return self.values[keep], row_subject


def match_rows(*, row_labels: np.ndarray, subjects: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Which rows belong to ``subjects``, and the subject position of each kept row.

    Returns
    -------
    keep : numpy.ndarray of bool, shape (n_rows,)
    row_subject : numpy.ndarray of int, shape (n_rows_kept,)

    Raises
    ------
    ValueError
        When a subject has no row (named after ``name``).
    """
    position = {label: i for i, label in enumerate(subjects)}
    keep = np.array([label in position for label in row_labels], dtype=bool)
    row_subject = np.array([position[label] for label in row_labels[keep]], dtype=np.int64)
    absent = set(range(len(subjects))) - set(row_subject.tolist())
    if absent:
        missing = sorted(subjects[sorted(absent)])[:5]
        raise ValueError(f"{name}: no rows for subjects {missing}")
    return keep, row_subject


def read_embedding_table(*, path: Path, name: str, dataset: str | None = None) -> FeatureTable:
    """Read an embeddings TSV (``dataset, subject, features...``).

    Parameters
    ----------
    path : Path
    name : str
        Model name for the results.
    dataset : str or None
        Keep only rows of this dataset (tables may hold several).

    Returns
    -------
    FeatureTable
    """
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "embeddings table not found", "run the embedding extraction step")
    table = pd.read_csv(path, sep="\t", dtype={"dataset": str, "subject": str})
    for column in ("dataset", "subject"):
        if column not in table.columns:
            raise BHInputError(path, f"no '{column}' column",
                               "write columns dataset, subject, features")
    if dataset is not None:
        table = table[table["dataset"] == dataset]
        if table.empty:
            raise BHInputError(path, f"no rows for dataset '{dataset}'",
                               "extract embeddings for this dataset first")
    features = table.drop(columns=["dataset", "subject"])
    if features.shape[1] == 0:
        raise BHInputError(path, "no feature columns", "write the embedding columns after subject")
    values = features.to_numpy(dtype=float)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise BHInputError(path, f"non-finite features for subjects "
                           f"{sorted(set(table['subject'][bad]))[:5]}",
                           "re-extract the embeddings of these subjects")
    subjects = table["subject"].map(subject_label).to_numpy().astype(str)
    return FeatureTable(name=name, subjects=subjects, values=values, source=str(path))


def subject_from_filename(*, path: Path) -> str:
    """Subject label from a BIDS file name ``sub-<label>_...`` (label without ``sub-``)."""
    match = _SUBJECT_IN_NAME.match(Path(path).name)
    if not match:
        raise BHInputError(path, "file name does not start with sub-<label>_",
                           "name time series files the BIDS way")
    return match.group(1)


def constant_parcels(*, timeseries: np.ndarray) -> np.ndarray:
    """Columns of a (n_timepoints, n_parcels) series that do not vary (bool, shape (n_parcels,))."""
    x = np.asarray(timeseries, float)
    return np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=0)) <= 0


def connectivity_features(*, timeseries: np.ndarray) -> np.ndarray:
    """Fisher z of the Pearson correlation between parcels, upper triangle.

    Parameters
    ----------
    timeseries : numpy.ndarray, shape (n_timepoints, n_parcels)

    Returns
    -------
    numpy.ndarray, shape (n_parcels * (n_parcels - 1) / 2,)
        Row-major upper triangle without the diagonal. A constant (empty) parcel
        has no correlation: its pairs are 0 (:func:`constant_parcels` finds them, and
        :func:`fc_feature_table` counts and reports them).
    """
    x = np.asarray(timeseries, float)
    x = x - x.mean(axis=0)
    norm = np.sqrt((x**2).sum(axis=0))
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)  # unit-norm columns
    r = x.T @ x  # (n_parcels, n_parcels)
    upper = np.triu_indices(r.shape[0], k=1)
    return np.arctanh(np.clip(r[upper], -_MAX_ABS_R, _MAX_ABS_R))


def fc_feature_table(*, timeseries: Sequence[Path], subjects: Iterable[str] | None = None,
                     name: str = "fc") -> FeatureTable:
    """Functional-connectivity features of every subject, runs averaged in Fisher z.

    Parameters
    ----------
    timeseries : sequence of Path
        Parcel time-series TSVs (T rows x parcels, headed by ROI names), file names
        starting with ``sub-<label>_``.
    subjects : iterable of str or None
        Only read the files of these subjects (labels without ``sub-``).
    name : str
        Model name for the results.

    Returns
    -------
    FeatureTable
        One row per subject, subjects sorted.
    """
    wanted = None if subjects is None else set(subjects)
    by_subject: dict[str, list[Path]] = {}
    for path in sorted(map(Path, timeseries)):
        label = subject_from_filename(path=path)
        if wanted is None or label in wanted:
            by_subject.setdefault(label, []).append(path)
    header: list[str] | None = None
    first: Path | None = None
    labels, rows = [], []
    constant: dict[str, set[str]] = {}  # subject -> parcels constant in one of its runs
    runs_with_constant, zero_pairs = 0, 0
    for label in tqdm(sorted(by_subject), desc="functional connectivity", disable=None):
        total = None
        for path in by_subject[label]:
            table = pd.read_csv(path, sep="\t")
            if header is None:
                header, first = list(table.columns), path
            elif list(table.columns) != header:
                raise BHInputError(path, f"parcel columns differ from those of {first.name}",
                                   "extract every run with the same atlas")
            if len(table) < 3 or not np.isfinite(table.to_numpy(float)).all():
                raise BHInputError(path, "fewer than 3 time points or non-finite values",
                                   "re-run the time-series extraction for this run")
            values = table.to_numpy(float)
            flat = constant_parcels(timeseries=values)
            if flat.any():
                k, n = int(flat.sum()), flat.size
                runs_with_constant += 1
                zero_pairs += k * (n - k) + k * (k - 1) // 2
                constant.setdefault(label, set()).update(np.asarray(header)[flat].tolist())
            z = connectivity_features(timeseries=values)
            total = z if total is None else total + z
        labels.append(label)
        rows.append((total / len(by_subject[label])).astype(np.float32))
    if not rows:
        raise BHInputError("timeseries", "no time-series file for the requested subjects",
                           "run the functional preprocessing first")
    n_runs = sum(len(v) for v in by_subject.values())
    n_features = rows[0].size
    notes = {
        "runs": n_runs,
        "runs_with_constant_parcels": runs_with_constant,
        "subjects_with_constant_parcels": len(constant),
        "constant_parcels": {subject: sorted(parcels) for subject, parcels in sorted(constant.items())},
        "pairs_set_to_zero": zero_pairs,
        "fraction_of_features_set_to_zero": zero_pairs / float(n_runs * n_features),
    }
    if runs_with_constant:
        log.warning("FC baseline: %d of %d runs (%d subjects) have parcels without signal; %d correlations "
                    "(%.3g %% of the run-level features) were set to 0 and are reported with the results",
                    runs_with_constant, n_runs, len(constant), zero_pairs, 100 * notes["fraction_of_features_set_to_zero"])
    return FeatureTable(name=name, subjects=np.array(labels), values=np.vstack(rows),
                        source=f"{len(by_subject)} subjects' parcel time series", notes=notes)


def chance_cross_validated_scores(*, labels: np.ndarray, splits: Sequence[Split], task_type: str,
                                  class_weight: str | None = "balanced") -> ProbeResult:
    """Out-of-fold scores of the feature-free (bias-only) probe fitted on each training fold.

    Under the probe's own loss: with balanced class weights the bias-only logistic
    model predicts 0.5 for everyone (AUROC and balanced accuracy 0.5; nobody is
    called positive); without class weights it predicts the training fold's
    positive-class frequency (the majority class). Regression: the training mean.

    Parameters
    ----------
    labels : numpy.ndarray, shape (n_subjects,) or (n_subjects, B)
    splits : sequence of Split
    task_type : str
    class_weight : {"balanced", None}
        As given to the logistic probe.

    Returns
    -------
    ProbeResult
        ``selected`` is NaN (nothing to tune).
    """
    labels = np.asarray(labels, float)
    labels = labels[:, None] if labels.ndim == 1 else labels  # (n_subjects, B)
    n_repeats = max(s.repeat for s in splits) + 1
    scores = np.full((n_repeats, labels.shape[0], labels.shape[1]), np.nan)
    for split in splits:
        if task_type == "classification" and class_weight == "balanced":
            scores[split.repeat, split.test] = 0.5
        else:
            scores[split.repeat, split.test] = labels[split.train].mean(axis=0)
    return ProbeResult(scores=scores, selected=np.full((len(splits), labels.shape[1]), np.nan))
