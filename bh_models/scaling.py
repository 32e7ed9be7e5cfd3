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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.augment import read_samples_table
from bh_models.errors import BHConfigError, BHInputError
from bh_models.jsonio import read_json, write_json

__desc__ = (
    "Parcel time series were robust-scaled per ROI, subtracting the median and "
    "dividing by the interquartile range of subjects' temporal mean signals, both "
    "computed over the {n_subjects} subjects of the training split only."
)

#: File names inside a dataset's fMRI store folder that scaling reads.
TEMPORAL_MEANS_FILE = "temporal_means.npy"
STORE_META_FILE = "index.json"


@dataclass(frozen=True)
class RobustScaling:
    """Per-ROI statistics: ``rois`` (names), ``median`` and ``iqr`` (float32, one per ROI)."""

    rois: tuple[str, ...]
    median: np.ndarray
    iqr: np.ndarray

    def apply_frames(self, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scale ``frames`` of shape (n_frames, n_rois), in float32 (the loader's hot path).

        The store's row-major (frames, ROIs) layout keeps this a contiguous
        broadcast; float32 throughout is ~10x cheaper than a float64 round trip.
        ``out`` (float32, same shape, may be a strided view) receives the result
        without temporaries.
        """
        median = self.median.astype(np.float32, copy=False)
        iqr = self.iqr.astype(np.float32, copy=False)
        out = np.subtract(np.asarray(frames, dtype=np.float32), median, out=out)
        return np.divide(out, iqr, out=out)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scale ``x`` of shape (n_rois, n_frames); returns float32 (same values as :meth:`apply_frames`)."""
        return self.apply_frames(np.asarray(x).T).T


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


def fit_robust_scaling(*, subject_means: np.ndarray, iqr_floor: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and IQR per ROI over subjects; IQRs below ``iqr_floor`` become 1.

    Returns
    -------
    median, iqr : ndarray, shape (n_rois,)
        Float64 statistics.
    floored : ndarray of bool
        ROIs whose IQR was floored (dividing by ~0 would blow the ROI up).
    """
    if subject_means.shape[0] == 0:
        raise BHConfigError("splits.fractions", "the training split holds no fMRI subject",
                            "give the train split a positive fraction and check the samples tables")
    q25, median, q75 = np.percentile(subject_means, [25, 50, 75], axis=0)
    iqr = q75 - q25
    floored = ~(iqr >= iqr_floor)
    return median, np.where(floored, 1.0, iqr), floored


def compute_scaling(
    *,
    fmri_indexes: Sequence[Path],
    out_scaling: Path,
    out_scaling_table: Path | None = None,
    split: str = "train",
    iqr_floor: float = 1e-6,
    threads: int = 1,
) -> dict:
    """Step function: robust-scaling statistics over the training split of the store.

    Parameters
    ----------
    fmri_indexes : list of Path
        ``<store>/fmri/<dataset>/index.tsv`` of every dataset; the packed
        ``temporal_means.npy`` and ``index.json`` beside each are read too.
    out_scaling : Path
        JSON with ``rois``, ``median``, ``iqr``, ``n_subjects``, ``datasets``,
        ``split`` and ``floored_rois`` (``<store>/scaling.json``).
    out_scaling_table : Path, optional
        The same statistics as a TSV (roi, median, iqr) for people to read.
    split : str
        Split the statistics are fitted on.
    iqr_floor : float
        IQRs below this are replaced by 1 and listed (config ``store.iqr_floor``).
    threads : int
        Unused.

    Returns
    -------
    dict
        ``n_subjects`` and ``n_floored``.
    """
    del threads
    rois, indexes, means = None, [], []
    for path in sorted(map(Path, fmri_indexes)):
        meta = read_json(path.parent / STORE_META_FILE)
        if rois is not None and meta["rois"] != rois:
            raise BHInputError(path, "ROI names differ from the other datasets' stores",
                               "use the same atlas (networks) for every dataset")
        rois = meta["rois"]
        index = read_samples_table(path)
        keep = (index["split"] == split).to_numpy()
        indexes.append(index[keep])
        means.append(np.load(path.parent / TEMPORAL_MEANS_FILE)[keep])
    if rois is None:
        raise BHConfigError("datasets", "no fMRI store to fit the scaling on", "pack at least one dataset")
    index = pd.concat(indexes, ignore_index=True)
    subjects = subject_temporal_means(index=index, sample_means=np.concatenate(means))
    median, iqr, floored = fit_robust_scaling(subject_means=subjects.to_numpy(), iqr_floor=iqr_floor)
    write_json(out_scaling, {
        "rois": rois, "median": median.tolist(), "iqr": iqr.tolist(), "split": split,
        "n_subjects": len(subjects), "datasets": sorted(set(index["dataset"])),
        "floored_rois": [r for r, f in zip(rois, floored) if f], "iqr_floor": iqr_floor,
        "Description": __desc__.format(n_subjects=len(subjects)),
    })
    if out_scaling_table is not None:
        table = pd.DataFrame({"roi": rois, "median": median, "iqr": iqr})
        Path(out_scaling_table).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_scaling_table, sep="\t", index=False, float_format="%.8g", lineterminator="\n")
    return {"n_subjects": len(subjects), "n_floored": int(floored.sum())}


def load_scaling(path: Path) -> RobustScaling:
    """Read statistics written by :func:`compute_scaling` (or stored in a checkpoint)."""
    if not Path(path).is_file():
        raise BHInputError(path, "robust-scaling statistics are missing",
                           "run compute_scaling on the store, or pass scale=False to read raw values")
    obj = read_json(path)
    return RobustScaling(rois=tuple(obj["rois"]), median=np.asarray(obj["median"], dtype=np.float32),
                         iqr=np.asarray(obj["iqr"], dtype=np.float32))
