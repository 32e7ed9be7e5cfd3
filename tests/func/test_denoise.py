"""Tests of bh_models.func.denoise: every named strategy, censoring and its bookkeeping, the cleaning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from nilearn.signal import clean

from bh_models.core.errors import BHConfigError
from bh_models.func import denoise as dn
from bh_models.func.confounds import expand_terms, motion_table

T = 120


def _table(seed: int = 0, n_compcor: int = 7) -> tuple[pd.DataFrame, dict]:
    """A confounds table with fMRIPrep's columns, and CompCor metadata."""
    rng = np.random.default_rng(seed)
    params = np.cumsum(rng.normal(0, [0.05, 0.05, 0.05, 0.001, 0.001, 0.001], (T, 6)), axis=0)
    means = pd.DataFrame(rng.standard_normal((T, 3)) + 100, columns=["global_signal", "csf", "white_matter"])
    columns = [expand_terms(means, list(means.columns)), motion_table(params)]
    metadata = {}
    for prefix, mask in (("c_comp_cor_", "CSF"), ("w_comp_cor_", "WM")):
        values = rng.standard_normal((T, n_compcor))
        cumulative = np.linspace(0.2, 0.9, n_compcor)
        names = [f"{prefix}{k:02d}" for k in range(n_compcor)]
        columns.append(pd.DataFrame(values, columns=names))
        for name, c in zip(names, cumulative):
            metadata[name] = {"CumulativeVarianceExplained": float(c), "Mask": mask}
    fd = np.r_[np.nan, np.abs(rng.normal(0.1, 0.05, T - 1))]
    columns.append(pd.DataFrame({"framewise_displacement": fd, "std_dvars": np.r_[np.nan, np.ones(T - 1)]}))
    return pd.concat(columns, axis=1), metadata


@pytest.mark.parametrize("name, count, tissue, compcor", [
    ("none", 0, False, 0), ("6P", 6, False, 0), ("24P", 24, False, 0), ("24P+2P", 24, True, 0),
    ("acompcor", 6, False, 10), ("acompcor50", 6, False, 2 * 4), ("scrubbing", 24, True, 0),
])
@pytest.mark.parametrize("gsr", [False, True])
def test_each_strategy_regresses_its_columns(name, count, tissue, compcor, gsr):
    table, metadata = _table()
    strategy = dn.check_denoise(denoise=name, gsr=gsr)
    columns, notes = dn.regressor_columns(strategy=strategy, gsr=gsr, table=table, metadata=metadata)
    motion = [c for c in columns if c.startswith(("trans_", "rot_"))]
    assert len(motion) == count
    assert len(set(columns)) == len(columns)
    if count == 6:
        assert motion == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    if count == 24:
        assert {"rot_y_derivative1", "trans_z_power2", "rot_x_derivative1_power2"} <= set(motion)
    assert (("white_matter" in columns) and ("csf" in columns)) == tissue
    comp = [c for c in columns if "comp_cor" in c]
    assert len(comp) == compcor
    if name == "acompcor":
        assert comp == [f"c_comp_cor_0{k}" for k in range(5)] + [f"w_comp_cor_0{k}" for k in range(5)]
    if name == "acompcor50":  # cumulative 0.2, 0.32, 0.43, 0.55, ...: the 4th reaches 50 %
        assert comp == [f"c_comp_cor_0{k}" for k in range(4)] + [f"w_comp_cor_0{k}" for k in range(4)]
    assert ("global_signal" in columns) == gsr
    assert strategy.censor == (name == "scrubbing")
    matrix = dn.regressor_matrix(table, columns)
    assert matrix.shape == (T, len(columns)) and np.isfinite(matrix).all()
    assert dn.matrix_rank(matrix) == len(columns)
    assert notes == []


def test_compcor_strategies_note_missing_components_and_fail_without_any():
    table, metadata = _table(n_compcor=3)
    columns, notes = dn.regressor_columns(strategy=dn.STRATEGIES["acompcor"], gsr=False, table=table,
                                          metadata=metadata)
    assert len([c for c in columns if "comp_cor" in c]) == 6 and len(notes) == 2
    assert "only 3 aCompCor components exist; 5 were asked for" in notes[0]
    low = {name: {**entry, "CumulativeVarianceExplained": 0.1 * (1 + int(name[-2:]))}
           for name, entry in metadata.items()}                               # 3 components reach 30 % only
    columns, notes = dn.regressor_columns(strategy=dn.STRATEGIES["acompcor50"], gsr=False, table=table,
                                          metadata=low)
    assert len([c for c in columns if "comp_cor" in c]) == 6 and len(notes) == 2 and all("(< 50 %) of the mask's variance; all were used" in n for n in notes)
    without = table.drop(columns=[c for c in table.columns if c.startswith("c_comp_cor_")])
    with pytest.raises(dn.StrategyError, match="no CSF aCompCor components"):
        dn.regressor_columns(strategy=dn.STRATEGIES["acompcor"], gsr=False, table=without, metadata=metadata)


@pytest.mark.parametrize("kwargs, key", [
    ({"denoise": "36P"}, "func.denoise"), ({"gsr": "yes"}, "func.gsr"), ({"high_pass": -0.01}, "func.high_pass"),
    ({"low_pass": 0.005}, "func.low_pass"), ({"standardize": "zscore"}, "func.standardize"),
    ({"fd_threshold": 0}, "func.scrubbing.fd_threshold"), ({"min_segment": 0}, "func.scrubbing.min_segment"),
    ({"denoise": "scrubbing", "fd_threshold": None, "std_dvars_threshold": None}, "func.scrubbing"),
])
def test_bad_settings_are_config_errors_naming_the_key(kwargs, key):
    with pytest.raises(BHConfigError) as info:
        dn.check_denoise(**kwargs)
    assert info.value.key == key


def test_censoring_rules():
    fd = np.array([np.nan, 0.1, 0.6, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1])
    std_dvars = np.array([np.nan, 1.0, 1.0, 1.0, 1.0, 1.6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    only_fd = dn.censor_frames(fd=fd, fd_threshold=0.5, std_dvars_threshold=None)
    assert np.flatnonzero(only_fd).tolist() == [2, 10]                      # n/a (frame 0) is never an outlier
    both = dn.censor_frames(fd=fd, std_dvars=std_dvars, fd_threshold=0.5, std_dvars_threshold=1.5)
    assert np.flatnonzero(both).tolist() == [2, 5, 10]
    # Kept runs shorter than min_segment go too, the leading and trailing ones included.
    segments = dn.censor_frames(fd=fd, std_dvars=std_dvars, fd_threshold=0.5, std_dvars_threshold=1.5,
                                min_segment=3)
    assert np.flatnonzero(segments).tolist() == [0, 1, 2, 3, 4, 5, 10, 11]
    assert not dn.censor_frames(fd=fd, fd_threshold=None, std_dvars_threshold=None).any()


def test_interpolation_is_a_spline_inside_and_the_nearest_frame_outside():
    t = np.arange(30, dtype=float)
    values = np.column_stack([t**3 / 1000, np.sin(t / 5)])
    censored = np.zeros(30, bool)
    censored[[0, 1, 12, 13, 14, 29]] = True
    filled = dn.interpolate_censored(values, censored, repetition_time=2.0)
    np.testing.assert_allclose(filled[12:15, 0], values[12:15, 0], rtol=1e-9)   # a cubic is reproduced exactly
    np.testing.assert_allclose(filled[~censored], values[~censored])
    assert (filled[:2] == values[2]).all() and (filled[29] == values[28]).all()


def _series(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    confounds = rng.standard_normal((T, 4))
    signal = rng.standard_normal((T, 5))
    return 1000 + 10 * signal + 30 * confounds @ rng.standard_normal((4, 5)), confounds


def test_uncensored_cleaning_is_nilearns_clean():
    series, confounds = _series()
    ours, notes = dn.clean_parcel_series(series=series, repetition_time=2.0, confounds=confounds, high_pass=0.01,
                                         standardize="psc")
    theirs = clean(series, detrend=True, standardize="psc", confounds=confounds, standardize_confounds=True,
                   filter="butterworth", high_pass=0.01, t_r=2.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-10)
    assert notes == []


def test_censored_path_with_nothing_censored_matches_nilearn():
    """The censored path (filter, fit on kept frames, scale) is nilearn's clean when every frame is kept."""
    series, confounds = _series()
    keep = np.ones(T, bool)
    filled = dn._nilearn_clean(series, detrend=True, standardize=None, filter="butterworth", high_pass=0.01,
                               low_pass=None, t_r=2.0)
    regressors = dn._nilearn_clean(confounds, detrend=True, standardize=None, filter="butterworth",
                                   high_pass=0.01, low_pass=None, t_r=2.0)
    ours = dn._project_out(filled[keep], regressors[keep])
    theirs = clean(series, detrend=True, standardize=None, confounds=confounds, standardize_confounds=True,
                   filter="butterworth", high_pass=0.01, t_r=2.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-8)


def test_censored_frames_never_reach_the_output():
    """Spikes in censored frames change nothing; the rows are the kept frames; regression fits kept frames only."""
    series, confounds = _series()
    censored = np.zeros(T, bool)
    censored[[5, 14, 60, 61, 62, T - 1]] = True   # 5 and 14 mirror each other in a 20-frame run: not here
    spiked = series.copy()
    spiked[censored] += 5000.0
    spiked_confounds = confounds.copy()
    spiked_confounds[censored] -= 40.0
    for standardize in ("psc", "zscore_sample", False):
        a, _ = dn.clean_parcel_series(series=series, repetition_time=2.0, confounds=confounds, censored=censored,
                                      high_pass=0.01, standardize=standardize)
        b, _ = dn.clean_parcel_series(series=spiked, repetition_time=2.0, confounds=spiked_confounds,
                                      censored=censored, high_pass=0.01, standardize=standardize)
        assert a.shape == (T - censored.sum(), 5)
        np.testing.assert_allclose(a, b, atol=1e-8)
    # The output is orthogonal to the filtered regressors on the kept frames.
    cleaned, _ = dn.clean_parcel_series(series=series, repetition_time=2.0, confounds=confounds, censored=censored,
                                        high_pass=0.01, standardize=False)
    filtered = dn._nilearn_clean(dn.interpolate_censored(confounds, censored, 2.0), detrend=True, standardize=None,
                                 filter="butterworth", high_pass=0.01, low_pass=None, t_r=2.0)[~censored]
    assert np.abs((filtered - filtered.mean(0)).T @ cleaned).max() < 1e-6


def test_mirrored_censored_frames_stay_out_unlike_nilearn_sample_mask():
    """nilearn 0.13.1's clean(sample_mask=...) with a filter interpolates the mirror frames (T-1-i) instead
    of the censored ones: frames 5 and 14 of 20 mirror each other, so their spikes reach the filter there."""
    rng = np.random.default_rng(4)
    series = rng.standard_normal((20, 1)) + 10
    censored = np.zeros(20, bool)
    censored[[5, 14]] = True
    spiked = series.copy()
    spiked[censored] += 100.0
    ours = dn.clean_parcel_series(series=spiked, repetition_time=1.0, censored=censored, high_pass=0.05,
                                  standardize=False)[0]
    reference = dn.clean_parcel_series(series=series, repetition_time=1.0, censored=censored, high_pass=0.05,
                                       standardize=False)[0]
    np.testing.assert_allclose(ours, reference, atol=1e-9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = clean(spiked, detrend=True, standardize=None, filter="butterworth", high_pass=0.05, t_r=1.0,
                       sample_mask=np.flatnonzero(~censored))
    assert np.abs(theirs - reference).max() > 1.0   # documents the library behaviour we avoid


def test_degrees_of_freedom_bookkeeping():
    duplicated = np.column_stack([np.arange(T), np.arange(T) * 2.0, np.ones(T), np.random.default_rng(0).normal(
        size=T)])
    assert dn.matrix_rank(duplicated) == 2                                   # constant and duplicate dropped
    assert dn.matrix_rank(np.zeros((T, 0))) == 0
    # 100 frames of 1.5 s = 150 s: bins at k / 150 Hz; below 0.01 Hz: k = 1 (0.0067 Hz): sine + cosine.
    assert dn.filter_bins_removed(n_frames=100, repetition_time=1.5, high_pass=0.01, low_pass=None) == 2
    assert dn.filter_bins_removed(n_frames=100, repetition_time=1.5, high_pass=None, low_pass=None) == 0
    # A band-pass also removes everything above 0.1 Hz up to Nyquist (1 / 3 Hz), the Nyquist bin counted once.
    assert dn.filter_bins_removed(n_frames=100, repetition_time=1.5, high_pass=0.01, low_pass=0.1) == 2 + 2 * 34 + 1


@pytest.mark.parametrize("name", list(dn.STRATEGIES))
def test_methods_text_names_the_strategy_and_its_reference(name):
    text = dn.describe_methods(config={"func": {"denoise": name, "high_pass": 0.01, "standardize": "psc",
                                                "scrubbing": {"fd_threshold": 0.5, "std_dvars_threshold": 1.5,
                                                              "min_segment": 5}}})
    assert f"'{name}' strategy" in text and "high-pass filtering at 0.01 Hz" in text
    assert ("censored" in text) == (name == "scrubbing")
    if name == "scrubbing":
        assert "FD above 0.5 mm or standardised DVARS above 1.5" in text and "fewer than 5 frames" in text
    if dn.STRATEGIES[name].reference:
        assert dn.STRATEGIES[name].reference in text
    gsr = dn.describe_methods(config={"func": {"denoise": name, "gsr": True}})
    assert "global signal" in gsr
