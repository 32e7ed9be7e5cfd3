"""Motion regressors, FD censoring, and confound cleaning of parcel time series.

Cleaning is ``nilearn.signal.clean`` on the (T, 400) parcel series, in
nilearn's order: censored frames are interpolated (cubic spline), then signals
*and* confounds are linearly detrended and Butterworth-filtered (so the
regression stays orthogonal to the filter, Lindquist 2019), the motion
regressors are projected out, censored frames are dropped, and the result is
scaled (``standardize``). Cleaning parcel means is the same linear operation as
cleaning every voxel and then averaging, at 1/300 of the cost.

Defaults (documented in the README)
-----------------------------------
``detrend=True``; ``high_pass=0.01`` Hz; ``low_pass=None`` (no low-pass: the
models see the full band each TR allows, which TAPE relies on);
``motion_regressors=24`` (6 parameters, their backward differences, and the
squares of both: the "full" motion strategy of nilearn's ``load_confounds``);
``fd_threshold=None`` (no censoring); ``standardize="psc"`` (percent signal
change against each parcel's mean, comparable across scanners).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from bh_models.core.errors import BHConfigError
from bh_models.func.motion import PARAMETER_NAMES

__desc__ = (
    "Parcel time series were cleaned with nilearn's signal.clean (Abraham et al. "
    "2014): linear detrending, Butterworth high-pass filtering at {high_pass} Hz, "
    "and regression of {motion_regressors} motion regressors (the six parameters, "
    "their temporal derivatives and the squares of both), with the same filter "
    "applied to the regressors; series were scaled to percent signal change."
)

MOTION_REGRESSOR_CHOICES = (0, 6, 12, 24)
STANDARDIZE_CHOICES = (False, "psc", "zscore_sample")
_STANDARDIZE_WORDS = {False: "", "psc": "percent signal change", "zscore_sample": "z-scores"}


def describe_methods(*, config: Mapping[str, Any]) -> str:
    """The methods sentence for the configured cleaning (None means "off").

    Used by :mod:`bh_models.records.boilerplate` in place of ``__desc__``.
    """
    from bh_models.core.methods import placeholder_value

    module = sys.modules[__name__]

    def setting(name: str) -> Any:
        return placeholder_value(name=name, config=config, module=module)

    high_pass, low_pass = setting("high_pass"), setting("low_pass")
    n_motion, fd_threshold = setting("motion_regressors"), setting("fd_threshold")
    detrend, standardize = setting("detrend"), setting("standardize")
    steps = ["linear detrending"] if detrend is not False else []
    if high_pass and low_pass:
        steps.append(f"Butterworth band-pass filtering ({high_pass:g}-{low_pass:g} Hz)")
    elif high_pass or low_pass:
        kind, cutoff = ("high", high_pass) if high_pass else ("low", low_pass)
        steps.append(f"Butterworth {kind}-pass filtering at {cutoff:g} Hz")
    if n_motion:
        what = {6: "the six motion parameters",
                12: "the six motion parameters and their temporal derivatives",
                24: "the six motion parameters, their temporal derivatives and the squares of both"}
        steps.append(f"regression of {n_motion} motion regressors ({what.get(n_motion, 'motion')}), "
                     "filtered like the signals")
    text = "Parcel time series were cleaned with nilearn's signal.clean (Abraham et al. 2014)"
    text += (": " + ", ".join(steps)) if steps else ""
    text += "."
    if fd_threshold:
        text += (f" Frames with FD above {fd_threshold:g} mm were censored (interpolated for "
                 "filtering, then removed).")
    scaled_to = _STANDARDIZE_WORDS.get(standardize, "")
    if scaled_to:
        text += f" Series were scaled to {scaled_to}."
    return text


def expand_motion(*, params: np.ndarray) -> pd.DataFrame:
    """All 24 motion regressors of (T, 6) parameters, fMRIPrep column names.

    Columns: the 6 parameters, ``*_derivative1`` (backward difference, 0 for
    the first frame), ``*_power2`` and ``*_derivative1_power2``.
    """
    base = pd.DataFrame(np.asarray(params, dtype=np.float64), columns=list(PARAMETER_NAMES))
    derivative = base.diff().fillna(0.0).add_suffix("_derivative1")
    table = pd.concat([base, derivative], axis=1)
    return pd.concat([table, (table**2).add_suffix("_power2")], axis=1)


def motion_columns(n_regressors: int) -> list[str]:
    """Column names of :func:`expand_motion` used for ``n_regressors`` (0, 6, 12, 24)."""
    check_cleaning(motion_regressors=n_regressors)
    names = list(PARAMETER_NAMES)
    if n_regressors >= 12:
        names += [f"{n}_derivative1" for n in PARAMETER_NAMES]
    if n_regressors == 24:
        names += [f"{n}_power2" for n in names]
    return names[:n_regressors]


def censor_frames(*, fd: np.ndarray, fd_threshold: float | None) -> np.ndarray:
    """(T,) bool, True for frames to drop: FD above the threshold (never the first frame)."""
    if fd_threshold is None:
        return np.zeros(len(fd), dtype=bool)
    return np.nan_to_num(fd, nan=0.0) > fd_threshold


def check_cleaning(
    *,
    motion_regressors: int = 24,
    high_pass: float | None = 0.01,
    low_pass: float | None = None,
    fd_threshold: float | None = None,
    standardize: bool | str = "psc",
) -> None:
    """Raise :class:`BHConfigError` for an invalid cleaning setting."""
    if motion_regressors not in MOTION_REGRESSOR_CHOICES or isinstance(motion_regressors, bool):
        raise BHConfigError("motion_regressors", f"{motion_regressors!r} is not allowed", "use 0, 6, 12 or 24")
    for key, value in (("high_pass", high_pass), ("low_pass", low_pass), ("fd_threshold", fd_threshold)):
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise BHConfigError(key, f"{value!r} is not a positive number", "give a positive number or null")
    if high_pass is not None and low_pass is not None and low_pass <= high_pass:
        raise BHConfigError("low_pass", f"{low_pass} Hz is not above high_pass {high_pass} Hz",
                            "set low_pass > high_pass, or null for high-pass only")
    if standardize not in STANDARDIZE_CHOICES:
        raise BHConfigError("standardize", f"{standardize!r} is not allowed", "use false, 'psc' or 'zscore_sample'")


def clean_parcel_series(
    *,
    series: np.ndarray,
    repetition_time: float,
    confounds: np.ndarray | None = None,
    censored: np.ndarray | None = None,
    detrend: bool = True,
    high_pass: float | None = 0.01,
    low_pass: float | None = None,
    standardize: bool | str = "psc",
) -> tuple[np.ndarray, list[str]]:
    """Clean (T, P) series with ``nilearn.signal.clean``.

    Parameters
    ----------
    series : np.ndarray
        (T, P) parcel series (raw BOLD units).
    repetition_time : float
        Seconds; the filter cut-offs are in Hz, so each run is filtered at its own TR.
    confounds : np.ndarray or None
        (T, K) regressors, K may be 0.
    censored : np.ndarray or None
        (T,) bool, frames to remove after filtering.
    detrend, high_pass, low_pass, standardize
        See the module defaults.

    Returns
    -------
    cleaned : np.ndarray
        (T - n_censored, P) float64.
    notes : list of str
        Warnings for the sidecar (e.g. a cut-off above Nyquist that was skipped).
    """
    from nilearn.signal import clean

    notes: list[str] = []
    nyquist = 0.5 / repetition_time
    if low_pass is not None and low_pass >= nyquist:
        notes.append(f"low_pass {low_pass:g} Hz is not below the Nyquist frequency {nyquist:.4g} Hz "
                     f"of TR {repetition_time:g} s; no low-pass filter was applied")
        low_pass = None
    if high_pass is not None and high_pass >= nyquist:
        notes.append(f"high_pass {high_pass:g} Hz is not below the Nyquist frequency {nyquist:.4g} Hz "
                     f"of TR {repetition_time:g} s; no high-pass filter was applied")
        high_pass = None
    if confounds is not None and confounds.shape[1] == 0:
        confounds = None
    sample_mask = None
    if censored is not None and censored.any():
        sample_mask = np.flatnonzero(~censored)
    with warnings.catch_warnings():
        # nilearn announces future changes of its defaults on every call; the
        # arguments here are explicit, so those messages say nothing about this run.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        cleaned = clean(
            np.asarray(series, dtype=np.float64),
            detrend=detrend,
            standardize=standardize if standardize else None,
            confounds=confounds,
            standardize_confounds=True,
            filter="butterworth" if (high_pass or low_pass) else False,
            low_pass=low_pass,
            high_pass=high_pass,
            t_r=repetition_time,
            sample_mask=sample_mask,
        )
    return np.asarray(cleaned, dtype=np.float64), notes
