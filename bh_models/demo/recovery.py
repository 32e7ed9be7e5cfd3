"""Ground-truth recovery: how well the functional chain returns the demo's parcel series.

The demo cohort (:mod:`bh_models.demo.cohort`) generates each BOLD run from known
Schaefer-400 series, written outside the BIDS folders. The chain's output is
cleaned (detrending, high-pass, the run's motion regressors, scaling), so it is
compared with the truth passed through the same cleaning: ``nilearn.signal.clean``
with the same detrend/high-pass/low-pass settings and the same regressors (the
columns the sidecar's ``Regressors`` names, read from the run's confounds TSV).
Regressing 24 motion columns out of 100-160 frames
removes a sizeable, signal-independent share of any series; leaving it out of the
reference would measure the cleaning, not the recovery. Scaling (psc) does not
change a correlation.

The truth is written in the 7-network Schaefer order; the chain writes the
configured order (``atlas.networks``, 17 by default). Both orders label the same
400 parcels, so columns are matched by parcel identity
(:func:`truth_in_recovered_order`), never by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from nilearn.signal import clean

from bh_models.core.errors import BHConfigError
from bh_models.core.jsonio import read_json, sidecar_path
from bh_models.core.templates import network_order_of, parcel_order


#: Confounds TSV columns that are not regressors (for sidecars without ``Regressors``).
NOT_REGRESSORS = ("framewise_displacement", "censored")


def filtered_truth(*, truth: np.ndarray, tr: float, detrend: bool, high_pass: float | None,
                   low_pass: float | None, confounds: np.ndarray | None = None) -> np.ndarray:
    """The true (T, 400) series through the chain's cleaning (filter and regressors)."""
    return clean(truth, t_r=tr, detrend=detrend, high_pass=high_pass, low_pass=low_pass,
                 confounds=confounds, standardize=None)


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of every column of ``a`` (T, P) with the same column of ``b``."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=0) / denom, np.nan)


def truth_in_recovered_order(*, truth: pd.DataFrame, recovered_columns: list[str]) -> pd.DataFrame:
    """The truth's columns reordered (and renamed) to the recovered table's parcel order.

    Parameters
    ----------
    truth : DataFrame
        T x 400, columns = Schaefer-400 names of one network order.
    recovered_columns : list of str
        Schaefer-400 names of the same or the other network order.

    Returns
    -------
    DataFrame
        T x 400 with ``recovered_columns``: column ``j`` holds the truth of the same parcel.
    """
    source = network_order_of(list(truth.columns))
    target = network_order_of(recovered_columns)
    values = truth.to_numpy()[:, parcel_order(source=source, target=target)]  # (T, 400), target order
    return pd.DataFrame(values, columns=recovered_columns)


def run_recovery(*, recovered: Path, truth: Path, confounds: Path | None = None, detrend: bool = True,
                 high_pass: float | None = 0.01, low_pass: float | None = None) -> dict:
    """Compare one run's recovered parcel series with its ground truth.

    Parameters
    ----------
    recovered : Path
        The chain's ``*_timeseries.tsv`` (T x 400, ROI names as header) with its sidecar
        (``RepetitionTime``; ``CensoredFrames`` / kept frames when scrubbed).
    truth : Path
        The demo's ground-truth TSV of the same run (T x 400, same header).
    confounds : Path, optional
        The run's ``*_desc-confounds_timeseries.tsv``; its regressors are removed
        from the truth too. Censored frames are dropped from the truth.

    Returns
    -------
    dict
        ``median_r``, ``min_r``, ``n_parcels`` (columns present), ``r`` (per parcel).
    """
    ours = pd.read_csv(recovered, sep="\t")
    true = pd.read_csv(truth, sep="\t")
    if list(ours.columns) != list(true.columns):
        try:  # another network order of the same parcels: match columns by parcel
            true = truth_in_recovered_order(truth=true, recovered_columns=list(ours.columns))
        except BHConfigError as err:
            raise ValueError(f"{recovered}: ROI columns differ from the ground truth {truth} ({err})") from err
    meta = read_json(sidecar_path(recovered))
    tr = float(meta["RepetitionTime"])
    regressors, keep = None, np.ones(len(true), dtype=bool)
    if confounds is not None:
        table = pd.read_csv(confounds, sep="\t", na_values="n/a")
        columns = (meta["Regressors"] if "Regressors" in meta
                   else [c for c in table.columns if c not in NOT_REGRESSORS])
        regressors = np.nan_to_num(table[columns].to_numpy(float))  # n/a: the first row of a derivative
        regressors = regressors if regressors.shape[1] else None
        if "censored" in table:
            keep = table["censored"].to_numpy() == 0
    reference = filtered_truth(truth=true.to_numpy(float), tr=tr, detrend=detrend, high_pass=high_pass,
                               low_pass=low_pass, confounds=regressors)[keep]
    if len(ours) != len(reference):
        raise ValueError(f"{recovered}: {len(ours)} frames, the truth has {len(reference)} "
                         "(compare runs without scrubbing)")
    r = rowwise_pearson(ours.to_numpy(float), reference)
    return {"median_r": float(np.nanmedian(r)), "min_r": float(np.nanmin(r)),
            "n_parcels": int(ours.shape[1]), "r": r}


def confounds_of(timeseries: Path) -> Path:
    """The confounds TSV written beside a run's parcel series by the functional chain."""
    stem = Path(timeseries).name.split("_space-")[0]
    return Path(timeseries).with_name(f"{stem}_desc-confounds_timeseries.tsv")


def recovery_table(*, pairs: Sequence[tuple[Path, Path]], **filter_settings) -> pd.DataFrame:
    """One row per run (recovered series, truth): file, median and minimum r, parcel count."""
    rows = []
    for recovered, truth in pairs:
        result = run_recovery(recovered=recovered, truth=truth, confounds=confounds_of(recovered),
                              **filter_settings)
        rows.append({"run": Path(recovered).name, "median_r": result["median_r"],
                     "min_r": result["min_r"], "n_parcels": result["n_parcels"]})
    return pd.DataFrame(rows)
