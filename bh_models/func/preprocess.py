"""Functional preprocessing of one rest BOLD run -> cleaned Schaefer-400 series.

Chain (each step in its own module):

1. checks: 4D, enough volumes, finite data, anatomical inputs present; a
   multi-echo run's echoes combined (:mod:`bh_models.func.multiecho`);
2. TR (:mod:`bh_models.func.tr`): config override > sidecar; header compared;
3. head motion (:mod:`bh_models.func.motion`): rigid, to the middle volume; FD;
4. coregistration (:mod:`bh_models.func.resample`): realigned mean -> T1w, rigid MI;
5. one-shot resampling (:mod:`bh_models.func.resample`): motion, BOLD->T1w and
   T1w->MNI composed, every volume interpolated once onto the template grid
   (only the atlas voxels inside the brain mask, unless the MNI BOLD is kept);
6. parcellation (:mod:`bh_models.func.parcellate`): 400 means, fixed layout;
7. cleaning (:mod:`bh_models.func.confounds`): nilearn ``signal.clean``;
8. outputs: series TSV + sidecar, confounds TSV + sidecar, carpet/FD PNG,
   optionally the MNI-space BOLD.

:func:`func_qc_table` gathers the run sidecars of a cohort into one table.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bh_models.func.confounds import (
    censor_frames,
    check_cleaning,
    clean_parcel_series,
    expand_motion,
    motion_columns,
)
from bh_models.core.errors import BHInputError
from bh_models.core.step import torch_threads
from bh_models.func.qc import plot_carpet
from bh_models.core.imagecheck import load_image, read_data, save_nifti
from bh_models.core.jsonio import atomic_write_text, read_json, sidecar_path, write_json
from bh_models.func.motion import (
    FD_RADIUS_MM,
    PARAMETER_NAMES,
    MotionEstimate,
    estimate_motion,
    framewise_displacement,
    motion_corrected_mean,
)
from bh_models.func.parcellate import (
    EMPTY_PARCEL_FILL,
    MIN_PARCEL_VOXELS,
    N_PARCELS,
    ParcelLayout,
    fill_empty_parcels,
    parcel_layout,
    parcel_means,
)
from bh_models.func.resample import coregister_to_t1w, grid_points, map_points, resample_bold
from bh_models.core.templates import TEMPLATE_SPACE, atlas_in_template_space
from bh_models.func.tr import RepetitionTime, resolve_tr

__desc__ = (
    "Each resting-state BOLD run was processed by bh_models' functional chain: "
    "head-motion estimation, rigid co-registration to the T1w, a single "
    "resampling to MNI152NLin2009cAsym that composes all transforms, "
    "Schaefer-400 parcellation and confound cleaning, described below."
)

MIN_VOLUMES = 20

# antsRegistration is reproducible only on one ITK thread (antspyx's own note;
# with 2 threads its Mattes MI sums differ from run to run even with a fixed
# seed). ITK reads this variable when it first starts threads, i.e. at the
# first antspyx call of the job process, so preprocess_bold sets it before any.
ITK_THREADS = 1


def _atlas_name(networks: int) -> str:
    return f"Schaefer2018_400Parcels_{networks}Networks"




def _require_files(**paths: Path) -> None:
    for name, path in paths.items():
        if not Path(path).is_file():
            raise BHInputError(
                path,
                f"anatomical input '{name}' is missing (the subject has no usable T1w, "
                "or its anatomical workflow failed)",
                "check the subject's T1w and its anatomical outputs; a BOLD run needs its subject's T1w",
            )


def _write_tsv(path: Path, table: pd.DataFrame) -> None:
    buffer = io.StringIO()
    table.to_csv(buffer, sep="\t", index=False, float_format="%.6g", na_rep="n/a", lineterminator="\n")
    atomic_write_text(Path(path), buffer.getvalue())


def _template_mask(mni_mask: Path, atlas: nib.Nifti1Image, resolution: float) -> nib.Nifti1Image:
    mask = load_image(mni_mask, ndim=3, what="MNI-space brain mask")
    if mask.shape[:3] != atlas.shape[:3] or not np.allclose(mask.affine, atlas.affine, atol=1e-3):
        raise BHInputError(
            mni_mask,
            f"not on the {TEMPLATE_SPACE} grid at {resolution:g} mm (shape {mask.shape}, "
            f"expected {atlas.shape})",
            "run the anatomical workflow with the same template resolution as the functional one",
        )
    return nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), atlas.affine)


@dataclass(frozen=True)
class _BoldRun:
    """The checked BOLD run: its image, data and resolved TR."""

    path: Path
    img: nib.Nifti1Image
    data: np.ndarray  # (X, Y, Z, T) float32, NaNs rejected
    n_volumes: int
    tr: RepetitionTime
    echoes: dict | None = None  # how a multi-echo run became this series (the sidecar's MultiEcho)


@dataclass(frozen=True)
class _Motion:
    """Head motion of the run, its FD trace and the frames kept after censoring."""

    estimate: MotionEstimate
    fd: np.ndarray  # (T,), NaN for the first frame
    censored: np.ndarray  # (T,) bool

    @property
    def n_kept(self) -> int:
        return int((~self.censored).sum())

    @property
    def mean_fd(self) -> float:
        finite_fd = self.fd[np.isfinite(self.fd)]
        return float(finite_fd.mean()) if finite_fd.size else 0.0

    @property
    def max_fd(self) -> float:
        finite_fd = self.fd[np.isfinite(self.fd)]
        return float(finite_fd.max()) if finite_fd.size else 0.0


@dataclass(frozen=True)
class _TemplateSeries:
    """The BOLD resampled onto the template grid at the sampled voxels."""

    atlas: nib.Nifti1Image
    layout: ParcelLayout
    targets: np.ndarray  # (N, 3) template voxels sampled
    atlas_rows: np.ndarray  # rows of ``targets`` that are the layout's atlas voxels, in layout order
    series: np.ndarray  # (T, N)
    in_view: np.ndarray  # (N,) seen by every volume


@dataclass(frozen=True)
class _Parcels:
    """Parcel means over the atlas voxels that every volume saw."""

    voxel_series: np.ndarray  # (T, n) usable atlas voxels
    voxel_labels: np.ndarray  # (n,)
    usable: np.ndarray  # (N atlas voxels,) bool
    filled: np.ndarray  # (T, 400)
    empty: np.ndarray  # (400,) bool
    empty_names: list[str]


def _check_settings(*, motion_regressors: int, high_pass: float | None, low_pass: float | None,
                    fd_threshold: float | None, standardize: bool | str, save_mni_bold: bool,
                    out_mni_bold: Path | None) -> None:
    """Refuse invalid cleaning settings, and a kept MNI BOLD without its output path."""
    check_cleaning(motion_regressors=motion_regressors, high_pass=high_pass, low_pass=low_pass,
                   fd_threshold=fd_threshold, standardize=standardize)
    if save_mni_bold and out_mni_bold is None:
        from bh_models.core.errors import BHConfigError

        raise BHConfigError("save_mni_bold", "is true but no out_mni_bold path was given",
                            "declare the MNI BOLD output in the rule, or set save_mni_bold: false")


def _load_inputs(*, bold: Path | Sequence[Path], anat: dict[str, Path], min_volumes: int, tr_sidecar: float | None,
                 tr_override: float | None, echo_times: Sequence[float] | None = None) -> _BoldRun:
    """1-2. Checks (4D, enough volumes, anatomical inputs present, finite data) and the TR; the echoes
    of a multi-echo run (``bold`` a list) combined into one series."""
    if isinstance(bold, (list, tuple)) and len(bold) > 1:
        from bh_models.func.multiecho import load_combined

        _require_files(**anat)
        img, data, echoes = load_combined(paths=bold, echo_times=echo_times)
        n_volumes = int(img.shape[3])
        if n_volumes < min_volumes:
            raise BHInputError(bold[0], f"BOLD run has {n_volumes} volumes, fewer than the minimum {min_volumes}",
                               "exclude the run, or lower min_volumes in config.yaml if it is really usable")
        tr = resolve_tr(bold=Path(bold[0]), img=img, tr_sidecar=tr_sidecar, tr_override=tr_override)
        return _BoldRun(path=Path(bold[0]), img=img, data=data, n_volumes=n_volumes, tr=tr, echoes=echoes)
    bold = Path(bold[0] if isinstance(bold, (list, tuple)) else bold)
    echoes = ({"Method": "one echo of a multi-echo run (datasets.<name>.filters.echo)", "Files": [bold.name]}
              if "_echo-" in bold.name else None)
    img = load_image(bold, ndim=4, what="BOLD run")
    n_volumes = int(img.shape[3])
    if n_volumes < min_volumes:
        raise BHInputError(bold, f"BOLD run has {n_volumes} volumes, fewer than the minimum {min_volumes}",
                           "exclude the run, or lower min_volumes in config.yaml if it is really usable")
    tr = resolve_tr(bold=bold, img=img, tr_sidecar=tr_sidecar, tr_override=tr_override)
    _require_files(**anat)
    data = read_data(img, bold, what="BOLD run")  # (X, Y, Z, T) float32, NaNs rejected
    return _BoldRun(path=bold, img=img, data=data, n_volumes=n_volumes, tr=tr, echoes=echoes)


def _estimate_motion(run: _BoldRun, *, fd_threshold: float | None, min_volumes: int,
                     motion_regressors: int) -> _Motion:
    """3. Rigid head motion to the middle volume, FD, censoring; too few kept frames fail."""
    estimate = estimate_motion(bold=run.data, affine=run.img.affine)
    fd = framewise_displacement(params=estimate.params)
    motion = _Motion(estimate=estimate, fd=fd, censored=censor_frames(fd=fd, fd_threshold=fd_threshold))
    n_kept = motion.n_kept
    if n_kept < min_volumes or n_kept <= motion_regressors + 1:
        raise BHInputError(
            run.path,
            (f"only {n_kept} frames remain after censoring (FD > {fd_threshold} mm)"
             if fd_threshold is not None else f"the run has {n_kept} frames")
            + f", too few for {motion_regressors} motion regressors and the minimum of {min_volumes} volumes",
            "exclude the run, or use fewer motion regressors or a higher fd_threshold",
        )
    return motion


def _coregister(run: _BoldRun, motion: _Motion, *, t1w: Path, t1w_mask: Path, out_transform: Path,
                seed: int) -> float:
    """4. Realigned mean BOLD -> T1w, rigid MI; writes ``out_transform``, returns the final MI."""
    reference = nib.Nifti1Image(
        motion_corrected_mean(bold=run.data, affine=run.img.affine, matrices=motion.estimate.matrices),
        run.img.affine,
    )
    return coregister_to_t1w(
        bold_reference=reference,
        t1w=load_image(t1w, ndim=3, what="T1w"),
        t1w_mask=load_image(t1w_mask, ndim=3, what="T1w brain mask"),
        out_transform=out_transform,
        seed=seed,
    )


def _resample_to_mni(run: _BoldRun, motion: _Motion, *, coreg: Path, t1w_to_mni: Path, mni_mask: Path,
                     resolution: float, networks: int, save_mni_bold: bool) -> _TemplateSeries:
    """5. Every volume interpolated once onto the template grid (motion, coreg and T1w->MNI composed).

    Only the atlas voxels inside the brain mask are sampled, unless the MNI BOLD
    is kept, which needs every brain voxel.
    """
    atlas = atlas_in_template_space(networks, resolution)
    mask = _template_mask(mni_mask, atlas, resolution)
    layout = parcel_layout(atlas=atlas, mask=mask, networks=networks)
    if save_mni_bold:
        targets = np.argwhere(np.asarray(mask.dataobj) > 0)  # (N, 3) all brain voxels
        flat = np.ravel_multi_index(tuple(targets.T), atlas.shape)
        atlas_rows = np.searchsorted(flat, np.ravel_multi_index(tuple(layout.indices.T), atlas.shape))
    else:
        targets = layout.indices
        atlas_rows = np.arange(len(targets))
    reference_points = map_points(
        points=grid_points(indices=targets.astype(np.float64), affine=atlas.affine),
        transforms=[Path(t1w_to_mni), coreg],  # W first, then C (ANTs list order)
    )
    series, in_view = resample_bold(
        bold=run.data, affine=run.img.affine, motion=motion.estimate.matrices, reference_points=reference_points
    )  # (T, N), (N,)
    return _TemplateSeries(atlas=atlas, layout=layout, targets=targets, atlas_rows=atlas_rows,
                           series=series, in_view=in_view)


def _extract_parcels(mni: _TemplateSeries, *, min_parcel_voxels: int) -> tuple[_Parcels, list[str]]:
    """6. The 400 parcel means in the fixed layout, empty parcels filled; and a field-of-view note."""
    # Parcel means over atlas voxels that every volume actually saw.
    atlas_series = mni.series[:, mni.atlas_rows]
    usable = mni.in_view[mni.atlas_rows]
    voxel_series, voxel_labels = atlas_series[:, usable], mni.layout.labels[usable]
    means, counts = parcel_means(series=voxel_series, labels=voxel_labels)
    filled, empty = fill_empty_parcels(means=means, counts=counts, min_parcel_voxels=min_parcel_voxels)
    notes = []
    if usable.mean() < 0.95:
        notes.append(f"{100 * (1 - usable.mean()):.1f} % of the atlas voxels in the brain mask "
                     "fall outside the BOLD field of view in at least one volume")
    empty_names = [mni.layout.names[i] for i in np.flatnonzero(empty)]
    return _Parcels(voxel_series=voxel_series, voxel_labels=voxel_labels, usable=usable, filled=filled,
                    empty=empty, empty_names=empty_names), notes


def _clean(parcels: _Parcels, motion: _Motion, *, tr: RepetitionTime, motion_regressors: int, detrend: bool,
           high_pass: float | None, low_pass: float | None,
           standardize: bool | str) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """7. nilearn ``signal.clean`` of the non-empty parcels: (kept frames, 400) series, motion table, notes."""
    motion_table = expand_motion(params=motion.estimate.params)
    confounds = motion_table[motion_columns(motion_regressors)].to_numpy()
    cleaned_valid, notes = clean_parcel_series(
        series=parcels.filled[:, ~parcels.empty], repetition_time=tr.seconds, confounds=confounds,
        censored=motion.censored, detrend=detrend, high_pass=high_pass, low_pass=low_pass, standardize=standardize,
    )
    cleaned = np.full((motion.n_kept, N_PARCELS), EMPTY_PARCEL_FILL)
    cleaned[:, ~parcels.empty] = cleaned_valid
    return cleaned, motion_table, notes


def _write_timeseries(out_timeseries: Path, cleaned: np.ndarray, *, run: _BoldRun, motion: _Motion,
                      parcels: _Parcels, layout: ParcelLayout, coreg_mi: float, cleaning: dict,
                      min_parcel_voxels: int, resolution: float, networks: int, warnings: list[str]) -> None:
    """8a. The parcel series TSV and its sidecar (TR, FD, scrubbing, empty parcels, settings, QC values)."""
    _write_tsv(out_timeseries, pd.DataFrame(cleaned, columns=list(layout.names)))
    sidecar = {
        "RepetitionTime": run.tr.seconds,
        "RepetitionTimeSource": run.tr.source,
        "NumberOfVolumes": run.n_volumes,
        "NumberOfRows": motion.n_kept,
        "MeanFD": motion.mean_fd,
        "MaxFD": motion.max_fd,
        "NumberOfScrubbedFrames": int(motion.censored.sum()),
        "ScrubbedFrames": np.flatnonzero(motion.censored).tolist(),
        "EmptyParcels": parcels.empty_names,
        "EmptyParcelFill": EMPTY_PARCEL_FILL,
        "MinParcelVoxels": int(min_parcel_voxels),
        "Space": TEMPLATE_SPACE,
        "Resolution": float(resolution),
        "Atlas": _atlas_name(networks),
        "NumberOfParcels": N_PARCELS,
        "Cleaning": cleaning,
        "MotionReferenceVolume": motion.estimate.reference_index,
        "CoregistrationMutualInformation": coreg_mi,
        "AtlasVoxelsInFieldOfView": float(parcels.usable.mean()),
        **({"MultiEcho": run.echoes} if run.echoes else {}),
        "warnings": warnings,
    }
    write_json(sidecar_path(out_timeseries), sidecar)


def _write_confounds(out_confounds: Path, motion_table: pd.DataFrame, *, motion: _Motion,
                     tr: RepetitionTime) -> None:
    """8b. The confounds TSV (motion regressors, FD, censored flag for every input frame) and its sidecar."""
    confound_table = motion_table.copy()
    confound_table["framewise_displacement"] = motion.fd
    confound_table["censored"] = motion.censored.astype(int)
    _write_tsv(out_confounds, confound_table)
    write_json(sidecar_path(out_confounds), {
        "RepetitionTime": tr.seconds,
        "MotionReferenceVolume": motion.estimate.reference_index,
        "trans_x": {"Description": "displacement of the field-of-view centre, RAS+ x (mm), "
                                   "relative to the reference volume", "Units": "mm"},
        "rot_x": {"Description": "extrinsic x-y-z Euler angle about the field-of-view centre, "
                                 "relative to the reference volume", "Units": "rad"},
        "framewise_displacement": {"Description": "Power et al. 2012 FD (nipype FramewiseDisplacement, "
                                                  f"{FD_RADIUS_MM:g} mm radius); n/a for the first frame",
                                   "Units": "mm"},
        "censored": {"Description": "1 where FD exceeded fd_threshold; such frames are absent from the "
                                    "parcel time series", "Levels": {"0": "kept", "1": "censored"}},
        "Columns": list(confound_table.columns),
        "MotionParameters": list(PARAMETER_NAMES),
    })


def _write_qc(out_carpet: Path, cleaned: np.ndarray, *, run: _BoldRun, motion: _Motion, parcels: _Parcels,
              fd_threshold: float | None) -> None:
    """8c. The FD trace + voxel carpet + cleaned parcel carpet PNG."""
    stem = run.path.name.removesuffix(".nii.gz").removesuffix(".nii").removesuffix("_bold")
    if run.echoes:  # the run, not one of its echoes
        stem = "_".join(part for part in stem.split("_") if not part.startswith("echo-"))
    plot_carpet(
        voxel_series=parcels.voxel_series, voxel_labels=parcels.voxel_labels, cleaned=cleaned,
        kept_frames=np.flatnonzero(~motion.censored), fd=motion.fd, repetition_time=run.tr.seconds,
        fd_threshold=fd_threshold, title=stem, out_png=out_carpet,
    )


def _write_mni_bold(out_mni_bold: Path, mni: _TemplateSeries, *, run: _BoldRun, resolution: float) -> None:
    """8d. The 4D float32 BOLD on the template grid, zero outside the brain mask, and its sidecar."""
    volume = np.zeros((*mni.atlas.shape[:3], run.n_volumes), dtype=np.float32)
    volume[tuple(mni.targets.T)] = (mni.series * mni.in_view).T  # (N, T) into the brain voxels
    img = nib.Nifti1Image(volume, mni.atlas.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((*img.header.get_zooms()[:3], run.tr.seconds))
    save_nifti(Path(out_mni_bold), img)
    write_json(sidecar_path(out_mni_bold), {"RepetitionTime": run.tr.seconds, "Space": TEMPLATE_SPACE,
                                            "Resolution": float(resolution), "SkullStripped": True})


def preprocess_bold(
    *,
    bold: Path | Sequence[Path],
    t1w: Path,
    t1w_mask: Path,
    t1w_to_mni: Path,
    mni_mask: Path,
    out_timeseries: Path,
    out_confounds: Path,
    out_carpet: Path,
    out_mni_bold: Path | None = None,
    tr_sidecar: float | None = None,
    tr_override: float | None = None,
    echo_times: Sequence[float] | None = None,
    resolution: float = 2.0,
    networks: int = 7,
    min_volumes: int = MIN_VOLUMES,
    min_parcel_voxels: int = MIN_PARCEL_VOXELS,
    detrend: bool = True,
    high_pass: float | None = 0.01,
    low_pass: float | None = None,
    motion_regressors: int = 24,
    fd_threshold: float | None = None,
    standardize: bool | str = "psc",
    save_mni_bold: bool = False,
    seed: int = 0,
    threads: int = 1,
) -> dict:
    """Step function: one rest BOLD run -> cleaned Schaefer-400 time series.

    Parameters
    ----------
    bold : Path or list of Path
        Raw 4D BOLD NIfTI (read only); for a multi-echo run, its echoes, combined
        first (T2*-weighted optimal combination, :mod:`bh_models.func.multiecho`).
    t1w : Path
        Native brain-extracted T1w (``*_desc-preproc_T1w.nii.gz``).
    t1w_mask : Path
        Native brain mask (``*_desc-brain_mask.nii.gz``).
    t1w_to_mni : Path
        Forward ANTs composite transform T1w -> MNI152NLin2009cAsym
        (``*_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5``).
    mni_mask : Path
        Subject brain mask on the template grid at ``resolution``
        (``*_space-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz``).
    out_timeseries : Path
        Written: TSV, one row per kept frame, 400 columns headed by ROI name
        in atlas order; plus its JSON sidecar (RepetitionTime,
        NumberOfVolumes, MeanFD, MaxFD, NumberOfScrubbedFrames, EmptyParcels,
        Space, Atlas, warnings, cleaning settings, QC values).
    out_confounds : Path
        Written: TSV with the 24 motion regressors, ``framewise_displacement``
        and ``censored`` for every input frame; plus a JSON sidecar.
    out_carpet : Path
        Written: PNG, FD trace + voxel carpet + cleaned parcel carpet.
    out_mni_bold : Path or None
        Written when ``save_mni_bold``: 4D float32 BOLD on the template grid,
        zero outside the brain mask (large; off by default).
    tr_sidecar : float or None
        ``RepetitionTime`` from the BIDS sidecar, inheritance resolved.
    tr_override : float or None
        The dataset's configured TR; wins over the sidecar.
    echo_times : list of float or None
        Echo times (s) of a multi-echo run's echoes, in the order of ``bold``.
    resolution : float
        Template grid spacing (mm); must match the anatomical outputs.
    networks : int
        Schaefer-400 network version, 7 or 17.
    min_volumes : int
        Runs with fewer volumes fail.
    min_parcel_voxels : int
        Parcels with fewer usable voxels are filled with 0 and listed.
    detrend, high_pass, low_pass, motion_regressors, fd_threshold, standardize
        Cleaning settings, see :mod:`bh_models.func.confounds`.
    save_mni_bold : bool
        Also write the MNI-space 4D BOLD to ``out_mni_bold``.
    seed : int
        Seed of the coregistration's metric sampling.
    threads : int
        Torch threads used here. ITK (the coregistration and the point
        mapping, a few seconds) runs single-threaded: see :data:`ITK_THREADS`.

    Returns
    -------
    dict
        ``repetition_time``, ``n_volumes``, ``n_frames_kept``, ``mean_fd``,
        ``max_fd``, ``n_scrubbed``, ``empty_parcels``, ``warnings``.

    Raises
    ------
    BHInputError
        3D BOLD, too few volumes, NaNs, bad or missing TR, missing anatomical
        inputs, too few frames left for the regressors.
    BHConfigError
        Invalid cleaning settings or TR override.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(ITK_THREADS)
    _check_settings(motion_regressors=motion_regressors, high_pass=high_pass, low_pass=low_pass,
                    fd_threshold=fd_threshold, standardize=standardize, save_mni_bold=save_mni_bold,
                    out_mni_bold=out_mni_bold)
    run = _load_inputs(bold=bold, anat={"t1w": t1w, "t1w_mask": t1w_mask, "t1w_to_mni": t1w_to_mni,
                                        "mni_mask": mni_mask},
                       min_volumes=min_volumes, tr_sidecar=tr_sidecar, tr_override=tr_override,
                       echo_times=echo_times)
    warnings = list(run.tr.warnings)

    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="bh-func-") as work:
        motion = _estimate_motion(run, fd_threshold=fd_threshold, min_volumes=min_volumes,
                                  motion_regressors=motion_regressors)
        coreg = Path(work) / "bold_from_t1w.mat"
        coreg_mi = _coregister(run, motion, t1w=t1w, t1w_mask=t1w_mask, out_transform=coreg, seed=seed)
        mni = _resample_to_mni(run, motion, coreg=coreg, t1w_to_mni=t1w_to_mni, mni_mask=mni_mask,
                               resolution=resolution, networks=networks, save_mni_bold=save_mni_bold)

    parcels, notes = _extract_parcels(mni, min_parcel_voxels=min_parcel_voxels)
    warnings += notes
    cleaned, motion_table, notes = _clean(parcels, motion, tr=run.tr, motion_regressors=motion_regressors,
                                          detrend=detrend, high_pass=high_pass, low_pass=low_pass,
                                          standardize=standardize)
    warnings += notes

    # ---- outputs
    cleaning = {"detrend": bool(detrend), "high_pass": high_pass, "low_pass": low_pass,
                "motion_regressors": int(motion_regressors), "fd_threshold": fd_threshold,
                "standardize": standardize, "method": "nilearn.signal.clean"}
    _write_timeseries(out_timeseries, cleaned, run=run, motion=motion, parcels=parcels, layout=mni.layout,
                      coreg_mi=coreg_mi, cleaning=cleaning, min_parcel_voxels=min_parcel_voxels,
                      resolution=resolution, networks=networks, warnings=warnings)
    _write_confounds(out_confounds, motion_table, motion=motion, tr=run.tr)
    _write_qc(out_carpet, cleaned, run=run, motion=motion, parcels=parcels, fd_threshold=fd_threshold)
    if save_mni_bold:
        _write_mni_bold(out_mni_bold, mni, run=run, resolution=resolution)

    return {
        "repetition_time": run.tr.seconds,
        "n_volumes": run.n_volumes,
        "n_frames_kept": motion.n_kept,
        "mean_fd": motion.mean_fd,
        "max_fd": motion.max_fd,
        "n_scrubbed": int(motion.censored.sum()),
        "empty_parcels": parcels.empty_names,
        "warnings": warnings,
    }


QC_COLUMNS = (
    "RepetitionTime", "NumberOfVolumes", "NumberOfRows", "MeanFD", "MaxFD", "NumberOfScrubbedFrames",
    "CoregistrationMutualInformation", "AtlasVoxelsInFieldOfView",
)


def func_qc_table(*, sidecars: list[Path], out_table: Path, threads: int = 1) -> dict:
    """Step function: one row per BOLD run from the time-series sidecars.

    Parameters
    ----------
    sidecars : list of Path
        JSON sidecars written by :func:`preprocess_bold`.
    out_table : Path
        Written: TSV sorted by ``run``, with the columns of :data:`QC_COLUMNS`,
        ``n_empty_parcels``, ``n_warnings`` and ``warnings`` (joined by " | ").
        ``run`` is the sidecar's path relative to the table's folder (no
        absolute paths in data files).
    threads : int
        Unused (the runner passes it to every step).

    Returns
    -------
    dict
        ``n_runs``, ``median_mean_fd``, ``n_with_empty_parcels``, ``n_with_warnings``.
    """
    out_table = Path(out_table)
    rows = []
    for path in sidecars:
        meta = read_json(path)
        row = {"run": os.path.relpath(Path(path).resolve(), out_table.parent.resolve())}
        row.update({key: meta.get(key) for key in QC_COLUMNS})
        row["n_empty_parcels"] = len(meta.get("EmptyParcels", []))
        row["n_warnings"] = len(meta.get("warnings", []))
        row["warnings"] = " | ".join(meta.get("warnings", []))
        rows.append(row)
    columns = ["run", *QC_COLUMNS, "n_empty_parcels", "n_warnings", "warnings"]
    table = pd.DataFrame(rows, columns=columns).sort_values("run", kind="stable").reset_index(drop=True)
    _write_tsv(out_table, table)
    return {
        "n_runs": len(table),
        "median_mean_fd": float(table["MeanFD"].median()) if len(table) else float("nan"),
        "n_with_empty_parcels": int((table["n_empty_parcels"] > 0).sum()),
        "n_with_warnings": int((table["n_warnings"] > 0).sum()),
    }
