"""Tests of bh_models.func.confounds: regressors, censoring, nilearn cleaning."""

from __future__ import annotations

import numpy as np
import pytest

from bh_models.func.confounds import (
    censor_frames,
    check_cleaning,
    clean_parcel_series,
    describe_methods,
    expand_motion,
    motion_columns,
)
from bh_models.core.errors import BHConfigError


def _params(n: int = 50, seed: int = 0) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed).normal(0, 0.05, (n, 6)), axis=0)


def test_expand_motion_derivatives_and_squares():
    params = _params()
    table = expand_motion(params=params)
    assert table.shape == (50, 24)
    assert np.allclose(table["trans_x"], params[:, 0])
    assert table["rot_z_derivative1"].iloc[0] == 0.0
    assert np.allclose(table["rot_z_derivative1"].iloc[1:], np.diff(params[:, 5]))
    assert np.allclose(table["trans_y_derivative1_power2"], table["trans_y_derivative1"] ** 2)


@pytest.mark.parametrize("n", [0, 6, 12, 24])
def test_motion_columns_counts(n):
    columns = motion_columns(n)
    assert len(columns) == n and set(columns) <= set(expand_motion(params=_params()).columns)


@pytest.mark.parametrize(
    "kwargs",
    [{"motion_regressors": 18}, {"high_pass": -0.01}, {"low_pass": 0.005}, {"fd_threshold": 0},
     {"standardize": "zscore"}],
)
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(BHConfigError):
        check_cleaning(**kwargs)


def test_censoring_uses_threshold_and_never_the_first_frame():
    fd = np.array([np.nan, 0.1, 0.6, 0.2, 0.9])
    assert censor_frames(fd=fd, fd_threshold=0.5).tolist() == [False, False, True, False, True]
    assert not censor_frames(fd=fd, fd_threshold=None).any()


def test_regressed_confound_is_removed():
    rng = np.random.default_rng(1)
    confound = rng.standard_normal((120, 1))
    signal = rng.standard_normal((120, 3))
    series = 100 + signal + 3 * confound
    cleaned, notes = clean_parcel_series(series=series, repetition_time=2.0, confounds=confound,
                                         high_pass=None, standardize=False)
    assert notes == []
    assert np.abs(confound[:, 0] @ cleaned).max() < 1e-8  # orthogonal to the regressor
    assert np.corrcoef(cleaned[:, 0], signal[:, 0])[0, 1] > 0.95


def test_high_pass_removes_slow_drift_at_each_runs_own_tr():
    t = np.arange(200)
    for tr in (0.735, 2.0):
        drift = np.sin(2 * np.pi * 0.003 * t * tr)  # 0.003 Hz, below the 0.01 Hz cut-off
        fast = np.sin(2 * np.pi * 0.05 * t * tr)
        cleaned, _ = clean_parcel_series(series=(drift + fast)[:, None], repetition_time=tr,
                                         high_pass=0.01, standardize=False, detrend=False)
        assert np.corrcoef(cleaned[:, 0], fast)[0, 1] > 0.95


def test_low_pass_above_nyquist_is_skipped_with_a_note():
    series = np.random.default_rng(2).standard_normal((60, 2)) + 10
    cleaned, notes = clean_parcel_series(series=series, repetition_time=8.0, low_pass=0.1,
                                         high_pass=0.01, standardize=False)
    assert len(notes) == 1 and "Nyquist" in notes[0]
    assert cleaned.shape == (60, 2)


def test_censored_frames_are_dropped_and_psc_scales_to_percent():
    rng = np.random.default_rng(3)
    series = 1000 * (1 + 0.01 * rng.standard_normal((80, 4)))
    censored = np.zeros(80, dtype=bool)
    censored[[10, 11, 40]] = True
    cleaned, _ = clean_parcel_series(series=series, repetition_time=1.0, censored=censored,
                                     high_pass=None, standardize="psc")
    assert cleaned.shape == (77, 4)
    assert 0.5 < cleaned.std() < 2.0  # 1 % fluctuations -> about 1 percent signal change


def test_describe_methods_follows_config():
    default = describe_methods(config={})
    assert "high-pass filtering at 0.01 Hz" in default and "24 motion regressors" in default
    custom = describe_methods(config={"func": {"low_pass": 0.1, "fd_threshold": 0.5,
                                                 "motion_regressors": 6, "standardize": False}})
    assert "band-pass filtering (0.01-0.1 Hz)" in custom and "FD above 0.5 mm" in custom
    assert "percent signal change" not in custom
