"""End-to-end tests of bh_models.func.preprocess.preprocess_bold on a small synthetic subject.

The subject is the MNI152 2009c brain placed in a native frame by a known rigid
``S`` (MNI point -> T1w point, 18 degrees about z); its BOLD run sits in the
same head moved by a second rigid ``P`` (T1w point -> BOLD point, 18 mm
in-plane), has 4 mm voxels, 40 volumes, small random head motion, and carries
an independent random series in every Schaefer-400 parcel (2 % of an EPI-like
baseline). The anatomical inputs come from
:func:`bh_models.anat.registration.register_to_template` (``Rigid`` preset) at 4 mm,
and the template grid is 4 mm, so a whole run takes a few seconds.

``S`` and ``P`` are chosen so that composing the transforms in the wrong order
misplaces the atlas by about 7 mm on average: the parcel-series correlation
check then fails (median ~0.34, 5th percentile ~0.0, against ~0.47 and ~0.30
for the right order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.func.preprocess import func_qc_table, preprocess_bold
from bh_models.anat.registration import limit_itk_threads, register_to_template
from bh_models.anat.tissues import tissue_priors
from bh_models.func.denoise import censor_frames
from bh_models.core.templates import atlas_in_template_space, atlas_labels, load_template

RESOLUTION = 4.0  # template grid of the outputs (mm)
N_VOLUMES = 40
HEADER_TR = 1.0  # deliberately different from the sidecar's 2.0 s
MOTION_COLUMNS_24 = 24


def rigid(degrees, shift) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    out[:3, 3] = shift
    return out


def pull(source: np.ndarray, source_affine, out_affine, out_shape, world_map, order: int) -> np.ndarray:
    """out(v) = source(world point ``world_map @ out_affine @ v``), trilinear or nearest."""
    m = np.linalg.inv(source_affine) @ world_map @ out_affine
    return ndimage.affine_transform(source, m[:3, :3], offset=m[:3, 3], output_shape=out_shape, order=order)


S = rigid([5, -4, 18], [6, -8, 5])  # MNI point -> T1w point
P = rigid([3, -2, 5], [18, -16, 4])  # T1w point -> BOLD point


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> dict:
    limit_itk_threads(1)  # effective only if ITK has not started threads in this process yet
    root = tmp_path_factory.mktemp("func_subject")
    rng = np.random.default_rng(0)
    tpl2, mask2, _ = load_template(2.0)
    tpl = np.asarray(tpl2.dataobj, dtype=np.float32)

    # Native T1w (2 mm) and its brain mask.
    t1_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1_affine[:3, 3] = [-80, -115, -70]
    t1_shape = (82, 100, 84)
    s_inv = np.linalg.inv(S)
    t1 = pull(tpl, tpl2.affine, t1_affine, t1_shape, s_inv, 1).astype(np.float32)
    brain = pull(np.asarray(mask2.dataobj, dtype=np.float32), mask2.affine, t1_affine, t1_shape, s_inv, 0)
    t1_img = nib.Nifti1Image(t1, t1_affine)
    nib.save(t1_img, root / "t1w.nii.gz")
    nib.save(nib.Nifti1Image((brain > 0.5).astype(np.uint8), t1_affine), root / "t1w_mask.nii.gz")

    # Anatomical forward transform and MNI-grid mask, T1w and tissue posteriors at the output resolution
    # (the posteriors: the template priors inside the mask, normalised, as a segmentation would give).
    template, mni_mask, _ = load_template(RESOLUTION)
    register_to_template(moving=t1_img, template=template, out_forward=root / "t1w_to_mni.h5",
                         out_inverse=root / "mni_to_t1w.h5", type_of_transform="Rigid", seed=1)
    nib.save(mni_mask, root / "mni_mask.nii.gz")
    nib.save(template, root / "mni_t1w.nii.gz")
    inside = np.asarray(mni_mask.dataobj) > 0
    priors = tissue_priors(RESOLUTION)
    total = sum(priors.values()) + 1e-6
    for name in ("GM", "WM", "CSF"):
        nib.save(nib.Nifti1Image((priors[name] / total * inside).astype(np.float32), mni_mask.affine),
                 root / f"{name.lower()}_probseg.nii.gz")

    # BOLD: EPI-like contrast, parcel signals, per-volume rigid motion.
    epi = ndimage.gaussian_filter(np.where(tpl > 0.05 * tpl.max(), 1.5 * tpl.max() - tpl, 0.0), 1.0)
    labels = np.asarray(atlas_in_template_space(7, 2.0).dataobj).astype(np.float32)
    signals = ndimage.gaussian_filter1d(rng.standard_normal((N_VOLUMES, 401)), 1.0, axis=0)
    signals[:, 0] = 0.0
    signals /= signals[:, 1:].std(axis=0).mean()
    motion = np.stack([rigid(rng.normal(0, 0.2, 3), rng.normal(0, 0.2, 3)) for _ in range(N_VOLUMES)])
    bold_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    bold_affine[:3, 3] = [-80, -140, -75]
    bold_shape = (50, 58, 46)
    data = np.empty((*bold_shape, N_VOLUMES), dtype=np.float32, order="F")
    for t in range(N_VOLUMES):
        world = s_inv @ np.linalg.inv(P) @ np.linalg.inv(motion[t])  # BOLD_t point -> MNI point
        base = pull(epi, tpl2.affine, bold_affine, bold_shape, world, 1)
        label = pull(labels, tpl2.affine, bold_affine, bold_shape, world, 0).astype(int)
        noise = rng.normal(0, 0.005 * epi.max(), bold_shape) * (base > 0)
        data[..., t] = base * (1 + 0.02 * signals[t, label]) + noise
    bold = root / "sub-01_task-rest_bold.nii.gz"
    save_bold(data, bold_affine, bold)
    return {
        "root": root, "bold": bold, "data": data, "affine": bold_affine, "signals": signals[:, 1:],
        "anat": {"t1w": root / "t1w.nii.gz", "t1w_mask": root / "t1w_mask.nii.gz",
                 "t1w_to_mni": root / "t1w_to_mni.h5", "mni_mask": root / "mni_mask.nii.gz",
                 "mni_t1w": root / "mni_t1w.nii.gz", "gm_probseg": root / "gm_probseg.nii.gz",
                 "wm_probseg": root / "wm_probseg.nii.gz", "csf_probseg": root / "csf_probseg.nii.gz"},
    }


def save_bold(data: np.ndarray, affine: np.ndarray, path: Path, tr: float = HEADER_TR) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], tr))
    nib.save(img, path)
    return path


def outputs(folder: Path) -> dict:
    return {"out_timeseries": folder / "ts.tsv", "out_confounds": folder / "confounds.tsv",
            "out_carpet": folder / "carpet.png", "out_rois": folder / "rois.png"}


def run(subject: dict, folder: Path, *, bold: Path | None = None, **kwargs) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    args = {"bold": bold or subject["bold"], **subject["anat"], **outputs(folder), "resolution": RESOLUTION,
            "tr_sidecar": 2.0, "denoise": "24P", "gsr": False}   # 24P unless a test names another strategy
    args.update(kwargs)
    return preprocess_bold(**args)


@pytest.fixture(scope="module")
def default_run(subject, tmp_path_factory) -> tuple[Path, dict]:
    """24P cleaning; sidecar TR 2.0 s against a header TR of 1.0 s."""
    folder = tmp_path_factory.mktemp("run_default")
    return folder, run(subject, folder)


@pytest.fixture(scope="module")
def override_run(subject, tmp_path_factory) -> tuple[Path, dict, list[int]]:
    """Config TR override, two parcels outside the mask, no denoising at all, MNI BOLD kept."""
    folder = tmp_path_factory.mktemp("run_override")
    template, mask, _ = load_template(RESOLUTION)
    atlas = np.asarray(atlas_in_template_space(7, RESOLUTION).dataobj)
    dropped = [3, 250]
    reduced = (np.asarray(mask.dataobj) > 0) & ~np.isin(atlas, dropped)
    nib.save(nib.Nifti1Image(reduced.astype(np.uint8), mask.affine), folder / "mni_mask_reduced.nii.gz")
    result = run(subject, folder, mni_mask=folder / "mni_mask_reduced.nii.gz", tr_override=0.8,
                 denoise="none", detrend=False, high_pass=None, standardize=False,
                 save_mni_bold=True, out_mni_bold=folder / "bold_mni.nii.gz")
    return folder, result, dropped


@pytest.fixture(scope="module")
def scrubbing_run(subject, default_run, tmp_path_factory) -> tuple[Path, dict, float]:
    """The scrubbing strategy, its FD threshold set so that the three largest FD values are above it."""
    folder = tmp_path_factory.mktemp("run_scrubbing")
    fd = pd.read_csv(default_run[0] / "confounds.tsv", sep="\t")["framewise_displacement"].to_numpy()
    threshold = float(np.sort(fd[1:])[-4:-2].mean())  # halfway: the TSV's 6 digits cannot move a frame across
    result = run(subject, folder, denoise="scrubbing", fd_threshold=threshold, std_dvars_threshold=None,
                 min_segment=3)
    return folder, result, threshold


def test_outputs_of_a_default_run(subject, default_run):
    folder, result = default_run
    names = list(atlas_labels(7)["name"])

    series = pd.read_csv(folder / "ts.tsv", sep="\t")
    assert series.shape == (N_VOLUMES, 400)
    assert list(series.columns) == names
    assert np.isfinite(series.to_numpy()).all()

    meta = json.loads((folder / "ts.json").read_text())
    assert meta["RepetitionTime"] == 2.0 and meta["RepetitionTimeSource"] == "sidecar"
    assert meta["NumberOfVolumes"] == N_VOLUMES and meta["NumberOfRows"] == N_VOLUMES
    assert meta["NumberOfCensoredFrames"] == 0 and meta["CensoredFrames"] == []
    assert meta["EmptyParcels"] == []
    assert meta["Space"] == "MNI152NLin2009cAsym" and meta["Resolution"] == RESOLUTION
    assert meta["Atlas"] == "Schaefer2018_400Parcels_7Networks" and meta["NumberOfParcels"] == 400
    assert meta["Cleaning"] == {"strategy": "24P", "gsr": False, "detrend": True, "high_pass": 0.01,
                                "low_pass": None, "standardize": "psc", "method": "nilearn.signal.clean",
                                "censoring": None}
    assert meta["Strategy"] == "24P" and len(meta["Regressors"]) == MOTION_COLUMNS_24
    assert meta["TemporalDegreesOfFreedomLost"] == MOTION_COLUMNS_24
    assert meta["DegreesOfFreedom"] == {"Frames": N_VOLUMES, "Censored": 0, "RegressorRank": MOTION_COLUMNS_24,
                                        "Lost": MOTION_COLUMNS_24, "Remaining": N_VOLUMES - MOTION_COLUMNS_24,
                                        "FilterBins": 0}  # 80 s: the first bin, 0.0125 Hz, is above 0.01 Hz
    # Sidecar wins over the header, and the disagreement travels with the output.
    assert any("header TR 1 s disagrees with the sidecar TR 2 s" in w for w in meta["warnings"])
    assert meta["AtlasVoxelsInFieldOfView"] > 0.99
    assert meta["CoregistrationMutualInformation"] < -0.5

    confounds = pd.read_csv(folder / "confounds.tsv", sep="\t", na_values="n/a")
    assert len(confounds) == N_VOLUMES
    for column in ("global_signal", "csf", "white_matter", "csf_wm", "tcompcor", "std_dvars", "dvars",
                   "framewise_displacement", "t_comp_cor_00", "c_comp_cor_00", "w_comp_cor_04", "a_comp_cor_00",
                   "trans_x", "rot_z_derivative1_power2", "white_matter_derivative1", "censored"):
        assert column in confounds, column
    assert meta["Regressors"] == [c for c in confounds.columns if c.startswith(("trans_", "rot_"))]
    fd = confounds["framewise_displacement"].to_numpy()
    assert np.isnan(fd[0]) and (confounds["censored"] == 0).all()
    assert meta["MeanFD"] == pytest.approx(np.nanmean(fd), rel=1e-5)
    assert meta["MaxFD"] == pytest.approx(np.nanmax(fd), rel=1e-5)
    assert meta["MeanDVARS"] == pytest.approx(confounds["dvars"].mean(), rel=1e-5)
    assert meta["MeanStdDVARS"] == pytest.approx(confounds["std_dvars"].mean(), rel=1e-5)
    assert 5 < meta["TSNRGreyMatter"] < 500
    sidecar = json.loads((folder / "confounds.json").read_text())
    assert sidecar["RepetitionTime"] == 2.0
    assert sidecar["c_comp_cor_00"]["Mask"] == "CSF" and sidecar["w_comp_cor_00"]["Mask"] == "WM"
    assert sidecar["a_comp_cor_00"]["Mask"] == "combined" and sidecar["t_comp_cor_00"]["Method"] == "tCompCor"
    assert 0 < sidecar["c_comp_cor_00"]["VarianceExplained"] <= sidecar["c_comp_cor_01"]["CumulativeVarianceExplained"]
    assert min(sidecar["MaskVoxels"][n] for n in ("CSF", "WM", "combined")) >= 10
    assert sidecar["Columns"] == list(confounds.columns)

    for png in ("carpet.png", "rois.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["repetition_time"] == 2.0 and result["n_volumes"] == N_VOLUMES
    assert result["n_frames_kept"] == N_VOLUMES and result["warnings"] == meta["warnings"]
    assert result["strategy"] == "24P" and result["tdof_lost"] == MOTION_COLUMNS_24


def test_parcel_series_follow_the_planted_signals(subject, default_run):
    """Transforms composed the right way round: each parcel correlates with its own planted series."""
    folder, _ = default_run
    series = pd.read_csv(folder / "ts.tsv", sep="\t").to_numpy()
    truth = subject["signals"]
    own = np.array([np.corrcoef(series[:, p], truth[:, p])[0, 1] for p in range(400)])
    other = np.array([np.corrcoef(series[:, p], truth[:, (p + 7) % 400])[0, 1] for p in range(400)])
    # 24 regressors and a high-pass on 40 frames leave part of the signal; wrong order gives ~0.34 / ~0.0.
    assert np.median(own) > 0.42 and np.percentile(own, 5) > 0.18
    assert abs(np.median(other)) < 0.05


def _run_in_fresh_process(subject: dict, folder: Path) -> None:
    """preprocess_bold in a new interpreter, as a Snakemake job runs it (ITK not started yet)."""
    args = {"bold": str(subject["bold"]), **{k: str(v) for k, v in subject["anat"].items()},
            **{k: str(v) for k, v in outputs(folder).items()}, "resolution": RESOLUTION, "tr_sidecar": 2.0}
    code = ("import json, sys\nfrom bh_models.func.preprocess import preprocess_bold\n"
            "preprocess_bold(**json.loads(sys.argv[1]), threads=2)\n")
    subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, cwd=Path(__file__).parents[2],
                   env={**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "2"})  # as the runner sets it


@pytest.mark.slow
def test_two_runs_write_identical_bytes(subject, tmp_path):
    """Two jobs with the same inputs write byte-identical TSV, JSON and PNG files (seed 0 included)."""
    _run_in_fresh_process(subject, tmp_path / "a")
    _run_in_fresh_process(subject, tmp_path / "b")
    for name in ("ts.tsv", "ts.json", "confounds.tsv", "confounds.json", "carpet.png", "rois.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_override_and_empty_parcels(subject, override_run):
    folder, result, dropped = override_run
    names = list(atlas_labels(7)["name"])
    meta = json.loads((folder / "ts.json").read_text())
    assert meta["RepetitionTime"] == 0.8 and meta["RepetitionTimeSource"] == "override"
    assert any("tr_override 0.8 s replaces the sidecar RepetitionTime 2 s" in w for w in meta["warnings"])
    assert any("header TR 1 s disagrees with the override TR 0.8 s" in w for w in meta["warnings"])
    assert meta["Strategy"] == "none" and meta["Regressors"] == [] and meta["TemporalDegreesOfFreedomLost"] == 0
    series = pd.read_csv(folder / "ts.tsv", sep="\t")
    assert series.shape == (N_VOLUMES, 400)
    assert meta["EmptyParcels"] == [names[i - 1] for i in dropped]
    assert (series[meta["EmptyParcels"]] == 0).all().all()
    assert list(series.columns) == names
    # Every confound is written whatever the strategy regresses.
    confounds = pd.read_csv(folder / "confounds.tsv", sep="\t")
    assert {"trans_x_derivative1_power2", "c_comp_cor_00", "global_signal"} <= set(confounds.columns)


def test_scrubbing_censors_and_keeps_the_books(subject, scrubbing_run):
    folder, result, threshold = scrubbing_run
    meta = json.loads((folder / "ts.json").read_text())
    confounds = pd.read_csv(folder / "confounds.tsv", sep="\t", na_values="n/a")
    fd = confounds["framewise_displacement"].to_numpy()
    expected = censor_frames(fd=fd, fd_threshold=threshold, std_dvars_threshold=None, min_segment=3)
    assert 3 <= expected.sum() < N_VOLUMES - 30                                  # the three largest FD and neighbours
    assert (np.nan_to_num(fd) > threshold).sum() == 3
    assert meta["CensoredFrames"] == np.flatnonzero(expected).tolist()
    assert meta["NumberOfCensoredFrames"] == int(expected.sum()) == result["n_censored"]
    assert confounds["censored"].to_numpy().nonzero()[0].tolist() == meta["CensoredFrames"]
    series = pd.read_csv(folder / "ts.tsv", sep="\t")
    assert series.shape == (N_VOLUMES - expected.sum(), 400) and np.isfinite(series.to_numpy()).all()
    assert result["n_frames_kept"] == N_VOLUMES - expected.sum() == meta["NumberOfRows"]
    # 24 motion regressors + WM + CSF; every censored frame is one more degree of freedom lost.
    assert len(meta["Regressors"]) == 26 and meta["Regressors"][-2:] == ["white_matter", "csf"]
    assert meta["DegreesOfFreedom"]["RegressorRank"] == 26
    assert meta["TemporalDegreesOfFreedomLost"] == 26 + expected.sum() == result["tdof_lost"]
    assert meta["Cleaning"]["censoring"]["fd_threshold"] == threshold
    assert meta["Cleaning"]["censoring"]["min_segment"] == 3


def test_too_many_regressors_for_the_frames_left_is_a_clear_error(subject, tmp_path):
    with pytest.raises(BHInputError, match="too few for 26 regressors") as info:
        run(subject, tmp_path, denoise="scrubbing", fd_threshold=0.01, std_dvars_threshold=None)
    assert info.value.path == str(subject["bold"])


def test_extraction_matches_nilearn_on_the_mni_bold(subject, override_run):
    """With cleaning off, the TSV is NiftiLabelsMasker's mean of the written MNI BOLD (kept frames)."""
    from nilearn.maskers import NiftiLabelsMasker

    folder, _, dropped = override_run
    meta = json.loads((folder / "ts.json").read_text())
    mni = nib.load(folder / "bold_mni.nii.gz")
    assert mni.shape[3] == N_VOLUMES and mni.header.get_zooms()[3] == pytest.approx(0.8)
    assert json.loads((folder / "bold_mni.json").read_text())["RepetitionTime"] == 0.8
    atlas = atlas_in_template_space(7, RESOLUTION)
    masker = NiftiLabelsMasker(labels_img=atlas, mask_img=folder / "mni_mask_reduced.nii.gz", strategy="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = masker.fit_transform(mni)
    present = np.array([int(v) for k, v in masker.region_ids_.items() if k != "background"])
    assert sorted(set(range(1, 401)) - set(present)) == dropped
    assert meta["CensoredFrames"] == []
    ours = pd.read_csv(folder / "ts.tsv", sep="\t").to_numpy()
    # The TSV stores 6 significant digits.
    np.testing.assert_allclose(ours[:, present - 1], theirs, rtol=1e-5, atol=0)


def test_mixed_trs_and_bold_qc_travel_to_the_cohort_table(default_run, override_run, scrubbing_run, tmp_path):
    first, _ = default_run
    second, *_ = override_run
    third, *_ = scrubbing_run
    table_path = tmp_path / "qc" / "func_qc.tsv"
    summary = func_qc_table(sidecars=[first / "ts.json", second / "ts.json", third / "ts.json"],
                            out_table=table_path)
    table = pd.read_csv(table_path, sep="\t")
    assert summary["n_runs"] == 3 and summary["n_with_empty_parcels"] == 1
    for column in ("MeanFD", "MaxFD", "MeanDVARS", "TSNRGreyMatter", "NumberOfCensoredFrames",
                   "TemporalDegreesOfFreedomLost", "Strategy"):
        assert column in table and table[column].notna().all(), column
    scrubbed = table[table["run"].str.contains(third.name)].iloc[0]
    assert scrubbed["NumberOfCensoredFrames"] > 0 and scrubbed["Strategy"] == "scrubbing"
    assert summary["n_with_censoring"] == 1
    table = table[~table["run"].str.contains(third.name)]
    by_run = dict(zip(table["run"], table["RepetitionTime"]))
    assert sorted(by_run.values()) == [0.8, 2.0]
    assert all(not Path(r).is_absolute() for r in table["run"])
    for folder, tr in ((first, 2.0), (second, 0.8)):
        assert json.loads((folder / "confounds.json").read_text())["RepetitionTime"] == tr
        assert by_run[[r for r in by_run if Path(r).parent.name == folder.name][0]] == tr


def test_no_tr_anywhere_is_a_clear_error(subject, tmp_path):
    with pytest.raises(BHInputError, match="no RepetitionTime") as info:
        run(subject, tmp_path, tr_sidecar=None)
    assert info.value.path == str(subject["bold"])
    assert "header says 1 s" in str(info.value) and "tr_override" in info.value.fix
    assert not (tmp_path / "ts.tsv").exists()


@pytest.mark.parametrize("tr, words", [(0, "not positive"), (-2.0, "not positive"), (12.0, "above 10 s")])
def test_bad_sidecar_tr_names_the_run(subject, tmp_path, tr, words):
    with pytest.raises(BHInputError, match=words) as info:
        run(subject, tmp_path, tr_sidecar=tr)
    assert info.value.path == str(subject["bold"])


def test_bad_tr_override_is_a_config_error(subject, tmp_path):
    with pytest.raises(BHConfigError, match="tr_override"):
        run(subject, tmp_path, tr_override=0.0)


@pytest.mark.parametrize("case, words", [
    ("3d", "is 3D"),
    ("short", "19 volumes, fewer than the minimum 20"),
    ("nan", "NaN"),
])
def test_bad_bold_names_the_file(subject, tmp_path, case, words):
    data = subject["data"]
    if case == "3d":
        bad = data[..., 0]
    elif case == "short":
        bad = data[..., :19]
    else:
        bad = data.copy()
        bad[10, 20, 15, 7] = np.nan
    bold = save_bold(np.asarray(bad), subject["affine"], tmp_path / f"sub-01_task-rest_acq-{case}_bold.nii.gz")
    with pytest.raises(BHInputError, match=words) as info:
        run(subject, tmp_path / "out", bold=bold)
    assert info.value.path == str(bold)
    assert not (tmp_path / "out" / "ts.tsv").exists()


def test_missing_anatomy_names_the_file(subject, tmp_path):
    with pytest.raises(BHInputError, match="anatomical input 't1w_to_mni' is missing") as info:
        run(subject, tmp_path, t1w_to_mni=tmp_path / "absent.h5")
    assert info.value.path == str(tmp_path / "absent.h5")
