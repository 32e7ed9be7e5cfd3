"""Tests of bh_models.func.confounds: fMRIPrep's columns, computed like nipype computes them on a 4-D image.

The reference is nipype itself, run as fMRIPrep runs it, on a small real 4-D
NIfTI with real mask files; our functions see only the masked voxels' series
(the chain never builds a native 4-D image), laid out as a pseudo-4-D image.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bh_models.func import confounds as conf
from bh_models.func.motion import framewise_displacement

TR = 2.0
SHAPE = (10, 10, 10)
T = 160  # 320 s: the 128 s cosine filter has a few cosines


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> dict:
    """A small 4-D run with structured noise in a 'CSF' and a 'WM' block, and its masks on disk."""
    root = tmp_path_factory.mktemp("confounds")
    rng = np.random.default_rng(0)
    sources = rng.standard_normal((T, 3))
    data = 1000 + 5 * rng.standard_normal(SHAPE + (T,))
    data += (np.indices(SHAPE)[0][..., None] / 10) * (sources[:, 0] * 20)     # a gradient everyone sees
    data[2:5, 2:5, 2:5] += sources[:, 1] * 30                                 # "CSF"
    data[5:8, 5:8, 5:8] += sources[:, 2] * 25                                 # "WM"
    data += np.linspace(0, 8, T)                                              # drift
    data[3, 6, 2] += 40 * rng.standard_normal(T)                             # one very variable voxel
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((3.0, 3.0, 3.0, TR))
    bold = root / "bold.nii.gz"
    nib.save(img, bold)
    masks = {"brain": np.zeros(SHAPE, bool), "CSF": np.zeros(SHAPE, bool), "WM": np.zeros(SHAPE, bool)}
    masks["brain"][1:9, 1:9, 1:9] = True
    masks["CSF"][2:5, 2:5, 2:5] = True
    masks["WM"][5:8, 5:8, 5:8] = True
    masks["combined"] = masks["CSF"] | masks["WM"]
    files = {}
    for name, mask in masks.items():
        files[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), files[name])
    return {"root": root, "bold": bold, "data": np.asarray(img.dataobj), "masks": masks, "files": files}


def _nipype_acompcor(image: dict, work: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """fMRIPrep's ACompCor node on the 4-D file (every component; fMRIPrep names per mask come later)."""
    from nipype.algorithms.confounds import ACompCor

    work.mkdir()
    result = ACompCor(realigned_file=str(image["bold"]),
                      mask_files=[str(image["files"][n]) for n in ("CSF", "WM", "combined")],
                      mask_names=["CSF", "WM", "combined"], merge_method="none", num_components="all",
                      components_file="acompcor.tsv", header_prefix="a_comp_cor_", pre_filter="cosine",
                      save_pre_filter=True, save_metadata=True, repetition_time=TR,
                      failure_mode="NaN").run(cwd=str(work))
    return (pd.read_csv(result.outputs.components_file, sep="\t"),
            pd.read_csv(result.outputs.metadata_file, sep="\t"))


def test_acompcor_equals_nipype_on_the_4d_image_with_fmriprep_names(image, tmp_path):
    theirs, meta = _nipype_acompcor(image, tmp_path / "nipype")
    union = image["masks"]["combined"]
    series = image["data"][union].T                                            # (T, V) voxel series
    local = {n: image["masks"][n][union] for n in ("CSF", "WM", "combined")}    # masks over those voxels
    (tmp_path / "ours").mkdir()
    ours, metadata = conf.acompcor(series=series, masks=local, repetition_time=TR, work=tmp_path / "ours")
    for mask, prefix in (("CSF", "c_comp_cor_"), ("WM", "w_comp_cor_"), ("combined", "a_comp_cor_")):
        rows = meta[meta["mask"] == mask]
        written = [c for c in ours.columns if c.startswith(prefix)]
        expected = conf.n_columns_to_write(rows["cumulative_variance_explained"].to_numpy())
        assert written == [f"{prefix}{k:02d}" for k in range(expected)]
        assert expected >= conf.COMPCOR_TOP_K
        for k, column in enumerate(written):
            row = rows.iloc[k]
            # nipype numbers its columns on across masks: CSF first, then WM, then combined.
            np.testing.assert_allclose(ours[column], theirs[row["component"]], atol=2e-6)
            entry = metadata[column]
            assert entry["Mask"] == mask and entry["Method"] == "aCompCor" and entry["Retained"] is True
            assert entry["VarianceExplained"] == pytest.approx(row["variance_explained"], rel=1e-6)
            assert entry["CumulativeVarianceExplained"] == pytest.approx(row["cumulative_variance_explained"],
                                                                         rel=1e-6)
            assert entry["SingularValue"] == pytest.approx(row["singular_value"], rel=1e-6)
    # The planted sources are found: each mask's first component follows its own source.
    assert abs(np.corrcoef(ours["c_comp_cor_00"], image["data"][2:5, 2:5, 2:5].mean((0, 1, 2)))[0, 1]) > 0.9


def test_tcompcor_dvars_and_fd_equal_nipype(image, tmp_path):
    from nipype.algorithms.confounds import ComputeDVARS, TCompCor

    brain = image["masks"]["brain"]
    series = image["data"][brain].T
    for name in ("nipype_t", "nipype_d", "ours_t", "ours_d"):
        (tmp_path / name).mkdir()
    theirs = TCompCor(realigned_file=str(image["bold"]), mask_files=[str(image["files"]["brain"])],
                      percentile_threshold=0.02, num_components="all", components_file="tcompcor.tsv",
                      header_prefix="t_comp_cor_", pre_filter="cosine", save_pre_filter=True, save_metadata=True,
                      repetition_time=TR, failure_mode="NaN").run(cwd=str(tmp_path / "nipype_t"))
    ours, metadata, high_variance = conf.tcompcor(series=series, repetition_time=TR, work=tmp_path / "ours_t")
    components = pd.read_csv(theirs.outputs.components_file, sep="\t")
    t_columns = [c for c in ours.columns if c.startswith("t_comp_cor_")]
    assert len(t_columns) >= conf.COMPCOR_TOP_K
    for column in t_columns:
        np.testing.assert_allclose(ours[column], components[column], atol=2e-6)
        assert metadata[column]["Method"] == "tCompCor" and "Mask" not in metadata[column]
    basis = pd.read_csv(theirs.outputs.pre_filter_file, sep="\t")
    cosines = [c for c in basis.columns if c.startswith("Cosine")]
    names = [f"cosine_{k:02d}" for k in range(len(cosines))]
    assert len(cosines) >= 2 and [c for c in ours.columns if c.startswith("cosine_")] == names
    np.testing.assert_allclose(ours[names].to_numpy(), basis[cosines].to_numpy(), atol=1e-8)
    mask_path = theirs.outputs.high_variance_masks
    nipype_mask = np.asarray(nib.load(mask_path if isinstance(mask_path, str) else mask_path[0]).dataobj) > 0
    assert np.array_equal(high_variance, nipype_mask[brain])
    assert high_variance[np.flatnonzero(brain.ravel() == 1).tolist().index(np.ravel_multi_index((3, 6, 2), SHAPE))]

    dv = ComputeDVARS(in_file=str(image["bold"]), in_mask=str(image["files"]["brain"]), save_std=True,
                      save_nstd=True, remove_zerovariance=True).run(cwd=str(tmp_path / "nipype_d"))
    nstd, std = conf.dvars(series=series, repetition_time=TR, work=tmp_path / "ours_d")
    assert np.isnan(nstd[0]) and np.isnan(std[0]) and len(nstd) == T
    np.testing.assert_allclose(nstd[1:], np.loadtxt(dv.outputs.out_nstd), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std[1:], np.loadtxt(dv.outputs.out_std), rtol=1e-5, atol=1e-5)

    params = np.cumsum(np.random.default_rng(1).normal(0, [0.05, 0.05, 0.05, 0.001, 0.001, 0.001], (T, 6)), 0)
    fd = framewise_displacement(params=params)
    manual = np.abs(np.diff(params[:, :3], axis=0)).sum(1) + 50 * np.abs(np.diff(params[:, 3:], axis=0)).sum(1)
    np.testing.assert_allclose(fd[1:], manual, atol=1e-6)


def test_compute_confounds_writes_fmriprep_columns(image, tmp_path):
    brain, masks = image["masks"]["brain"], image["masks"]
    flat = np.flatnonzero(brain)
    rows = lambda m: np.searchsorted(flat, np.flatnonzero(m & brain))  # noqa: E731
    sets = conf.VoxelSets(brain=rows(brain), masks={n: rows(masks[n]) for n in ("CSF", "WM", "combined")},
                          grey=rows(brain & ~masks["combined"]))
    series = image["data"][brain].T
    params = np.cumsum(np.random.default_rng(2).normal(0, [0.1, 0.1, 0.1, 0.002, 0.002, 0.002], (T, 6)), 0)
    params[40] += [1.5, 0, 0, 0, 0, 0]                                         # a jerk: FD > 0.5 twice
    fd = framewise_displacement(params=params)
    result = conf.compute_confounds(series=series, sets=sets, params=params, fd=fd, repetition_time=TR)
    table = result.table
    assert len(table) == T
    expected = ["global_signal", "global_signal_derivative1", "global_signal_power2",
                "global_signal_derivative1_power2", "csf", "csf_derivative1", "csf_power2", "csf_derivative1_power2",
                "white_matter", "white_matter_derivative1", "white_matter_power2",
                "white_matter_derivative1_power2", "csf_wm", "tcompcor", "std_dvars", "dvars",
                "framewise_displacement"]
    assert list(table.columns[:len(expected)]) == expected
    for prefix in ("t_comp_cor_", "c_comp_cor_", "w_comp_cor_", "a_comp_cor_"):
        assert f"{prefix}00" in table and f"{prefix}04" in table
    assert {"cosine_00", "cosine_01", "trans_x", "rot_z_derivative1_power2"} <= set(table.columns)
    spikes = [c for c in table.columns if c.startswith("motion_outlier_")]
    assert len(spikes) >= 2 and table.loc[40, spikes].sum() == 1 and table.loc[41, spikes].sum() == 1
    np.testing.assert_allclose(table["global_signal"], series.mean(axis=1, dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(table["csf"], image["data"][masks["CSF"]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(table["white_matter"], image["data"][masks["WM"]].mean(axis=0), rtol=1e-6)
    # fMRIPrep writes n/a in the first row of every derivative, and of FD and DVARS.
    for column in ("csf_derivative1", "trans_x_derivative1_power2", "framewise_displacement", "dvars", "std_dvars"):
        assert np.isnan(table[column].iloc[0]) and np.isfinite(table[column].iloc[1:]).all(), column
    np.testing.assert_allclose(table["trans_y_derivative1_power2"].iloc[1:], np.diff(params[:, 1]) ** 2)
    assert result.mask_voxels["CSF"] == 27 and result.mask_voxels["WM"] == 27
    assert result.tsnr_gm == pytest.approx(conf.temporal_snr(series[:, sets.grey]))
    json.dumps(result.metadata)  # the sidecar is plain JSON
    assert result.metadata["csf"]["Method"] == "Mean" and result.metadata["trans_x"]["Units"] == "mm"


def test_a_mask_too_small_gives_no_columns_and_a_note(image):
    brain, masks = image["masks"]["brain"], image["masks"]
    flat = np.flatnonzero(brain)
    rows = lambda m: np.searchsorted(flat, np.flatnonzero(m & brain))  # noqa: E731
    tiny = np.zeros(SHAPE, bool)
    tiny[2, 2, 2:5] = True                                                     # 3 voxels
    sets = conf.VoxelSets(brain=rows(brain), masks={"CSF": rows(tiny), "WM": rows(masks["WM"]),
                                                   "combined": rows(masks["combined"])}, grey=rows(brain))
    result = conf.compute_confounds(series=image["data"][brain].T, sets=sets, params=np.zeros((T, 6)),
                                    fd=np.r_[np.nan, np.zeros(T - 1)], repetition_time=TR)
    assert not any(c.startswith("c_comp_cor_") for c in result.table.columns)
    assert "w_comp_cor_00" in result.table
    assert any("fewer than 10 voxels" in note and "CSF (3)" in note for note in result.notes)


def test_compcor_masks_exclude_dilated_grey_matter_from_wm_not_from_csf():
    shape = (40, 40, 40)
    labels = np.full(shape, 1)                                                 # WM
    labels[:, :, :8] = 0                                                       # GM slab, z < 8
    labels[15:25, 15:25, 20:30] = 2                                            # CSF block inside WM
    labels[15:25, 15:25, 8:16] = 2                                             # CSF touching GM
    probseg = {name: (labels == k).astype(np.float32) for k, name in enumerate(("GM", "WM", "CSF"))}
    brain = np.ones(shape, bool)
    masks = conf.compcor_masks(probseg=probseg, brain=brain, grid_mm=1.0, bold_mm=1.0)
    # 1 mm grid: GM dilated by 3 mm covers z <= 10, so WM starts at z = 11 (its own blur costs nothing more).
    assert np.flatnonzero(masks["WM"][30, 30])[0] == 11
    assert masks["CSF"][20, 20, 25] and not masks["WM"][20, 20, 25]
    assert masks["combined"][20, 20, 25] and masks["combined"][30, 30, 20]
    assert masks["CSF"][20, 20, 9:11].all()                                   # CSF keeps its GM border,
    assert not masks["combined"][20, 20, 9:11].any()                          # the combined mask does not
    coarse = conf.compcor_masks(probseg=probseg, brain=brain, grid_mm=1.0, bold_mm=4.0)
    assert coarse["WM"].sum() < masks["WM"].sum()                             # larger BOLD voxels: smaller WM
    cut = conf.compcor_masks(probseg=probseg, brain=np.zeros(shape, bool), grid_mm=1.0, bold_mm=1.0)
    assert not any(m.any() for m in cut.values())


def test_expansion_and_column_rules():
    table = pd.DataFrame({"a": [1.0, 3.0, 2.0]})
    out = conf.expand_terms(table, ["a"])
    assert list(out.columns) == ["a", "a_derivative1", "a_power2", "a_derivative1_power2"]
    assert np.isnan(out["a_derivative1"][0]) and out["a_derivative1"].tolist()[1:] == [2.0, -1.0]
    assert out["a_derivative1_power2"].tolist()[1:] == [4.0, 1.0] and out["a_power2"].tolist() == [1.0, 9.0, 4.0]
    assert list(conf.motion_table(np.zeros((4, 6))).columns[:4]) == [
        "trans_x", "trans_x_derivative1", "trans_x_power2", "trans_x_derivative1_power2"]
    # Columns written per CompCor set: the 50 % set, at least 5, at most 10, never more than exist.
    assert conf.n_columns_to_write(np.array([0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0])) == 5
    assert conf.n_columns_to_write(np.linspace(0.05, 1.0, 20)) == 10
    assert conf.n_columns_to_write(np.linspace(0.1, 1.0, 10)[:7]) == 5
    assert conf.n_columns_to_write(np.array([0.3, 0.45, 0.55, 1.0])) == 4
    assert conf.components_for_variance(np.array([0.3, 0.45, 0.55, 1.0])) == 3
    lattice = conf.brain_lattice(np.ones((5, 5, 5), bool), 2)
    assert lattice.sum() == 27 and lattice[0, 2, 4] and not lattice[1, 2, 4]
    spikes = conf.spike_regressors(fd=np.array([np.nan, 0.1, 0.6, 0.1]), std_dvars=np.array([np.nan, 2.0, 1.0, 1.0]))
    assert list(spikes.columns) == ["motion_outlier_00", "motion_outlier_01"]
    assert spikes["motion_outlier_00"].tolist() == [0, 1, 0, 0] and spikes["motion_outlier_01"].tolist() == [0, 0, 1, 0]
    flat = np.ones((20, 3)) * 100
    flat[:, 0] += np.arange(20) % 2                                            # mean 100.5, std 0.5 -> 201
    assert conf.temporal_snr(flat) == pytest.approx(201.0)                   # flat voxels are left out
