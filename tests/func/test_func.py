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

    # Anatomical forward transform and MNI-grid mask at the output resolution.
    template, mni_mask, _ = load_template(RESOLUTION)
    register_to_template(moving=t1_img, template=template, out_forward=root / "t1w_to_mni.h5",
                         out_inverse=root / "mni_to_t1w.h5", type_of_transform="Rigid", seed=1)
    nib.save(mni_mask, root / "mni_mask.nii.gz")

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
                 "t1w_to_mni": root / "t1w_to_mni.h5", "mni_mask": root / "mni_mask.nii.gz"},
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
            "out_carpet": folder / "carpet.png"}


def run(subject: dict, folder: Path, *, bold: Path | None = None, **kwargs) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    args = {"bold": bold or subject["bold"], **subject["anat"], **outputs(folder), "resolution": RESOLUTION,
            "tr_sidecar": 2.0}
    args.update(kwargs)
    return preprocess_bold(**args)


@pytest.fixture(scope="module")
def default_run(subject, tmp_path_factory) -> tuple[Path, dict]:
    """Default cleaning; sidecar TR 2.0 s against a header TR of 1.0 s."""
    folder = tmp_path_factory.mktemp("run_default")
    return folder, run(subject, folder)


@pytest.fixture(scope="module")
def override_run(subject, tmp_path_factory) -> tuple[Path, dict, list[int], float]:
    """Config TR override, FD censoring, two parcels outside the mask, cleaning off, MNI BOLD kept."""
    folder = tmp_path_factory.mktemp("run_override")
    template, mask, _ = load_template(RESOLUTION)
    atlas = np.asarray(atlas_in_template_space(7, RESOLUTION).dataobj)
    dropped = [3, 250]
    reduced = (np.asarray(mask.dataobj) > 0) & ~np.isin(atlas, dropped)
    nib.save(nib.Nifti1Image(reduced.astype(np.uint8), mask.affine), folder / "mni_mask_reduced.nii.gz")
    # FD of this run is ~1.2 mm on average (random 0.2 mm / 0.2 degree jitter per volume).
    result = run(subject, folder, mni_mask=folder / "mni_mask_reduced.nii.gz", tr_override=0.8,
                 fd_threshold=1.6, detrend=False, high_pass=None, motion_regressors=0, standardize=False,
                 save_mni_bold=True, out_mni_bold=folder / "bold_mni.nii.gz")
    return folder, result, dropped, 1.6


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
    assert meta["NumberOfScrubbedFrames"] == 0 and meta["ScrubbedFrames"] == []
    assert meta["EmptyParcels"] == []
    assert meta["Space"] == "MNI152NLin2009cAsym" and meta["Resolution"] == RESOLUTION
    assert meta["Atlas"] == "Schaefer2018_400Parcels_7Networks" and meta["NumberOfParcels"] == 400
    assert meta["Cleaning"] == {"detrend": True, "high_pass": 0.01, "low_pass": None, "motion_regressors": 24,
                                "fd_threshold": None, "standardize": "psc", "method": "nilearn.signal.clean"}
    # Sidecar wins over the header, and the disagreement travels with the output.
    assert any("header TR 1 s disagrees with the sidecar TR 2 s" in w for w in meta["warnings"])
    assert meta["AtlasVoxelsInFieldOfView"] > 0.99
    assert meta["CoregistrationMutualInformation"] < -0.5

    confounds = pd.read_csv(folder / "confounds.tsv", sep="\t")
    assert len(confounds) == N_VOLUMES
    assert confounds.shape[1] == MOTION_COLUMNS_24 + 2
    assert list(confounds.columns[-2:]) == ["framewise_displacement", "censored"]
    fd = confounds["framewise_displacement"].to_numpy()
    assert np.isnan(fd[0]) and (confounds["censored"] == 0).all()
    assert meta["MeanFD"] == pytest.approx(np.nanmean(fd), rel=1e-5)
    assert meta["MaxFD"] == pytest.approx(np.nanmax(fd), rel=1e-5)
    assert json.loads((folder / "confounds.json").read_text())["RepetitionTime"] == 2.0

    assert (folder / "carpet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["repetition_time"] == 2.0 and result["n_volumes"] == N_VOLUMES
    assert result["n_frames_kept"] == N_VOLUMES and result["warnings"] == meta["warnings"]


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
    for name in ("ts.tsv", "ts.json", "confounds.tsv", "confounds.json", "carpet.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_override_scrubbing_and_empty_parcels(subject, override_run):
    folder, result, dropped, threshold = override_run
    names = list(atlas_labels(7)["name"])
    meta = json.loads((folder / "ts.json").read_text())
    assert meta["RepetitionTime"] == 0.8 and meta["RepetitionTimeSource"] == "override"
    assert any("tr_override 0.8 s replaces the sidecar RepetitionTime 2 s" in w for w in meta["warnings"])
    assert any("header TR 1 s disagrees with the override TR 0.8 s" in w for w in meta["warnings"])

    confounds = pd.read_csv(folder / "confounds.tsv", sep="\t")
    fd = confounds["framewise_displacement"].to_numpy()
    censored = np.flatnonzero(np.nan_to_num(fd) > threshold)
    assert 0 < len(censored) < N_VOLUMES - 20
    assert meta["ScrubbedFrames"] == censored.tolist() and meta["NumberOfScrubbedFrames"] == len(censored)
    assert confounds["censored"].to_numpy().nonzero()[0].tolist() == censored.tolist()
    assert confounds.shape[1] == MOTION_COLUMNS_24 + 2  # all 24 are written even when 0 are regressed
    series = pd.read_csv(folder / "ts.tsv", sep="\t")
    assert series.shape == (N_VOLUMES - len(censored), 400)
    assert result["n_frames_kept"] == N_VOLUMES - len(censored) == meta["NumberOfRows"]

    assert meta["EmptyParcels"] == [names[i - 1] for i in dropped]
    assert (series[meta["EmptyParcels"]] == 0).all().all()
    assert list(series.columns) == names


def test_extraction_matches_nilearn_on_the_mni_bold(subject, override_run):
    """With cleaning off, the TSV is NiftiLabelsMasker's mean of the written MNI BOLD (kept frames)."""
    from nilearn.maskers import NiftiLabelsMasker

    folder, _, dropped, _ = override_run
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
    kept = np.setdiff1d(np.arange(N_VOLUMES), meta["ScrubbedFrames"])
    ours = pd.read_csv(folder / "ts.tsv", sep="\t").to_numpy()
    # The TSV stores 6 significant digits.
    np.testing.assert_allclose(ours[:, present - 1], theirs[kept], rtol=1e-5, atol=0)


def test_mixed_trs_travel_with_the_outputs(default_run, override_run, tmp_path):
    first, _ = default_run
    second, *_ = override_run
    table_path = tmp_path / "qc" / "func_qc.tsv"
    summary = func_qc_table(sidecars=[first / "ts.json", second / "ts.json"], out_table=table_path)
    table = pd.read_csv(table_path, sep="\t")
    assert summary["n_runs"] == 2 and summary["n_with_empty_parcels"] == 1
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
