"""Subject-level train/val/test splits.

The unit of splitting is the subject (dataset, subject label): every variant,
run, session and modality of a subject lands in the same split, so no
information about a test subject leaks into training.

Each dataset is split on its own, with a generator keyed by (seed, dataset,
stratum). Adding a dataset therefore never moves a subject of another dataset,
which keeps the packed store incremental. Inside a dataset the subjects are
grouped by stratum (the binned target, when configured), shuffled, and dealt to
the splits in proportion (a largest-deficit sequence), so every stratum and the
dataset as a whole get their share to within one subject.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import sidecar_path, write_json
from bh_models.core.storeformat import parse_entities, read_samples_table
from bh_models.store.augment import derived_rng

__desc__ = (
    "Subjects were assigned to {splits} splits ({fractions}) at the subject level, "
    "separately for each dataset{stratify}, with a fixed random seed, so that all "
    "runs, downsampled variants and modalities of a subject share one split."
)

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SPLIT_COLUMNS = ("dataset", "subject", "split", "stratum", "n_fmri_samples", "n_t1")
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9]*$")


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate split fractions: simple lower-case names, non-negative, sum 1."""
    out = {str(k): float(v) for k, v in dict(fractions).items()}
    if not out or any(not _SPLIT_NAME.match(k) for k in out) or any(v < 0 for v in out.values()) \
            or abs(sum(out.values()) - 1.0) > 1e-6:
        raise BHConfigError("splits.fractions", f"{fractions!r} is not a set of named fractions summing to 1",
                            "use e.g. {train: 0.8, val: 0.1, test: 0.1}")
    return out


def stratum_labels(*, values: pd.Series, name: str, n_bins: int = 4) -> pd.Series:
    """Stratum label of each subject from a target column.

    A numeric column with more than ``n_bins`` distinct values is cut into
    ``n_bins`` rank quantiles (``age:q0`` ... ``age:q3``); any other column is
    used as is (``sex:F``). Missing values form their own stratum (``age:n/a``).
    """
    raw = values.astype("string").str.strip()
    missing = raw.isna() | raw.isin(["", "n/a", "NA", "nan"])
    numeric = pd.to_numeric(raw.where(~missing), errors="coerce")
    labels = pd.Series(f"{name}:n/a", index=values.index, dtype=object)
    if numeric[~missing].notna().all() and numeric[~missing].nunique() > n_bins:
        ranks = numeric[~missing].rank(method="first").to_numpy() - 1
        bins = np.floor(ranks * n_bins / len(ranks)).astype(int)
        labels[~missing] = [f"{name}:q{b}" for b in bins]
    else:
        labels[~missing] = [f"{name}:{v}" for v in raw[~missing]]
    return labels


def deal_subjects(*, n_subjects: int, fractions: Mapping[str, float]) -> list[str]:
    """Split names for an ordered list of subjects, in proportion to ``fractions``.

    Subject i goes to the split furthest below its share ``fraction * (i + 1)``
    (ties to the earlier split), so any prefix of the list - and so any stratum
    of a list grouped by stratum - is split to within one subject of the target.
    """
    names, shares = list(fractions), np.array(list(fractions.values()))
    counts = np.zeros(len(names))
    out = []
    for i in range(n_subjects):
        pick = int(np.argmax(shares * (i + 1) - counts))
        counts[pick] += 1
        out.append(names[pick])
    return out


def assign_splits(
    *,
    subjects: pd.DataFrame,
    dataset: str,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int,
) -> pd.Series:
    """Assign one split per subject of one dataset.

    Parameters
    ----------
    subjects : DataFrame
        Columns ``subject`` (unique) and ``stratum``.
    dataset : str
        Dataset name (keys the generator).
    fractions : mapping
        Split name -> fraction.
    seed : int
        Seed.

    Returns
    -------
    Series
        Split name per row of ``subjects`` (same index).
    """
    fractions = check_fractions(fractions)
    order: list = []
    for stratum in sorted(subjects["stratum"].unique()):
        members = subjects.index[subjects["stratum"] == stratum]
        # Sort first so the shuffle does not depend on the input row order.
        members = members[np.argsort(subjects.loc[members, "subject"].to_numpy(), kind="stable")]
        order.extend(members[derived_rng(seed, dataset, stratum).permutation(len(members))])
    return pd.Series(deal_subjects(n_subjects=len(order), fractions=fractions), index=order).loc[subjects.index]


def make_splits(
    *,
    dataset: str,
    out_splits: Path,
    samples: Path | None = None,
    t1_tensors: Sequence[Path] = (),
    participants: Path | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    stratify: str | None = None,
    n_bins: int = 4,
    seed: int,
    threads: int = 1,
) -> dict:
    """Step function: subject-level splits of one dataset.

    Parameters
    ----------
    dataset : str
        Dataset name.
    out_splits : Path
        Output TSV (columns :data:`SPLIT_COLUMNS`, one row per subject) with a JSON sidecar.
    samples : Path, optional
        fMRI samples table of the dataset (from :func:`bh_models.store.augment.make_samples`).
    t1_tensors : list of Path
        T1 encoder tensors of the dataset (``sub-<label>`` in the file name).
    participants : Path, optional
        The dataset's ``participants.tsv`` (``participant_id`` + target); needed with ``stratify``.
    fractions : dict
        Split name -> fraction (config ``splits.fractions``).
    stratify : str, optional
        participants.tsv column to stratify by (config ``datasets.<name>.stratify``).
    n_bins : int
        Quantile bins of a numeric target (config ``splits.n_bins``).
    seed : int
        Seed.
    threads : int
        Unused.

    Returns
    -------
    dict
        Number of subjects per split.
    """
    del threads
    fractions = check_fractions(fractions)
    fmri = read_samples_table(Path(samples)) if samples is not None else pd.DataFrame(columns=["subject"])
    if len(fmri) and set(fmri["dataset"]) != {dataset}:
        raise BHInputError(samples, f"holds datasets {sorted(set(fmri['dataset']))}, expected {dataset}",
                           "pass the samples table of this dataset")
    t1_subjects = pd.Series([parse_entities(Path(p).name)["subject"] for p in t1_tensors], dtype=object)
    if (t1_subjects == "").any():
        raise BHInputError(t1_tensors[int(np.argmax(t1_subjects == ""))], "no sub-<label> in the file name",
                           "use BIDS file names")
    table = pd.DataFrame({"subject": sorted(set(fmri["subject"]) | set(t1_subjects))}, dtype=object)
    table.insert(0, "dataset", dataset)
    table["n_fmri_samples"] = table["subject"].map(fmri["subject"].value_counts()).fillna(0).astype(int)
    table["n_t1"] = table["subject"].map(t1_subjects.value_counts()).fillna(0).astype(int)
    table["stratum"] = _strata(table["subject"], participants, stratify, n_bins)
    table["split"] = assign_splits(subjects=table, dataset=dataset, fractions=fractions, seed=seed)
    table = table[list(SPLIT_COLUMNS)]
    out_splits = Path(out_splits)
    out_splits.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_splits.with_name(f".{out_splits.name}.tmp")
    table.to_csv(tmp, sep="\t", index=False, lineterminator="\n")
    tmp.replace(out_splits)
    counts = {name: int((table["split"] == name).sum()) for name in fractions}
    write_json(sidecar_path(out_splits), {
        "Dataset": dataset, "Fractions": fractions, "Stratify": stratify, "NBins": n_bins, "Seed": seed,
        "SubjectsPerSplit": counts,
        "Description": __desc__.format(
            splits=len(fractions), fractions=", ".join(f"{k} {v:g}" for k, v in fractions.items()),
            stratify=f" and stratified by {stratify}" if stratify else ""),
    })
    return counts


def _strata(subjects: pd.Series, participants: Path | None, stratify: str | None, n_bins: int) -> pd.Series:
    if not stratify:
        return pd.Series("all", index=subjects.index, dtype=object)
    if participants is None:
        raise BHConfigError("datasets.<name>.stratify", f"stratify by '{stratify}' needs the participants.tsv",
                            "add a participants.tsv to the dataset or set its stratify to null")
    table = pd.read_csv(participants, sep="\t", dtype=str, keep_default_na=False)
    if "participant_id" not in table or stratify not in table:
        raise BHInputError(participants, f"needs columns participant_id and {stratify}",
                           "add the column or change the dataset's stratify in config.yaml")
    labels = table["participant_id"].str.removeprefix("sub-")
    values = subjects.map(dict(zip(labels, table[stratify]))).astype(object)
    return stratum_labels(values=values, name=stratify, n_bins=n_bins)


def read_splits(paths: Sequence[Path]) -> pd.DataFrame:
    """Concatenate per-dataset split tables and check each subject has one split.

    Raises
    ------
    BHInputError
        When a (dataset, subject) is listed twice.
    """
    tables = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in paths]
    out = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(SPLIT_COLUMNS))
    dup = out.duplicated(["dataset", "subject"])
    if dup.any():
        row = out[dup].iloc[0]
        raise BHInputError(", ".join(map(str, paths)), f"subject {row['subject']} of {row['dataset']} listed twice",
                           "rerun make_splits; give each dataset one split file")
    return out


def split_of(*, splits: pd.DataFrame, dataset: str, subjects: pd.Series, source: Path) -> pd.Series:
    """Split of each subject; raises when a subject is missing from the splits file."""
    lookup = dict(zip(splits.loc[splits["dataset"] == dataset, "subject"],
                      splits.loc[splits["dataset"] == dataset, "split"]))
    out = subjects.map(lookup)
    if out.isna().any():
        raise BHInputError(source, f"subject {subjects[out.isna()].iloc[0]} of {dataset} has no split",
                           "rerun make_splits with this dataset's current samples and T1 tensors")
    return out
