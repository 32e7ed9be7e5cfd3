"""Functional preprocessing of one rest BOLD run -> cleaned Schaefer-400 series.

Chain (each step in its own module):

1. checks: 4D, enough volumes, finite data, anatomical inputs present;
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
    estimate_motion,
    framewise_displacement,
    motion_corrected_mean,
)
from bh_models.func.parcellate import (
    EMPTY_PARCEL_FILL,
    MIN_PARCEL_VOXELS,
    N_PARCELS,
    fill_empty_parcels,
    parcel_layout,
    parcel_means,
)
from bh_models.func.resample import coregister_to_t1w, grid_points, map_points, resample_bold
from bh_models.core.templates import TEMPLATE_SPACE, atlas_in_template_space
from bh_models.func.tr import resolve_tr

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


def preprocess_bold(
    *,
    bold: Path,
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
    bold : Path
        Raw 4D BOLD NIfTI (read only).
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
    bold = Path(bold)
    check_cleaning(motion_regressors=motion_regressors, high_pass=high_pass, low_pass=low_pass,
                   fd_threshold=fd_threshold, standardize=standardize)
    if save_mni_bold and out_mni_bold is None:
        from bh_models.core.errors import BHConfigError

        raise BHConfigError("save_mni_bold", "is true but no out_mni_bold path was given",
                            "declare the MNI BOLD output in the rule, or set save_mni_bold: false")
    img = load_image(bold, ndim=4, what="BOLD run")
    n_volumes = int(img.shape[3])
    if n_volumes < min_volumes:
        raise BHInputError(bold, f"BOLD run has {n_volumes} volumes, fewer than the minimum {min_volumes}",
                           "exclude the run, or lower min_volumes in config.yaml if it is really usable")
    tr = resolve_tr(bold=bold, img=img, tr_sidecar=tr_sidecar, tr_override=tr_override)
    _require_files(t1w=t1w, t1w_mask=t1w_mask, t1w_to_mni=t1w_to_mni, mni_mask=mni_mask)
    data = read_data(img, bold, what="BOLD run")  # (X, Y, Z, T) float32, NaNs rejected
    warnings = list(tr.warnings)

    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="bh-func-") as work:
        motion = estimate_motion(bold=data, affine=img.affine)
        fd = framewise_displacement(params=motion.params)
        censored = censor_frames(fd=fd, fd_threshold=fd_threshold)
        n_kept = int((~censored).sum())
        if n_kept < min_volumes or n_kept <= motion_regressors + 1:
            raise BHInputError(
                bold,
                (f"only {n_kept} frames remain after censoring (FD > {fd_threshold} mm)"
                 if fd_threshold is not None else f"the run has {n_kept} frames")
                + f", too few for {motion_regressors} motion regressors and the minimum of {min_volumes} volumes",
                "exclude the run, or use fewer motion regressors or a higher fd_threshold",
            )

        reference = nib.Nifti1Image(
            motion_corrected_mean(bold=data, affine=img.affine, matrices=motion.matrices), img.affine
        )
        coreg = Path(work) / "bold_from_t1w.mat"
        coreg_mi = coregister_to_t1w(
            bold_reference=reference,
            t1w=load_image(t1w, ndim=3, what="T1w"),
            t1w_mask=load_image(t1w_mask, ndim=3, what="T1w brain mask"),
            out_transform=coreg,
            seed=seed,
        )

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
            bold=data, affine=img.affine, motion=motion.matrices, reference_points=reference_points
        )  # (T, N), (N,)

    # Parcel means over atlas voxels that every volume actually saw.
    atlas_series = series[:, atlas_rows]
    usable = in_view[atlas_rows]
    means, counts = parcel_means(series=atlas_series[:, usable], labels=layout.labels[usable])
    filled, empty = fill_empty_parcels(means=means, counts=counts, min_parcel_voxels=min_parcel_voxels)
    if usable.mean() < 0.95:
        warnings.append(f"{100 * (1 - usable.mean()):.1f} % of the atlas voxels in the brain mask "
                        "fall outside the BOLD field of view in at least one volume")

    motion_table = expand_motion(params=motion.params)
    confounds = motion_table[motion_columns(motion_regressors)].to_numpy()
    cleaned_valid, notes = clean_parcel_series(
        series=filled[:, ~empty], repetition_time=tr.seconds, confounds=confounds, censored=censored,
        detrend=detrend, high_pass=high_pass, low_pass=low_pass, standardize=standardize,
    )
    warnings += notes
    cleaned = np.full((n_kept, N_PARCELS), EMPTY_PARCEL_FILL)
    cleaned[:, ~empty] = cleaned_valid
    kept_frames = np.flatnonzero(~censored)

    # ---- outputs
    _write_tsv(out_timeseries, pd.DataFrame(cleaned, columns=list(layout.names)))
    empty_names = [layout.names[i] for i in np.flatnonzero(empty)]
    finite_fd = fd[np.isfinite(fd)]
    mean_fd = float(finite_fd.mean()) if finite_fd.size else 0.0
    max_fd = float(finite_fd.max()) if finite_fd.size else 0.0
    sidecar = {
        "RepetitionTime": tr.seconds,
        "RepetitionTimeSource": tr.source,
        "NumberOfVolumes": n_volumes,
        "NumberOfRows": n_kept,
        "MeanFD": mean_fd,
        "MaxFD": max_fd,
        "NumberOfScrubbedFrames": int(censored.sum()),
        "ScrubbedFrames": np.flatnonzero(censored).tolist(),
        "EmptyParcels": empty_names,
        "EmptyParcelFill": EMPTY_PARCEL_FILL,
        "MinParcelVoxels": int(min_parcel_voxels),
        "Space": TEMPLATE_SPACE,
        "Resolution": float(resolution),
        "Atlas": _atlas_name(networks),
        "NumberOfParcels": N_PARCELS,
        "Cleaning": {
            "detrend": bool(detrend), "high_pass": high_pass, "low_pass": low_pass,
            "motion_regressors": int(motion_regressors), "fd_threshold": fd_threshold,
            "standardize": standardize, "method": "nilearn.signal.clean",
        },
        "MotionReferenceVolume": motion.reference_index,
        "CoregistrationMutualInformation": coreg_mi,
        "AtlasVoxelsInFieldOfView": float(usable.mean()),
        "warnings": warnings,
    }
    write_json(sidecar_path(out_timeseries), sidecar)

    confound_table = motion_table.copy()
    confound_table["framewise_displacement"] = fd
    confound_table["censored"] = censored.astype(int)
    _write_tsv(out_confounds, confound_table)
    write_json(sidecar_path(out_confounds), {
        "RepetitionTime": tr.seconds,
        "MotionReferenceVolume": motion.reference_index,
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

    stem = bold.name.removesuffix(".nii.gz").removesuffix(".nii").removesuffix("_bold")
    plot_carpet(
        voxel_series=atlas_series[:, usable], voxel_labels=layout.labels[usable], cleaned=cleaned,
        kept_frames=kept_frames, fd=fd, repetition_time=tr.seconds, fd_threshold=fd_threshold,
        title=stem, out_png=out_carpet,
    )

    if save_mni_bold:
        volume = np.zeros((*atlas.shape[:3], n_volumes), dtype=np.float32)
        volume[tuple(targets.T)] = (series * in_view).T  # (N, T) into the brain voxels
        mni = nib.Nifti1Image(volume, atlas.affine)
        mni.header.set_xyzt_units("mm", "sec")
        mni.header.set_zooms((*mni.header.get_zooms()[:3], tr.seconds))
        save_nifti(Path(out_mni_bold), mni)
        write_json(sidecar_path(out_mni_bold), {"RepetitionTime": tr.seconds, "Space": TEMPLATE_SPACE,
                                                "Resolution": float(resolution), "SkullStripped": True})

    return {
        "repetition_time": tr.seconds,
        "n_volumes": n_volumes,
        "n_frames_kept": n_kept,
        "mean_fd": mean_fd,
        "max_fd": max_fd,
        "n_scrubbed": int(censored.sum()),
        "empty_parcels": empty_names,
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
