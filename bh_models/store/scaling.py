"""Robust scaling of parcel time series, fitted on the training split only.

Per ROI, the statistics are the median and the interquartile range (IQR) over
training subjects of each subject's temporal mean signal. A sample is scaled as
``(x - median) / IQR`` per ROI when it is read from the store, so the packed
shards keep the original values and the statistics can be refitted (a dataset
added, another split) without repacking. The statistics are written next to the
store (and are copied into model checkpoints by the training code) because the
official release lacks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import read_json, write_json, write_tsv
from bh_models.core.storeformat import (
    INDEX_FILE,
    STORE_META_FILE,
    TEMPORAL_MEANS_FILE,
    TEMPORAL_SDS_FILE,
    read_samples_table,
)

__desc__ = (
    "Parcel time series were robust-scaled per ROI, subtracting the median and "
    "dividing by the interquartile range of subjects' temporal mean signals, both "
    "computed over the {n_subjects} subjects of the training split only{floored}."
)

def subject_temporal_means(*, index: pd.DataFrame, sample_means: np.ndarray) -> pd.DataFrame:
    """Frame-weighted temporal mean signal of each subject.

    Parameters
    ----------
    index : DataFrame
        Store index rows (``dataset``, ``subject``, ``n_frames``) aligned with ``sample_means``.
    sample_means : ndarray, shape (n_samples, n_rois)
        Temporal mean of each packed sample.

    Returns
    -------
    DataFrame
        One row per (dataset, subject), one column per ROI index.
    """
    weighted = pd.DataFrame(sample_means * index["n_frames"].to_numpy()[:, None])
    keys = [index["dataset"].to_numpy(), index["subject"].to_numpy()]
    sums = weighted.groupby(keys, sort=True).sum()
    frames = index.groupby(keys, sort=True)["n_frames"].sum()
    return sums.div(frames.to_numpy(), axis=0)


def fit_robust_scaling(
    *,
    subject_means: np.ndarray,
    iqr_floor: float = 1e-6,
    within_sd: np.ndarray | None = None,
    relative_iqr_floor: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and IQR per ROI over subjects; IQRs too small to divide by become 1.

    An IQR is floored when it is below ``iqr_floor``, or below
    ``relative_iqr_floor`` x ``within_sd`` (the ROI's typical within-run SD).
    The second case is a series demeaned upstream (detrending, high-pass or
    percent-signal-change cleaning leave temporal means of ~0): dividing by the
    between-subject spread of removed means would blow noise up ~1000-fold and
    give every ROI an arbitrary scale, so such ROIs keep their cleaned units.

    Parameters
    ----------
    subject_means : ndarray, shape (n_subjects, n_rois)
    iqr_floor : float
        Absolute floor.
    within_sd : ndarray, shape (n_rois,), optional
        Median over subjects of the within-run temporal SD; no relative floor without it.
    relative_iqr_floor : float
        Relative floor (config ``store.relative_iqr_floor``).

    Returns
    -------
    median, iqr : ndarray, shape (n_rois,)
        Float64 statistics.
    floored : ndarray of bool
        ROIs whose IQR was floored.
    """
    if subject_means.shape[0] == 0:
        raise BHConfigError("splits.fractions", "the training split holds no fMRI subject",
                            "give the train split a positive fraction and check the samples tables")
    q25, median, q75 = np.percentile(subject_means, [25, 50, 75], axis=0)
    iqr = q75 - q25
    floor = np.full_like(iqr, iqr_floor)
    if within_sd is not None:
        floor = np.maximum(floor, relative_iqr_floor * np.asarray(within_sd, dtype=np.float64))
    floored = ~(iqr >= floor)
    return median, np.where(floored, 1.0, iqr), floored


def compute_scaling(
    *,
    fmri: Sequence[Path],
    out_scaling: Path,
    out_scaling_table: Path | None = None,
    split: str = "train",
    iqr_floor: float = 1e-6,
    relative_iqr_floor: float = 0.05,
    threads: int = 1,
) -> dict:
    """Step function: robust-scaling statistics over the training split of the store.

    Parameters
    ----------
    fmri : list of Path
        Packed fMRI dataset folders (``<store>/fmri/<dataset>``) of the
        pretraining datasets: their ``index.tsv``, ``index.json``,
        ``temporal_means.npy`` and ``temporal_sds.npy`` are read.
    out_scaling : Path
        JSON with ``rois``, ``median``, ``iqr``, ``n_subjects``, ``datasets``,
        ``split`` and ``floored_rois`` (``<store>/scaling.json``).
    out_scaling_table : Path, optional
        The same statistics as a TSV (roi, median, iqr) for people to read.
    split : str
        Split the statistics are fitted on.
    iqr_floor : float
        IQRs below this are replaced by 1 and listed (config ``store.iqr_floor``).
    relative_iqr_floor : float
        IQRs below this fraction of the ROI's median within-run SD are replaced
        by 1 and listed (config ``store.relative_iqr_floor``; see
        :func:`fit_robust_scaling`).
    threads : int
        Unused.

    Returns
    -------
    dict
        ``n_subjects`` and ``n_floored``.
    """
    del threads
    rois, indexes, means, sds = None, [], [], []
    for path in sorted(Path(folder) / INDEX_FILE for folder in fmri):
        meta = read_json(path.parent / STORE_META_FILE)
        if rois is not None and meta["rois"] != rois:
            raise BHInputError(path, "ROI names differ from the other datasets' stores",
                               "use the same atlas (networks) for every dataset")
        rois = meta["rois"]
        index = read_samples_table(path)
        keep = (index["split"] == split).to_numpy()
        indexes.append(index[keep])
        means.append(np.load(path.parent / TEMPORAL_MEANS_FILE)[keep])
        sds.append(np.load(path.parent / TEMPORAL_SDS_FILE)[keep])
    if rois is None:
        raise BHConfigError("datasets", "no fMRI store to fit the scaling on", "pack at least one dataset")
    index = pd.concat(indexes, ignore_index=True)
    subjects = subject_temporal_means(index=index, sample_means=np.concatenate(means))
    within_sd = np.median(subject_temporal_means(index=index, sample_means=np.concatenate(sds)).to_numpy(), axis=0)
    median, iqr, floored = fit_robust_scaling(subject_means=subjects.to_numpy(), iqr_floor=iqr_floor,
                                              within_sd=within_sd, relative_iqr_floor=relative_iqr_floor)
    write_json(out_scaling, {
        "rois": rois, "median": median.tolist(), "iqr": iqr.tolist(), "split": split,
        "n_subjects": len(subjects), "datasets": sorted(set(index["dataset"])),
        "floored_rois": [r for r, f in zip(rois, floored) if f], "iqr_floor": iqr_floor,
        "relative_iqr_floor": relative_iqr_floor, "within_run_sd": within_sd.tolist(),
        "Description": __desc__.format(n_subjects=len(subjects), floored=(
            f"; {int(floored.sum())} of {len(rois)} ROIs, whose series were demeaned upstream (IQR of "
            f"temporal means < {relative_iqr_floor} x within-run SD), kept their cleaned units"
            if floored.any() else "")),
    })
    if out_scaling_table is not None:
        table = pd.DataFrame({"roi": rois, "median": median, "iqr": iqr})
        write_tsv(table, out_scaling_table, float_format="%.8g")
    return {"n_subjects": len(subjects), "n_floored": int(floored.sum())}
