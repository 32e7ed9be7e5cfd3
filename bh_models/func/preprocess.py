"""Functional preprocessing of one rest BOLD run -> cleaned Schaefer-400 series.

Chain (each step in its own module):

1. checks: 4D, enough volumes, finite data, anatomical inputs present; a
   multi-echo run's echoes combined (:mod:`bh_models.func.multiecho`);
2. TR (:mod:`bh_models.func.tr`): config override > sidecar; header compared;
3. head motion (:mod:`bh_models.func.motion`): rigid, to the middle volume; FD;
4. coregistration (:mod:`bh_models.func.resample`): realigned mean -> T1w, rigid MI;
5. one-shot resampling (:mod:`bh_models.func.resample`): motion, BOLD->T1w and
   T1w->MNI composed, every volume interpolated once onto the template grid
   (the atlas voxels inside the brain mask, the aCompCor masks and a lattice
   of the brain mask; every brain voxel when the MNI BOLD is kept);
6. parcellation (:mod:`bh_models.func.parcellate`): 400 means, fixed layout;
7. confounds (:mod:`bh_models.func.confounds`): fMRIPrep's columns with
   nipype's algorithms, from the tissue masks of the anatomical chain;
8. denoising (:mod:`bh_models.func.denoise`): the named strategy, censoring,
   nilearn ``signal.clean``;
9. outputs: series TSV + sidecar (strategy, degrees of freedom, QC measures),
   confounds TSV + sidecar, carpet/FD/DVARS PNG, mask PNG, optionally the
   MNI-space BOLD.

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

from bh_models.core.errors import BHInputError
from bh_models.core.step import torch_threads
from bh_models.func.confounds import (
    BRAIN_LATTICE_STEP,
    Confounds,
    VoxelSets,
    brain_lattice,
    compcor_masks,
    compute_confounds,
)
from bh_models.func.denoise import (
    DEFAULT_GSR,
    DEFAULT_STRATEGY,
    Scrubbing,
    Strategy,
    StrategyError,
    censor_frames,
    check_denoise,
    clean_parcel_series,
    filter_bins_removed,
    matrix_rank,
    regressor_columns,
    regressor_matrix,
)
from bh_models.func.qc import plot_carpet, plot_rois
from bh_models.core.imagecheck import load_image, read_data, save_nifti
from bh_models.core.jsonio import atomic_write_text, read_json, sidecar_path, write_json
from bh_models.func.motion import (
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
    "Schaefer-400 parcellation, confound extraction and denoising, described below."
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
    """Head motion of the run and its FD trace."""

    estimate: MotionEstimate
    fd: np.ndarray  # (T,), NaN for the first frame

    @property
    def mean_fd(self) -> float:
        finite_fd = self.fd[np.isfinite(self.fd)]
        return float(finite_fd.mean()) if finite_fd.size else 0.0

    @property
    def max_fd(self) -> float:
        finite_fd = self.fd[np.isfinite(self.fd)]
        return float(finite_fd.max()) if finite_fd.size else 0.0


@dataclass(frozen=True)
class _Targets:
    """Template voxels to sample, and which rows of them make each voxel set."""

    indices: np.ndarray  # (N, 3) template voxels, sorted by flat index
    atlas_rows: np.ndarray  # rows that are the layout's atlas voxels, in layout order
    brain_rows: np.ndarray  # brain-mask lattice
    mask_rows: dict[str, np.ndarray]  # aCompCor masks
    grey_rows: np.ndarray  # GM posterior > 0.5
    masks: dict[str, np.ndarray]  # the aCompCor masks on the grid (for the QC figure)


@dataclass(frozen=True)
class _TemplateSeries:
    """The BOLD resampled onto the template grid at the sampled voxels."""

    atlas: nib.Nifti1Image
    layout: ParcelLayout
    brain: np.ndarray  # (X, Y, Z) bool subject brain mask on the grid
    targets: _Targets
    series: np.ndarray  # (T, N)
    in_view: np.ndarray  # (N,) seen by every volume

    def sets(self) -> VoxelSets:
        """The confound voxel sets, restricted to voxels every volume saw."""
        seen = lambda rows: rows[self.in_view[rows]]  # noqa: E731
        return VoxelSets(brain=seen(self.targets.brain_rows),
                         masks={n: seen(r) for n, r in self.targets.mask_rows.items()},
                         grey=seen(self.targets.grey_rows))


@dataclass(frozen=True)
class _Parcels:
    """Parcel means over the atlas voxels that every volume saw."""

    voxel_series: np.ndarray  # (T, n) usable atlas voxels
    voxel_labels: np.ndarray  # (n,)
    usable: np.ndarray  # (N atlas voxels,) bool
    filled: np.ndarray  # (T, 400)
    empty: np.ndarray  # (400,) bool
    empty_names: list[str]


@dataclass(frozen=True)
class _Denoised:
    """The cleaned series and what the strategy did to get them."""

    cleaned: np.ndarray  # (T_kept, 400)
    censored: np.ndarray  # (T,) bool
    columns: list[str]  # regressors, names of the confounds table
    rank: int
    filter_bins: int

    @property
    def n_kept(self) -> int:
        return int((~self.censored).sum())

    @property
    def tdof_lost(self) -> int:
        return self.rank + int(self.censored.sum())


def _check_settings(*, denoise: str, gsr: bool, high_pass: float | None, low_pass: float | None,
                    scrubbing: Scrubbing, standardize: bool | str, save_mni_bold: bool,
                    out_mni_bold: Path | None) -> Strategy:
    """The strategy; invalid cleaning settings, and a kept MNI BOLD without its output path, are refused."""
    strategy = check_denoise(denoise=denoise, gsr=gsr, high_pass=high_pass, low_pass=low_pass,
                             standardize=standardize, fd_threshold=scrubbing.fd_threshold,
                             std_dvars_threshold=scrubbing.std_dvars_threshold, min_segment=scrubbing.min_segment)
    if save_mni_bold and out_mni_bold is None:
        from bh_models.core.errors import BHConfigError

        raise BHConfigError("save_mni_bold", "is true but no out_mni_bold path was given",
                            "declare the MNI BOLD output in the rule, or set save_mni_bold: false")
    return strategy


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


def _estimate_motion(run: _BoldRun) -> _Motion:
    """3. Rigid head motion to the middle volume, and FD."""
    estimate = estimate_motion(bold=run.data, affine=run.img.affine)
    return _Motion(estimate=estimate, fd=framewise_displacement(params=estimate.params))


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


def _load_probseg(paths: dict[str, Path], atlas: nib.Nifti1Image) -> dict[str, np.ndarray]:
    """The anatomical chain's GM/WM/CSF posteriors, checked to lie on the template grid."""
    maps = {}
    for name, path in paths.items():
        img = load_image(path, ndim=3, what=f"{name} probability map")
        if img.shape[:3] != atlas.shape[:3] or not np.allclose(img.affine, atlas.affine, atol=1e-3):
            raise BHInputError(path, f"not on the {TEMPLATE_SPACE} grid of the atlas (shape {img.shape})",
                               "run the anatomical workflow with the same template resolution as the functional one")
        maps[name] = read_data(img, path, what=f"{name} probability map")
    return maps


def _sampling_targets(*, layout: ParcelLayout, brain: np.ndarray, probseg: dict[str, np.ndarray],
                      resolution: float, bold_mm: float, save_mni_bold: bool) -> _Targets:
    """The template voxels to resample: atlas voxels, the aCompCor masks and the brain lattice.

    With ``save_mni_bold`` every brain voxel (a superset of them all).
    """
    masks = compcor_masks(probseg=probseg, brain=brain, grid_mm=float(resolution), bold_mm=bold_mm)
    lattice = brain_lattice(brain, BRAIN_LATTICE_STEP)
    grey = (probseg["GM"] > 0.5) & brain

    def flat(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)  # C-order flat indices, ascending

    atlas_flat = np.ravel_multi_index(tuple(layout.indices.T), brain.shape)
    if save_mni_bold:
        chosen = flat(brain)
    else:
        chosen = np.unique(np.concatenate([atlas_flat, flat(lattice), *[flat(m) for m in masks.values()]]))
    rows = lambda mask_flat: np.searchsorted(chosen, mask_flat)  # noqa: E731
    grey_flat = np.intersect1d(flat(grey), chosen, assume_unique=True)
    return _Targets(indices=np.column_stack(np.unravel_index(chosen, brain.shape)), atlas_rows=rows(atlas_flat),
                    brain_rows=rows(flat(lattice)), mask_rows={n: rows(flat(m)) for n, m in masks.items()},
                    grey_rows=rows(grey_flat), masks=masks)


def _resample_to_mni(run: _BoldRun, motion: _Motion, *, coreg: Path, t1w_to_mni: Path, mni_mask: Path,
                     probseg: dict[str, Path], resolution: float, networks: int,
                     save_mni_bold: bool) -> _TemplateSeries:
    """5. Every volume interpolated once onto the template grid (motion, coreg and T1w->MNI composed).

    The atlas voxels inside the brain mask, the aCompCor masks and a lattice of
    the brain mask are sampled (:func:`_sampling_targets`); every brain voxel
    when the MNI BOLD is kept.
    """
    atlas = atlas_in_template_space(networks, resolution)
    mask = _template_mask(mni_mask, atlas, resolution)
    layout = parcel_layout(atlas=atlas, mask=mask, networks=networks)
    brain = np.asarray(mask.dataobj) > 0
    bold_mm = float(np.prod(nib.affines.voxel_sizes(run.img.affine)) ** (1 / 3))
    targets = _sampling_targets(layout=layout, brain=brain, probseg=_load_probseg(probseg, atlas),
                                resolution=resolution, bold_mm=bold_mm, save_mni_bold=save_mni_bold)
    reference_points = map_points(
        points=grid_points(indices=targets.indices.astype(np.float64), affine=atlas.affine),
        transforms=[Path(t1w_to_mni), coreg],  # W first, then C (ANTs list order)
    )
    series, in_view = resample_bold(
        bold=run.data, affine=run.img.affine, motion=motion.estimate.matrices, reference_points=reference_points
    )  # (T, N), (N,)
    return _TemplateSeries(atlas=atlas, layout=layout, brain=brain, targets=targets, series=series,
                           in_view=in_view)


def _extract_parcels(mni: _TemplateSeries, *, min_parcel_voxels: int) -> tuple[_Parcels, list[str]]:
    """6. The 400 parcel means in the fixed layout, empty parcels filled; and a field-of-view note."""
    # Parcel means over atlas voxels that every volume actually saw.
    atlas_series = mni.series[:, mni.targets.atlas_rows]
    usable = mni.in_view[mni.targets.atlas_rows]
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


def _confounds(mni: _TemplateSeries, motion: _Motion, *, tr: RepetitionTime) -> Confounds:
    """7. fMRIPrep's confound columns (nipype's algorithms) from the sampled voxels."""
    return compute_confounds(series=mni.series, sets=mni.sets(), params=motion.estimate.params, fd=motion.fd,
                             repetition_time=tr.seconds)


def _clean(parcels: _Parcels, confounds: Confounds, *, run: _BoldRun, strategy: Strategy, gsr: bool,
           scrubbing: Scrubbing, min_volumes: int, detrend: bool, high_pass: float | None,
           low_pass: float | None, standardize: bool | str) -> tuple[_Denoised, list[str]]:
    """8. The strategy's regressors and censoring, then cleaning of the non-empty parcels; too few frames fail."""
    table = confounds.table
    try:
        columns, notes = regressor_columns(strategy=strategy, gsr=gsr, table=table, metadata=confounds.metadata)
        regressors = regressor_matrix(table, columns)
    except StrategyError as exc:
        raise BHInputError(run.path, f"the '{strategy.name}' strategy cannot be applied: {exc}",
                           "choose a strategy without CompCor (e.g. 24P+2P) for this dataset, or check the "
                           "tissue masks in the anatomical QC figures") from exc
    censored = np.zeros(run.n_volumes, dtype=bool)
    if strategy.censor:
        censored = censor_frames(fd=table["framewise_displacement"].to_numpy(), std_dvars=table["std_dvars"].to_numpy(),
                                 fd_threshold=scrubbing.fd_threshold,
                                 std_dvars_threshold=scrubbing.std_dvars_threshold, min_segment=scrubbing.min_segment)
    rank, n_kept = matrix_rank(regressors), int((~censored).sum())
    if n_kept < min_volumes or n_kept <= rank + 1:
        raise BHInputError(
            run.path,
            (f"only {n_kept} frames remain after censoring" if censored.any() else f"the run has {n_kept} frames")
            + f", too few for {rank} regressors ('{strategy.name}') and the minimum of {min_volumes} volumes",
            "exclude the run, or choose a strategy with fewer regressors or laxer scrubbing thresholds",
        )
    cleaned_valid, filter_notes = clean_parcel_series(
        series=parcels.filled[:, ~parcels.empty], repetition_time=run.tr.seconds, confounds=regressors,
        censored=censored, detrend=detrend, high_pass=high_pass, low_pass=low_pass, standardize=standardize,
    )
    cleaned = np.full((n_kept, N_PARCELS), EMPTY_PARCEL_FILL)
    cleaned[:, ~parcels.empty] = cleaned_valid
    bins = filter_bins_removed(n_frames=n_kept, repetition_time=run.tr.seconds, high_pass=high_pass,
                               low_pass=low_pass)
    return _Denoised(cleaned=cleaned, censored=censored, columns=columns, rank=rank, filter_bins=bins), \
        notes + filter_notes


def _qc_measures(motion: _Motion, confounds: Confounds, denoised: _Denoised) -> dict:
    """BOLD QC values of the run (sidecar and cohort table)."""
    table = confounds.table
    finite = lambda column: table[column].to_numpy()[np.isfinite(table[column].to_numpy())]  # noqa: E731
    return {
        "MeanFD": motion.mean_fd,
        "MaxFD": motion.max_fd,
        "MeanDVARS": float(finite("dvars").mean()) if finite("dvars").size else None,
        "MeanStdDVARS": float(finite("std_dvars").mean()) if finite("std_dvars").size else None,
        "NumberOfFDAbove0.5mm": int((finite("framewise_displacement") > 0.5).sum()),
        "NumberOfFDAbove0.2mm": int((finite("framewise_displacement") > 0.2).sum()),
        "TSNRGreyMatter": confounds.tsnr_gm,
        "NumberOfCensoredFrames": int(denoised.censored.sum()),
        "TemporalDegreesOfFreedomLost": denoised.tdof_lost,
    }


def _write_timeseries(out_timeseries: Path, denoised: _Denoised, *, run: _BoldRun, parcels: _Parcels,
                      layout: ParcelLayout, coreg_mi: float, cleaning: dict, qc: dict, min_parcel_voxels: int,
                      resolution: float, networks: int, warnings: list[str]) -> None:
    """9a. The parcel series TSV and its sidecar (TR, strategy, degrees of freedom, QC values, settings)."""
    _write_tsv(out_timeseries, pd.DataFrame(denoised.cleaned, columns=list(layout.names)))
    sidecar = {
        "RepetitionTime": run.tr.seconds,
        "RepetitionTimeSource": run.tr.source,
        "NumberOfVolumes": run.n_volumes,
        "NumberOfRows": denoised.n_kept,
        **qc,
        "CensoredFrames": np.flatnonzero(denoised.censored).tolist(),
        "Strategy": cleaning["strategy"],
        "Regressors": denoised.columns,
        "DegreesOfFreedom": {"Frames": run.n_volumes, "Censored": int(denoised.censored.sum()),
                             "RegressorRank": denoised.rank, "Lost": denoised.tdof_lost,
                             "Remaining": run.n_volumes - denoised.tdof_lost, "FilterBins": denoised.filter_bins},
        "EmptyParcels": parcels.empty_names,
        "EmptyParcelFill": EMPTY_PARCEL_FILL,
        "MinParcelVoxels": int(min_parcel_voxels),
        "Space": TEMPLATE_SPACE,
        "Resolution": float(resolution),
        "Atlas": _atlas_name(networks),
        "NumberOfParcels": N_PARCELS,
        "Cleaning": cleaning,
        "CoregistrationMutualInformation": coreg_mi,
        "AtlasVoxelsInFieldOfView": float(parcels.usable.mean()),
        **({"MultiEcho": run.echoes} if run.echoes else {}),
        "warnings": warnings,
    }
    write_json(sidecar_path(out_timeseries), sidecar)


def _write_confounds(out_confounds: Path, confounds: Confounds, *, motion: _Motion, censored: np.ndarray,
                     tr: RepetitionTime, strategy: str) -> None:
    """9b. The confounds TSV (fMRIPrep's columns and ``censored``, every input frame) and its sidecar."""
    table = confounds.table.copy()
    table["censored"] = censored.astype(int)
    _write_tsv(out_confounds, table)
    write_json(sidecar_path(out_confounds), {
        **confounds.metadata,
        "censored": {"Description": f"1 where the '{strategy}' strategy censored the frame; such frames are "
                                    "absent from the parcel time series", "Levels": {"0": "kept", "1": "censored"}},
        "RepetitionTime": tr.seconds,
        "MotionReferenceVolume": motion.estimate.reference_index,
        "MotionParameters": list(PARAMETER_NAMES),
        "MaskVoxels": confounds.mask_voxels,
        "BrainLatticeStep": BRAIN_LATTICE_STEP,
        "Columns": list(table.columns),
    })


def _write_qc(out_carpet: Path, out_rois: Path, mni: _TemplateSeries, confounds: Confounds,
              denoised: _Denoised, *, run: _BoldRun, parcels: _Parcels, mni_t1w: Path,
              scrubbing: Scrubbing | None) -> None:
    """9c. The FD/DVARS + voxel carpet + cleaned parcel carpet PNG, and the confound masks PNG."""
    stem = run.path.name.removesuffix(".nii.gz").removesuffix(".nii").removesuffix("_bold")
    table = confounds.table
    if run.echoes:  # the run, not one of its echoes
        stem = "_".join(part for part in stem.split("_") if not part.startswith("echo-"))
    plot_carpet(
        voxel_series=parcels.voxel_series, voxel_labels=parcels.voxel_labels, cleaned=denoised.cleaned,
        kept_frames=np.flatnonzero(~denoised.censored), fd=table["framewise_displacement"].to_numpy(),
        std_dvars=table["std_dvars"].to_numpy(), repetition_time=run.tr.seconds,
        fd_threshold=scrubbing.fd_threshold if scrubbing else None,
        std_dvars_threshold=scrubbing.std_dvars_threshold if scrubbing else None, title=stem, out_png=out_carpet,
    )
    plot_rois(background=read_data(load_image(mni_t1w, ndim=3, what="MNI-space T1w"), mni_t1w, what="T1w"),
              brain=mni.brain, masks=mni.targets.masks,
              tcompcor_voxels=mni.targets.indices[confounds.tcompcor_rows],
              title=f"{stem}: brain mask (red), aCompCor CSF (magenta), WM (cyan), combined (green), "
                    "tCompCor voxels (yellow)", out_png=out_rois)


def _write_mni_bold(out_mni_bold: Path, mni: _TemplateSeries, *, run: _BoldRun, resolution: float) -> None:
    """9d. The 4D float32 BOLD on the template grid, zero outside the brain mask, and its sidecar."""
    volume = np.zeros((*mni.atlas.shape[:3], run.n_volumes), dtype=np.float32)
    volume[tuple(mni.targets.indices.T)] = (mni.series * mni.in_view).T  # (N, T) into the brain voxels
    img = nib.Nifti1Image(volume, mni.atlas.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((*img.header.get_zooms()[:3], run.tr.seconds))
    save_nifti(Path(out_mni_bold), img)
    write_json(sidecar_path(out_mni_bold), {"RepetitionTime": run.tr.seconds, "Space": TEMPLATE_SPACE,
                                            "Resolution": float(resolution), "SkullStripped": True})


@dataclass(frozen=True)
class RunSignals:
    """Everything of a run before denoising: resampled voxels, parcel means, confounds (stages 1-7)."""

    run: _BoldRun
    motion: _Motion
    mni: _TemplateSeries
    parcels: _Parcels
    confounds: Confounds
    coreg_mi: float
    warnings: list[str]


def extract_run(*, bold: Path | Sequence[Path], t1w: Path, t1w_mask: Path, t1w_to_mni: Path, mni_mask: Path,
                gm_probseg: Path, wm_probseg: Path, csf_probseg: Path, tr_sidecar: float | None = None,
                tr_override: float | None = None, resolution: float = 2.0, networks: int = 7,
                min_volumes: int = MIN_VOLUMES, min_parcel_voxels: int = MIN_PARCEL_VOXELS,
                save_mni_bold: bool = False, seed: int = 0, threads: int = 1,
                echo_times: Sequence[float] | None = None) -> RunSignals:
    """Stages 1-7 of :func:`preprocess_bold` (no denoising, nothing written); parameters as there.

    The denoising benchmark runs this once per run and :func:`denoise_run` once per strategy.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(ITK_THREADS)
    probseg = {"GM": Path(gm_probseg), "WM": Path(wm_probseg), "CSF": Path(csf_probseg)}
    run = _load_inputs(bold=bold, anat={"t1w": t1w, "t1w_mask": t1w_mask, "t1w_to_mni": t1w_to_mni,
                                              "mni_mask": mni_mask, "gm_probseg": probseg["GM"],
                                              "wm_probseg": probseg["WM"], "csf_probseg": probseg["CSF"]},
                       min_volumes=min_volumes, tr_sidecar=tr_sidecar, tr_override=tr_override,
                       echo_times=echo_times)
    warnings = list(run.tr.warnings)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="bh-func-") as work:
        motion = _estimate_motion(run)
        coreg = Path(work) / "bold_from_t1w.mat"
        coreg_mi = _coregister(run, motion, t1w=t1w, t1w_mask=t1w_mask, out_transform=coreg, seed=seed)
        mni = _resample_to_mni(run, motion, coreg=coreg, t1w_to_mni=t1w_to_mni, mni_mask=mni_mask,
                               probseg=probseg, resolution=resolution, networks=networks,
                               save_mni_bold=save_mni_bold)
    parcels, notes = _extract_parcels(mni, min_parcel_voxels=min_parcel_voxels)
    confounds = _confounds(mni, motion, tr=run.tr)
    return RunSignals(run=run, motion=motion, mni=mni, parcels=parcels, confounds=confounds, coreg_mi=coreg_mi,
                      warnings=warnings + notes + confounds.notes)


def denoise_run(signals: RunSignals, *, denoise: str = DEFAULT_STRATEGY, gsr: bool = DEFAULT_GSR,
                fd_threshold: float | None = 0.5, std_dvars_threshold: float | None = 1.5, min_segment: int = 5,
                detrend: bool = True, high_pass: float | None = 0.01, low_pass: float | None = None,
                standardize: bool | str = "psc", min_volumes: int = MIN_VOLUMES
                ) -> tuple[np.ndarray, np.ndarray, dict, list[str]]:
    """Stage 8 of :func:`preprocess_bold` on an extracted run: (T_kept, 400) series, censored frames, info, notes.

    ``info`` holds the regressors, their rank, the censored frames and the degrees of freedom lost.
    """
    scrubbing = Scrubbing(fd_threshold=fd_threshold, std_dvars_threshold=std_dvars_threshold, min_segment=min_segment)
    strategy = check_denoise(denoise=denoise, gsr=gsr, high_pass=high_pass, low_pass=low_pass,
                             standardize=standardize, fd_threshold=fd_threshold,
                             std_dvars_threshold=std_dvars_threshold, min_segment=min_segment)
    denoised, notes = _clean(signals.parcels, signals.confounds, run=signals.run, strategy=strategy, gsr=gsr,
                             scrubbing=scrubbing, min_volumes=min_volumes, detrend=detrend, high_pass=high_pass,
                             low_pass=low_pass, standardize=standardize)
    info = {"regressors": denoised.columns, "rank": denoised.rank, "n_censored": int(denoised.censored.sum()),
            "tdof_lost": denoised.tdof_lost, "filter_bins": denoised.filter_bins}
    return denoised.cleaned, denoised.censored, info, notes


def preprocess_bold(
    *,
    bold: Path | Sequence[Path],
    t1w: Path,
    t1w_mask: Path,
    t1w_to_mni: Path,
    mni_mask: Path,
    mni_t1w: Path,
    gm_probseg: Path,
    wm_probseg: Path,
    csf_probseg: Path,
    out_timeseries: Path,
    out_confounds: Path,
    out_carpet: Path,
    out_rois: Path,
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
    denoise: str = DEFAULT_STRATEGY,
    gsr: bool = DEFAULT_GSR,
    fd_threshold: float | None = 0.5,
    std_dvars_threshold: float | None = 1.5,
    min_segment: int = 5,
    standardize: bool | str = "psc",
    save_mni_bold: bool = False,
    seed: int = 0,
    threads: int = 1,
) -> dict:
    """Step function: one rest BOLD run -> denoised Schaefer-400 time series and fMRIPrep-style confounds.

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
    mni_t1w : Path
        The T1w on that grid (background of the mask figure).
    gm_probseg, wm_probseg, csf_probseg : Path
        Tissue posteriors on that grid (``*_label-{GM,WM,CSF}_probseg.nii.gz``):
        the aCompCor masks and the grey matter of the tSNR.
    out_timeseries : Path
        Written: TSV, one row per kept frame, 400 columns headed by ROI name
        in atlas order; plus its JSON sidecar (RepetitionTime, NumberOfVolumes,
        Strategy, Regressors, DegreesOfFreedom, the BOLD QC measures MeanFD,
        MaxFD, MeanDVARS, MeanStdDVARS, TSNRGreyMatter,
        NumberOfCensoredFrames, TemporalDegreesOfFreedomLost; EmptyParcels,
        Space, Atlas, warnings, cleaning settings).
    out_confounds : Path
        Written: TSV with fMRIPrep's confound columns (:mod:`bh_models.func.confounds`)
        and ``censored`` for every input frame; plus fMRIPrep's JSON sidecar
        (CompCor components: mask, variance explained).
    out_carpet : Path
        Written: PNG, FD and std DVARS traces + voxel carpet + cleaned parcel carpet.
    out_rois : Path
        Written: PNG, the brain mask, aCompCor masks and tCompCor voxels on the T1w.
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
        Runs with fewer volumes (or fewer kept frames) fail.
    min_parcel_voxels : int
        Parcels with fewer usable voxels are filled with 0 and listed.
    detrend, high_pass, low_pass, standardize
        Filtering and scaling, see :mod:`bh_models.func.denoise`.
    denoise, gsr
        The named strategy and global signal regression (:data:`bh_models.func.denoise.STRATEGIES`).
    fd_threshold, std_dvars_threshold, min_segment
        Censoring of strategies that censor (``scrubbing``).
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
        ``max_fd``, ``n_censored``, ``tdof_lost``, ``strategy``, ``empty_parcels``, ``warnings``.

    Raises
    ------
    BHInputError
        3D BOLD, too few volumes, NaNs, bad or missing TR, missing anatomical
        inputs, too few frames left for the regressors, a CompCor strategy
        without CompCor components.
    BHConfigError
        Invalid cleaning settings or TR override.
    """
    scrubbing = Scrubbing(fd_threshold=fd_threshold, std_dvars_threshold=std_dvars_threshold, min_segment=min_segment)
    strategy = _check_settings(denoise=denoise, gsr=gsr, high_pass=high_pass, low_pass=low_pass, scrubbing=scrubbing,
                               standardize=standardize, save_mni_bold=save_mni_bold, out_mni_bold=out_mni_bold)
    _require_files(mni_t1w=Path(mni_t1w))
    signals = extract_run(bold=bold, t1w=t1w, t1w_mask=t1w_mask, t1w_to_mni=t1w_to_mni, mni_mask=mni_mask,
                          gm_probseg=gm_probseg, wm_probseg=wm_probseg, csf_probseg=csf_probseg,
                          tr_sidecar=tr_sidecar, tr_override=tr_override, resolution=resolution, networks=networks,
                          min_volumes=min_volumes, min_parcel_voxels=min_parcel_voxels,
                          save_mni_bold=save_mni_bold, seed=seed, threads=threads, echo_times=echo_times)
    run, motion, mni, parcels, confounds = (signals.run, signals.motion, signals.mni, signals.parcels,
                                            signals.confounds)
    denoised, notes = _clean(parcels, confounds, run=run, strategy=strategy, gsr=gsr, scrubbing=scrubbing,
                             min_volumes=min_volumes, detrend=detrend, high_pass=high_pass, low_pass=low_pass,
                             standardize=standardize)
    warnings = signals.warnings + notes

    # ---- outputs
    cleaning = {"strategy": strategy.name, "gsr": bool(gsr), "detrend": bool(detrend), "high_pass": high_pass,
                "low_pass": low_pass, "standardize": standardize, "method": "nilearn.signal.clean",
                "censoring": ({"fd_threshold": fd_threshold, "std_dvars_threshold": std_dvars_threshold,
                               "min_segment": int(min_segment), "method": "interpolate (cubic spline), filter, "
                               "regress on kept frames, remove"} if strategy.censor else None)}
    qc = _qc_measures(motion, confounds, denoised)
    _write_timeseries(out_timeseries, denoised, run=run, parcels=parcels, layout=mni.layout,
                      coreg_mi=signals.coreg_mi, cleaning=cleaning, qc=qc, min_parcel_voxels=min_parcel_voxels,
                      resolution=resolution, networks=networks, warnings=warnings)
    _write_confounds(out_confounds, confounds, motion=motion, censored=denoised.censored, tr=run.tr,
                     strategy=strategy.name)
    _write_qc(out_carpet, out_rois, mni, confounds, denoised, run=run, parcels=parcels, mni_t1w=Path(mni_t1w),
              scrubbing=scrubbing if strategy.censor else None)
    if save_mni_bold:
        _write_mni_bold(out_mni_bold, mni, run=run, resolution=resolution)

    return {
        "repetition_time": run.tr.seconds,
        "n_volumes": run.n_volumes,
        "n_frames_kept": denoised.n_kept,
        "mean_fd": motion.mean_fd,
        "max_fd": motion.max_fd,
        "n_censored": int(denoised.censored.sum()),
        "tdof_lost": denoised.tdof_lost,
        "strategy": strategy.name,
        "empty_parcels": parcels.empty_names,
        "warnings": warnings,
    }


QC_COLUMNS = (
    "RepetitionTime", "NumberOfVolumes", "NumberOfRows", "Strategy", "MeanFD", "MaxFD", "MeanDVARS",
    "MeanStdDVARS", "TSNRGreyMatter", "NumberOfCensoredFrames", "TemporalDegreesOfFreedomLost",
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
        ``n_runs``, ``median_mean_fd``, ``n_with_empty_parcels``, ``n_with_censoring``, ``n_with_warnings``.
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
        "n_with_censoring": int((pd.to_numeric(table["NumberOfCensoredFrames"]).fillna(0) > 0).sum()),
        "n_with_warnings": int((table["n_warnings"] > 0).sum()),
    }
