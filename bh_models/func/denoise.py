"""Named denoising strategies, censoring, and the cleaning of parcel time series.

Every strategy detrends (linear) and Butterworth-filters the parcel series and
its regressors alike (``func.high_pass``, ``func.low_pass``; the regression
stays orthogonal to the filter, Lindquist et al. 2019), regresses the
strategy's confounds (columns of the run's fMRIPrep-named confounds table,
:mod:`bh_models.func.confounds`) and scales the result (``func.standardize``):

=============  ==========================================================  =====================================
strategy       regressors                                                  reference
=============  ==========================================================  =====================================
``none``       none (detrending and filtering only)                        --
``6P``         ``trans_*``, ``rot_*``                                      Friston et al. 1996
``24P``        6P, their derivatives, and the squares of both               Friston et al. 1996; Satterthwaite et al. 2013
``24P+2P``     24P + ``white_matter`` + ``csf``                            Ciric et al. 2017; Parkes et al. 2018
``acompcor``   6P + ``c_comp_cor_00-04`` + ``w_comp_cor_00-04``             Behzadi et al. 2007; Muschelli et al. 2014
``acompcor50`` 6P + the CSF and WM components reaching 50 % of variance    Behzadi et al. 2007 (fMRIPrep's 50 % rule)
``scrubbing``  24P+2P, and frames censored (below)                          Power et al. 2012; Power et al. 2014
=============  ==========================================================  =====================================

``gsr: true`` adds ``global_signal`` to any of them (Ciric et al. 2017).

Censoring (``scrubbing``)
-------------------------
Frames with FD above ``fd_threshold`` (0.5 mm) or ``std_dvars`` above
``std_dvars_threshold`` (1.5) are censored (fMRIPrep's and nilearn's spike
thresholds; ``n/a`` is never an outlier), and so is every run of kept frames
shorter than ``min_segment`` (5) frames, leading and trailing runs included
(nilearn's ``load_confounds`` ``scrub=5`` rule).

Censored frames are **interpolated, then removed**, as XCP-D does: each censored
frame of the series and of the regressors is replaced by a cubic spline
through the kept frames (a censored block at either end takes the nearest kept
frame), so the filter sees no spike; series and regressors are then detrended
and filtered with ``nilearn.signal.clean``; the regression is fitted on the
kept frames only; and the censored frames are dropped before scaling. The
output has one row per kept frame. (nilearn 0.13.1's own
``clean(sample_mask=...)`` with a Butterworth filter is not used: it converts
the mask to indices and then interpolates the mirror images of the kept
frames, so censored spikes can reach the filter.) Without censoring, cleaning
is one ``nilearn.signal.clean`` call.

Degrees of freedom
------------------
``tdof_lost`` = rank of the regressor matrix + censored frames (Ciric et al.
2017; Parkes et al. 2018), written to the series sidecar with the frequency
bins the filter removes (the same for every strategy with the same filter).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bh_models.core.errors import BHConfigError
from bh_models.func.motion import PARAMETER_NAMES

__desc__ = (
    "Parcel time series were denoised with the '{denoise}' strategy through nilearn's signal.clean "
    "(Abraham et al. 2014): linear detrending, Butterworth high-pass filtering at {high_pass} Hz and "
    "regression of the strategy's confounds, filtered like the signals."
)

STANDARDIZE_CHOICES = (False, "psc", "zscore_sample")
_STANDARDIZE_WORDS = {False: "", "psc": "percent signal change", "zscore_sample": "z-scores"}
#: Columns the acompcor strategy takes from each of the CSF and WM sets.
ACOMPCOR_TOP_K = 5


class StrategyError(ValueError):
    """A strategy cannot be applied to a run (its confounds lack the columns it needs)."""


@dataclass(frozen=True)
class Strategy:
    """One named set of regressors, with or without censoring."""

    name: str
    motion: int  # 0, 6 or 24 motion regressors
    tissue: bool  # white_matter + csf means
    compcor: str | None  # "top5" | "50pct" | None
    censor: bool
    words: str  # for the methods text
    reference: str


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("none", 0, False, None, False, "no confound regression", ""),
    Strategy("6P", 6, False, None, False, "the six motion parameters", "Friston et al. 1996"),
    Strategy("24P", 24, False, None, False, "24 motion regressors (the six parameters, their temporal derivatives "
             "and the squares of both)", "Friston et al. 1996; Satterthwaite et al. 2013"),
    Strategy("24P+2P", 24, True, None, False, "24 motion regressors and the mean white-matter and CSF signals",
             "Ciric et al. 2017; Parkes et al. 2018"),
    Strategy("acompcor", 6, False, "top5", False, "the six motion parameters and the first five aCompCor "
             "components of each of the CSF and white-matter masks", "Behzadi et al. 2007; Muschelli et al. 2014"),
    Strategy("acompcor50", 6, False, "50pct", False, "the six motion parameters and the aCompCor components "
             "explaining 50 % of the variance of each of the CSF and white-matter masks", "Behzadi et al. 2007"),
    Strategy("scrubbing", 24, True, None, True, "24 motion regressors and the mean white-matter and CSF signals, "
             "with high-motion frames censored", "Power et al. 2012; Power et al. 2014"),
)}

#: The workflow's default (``func.denoise``, ``func.gsr``): the best fidelity among the strategies whose median
#: |QC-FC| is at or below the median of all, measured on the demo by ``benchmarks/bench_denoise.py`` (README,
#: "Denoising").
DEFAULT_STRATEGY = "none"
DEFAULT_GSR = True


@dataclass(frozen=True)
class Scrubbing:
    """Censoring thresholds (used by strategies that censor)."""

    fd_threshold: float | None = 0.5
    std_dvars_threshold: float | None = 1.5
    min_segment: int = 5


def check_denoise(*, denoise: str = DEFAULT_STRATEGY, gsr: bool = DEFAULT_GSR, high_pass: float | None = 0.01,
                  low_pass: float | None = None, standardize: bool | str = "psc",
                  fd_threshold: float | None = 0.5, std_dvars_threshold: float | None = 1.5,
                  min_segment: int = 5) -> Strategy:
    """The named :class:`Strategy`; :class:`BHConfigError` for any invalid cleaning setting."""
    if denoise not in STRATEGIES:
        raise BHConfigError("func.denoise", f"{denoise!r} is not a strategy", f"use one of {', '.join(STRATEGIES)}")
    if not isinstance(gsr, bool):
        raise BHConfigError("func.gsr", f"{gsr!r} is not true or false", "use true or false")
    for key, value in (("func.high_pass", high_pass), ("func.low_pass", low_pass),
                       ("func.scrubbing.fd_threshold", fd_threshold),
                       ("func.scrubbing.std_dvars_threshold", std_dvars_threshold)):
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise BHConfigError(key, f"{value!r} is not a positive number", "give a positive number or null")
    if high_pass is not None and low_pass is not None and low_pass <= high_pass:
        raise BHConfigError("func.low_pass", f"{low_pass} Hz is not above high_pass {high_pass} Hz",
                            "set low_pass > high_pass, or null for high-pass only")
    if standardize not in STANDARDIZE_CHOICES:
        raise BHConfigError("func.standardize", f"{standardize!r} is not allowed",
                            "use false, 'psc' or 'zscore_sample'")
    if isinstance(min_segment, bool) or not isinstance(min_segment, (int, np.integer)) or min_segment < 1:
        raise BHConfigError("func.scrubbing.min_segment", f"{min_segment!r} is not a positive integer",
                            "use e.g. 5 (1 keeps every frame below the thresholds)")
    strategy = STRATEGIES[denoise]
    if strategy.censor and fd_threshold is None and std_dvars_threshold is None:
        raise BHConfigError("func.scrubbing", "both thresholds are null, so the scrubbing strategy censors nothing",
                            "set fd_threshold and/or std_dvars_threshold, or choose the 24P+2P strategy")
    return strategy


# --------------------------------------------------------------------------- regressors


def _motion_columns(n: int) -> list[str]:
    if n == 0:
        return []
    if n == 6:
        return list(PARAMETER_NAMES)
    return [f"{p}{suffix}" for p in PARAMETER_NAMES
            for suffix in ("", "_derivative1", "_power2", "_derivative1_power2")]


def _compcor_columns(rule: str, table: pd.DataFrame, metadata: Mapping[str, dict]) -> tuple[list[str], list[str]]:
    """CSF and WM aCompCor columns for ``rule`` ("top5" or "50pct"), and notes."""
    from bh_models.func.confounds import components_for_variance

    columns, notes = [], []
    for prefix, mask in (("c_comp_cor_", "CSF"), ("w_comp_cor_", "WM")):
        present = sorted(c for c in table.columns if c.startswith(prefix))
        if not present:
            raise StrategyError(f"the confounds have no {mask} aCompCor components (the {mask} mask is too small "
                             "in this run's field of view)")
        if rule == "top5":
            wanted = ACOMPCOR_TOP_K
        else:
            cumulative = [metadata[c]["CumulativeVarianceExplained"] for c in present]
            wanted = components_for_variance(np.asarray(cumulative))
            if cumulative[-1] < 0.5:
                notes.append(f"{mask}: the {len(present)} written aCompCor components explain "
                             f"{100 * cumulative[-1]:.0f} % (< 50 %) of the mask's variance; all were used")
        if len(present) < wanted:
            notes.append(f"{mask}: only {len(present)} aCompCor components exist; {wanted} were asked for")
        columns += present[:wanted]
    return columns, notes


def regressor_columns(*, strategy: Strategy, gsr: bool, table: pd.DataFrame,
                      metadata: Mapping[str, dict]) -> tuple[list[str], list[str]]:
    """The confounds-table columns a strategy regresses, and notes for the sidecar.

    Raises
    ------
    StrategyError
        A CompCor strategy on a run whose confounds have no components of a
        mask (the caller names the run).
    """
    columns = _motion_columns(strategy.motion)
    notes: list[str] = []
    if strategy.tissue:
        columns += ["white_matter", "csf"]
    if strategy.compcor is not None:
        compcor, notes = _compcor_columns(strategy.compcor, table, metadata)
        columns += compcor
    if gsr:
        columns.append("global_signal")
    return columns, notes


def regressor_matrix(table: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """(T, K) regressors; the ``n/a`` first row of a derivative is 0 (its value after demeaning is moot)."""
    if not columns:
        return np.zeros((len(table), 0))
    values = np.array(table[columns].to_numpy(dtype=np.float64), copy=True)
    missing = ~np.isfinite(values)
    if missing[1:].any():
        bad = [c for c, m in zip(columns, missing[1:].any(axis=0)) if m]
        raise StrategyError(f"confound columns {bad} have n/a values beyond the first frame")
    values[missing] = 0.0
    return values


def matrix_rank(confounds: np.ndarray) -> int:
    """Numerical rank of (T, K) regressors after z-scoring (nilearn's QR tolerance)."""
    from scipy import linalg

    if confounds.shape[1] == 0:
        return 0
    centred = confounds - confounds.mean(axis=0)
    std = centred.std(axis=0)
    centred = centred[:, std > 0] / std[std > 0]
    if centred.shape[1] == 0:
        return 0
    _, r, _ = linalg.qr(centred, mode="economic", pivoting=True)
    return int((np.abs(np.diag(r)) > np.finfo(np.float64).eps * 100.0).sum())


# --------------------------------------------------------------------------- censoring


def censor_frames(*, fd: np.ndarray, std_dvars: np.ndarray | None = None, fd_threshold: float | None = 0.5,
                  std_dvars_threshold: float | None = 1.5, min_segment: int = 1) -> np.ndarray:
    """(T,) bool, True for frames to censor.

    Outliers: FD above ``fd_threshold`` or ``std_dvars`` above
    ``std_dvars_threshold`` (a null threshold tests nothing; ``n/a`` is never
    an outlier). Then every run of kept frames shorter than ``min_segment`` is
    censored too.
    """
    fd = np.asarray(fd, dtype=np.float64)
    censored = np.zeros(len(fd), dtype=bool)
    if fd_threshold is not None:
        censored |= np.nan_to_num(fd, nan=0.0) > fd_threshold
    if std_dvars is not None and std_dvars_threshold is not None:
        censored |= np.nan_to_num(np.asarray(std_dvars, dtype=np.float64), nan=0.0) > std_dvars_threshold
    if min_segment > 1:
        kept = np.flatnonzero(~censored)
        for segment in np.split(kept, np.flatnonzero(np.diff(kept) > 1) + 1):
            if 0 < segment.size < min_segment:
                censored[segment] = True
    return censored


def interpolate_censored(values: np.ndarray, censored: np.ndarray, repetition_time: float) -> np.ndarray:
    """(T, P) ``values`` with censored frames replaced by a cubic spline through the kept frames.

    A censored block at the start or end takes the value of the nearest kept
    frame (no extrapolation), as XCP-D does.
    """
    from scipy.interpolate import CubicSpline

    values = np.array(values, dtype=np.float64, copy=True)
    censored = np.asarray(censored, dtype=bool)
    if not censored.any():
        return values
    kept = np.flatnonzero(~censored)
    times = np.arange(len(values)) * repetition_time
    inner = censored & (np.arange(len(values)) > kept[0]) & (np.arange(len(values)) < kept[-1])
    if inner.any():
        spline = CubicSpline(times[kept], values[kept], axis=0, extrapolate=False)
        values[inner] = spline(times[inner])
    values[: kept[0]] = values[kept[0]]
    values[kept[-1] + 1:] = values[kept[-1]]
    return values


# --------------------------------------------------------------------------- cleaning


def _checked_filter(high_pass: float | None, low_pass: float | None,
                    repetition_time: float) -> tuple[float | None, float | None, list[str]]:
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
    return high_pass, low_pass, notes


def _nilearn_clean(signals: np.ndarray, **kwargs: Any) -> np.ndarray:
    from nilearn.signal import clean

    with warnings.catch_warnings():
        # nilearn announces future changes of its defaults on every call; the
        # arguments here are explicit, so those messages say nothing about this run.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        return np.asarray(clean(np.asarray(signals, dtype=np.float64), **kwargs), dtype=np.float64)


def filter_bins_removed(*, n_frames: int, repetition_time: float, high_pass: float | None,
                        low_pass: float | None) -> int:
    """Discrete Fourier bins of a run outside the pass band (degrees of freedom the filter takes)."""
    freq = np.fft.rfftfreq(n_frames, d=repetition_time)[1:]   # the mean goes with detrending
    removed = np.zeros(freq.size, dtype=bool)
    if high_pass is not None:
        removed |= freq < high_pass
    if low_pass is not None:
        removed |= freq > low_pass
    # Each bin below Nyquist is a sine and a cosine; the Nyquist bin of an even run is one.
    weights = np.full(freq.size, 2)
    if n_frames % 2 == 0:
        weights[-1] = 1
    return int((weights * removed).sum())


def clean_parcel_series(*, series: np.ndarray, repetition_time: float, confounds: np.ndarray | None = None,
                        censored: np.ndarray | None = None, detrend: bool = True, high_pass: float | None = 0.01,
                        low_pass: float | None = None, standardize: bool | str = "psc"
                        ) -> tuple[np.ndarray, list[str]]:
    """Clean (T, P) series; censored frames are interpolated, then removed (module notes).

    Parameters
    ----------
    series : np.ndarray
        (T, P) parcel series (raw BOLD units).
    repetition_time : float
        Seconds; the filter cut-offs are in Hz, so each run is filtered at its own TR.
    confounds : np.ndarray or None
        (T, K) regressors, K may be 0.
    censored : np.ndarray or None
        (T,) bool, frames to leave out of the regression and the output.
    detrend, high_pass, low_pass, standardize
        See :func:`check_denoise`.

    Returns
    -------
    cleaned : np.ndarray
        (T - n_censored, P) float64.
    notes : list of str
        Warnings for the sidecar (e.g. a cut-off above Nyquist that was skipped).
    """
    high_pass, low_pass, notes = _checked_filter(high_pass, low_pass, repetition_time)
    if confounds is not None and confounds.shape[1] == 0:
        confounds = None
    filtering = {"filter": "butterworth" if (high_pass or low_pass) else False, "low_pass": low_pass,
                 "high_pass": high_pass, "t_r": repetition_time}
    scale = standardize if standardize else None
    if censored is None or not np.any(censored):
        return _nilearn_clean(series, detrend=detrend, standardize=scale, confounds=confounds,
                              standardize_confounds=True, **filtering), notes
    keep = ~np.asarray(censored, dtype=bool)
    filled = interpolate_censored(series, ~keep, repetition_time)
    mean = filled.mean(axis=0)
    signals = _nilearn_clean(filled, detrend=detrend, standardize=None, **filtering)[keep]
    if confounds is not None:
        regressors = _nilearn_clean(interpolate_censored(confounds, ~keep, repetition_time), detrend=detrend,
                                    standardize=None, **filtering)[keep]
        signals = _project_out(signals, regressors)
    if scale is None:
        return signals, notes
    from nilearn.signal import standardize_signal

    if scale == "psc":  # as nilearn does for detrended or filtered series: against the original mean
        return standardize_signal(signals + mean, standardize="psc", detrend=False), notes
    return standardize_signal(signals, standardize=scale, detrend=False), notes


def _project_out(signals: np.ndarray, confounds: np.ndarray) -> np.ndarray:
    """``signals`` minus their projection on the z-scored ``confounds`` (nilearn's pivoted QR, rank-safe)."""
    from scipy import linalg

    centred = confounds - confounds.mean(axis=0)
    std = centred.std(axis=0)
    std[std < np.finfo(np.float64).eps] = 1.0
    q, r, _ = linalg.qr(centred / std, mode="economic", pivoting=True)
    q = q[:, np.abs(np.diag(r)) > np.finfo(np.float64).eps * 100.0]
    return signals - q @ (q.T @ signals)


# --------------------------------------------------------------------------- methods text


def describe_methods(*, config: Mapping[str, Any]) -> str:
    """The methods sentence for the configured cleaning (None means "off").

    Used by :mod:`bh_models.records.boilerplate` in place of ``__desc__``.
    """
    from bh_models.core.methods import placeholder_value

    module = sys.modules[__name__]

    def setting(name: str, default: Any) -> Any:
        value = placeholder_value(name=name, config=config, module=module)
        return default if value is None and default is not None else value

    name = setting("func.denoise", DEFAULT_STRATEGY)
    strategy = STRATEGIES.get(name, STRATEGIES[DEFAULT_STRATEGY])
    high_pass, low_pass = setting("func.high_pass", None), setting("func.low_pass", None)
    detrend, standardize = setting("func.detrend", True), setting("func.standardize", "psc")
    gsr = setting("func.gsr", DEFAULT_GSR)
    steps = ["linear detrending"] if detrend is not False else []
    if high_pass and low_pass:
        steps.append(f"Butterworth band-pass filtering ({high_pass:g}-{low_pass:g} Hz)")
    elif high_pass or low_pass:
        kind, cutoff = ("high", high_pass) if high_pass else ("low", low_pass)
        steps.append(f"Butterworth {kind}-pass filtering at {cutoff:g} Hz")
    what = strategy.words + (" and the global signal" if gsr else "")
    if strategy.motion or strategy.tissue or strategy.compcor or gsr:
        cite = f" ({strategy.reference})" if strategy.reference else ""
        steps.append(f"regression of {what}{cite}, filtered like the signals")
    text = ("Parcel time series were denoised with the " + f"'{strategy.name}' strategy"
            + (" plus global signal regression" if gsr else "")
            + " through nilearn's signal.clean (Abraham et al. 2014)")
    text += (": " + ", ".join(steps)) if steps else ""
    text += "."
    if strategy.censor:
        fd = setting("func.scrubbing.fd_threshold", None)
        dv = setting("func.scrubbing.std_dvars_threshold", None)
        segment = setting("func.scrubbing.min_segment", 5)
        rules = ([f"FD above {fd:g} mm"] if fd else []) + ([f"standardised DVARS above {dv:g}"] if dv else [])
        text += (f" Frames with {' or '.join(rules)}, and runs of fewer than {segment} frames between them, were "
                 "censored: interpolated (cubic spline) before filtering, left out of the regression and removed.")
    scaled_to = _STANDARDIZE_WORDS.get(standardize, "")
    if scaled_to:
        text += f" Series were scaled to {scaled_to}."
    return text
