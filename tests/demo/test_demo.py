"""The demo cohort: BIDS layout, anatomy, BOLD generated from ground truth, labels, determinism.

One small cohort (6 subjects per site, the minimum the demo promises) is
written once per module; the rerun test writes a second copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bh_models.demo import cohort as demo
from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.templates import atlas_in_template_space, atlas_labels, load_template

N = 6       # subjects per site in these tests: the smallest cohort the demo is meant to have
SEED = 0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "demo_data"
    summary = demo.write_demo_cohort(out, seed=SEED, subjects_per_site=N)
    return out, summary


def _affine(row: pd.Series) -> np.ndarray:
    """MNI -> scanner affine of one subject, from ``ground_truth/<site>/subjects.tsv``."""
    out = np.eye(4)
    out[:3] = [[row[f"affine_{r}{c}"] for c in range(4)] for r in range(3)]
    return out


def _subjects(root: Path, site: str) -> pd.DataFrame:
    return pd.read_csv(root / "ground_truth" / site / "subjects.tsv", sep="\t")


def _truth(root: Path, run: dict) -> np.ndarray:
    return pd.read_csv(root / run["timeseries"], sep="\t").to_numpy()


def _sha256_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _labels_in_grid(img: nib.Nifti1Image, mni_to_scanner: np.ndarray, atlas: nib.Nifti1Image) -> np.ndarray:
    """Nearest atlas label (0 outside) of every voxel of ``img``'s grid, C-order flattened."""
    ijk = np.indices(img.shape[:3]).reshape(3, -1).T
    to_atlas = np.linalg.inv(atlas.affine) @ np.linalg.inv(mni_to_scanner) @ img.affine
    voxel = np.rint(ijk @ to_atlas[:3, :3].T + to_atlas[:3, 3]).astype(int)
    inside = np.all((voxel >= 0) & (voxel < atlas.shape[:3]), axis=1)
    labels = np.zeros(len(ijk), dtype=int)
    labels[inside] = np.asarray(atlas.dataobj)[tuple(voxel[inside].T)]
    return labels


# --------------------------------------------------------------------------- layout


def test_sites_are_valid_bids_with_different_trs(cohort):
    from bids import BIDSLayout

    root, summary = cohort
    trs = {}
    for site, info in summary["sites"].items():
        bids = root / site
        assert len(info["subjects"]) >= 6
        layout = BIDSLayout(bids, validate=True)
        assert sorted(layout.get_subjects()) == [s.removeprefix("sub-") for s in info["subjects"]]
        assert len(layout.get(suffix="T1w", extension=".nii.gz")) == N
        bolds = layout.get(suffix="bold", task="rest", extension=".nii.gz")
        assert len(bolds) == info["n_bold_runs"] >= 5
        for bold in bolds:
            # TR from BIDS inheritance (top-level sidecar) and from the header agree.
            assert bold.get_metadata()["RepetitionTime"] == info["repetition_time"]
            img = nib.load(bold.path)
            assert img.ndim == 4 and img.shape[3] == info["n_volumes"]
            assert img.header.get_zooms()[3] == pytest.approx(info["repetition_time"])
            assert img.header.get_xyzt_units() == ("mm", "sec")
        trs[site] = info["repetition_time"]
        # Every file is readable by others (mkstemp's 0600 is not left behind).
        for path in bids.rglob("*"):
            if path.is_file():
                assert path.stat().st_mode & 0o044 == 0o044, path
    assert len(trs) >= 2 and len(set(trs.values())) == len(trs)
    assert sorted(trs.values()) == [0.735, 1.5, 2.0]
    assert {site: info["role"] for site, info in summary["sites"].items()} == {
        "siteA": "pretrain", "siteB": "pretrain", "siteC": "downstream"}


def test_project_indexer_sees_both_sites_without_problems(cohort):
    from bh_models.bids.index import index_dataset

    root, summary = cohort
    for site, info in summary["sites"].items():
        index = index_dataset(root / site, dataset=site)
        assert index.problems.empty
        bold = index.runs[index.runs["suffix"] == "bold"]
        assert set(bold["repetition_time"]) == {info["repetition_time"]}
        subjects = index.subjects.set_index("subject")
        t1_only = [s.removeprefix("sub-") for s in info["t1w_only"]]
        assert subjects.loc[t1_only, "n_bold"].eq(0).all()
        assert subjects["has_t1w"].all()


def test_t1w_only_subject_and_multi_run_subject(cohort):
    root, summary = cohort
    site_b = summary["sites"]["siteB"]
    assert site_b["t1w_only"] == [f"sub-{N:02d}"]
    assert (root / "siteB" / f"sub-{N:02d}" / "anat" / f"sub-{N:02d}_T1w.nii.gz").is_file()
    assert not (root / "siteB" / f"sub-{N:02d}" / "func").exists()
    runs = sorted(p.name for p in (root / "siteA" / "sub-01" / "func").glob("*_bold.nii.gz"))
    assert runs == ["sub-01_task-rest_run-1_bold.nii.gz", "sub-01_task-rest_run-2_bold.nii.gz"]


def test_ground_truth_lies_outside_the_bids_folders(cohort):
    root, summary = cohort
    truth = Path(summary["ground_truth"]).resolve()
    for info in summary["sites"].values():
        bids = Path(info["bids_root"]).resolve()
        assert not truth.is_relative_to(bids) and not bids.is_relative_to(truth)
        names = {p.name for p in bids.rglob("*")}
        assert not any("timeseries" in n or "motion" in n or n == "subjects.tsv" for n in names)
        # participants.tsv carries the phenotype only, none of the latents.
        columns = pd.read_csv(bids / "participants.tsv", sep="\t").columns
        assert list(columns) == ["participant_id", "age", "sex", "diagnosis", "score"]
    for run in summary["runs"]:
        assert (root / run["timeseries"]).resolve().is_relative_to(truth)
        assert (root / run["motion"]).resolve().is_relative_to(truth)


def test_default_cohort_is_small_enough_for_the_cpu_demo():
    """The default cohort keeps the demo workflow within 15 minutes on 2 cores: two small
    pretraining sites and a downstream site large enough for a cross-validated probe."""
    assert inspect.signature(demo.write_demo_cohort).parameters["subjects_per_site"].default is None
    sizes = {site.name: site.n_subjects for site in demo.SITES}
    assert sizes == {"siteA": 6, "siteB": 6, "siteC": 16}
    assert [site.role for site in demo.SITES] == ["pretrain", "pretrain", "downstream"]
    assert demo.BOLD_VOXEL_MM >= 4.0
    for site in demo.SITES:
        assert 100 <= site.n_volumes <= 200


# --------------------------------------------------------------------------- anatomy


def test_t1w_is_a_head_around_the_template_brain_under_a_random_affine(cohort):
    root, _ = cohort
    _, mask, _ = load_template(2.0)
    table = _subjects(root, "siteA")
    affines = [_affine(row) for _, row in table.iterrows()]
    # Per-subject random pose: all different, none the identity, rotations and shifts present.
    for a, b in zip(affines, affines[1:]):
        assert not np.allclose(a, b)
    for affine in affines:
        assert not np.allclose(affine, np.eye(4), atol=1e-3)
    assert table[["rotation_x_deg", "rotation_y_deg", "rotation_z_deg"]].abs().to_numpy().max() > 2.0
    for (_, row), affine in list(zip(table.iterrows(), affines))[:2]:
        img = nib.load(root / "siteA" / row.participant_id / "anat" / f"{row.participant_id}_T1w.nii.gz")
        data = np.asarray(img.dataobj, dtype=np.float32)
        assert img.get_data_dtype() == np.int16 and img.header.get_zooms() == (1.0, 1.0, 1.0)
        brain = _labels_in_grid(img, affine, mask).reshape(data.shape) > 0
        # The template brain, moved by the subject's affine, is where the T1w says it is.
        assert 1.2e6 < brain.sum() < 2.6e6
        assert np.median(data[brain]) > 5 * np.median(data[~brain & (data < np.percentile(data, 5))] + 1)
        # A head (skull, scalp) surrounds the brain: much signal outside the brain mask.
        bright = data > 0.1 * np.percentile(data[brain], 90)
        assert (bright & ~brain).sum() > 0.4 * brain.sum()
        # The field of view is a head, not the 197 x 233 x 189 template box.
        assert all(150 < n < 260 for n in data.shape)
        # Rician noise in the background.
        corner = data[:8, :8, :8]
        assert corner.std() > 1.0 and corner.mean() > 1.0


def test_t1w_carries_a_smooth_bias_field(cohort):
    ref = demo._reference()
    site = demo.SITES[0]
    latents = demo._cohort_latents(seed=SEED, subjects_per_site=N)["siteA"][1]
    rng = lambda: demo._rng(SEED, 0, 2, 1)  # noqa: E731  the stream _write_subject uses
    biased = np.asarray(demo._synthesize_t1w(ref=ref, latents=latents, site=site, rng=rng()).dataobj, np.float32)
    flat_site = dataclasses.replace(site, bias_strength=0.0)
    # bias_strength 0 draws the same numbers (scale 0), so the noise is identical.
    flat = np.asarray(demo._synthesize_t1w(ref=ref, latents=latents, site=flat_site, rng=rng()).dataobj, np.float32)
    assert biased.shape == flat.shape
    bright = flat > np.percentile(flat, 80)
    ratio = biased[bright] / flat[bright]
    assert np.ptp(np.log(ratio)) > 0.05          # a few percent of shading at least
    assert np.abs(np.log(ratio)).max() < 0.7      # not absurd
    # Smooth: the profiles of each axis have tiny second differences.
    profiles = demo._bias_profiles(rng=demo._rng(SEED, 0, 2, 1), shape=(100, 120, 90), strength=0.09)
    for profile in profiles:
        p = np.log(profile.ravel())
        assert np.abs(np.diff(p, 2)).max() < 1e-3
    # The written T1w is exactly the biased synthesis.
    written = nib.load(next((Path(cohort[0]) / "siteA" / "sub-02" / "anat").glob("*_T1w.nii.gz")))
    assert np.array_equal(np.asarray(written.dataobj, np.float32), biased)


# --------------------------------------------------------------------------- BOLD


def test_bold_is_generated_from_the_ground_truth_in_subject_space(cohort):
    root, summary = cohort
    atlas = atlas_in_template_space(7, 2.0)
    checked = 0
    for site in ("siteA", "siteB"):
        table = _subjects(root, site).set_index("participant_id")
        run = next(r for r in summary["runs"] if r["site"] == site and r["subject"] == "sub-02")
        img = nib.load(root / run["bold"])
        data = np.asarray(img.dataobj, dtype=np.float32)
        assert img.get_data_dtype() == np.int16
        assert img.header.get_zooms()[:3] == (demo.BOLD_VOXEL_MM,) * 3
        # Same scanner space as the subject's T1w (the grids overlap, oblique to MNI).
        t1 = nib.load(root / site / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
        assert np.allclose(img.affine[:3, :3], np.diag([demo.BOLD_VOXEL_MM] * 3))
        assert np.allclose(t1.affine[:3, :3], np.eye(3))
        truth = _truth(root, run)
        assert truth.shape == (img.shape[3], 400)
        labels = _labels_in_grid(img, _affine(table.loc["sub-02"]), atlas)
        flat = data.reshape(-1, data.shape[3])
        # The run also carries the planted noise: take out the written physiological courses, a quadratic
        # trend (the drift), the true motion and its FD (head motion, spin history) before comparing.
        noise = pd.read_csv(root / run["noise"], sep="\t")
        motion = pd.read_csv(root / run["motion"], sep="\t").to_numpy()
        fd = np.r_[0, np.abs(np.diff(motion[:, :3], axis=0)).sum(1) + 50 * np.abs(np.diff(motion[:, 3:], axis=0)).sum(1)]
        t = np.linspace(-1, 1, img.shape[3])
        design = np.column_stack([np.ones_like(t), t, t**2, noise[[c for c in noise if c.startswith("physio_")]],
                                  motion, fd, np.r_[0, fd[:-1]]])

        def clean(y: np.ndarray) -> np.ndarray:
            return y - design @ np.linalg.lstsq(design, y, rcond=None)[0]

        r = []
        for parcel in range(1, 401):
            voxels = labels == parcel
            if voxels.sum() >= 2:
                r.append(np.corrcoef(clean(flat[voxels].mean(axis=0)), clean(truth[:, parcel - 1]))[0, 1])
        assert len(r) > 350
        assert np.median(r) > 0.8
        # Through the wrong affine (identity pose) parcels pick up their neighbours'
        # (correlated) signal: clearly worse, so the recorded pose is the true one.
        wrong = _labels_in_grid(img, np.eye(4), atlas)
        r_wrong = [
            np.corrcoef(clean(flat[wrong == p].mean(axis=0)), clean(truth[:, p - 1]))[0, 1]
            for p in range(1, 401) if (wrong == p).sum() >= 2
        ]
        assert np.median(r_wrong) < np.median(r) - 0.05
        checked += 1
    assert checked == 2


def test_true_series_have_network_covariance_and_resting_spectrum(cohort):
    root, summary = cohort
    group = pd.read_csv(
        demo.data_dir() / "fslr32k" / "schaefer_400_mean_connectivity_matrix.csv", header=None
    ).to_numpy()
    upper = np.triu_indices(400, 1)
    names = atlas_labels(7)["name"]
    assert list(pd.read_csv(root / summary["runs"][0]["timeseries"], sep="\t", nrows=0).columns) == list(names)
    info = summary["sites"]
    fcs = []
    for run in summary["runs"]:
        truth = _truth(root, run)
        fc = np.corrcoef(truth.T)
        fcs.append(fc[upper])
        # Each run's connectivity follows the group matrix, up to the sampling noise
        # of a few minutes of band-limited signal.
        assert np.corrcoef(fc[upper], group[upper])[0, 1] > 0.3
        # Resting-state band: most power below 0.1 Hz at the site TR.
        tr = info[run["site"]]["repetition_time"]
        power = np.abs(np.fft.rfft(truth - truth.mean(0), axis=0)) ** 2
        freq = np.fft.rfftfreq(truth.shape[0], d=tr)
        assert power[(freq > 0.005) & (freq < 0.12)].sum() / power.sum() > 0.8
    # Averaged over runs, the sampling noise goes and the group matrix remains.
    assert np.corrcoef(np.mean(fcs, axis=0), group[upper])[0, 1] > 0.8


def test_motion_ground_truth_is_a_bounded_drift_with_jerks(cohort):
    root, summary = cohort
    levels, mean_fd = [], []
    for site in summary["sites"]:
        table = _subjects(root, site).set_index("participant_id")
        for run in (r for r in summary["runs"] if r["site"] == site):
            motion = pd.read_csv(root / run["motion"], sep="\t")
            assert list(motion.columns) == list(demo.MOTION_COLUMNS)
            assert np.allclose(motion.iloc[0], 0)
            assert motion[["trans_x", "trans_y", "trans_z"]].abs().to_numpy().max() <= demo.DISPLACEMENT_MAX_MM + 1e-6
            params = motion.to_numpy()
            fd = np.abs(np.diff(params[:, :3], axis=0)).sum(1) + 50 * np.abs(np.diff(params[:, 3:], axis=0)).sum(1)
            levels.append(table.loc[run["subject"], "motion_level"])
            mean_fd.append(fd.mean())
    # Subjects differ in how much they move, and the latent says who moves more.
    from scipy.stats import spearmanr

    assert max(levels) / min(levels) > 3
    assert spearmanr(levels, mean_fd).statistic > 0.5
    assert max(mean_fd) / min(mean_fd) > 2


def _one_subject(site_index: int = 2, subject_index: int = 1):
    """Geometry, latents, series and the rng factory of one demo subject (as _write_subject draws them)."""
    ref = demo._reference()
    site = demo.SITES[site_index]
    latents = demo._cohort_latents(seed=SEED, subjects_per_site=N)[site.name][subject_index]
    stream = lambda k: demo._rng(SEED, site_index, subject_index + 1, k)  # noqa: E731
    series = demo._parcel_series(ref=ref, latents=latents, site=site, rng=stream(2))
    return ref, site, latents, demo._bold_geometry(ref=ref, latents=latents), series, stream


def _bold(geometry, series, site, latents, stream) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(S, T) support voxels of the synthesised run, its motion and nuisance table (fixed seeds)."""
    rng = stream(2)
    demo._parcel_series(ref=demo._reference(), latents=latents, site=site, rng=rng)  # advance like the writer
    img, motion, nuisance = demo._synthesize_bold(geometry=geometry, series_pct=series, site=site, rng=rng,
                                                  latents=latents, noise_rng=stream(demo.NOISE_STREAM + 1))
    data = np.asarray(img.dataobj, dtype=np.float64).reshape(-1, img.shape[3], order="F")
    return data[geometry.support], motion, nuisance


def test_planted_noise_has_the_recorded_amplitudes_and_places(monkeypatch):
    """Each noise term, isolated by switching it off with every random draw unchanged."""
    ref, site, latents, geometry, series, stream = _one_subject()
    full, motion, nuisance = _bold(geometry, series, site, latents, stream)
    gain = site.bold_gain
    base = geometry.base * gain                                                      # (S,) int16 units

    # Physiology: shared by WM and CSF, leaking into GM, with the written courses and amplitude.
    no_physio, _, _ = _bold(geometry, series, site, dataclasses.replace(latents, physio_pct=0.0), stream)
    physio = (full - no_physio) / base[:, None] * 100                                # % of baseline
    courses = nuisance[[c for c in nuisance.columns if c.startswith("physio_")]].to_numpy()
    assert courses.shape[1] == len(demo.PHYSIO_LOADINGS)
    np.testing.assert_allclose(courses.std(axis=0), 1.0, atol=1e-3)
    predicted = (geometry.physio_weights / geometry.base[:, None]) @ courses.T * latents.physio_pct
    strong = np.abs(predicted).std(axis=1) > 0.3
    assert np.corrcoef(physio[strong].ravel(), predicted[strong].ravel())[0, 1] > 0.95
    weights = geometry.physio_weights / geometry.base[:, None]                      # (S, K) loading per voxel
    cortex = np.asarray(geometry.parcel_weights.sum(axis=1)).ravel() * 100 / geometry.base   # atlas fraction
    csf_like, gm_like = weights[:, 0] > 0.8, cortex > 0.9                           # (CSF loads source 0 at 1.0)
    assert csf_like.sum() > 20 and gm_like.sum() > 100
    assert physio[csf_like].std() > 1.3 * physio[gm_like].std() > 0                 # CSF strong, GM a leak

    # Spin history: scales with the voxel's own displacement (FD), stronger at the brain's edge.
    monkeypatch.setattr(demo, "SPIN_HISTORY_PCT_PER_MM", 0.0)
    no_spin, _, _ = _bold(geometry, series, site, latents, stream)
    monkeypatch.undo()
    spin = (full - no_spin) / base[:, None] * 100                                   # % (negative: a loss)
    fd = np.r_[0, np.abs(np.diff(motion[:, :3], axis=0)).sum(1) + 50 * np.abs(np.diff(motion[:, 3:], axis=0)).sum(1)]
    assert np.corrcoef(-spin.mean(axis=0), fd)[0, 1] > 0.8
    edge = geometry.edge_weights / geometry.base
    assert np.abs(spin[edge > 0.9]).mean() > 2 * np.abs(spin[edge < 0.3]).mean()
    drive = demo._spin_history(motion=motion, centres=geometry.centres)
    expected = -demo.SPIN_HISTORY_PCT_PER_MM * edge[:, None] * drive
    bright = base > 100                                    # dim edge voxels can clip at 0 in int16
    assert bright.mean() > 0.8
    assert np.abs(spin - expected)[bright].max() < 100 / 100 + 1e-6                 # int16 rounding only

    # Drift: slow, the written course, the recorded amplitude.
    no_drift, _, _ = _bold(geometry, series, site, dataclasses.replace(latents, drift_pct=0.0), stream)
    drift = ((full - no_drift) / base[:, None] * 100).mean(axis=0)
    np.testing.assert_allclose(np.abs(nuisance["drift_pct"]).max(), latents.drift_pct)
    assert np.corrcoef(drift, nuisance["drift_pct"])[0, 1] > 0.99
    assert np.abs(np.diff(drift, 2)).max() < 0.05                                  # smooth


def test_spin_history_drive_is_each_voxels_own_displacement():
    centres = np.array([[0.0, 0.0, 0.0], [0.0, 80.0, 0.0]])
    motion = np.zeros((6, 6))
    motion[2, 0] = 1.0                      # a 1 mm shift in x for frame 2 only
    motion[4, 5] = 0.01                     # a 0.01 rad turn about z for frame 4 only
    drive = demo._spin_history(motion=motion, centres=centres)
    np.testing.assert_allclose(drive[0, :4], [0, 0, 1.0, 1.0 + 0.5])               # in, out (plus recovery)
    assert drive[0, 4] == pytest.approx(0.25 + 0.5)                                 # recovery only at the axis
    assert drive[1, 4] > drive[0, 4] + 0.7                                          # 80 mm away: 0.8 mm moved


def test_tissue_truth_is_the_template_with_the_subjects_ventricles(cohort):
    root, _ = cohort
    table = _subjects(root, "siteA")
    for column in ("gm_ml", "wm_ml", "csf_ml", "motion_level", "physio_pct", "drift_pct",
                   "spin_history_pct_per_mm"):
        assert column in table and table[column].notna().all(), column
    patients = table["diagnosis"] == "patient"
    assert table.loc[patients, "csf_ml"].min() > table.loc[~patients, "csf_ml"].max()    # dilated ventricles
    latents = demo._cohort_latents(seed=SEED, subjects_per_site=N)["siteA"][0]
    maps, affine = demo.tissue_truth(latents)
    total = maps["GM"] + maps["WM"] + maps["CSF"]
    ref = demo._reference()
    assert np.allclose(total[ref.brain], 1.0, atol=1e-5)                            # fractions inside the brain
    assert maps["CSF"][~ref.brain].sum() > 0 and maps["GM"][~ref.brain].sum() == 0  # the CSF shell
    assert table["gm_ml"].iloc[0] == pytest.approx(maps["GM"][ref.brain].sum() / 1000, rel=1e-5)
    assert 900 < table["gm_ml"].iloc[0] < 1100 and 600 < table["wm_ml"].iloc[0] < 750


# --------------------------------------------------------------------------- labels


def _network_connectivity(truth: np.ndarray, networks: np.ndarray) -> np.ndarray:
    """Mean within-network correlation of each of the 7 networks (Fisher z)."""
    fc = np.arctanh(np.clip(np.corrcoef(truth.T), -0.999, 0.999))
    feats = []
    for name in np.unique(networks):
        block = fc[np.ix_(networks == name, networks == name)]
        feats.append(block[np.triu_indices_from(block, 1)].mean())
    return np.array(feats)


def test_diagnosis_and_score_are_predictable_from_the_ground_truth(cohort):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root, summary = cohort
    networks = atlas_labels(7)["name"].str.split("_").str[2].to_numpy()
    features, diagnosis, score, sommot = [], [], [], []
    for site in summary["sites"]:
        participants = pd.read_csv(root / site / "participants.tsv", sep="\t").set_index("participant_id")
        for run in (r for r in summary["runs"] if r["site"] == site):
            if run["bold"].endswith("run-2_bold.nii.gz"):
                continue        # one run per subject
            truth = _truth(root, run)
            features.append(_network_connectivity(truth, networks))
            diagnosis.append(participants.loc[run["subject"], "diagnosis"] == "patient")
            score.append(participants.loc[run["subject"], "score"])
            sommot.append(truth[:, networks == "SomMot"].std() / truth[:, networks == "Vis"].std())
    x, y = np.array(features), np.array(diagnosis)
    assert len(y) >= 10 and 0.3 < y.mean() < 0.7
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    predicted = cross_val_predict(model, x, y, cv=LeaveOneOut())
    accuracy = (predicted == y).mean()
    assert accuracy >= 0.8, accuracy       # chance is 0.5
    # Shuffled labels are not predictable (the features are not a leak of the row order).
    shuffled = np.random.default_rng(1).permutation(y)
    assert (cross_val_predict(model, x, shuffled, cv=LeaveOneOut()) == shuffled).mean() < accuracy
    # The continuous score drives Somatomotor amplitude.
    from scipy.stats import spearmanr

    assert spearmanr(score, sommot).statistic > 0.7


def test_labels_are_balanced_and_latents_consistent(cohort):
    root, summary = cohort
    for site in summary["sites"]:
        participants = pd.read_csv(root / site / "participants.tsv", sep="\t")
        latents = _subjects(root, site)
        assert set(participants["diagnosis"]) == {"control", "patient"}
        assert (participants["diagnosis"] == "patient").sum() == N // 2
        assert participants["participant_id"].tolist() == latents["participant_id"].tolist()
        assert np.allclose(participants["score"], latents["score"])
        patient = latents["diagnosis"] == "patient"
        assert latents.loc[patient, "default_gain"].min() > latents.loc[~patient, "default_gain"].max()


# --------------------------------------------------------------------------- determinism and guards


@pytest.mark.slow
def test_same_seed_writes_byte_identical_files(cohort, tmp_path):
    root, _ = cohort
    again = tmp_path / "again"
    demo.write_demo_cohort(again, seed=SEED, subjects_per_site=N)
    first, second = _sha256_tree(root), _sha256_tree(again)
    assert len(first) > 3 * N
    assert first == second


def test_other_seed_gives_other_data(tmp_path):
    a = demo._cohort_latents(seed=0, subjects_per_site=N)["siteA"]
    b = demo._cohort_latents(seed=1, subjects_per_site=N)["siteA"]
    assert [s.score for s in a] != [s.score for s in b]


def test_refuses_foreign_folders_and_bad_arguments(tmp_path):
    (tmp_path / "siteA").mkdir()
    (tmp_path / "siteA" / "dataset_description.json").write_text(json.dumps({"Name": "real data"}))
    with pytest.raises(BHInputError):
        demo.write_demo_cohort(tmp_path, subjects_per_site=2)
    assert (tmp_path / "siteA" / "dataset_description.json").is_file()
    for bad in (1, 0, True, 2.5):
        with pytest.raises(BHConfigError):
            demo.write_demo_cohort(tmp_path / "x", subjects_per_site=bad)
    with pytest.raises(BHConfigError):
        demo.write_demo_cohort(tmp_path / "x", seed=-1)


@pytest.mark.slow
def test_cli_writes_the_cohort(tmp_path, capsys):
    from bh_models.cli import main

    args = ["demo", str(tmp_path / "d"), "--subjects-per-site", "2", "--seed", "3"]
    assert main(args) == 0
    assert (tmp_path / "d" / "siteA" / "participants.tsv").is_file()
    assert (tmp_path / "d" / "siteB" / "sub-02" / "anat" / "sub-02_T1w.nii.gz").is_file()
    assert "demo cohort written" in capsys.readouterr().out
    # A rerun into the same folder replaces its own output, byte for byte.
    first = _sha256_tree(tmp_path / "d")
    (tmp_path / "d" / "siteA" / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"stale")
    assert main(args) == 0
    assert _sha256_tree(tmp_path / "d") == first
