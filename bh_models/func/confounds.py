"""Confound time series of one BOLD run, with fMRIPrep's names, computed with nipype's algorithms.

Columns (``*_desc-confounds_timeseries.tsv``, one row per input volume, ``n/a``
where a value does not exist) and how each is computed:

``trans_*``, ``rot_*``
    Head motion (:mod:`bh_models.func.motion`), mm and rad; with
    ``_derivative1`` (backward difference, ``n/a`` in the first row),
    ``_power2`` and ``_derivative1_power2``, fMRIPrep's expansion (Friston
    et al. 1996; Satterthwaite et al. 2013).
``framewise_displacement``
    nipype ``FramewiseDisplacement`` (Power et al. 2012; 50 mm radius).
``dvars``, ``std_dvars``
    nipype ``ComputeDVARS`` (intensity-normalised to a median of 1000;
    ``std_dvars`` standardised by its expected value under an AR(1) model).
``global_signal``, ``csf``, ``white_matter``, ``csf_wm``, ``tcompcor``
    Means over the brain mask, the CSF, WM and combined aCompCor masks and the
    tCompCor voxels; ``global_signal``, ``csf`` and ``white_matter`` are
    expanded like the motion parameters.
``c_comp_cor_XX``, ``w_comp_cor_XX``, ``a_comp_cor_XX``
    nipype ``ACompCor`` (Behzadi et al. 2007) on the CSF, WM and combined masks
    (``merge_method='none'``, cosine pre-filter at 128 s, every component
    computed), renamed per mask as fMRIPrep >= 21 does. Written: the
    components up to 50 % of the mask's variance, at least
    :data:`COMPCOR_TOP_K` and at most :data:`COMPCOR_MAX_COLUMNS` (fMRIPrep
    writes exactly the 50 % set; the floor lets the ``acompcor`` strategy take
    the top five of each tissue, the ceiling keeps noise-dominated masks, whose
    50 % set can run to a hundred components, from filling the table).
``t_comp_cor_XX``, ``cosine_XX``
    nipype ``TCompCor``: the 2 % most variable brain voxels (after quadratic
    detrending), same pre-filter and column rule; ``cosine_XX`` is its
    discrete-cosine high-pass basis, absent when the run is shorter than
    the 128 s cut-off allows.
``motion_outlier_XX``
    One column per frame with FD > 0.5 mm or ``std_dvars`` > 1.5 (fMRIPrep's
    spike regressors); whether frames are censored is the strategy's choice
    (:mod:`bh_models.func.denoise`).

The sidecar JSON is keyed by column, as fMRIPrep writes it: CompCor entries carry
``Method``, ``Mask`` (not for tCompCor), ``SingularValue``,
``VarianceExplained``, ``CumulativeVarianceExplained`` and ``Retained``.

Masks, as fMRIPrep builds them (``acompcor_masks``, its route for discrete
segmentations), on the template grid the BOLD is resampled onto: from the
anatomical chain's tissue labels, grey matter dilated by 3 mm is an exclusion
zone; WM and CSF become pseudo partial-volume maps at the BOLD's voxel size;
the exclusion zone is removed from the WM and combined (WM + CSF) maps (the CSF
map is left as is); each is cut to the brain mask and thresholded at 0.99
(:func:`compcor_masks` says why not the partial-volume route).

CompCor, tCompCor and DVARS use only voxel time series, so they run on the
sampled voxels laid out as an (N, 1, 1, T) image: the same numbers as on the
full 4-D grid, in a private temporary folder. The brain-wide measures
(``global_signal``, ``dvars``, tCompCor) use the brain-mask voxels on a lattice of
every :data:`BRAIN_LATTICE_STEP`-th voxel along each axis (4 mm at 2 mm), which
the chain resamples anyway (a brain mask's worth of voxels costs as much as
keeping the MNI-space BOLD); DVARS uses at most :data:`DVARS_MAX_VOXELS` of
them, evenly spaced, and the grey-matter tSNR at most :data:`TSNR_MAX_VOXELS`
grey-matter voxels.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from bh_models.func.motion import FD_RADIUS_MM, PARAMETER_NAMES

__desc__ = (
    "Confound time series were computed with fMRIPrep's names (Esteban et al. 2019) and nipype's "
    "algorithms (Gorgolewski et al. 2011): framewise displacement and DVARS (Power et al. 2012), the "
    "global, white-matter and CSF mean signals, and anatomical (Behzadi et al. 2007) and temporal CompCor "
    "components from eroded white-matter and CSF masks (grey matter dilated by 3 mm removed; tissue maps "
    "smoothed to the BOLD resolution and thresholded at 0.99, as fMRIPrep does for discrete segmentations) "
    "after a 128 s cosine high-pass."
)

#: fMRIPrep's mask construction (its route for discrete segmentations).
GM_DILATION_MM = 3.0
MASK_THRESHOLD = 0.99
#: A CompCor mask with fewer voxels in the field of view gives no components (nipype would skip it silently).
MIN_MASK_VOXELS = 10
#: Columns written per CompCor set: the 50 % set, at least TOP_K, at most MAX_COLUMNS.
COMPCOR_TOP_K = 5
COMPCOR_MAX_COLUMNS = 10
VARIANCE_THRESHOLD = 0.5
COSINE_CUTOFF_S = 128.0
TCOMPCOR_PERCENTILE = 0.02
#: fMRIPrep's spike thresholds for ``motion_outlier_XX``.
SPIKE_FD_MM = 0.5
SPIKE_STD_DVARS = 1.5
#: Brain-wide measures sample every n-th brain voxel along each axis of the template grid.
BRAIN_LATTICE_STEP = 2
#: DVARS uses an evenly spaced subset of at most this many of those voxels: nipype fits an AR(1) model per
#: voxel in a Python loop (~0.15 ms each), and DVARS, an RMS over voxels, needs no more.
DVARS_MAX_VOXELS = 2000
#: tSNR in grey matter: the median over at most this many grey-matter voxels, evenly spaced.
TSNR_MAX_VOXELS = 20000
#: Tissue masks whose mean signals are written, in fMRIPrep's column names.
MASK_COLUMNS = {"CSF": "csf", "WM": "white_matter", "combined": "csf_wm"}
_COMPCOR_PREFIX = {"CSF": "c_comp_cor_", "WM": "w_comp_cor_", "combined": "a_comp_cor_"}


def expand_terms(table: pd.DataFrame, columns: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """fMRIPrep's expansion of ``columns``: ``x``, ``x_derivative1``, ``x_power2``, ``x_derivative1_power2``.

    The derivative is the backward difference, NaN (``n/a``) in the first row,
    as fMRIPrep writes it.
    """
    out = {}
    for name in columns:
        values = table[name].to_numpy(dtype=np.float64)
        derivative = np.concatenate([[np.nan], np.diff(values)])
        out[name] = values
        out[f"{name}_derivative1"] = derivative
        out[f"{name}_power2"] = values**2
        out[f"{name}_derivative1_power2"] = derivative**2
    return pd.DataFrame(out, index=table.index)


def motion_table(params: np.ndarray) -> pd.DataFrame:
    """The 24 motion columns of (T, 6) parameters (translations mm, rotations rad), fMRIPrep order."""
    return expand_terms(pd.DataFrame(np.asarray(params, dtype=np.float64), columns=list(PARAMETER_NAMES)),
                        PARAMETER_NAMES)


# --------------------------------------------------------------------------- masks


def volume_fraction(mask: np.ndarray, *, bold_mm: float, grid_mm: float) -> np.ndarray:
    """fMRIPrep's pseudo partial-volume map of a binary tissue mask (its ``mask2vf``).

    A Gaussian of sigma ``0.5 x bold_mm / grid_mm`` voxels, divided by the 99th
    percentile of the positive values and clipped to [0, 1].
    """
    smooth = ndimage.gaussian_filter(np.asarray(mask, dtype=np.float64), 0.5 * float(bold_mm) / float(grid_mm))
    positive = smooth[smooth > 0]
    if positive.size == 0:
        return smooth
    return np.clip(smooth / np.percentile(positive, 99), 0.0, 1.0)


def compcor_masks(*, probseg: dict[str, np.ndarray], brain: np.ndarray, grid_mm: float,
                  bold_mm: float) -> dict[str, np.ndarray]:
    """fMRIPrep's eroded CSF, WM and combined aCompCor masks on the template grid.

    The tissue labels (maximum posterior inside the brain mask) go through
    fMRIPrep's route for discrete segmentations: grey matter dilated by 3 mm is
    the exclusion zone; WM and CSF become pseudo partial-volume maps
    (:func:`volume_fraction`, scaled to the BOLD voxel size); the exclusion zone
    is removed from the WM and combined (WM + CSF) maps, not from the CSF map;
    each map is cut to the brain mask and thresholded at 0.99. (Atropos'
    posteriors are prior-weighted and diffuse -- GM > 0.05 covered 88 % of the
    demo brains -- so fMRIPrep's partial-volume route, which thresholds GM at
    0.05, would leave a few dozen voxels.) The grid the maps live on is the
    grid the BOLD is resampled onto, so no further resampling is needed.

    Parameters
    ----------
    probseg : dict
        ``"GM"``, ``"WM"``, ``"CSF"`` posteriors on the grid.
    brain : np.ndarray
        (X, Y, Z) bool brain mask on the grid.
    grid_mm : float
        Grid spacing (mm).
    bold_mm : float
        The BOLD run's voxel size (mm, geometric mean of its three sides).

    Returns
    -------
    dict
        ``"CSF"``, ``"WM"``, ``"combined"``: (X, Y, Z) bool masks.
    """
    brain = np.asarray(brain, dtype=bool)
    labels = np.argmax(np.stack([probseg[name] for name in ("GM", "WM", "CSF")]), axis=0)  # 0 GM, 1 WM, 2 CSF
    grey = brain & (labels == 0)
    exclusion = ndimage.distance_transform_edt(~grey, sampling=(float(grid_mm),) * 3) <= GM_DILATION_MM
    wm = volume_fraction(brain & (labels == 1), bold_mm=bold_mm, grid_mm=grid_mm)
    csf = volume_fraction(brain & (labels == 2), bold_mm=bold_mm, grid_mm=grid_mm)
    wm[exclusion] = 0.0
    combined = csf + wm
    combined[exclusion] = 0.0
    return {name: (pv > MASK_THRESHOLD) & brain for name, pv in (("CSF", csf), ("WM", wm), ("combined", combined))}


def brain_lattice(brain: np.ndarray, step: int = BRAIN_LATTICE_STEP) -> np.ndarray:
    """The brain-mask voxels whose indices are all multiples of ``step`` (bool, same shape)."""
    lattice = np.zeros(brain.shape, dtype=bool)
    lattice[::step, ::step, ::step] = True
    return lattice & np.asarray(brain, dtype=bool)


# --------------------------------------------------------------------------- nipype on sampled voxels


def _pseudo_4d(series: np.ndarray, repetition_time: float, path: Path) -> Path:
    """(T, V) voxel series as an (V, 1, 1, T) float32 NIfTI: what nipype's confound interfaces read."""
    data = np.ascontiguousarray(np.asarray(series, dtype=np.float32).T)[:, None, None, :]  # (V, 1, 1, T)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((1.0, 1.0, 1.0, float(repetition_time)))
    nib.save(img, path)
    return path


def _mask_file(mask: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(mask, dtype=np.uint8)[:, None, None], np.eye(4)), path)  # (V, 1, 1)
    return path


def _read_components(path: str) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


def _read_metadata(path: str) -> pd.DataFrame:
    meta = pd.read_csv(path, sep="\t", dtype={"component": str, "mask": str})
    meta["retained"] = meta["retained"].astype(str) == "True"
    return meta


def n_columns_to_write(cumulative: np.ndarray) -> int:
    """Columns written for one CompCor set: the 50 % set, at least TOP_K, at most MAX_COLUMNS, at most all."""
    cumulative = np.asarray(cumulative, dtype=np.float64)
    if cumulative.size == 0:
        return 0
    k50 = int(np.searchsorted(cumulative, VARIANCE_THRESHOLD) + 1)
    return int(min(max(k50, COMPCOR_TOP_K), COMPCOR_MAX_COLUMNS, cumulative.size))


def components_for_variance(cumulative: np.ndarray, threshold: float = VARIANCE_THRESHOLD) -> int:
    """The smallest number of components whose cumulative variance explained reaches ``threshold``."""
    return int(min(np.searchsorted(np.asarray(cumulative, dtype=np.float64), threshold) + 1, len(cumulative)))


def _compcor_entry(row: pd.Series, method: str, mask: str | None) -> dict:
    entry = {"CumulativeVarianceExplained": float(row["cumulative_variance_explained"]),
             "Method": method, "Retained": True, "SingularValue": float(row["singular_value"]),
             "VarianceExplained": float(row["variance_explained"])}
    if mask is not None:
        entry["Mask"] = mask
    return entry


def acompcor(*, series: np.ndarray, masks: dict[str, np.ndarray], repetition_time: float,
             work: Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """nipype ``ACompCor`` on sampled voxels: fMRIPrep-named components and their sidecar entries.

    Parameters
    ----------
    series : np.ndarray
        (T, V) voxel series (every voxel of any mask).
    masks : dict
        ``"CSF"``, ``"WM"``, ``"combined"``: (V,) bool; masks with fewer than
        :data:`MIN_MASK_VOXELS` voxels are left out (no columns).
    repetition_time : float
        Seconds (the cosine pre-filter's time axis).
    work : Path
        An empty private folder for nipype's files.

    Returns
    -------
    components : pd.DataFrame
        (T, K) ``c_comp_cor_XX``, ``w_comp_cor_XX``, ``a_comp_cor_XX`` (see :func:`n_columns_to_write`).
    metadata : dict
        Column -> fMRIPrep sidecar entry.
    """
    from nipype.algorithms.confounds import ACompCor

    names = [name for name in ("CSF", "WM", "combined") if int(np.sum(masks[name])) >= MIN_MASK_VOXELS]
    if not names:
        return pd.DataFrame(index=range(len(series))), {}
    bold = _pseudo_4d(series, repetition_time, work / "acompcor_bold.nii")
    interface = ACompCor(
        realigned_file=str(bold), mask_files=[str(_mask_file(masks[n], work / f"mask_{n}.nii")) for n in names],
        mask_names=names, merge_method="none", num_components="all", components_file="acompcor.tsv",
        header_prefix="a_comp_cor_", pre_filter="cosine", high_pass_cutoff=COSINE_CUTOFF_S,
        repetition_time=float(repetition_time), save_pre_filter=False, save_metadata=True, failure_mode="NaN",
    )
    result = interface.run(cwd=str(work))
    components = _read_components(result.outputs.components_file)
    meta = _read_metadata(result.outputs.metadata_file)
    columns, metadata = {}, {}
    for name in names:
        rows = meta[(meta["mask"] == name) & meta["retained"]]
        for k, (_, row) in enumerate(rows.head(n_columns_to_write(rows["cumulative_variance_explained"]))
                                     .iterrows()):
            column = f"{_COMPCOR_PREFIX[name]}{k:02d}"
            columns[column] = components[row["component"]].to_numpy()
            metadata[column] = _compcor_entry(row, "aCompCor", name)
    return pd.DataFrame(columns, index=range(len(series))), metadata


def tcompcor(*, series: np.ndarray, repetition_time: float, work: Path
             ) -> tuple[pd.DataFrame, dict[str, dict], np.ndarray]:
    """nipype ``TCompCor`` on the brain voxels: ``t_comp_cor_XX``, ``cosine_XX``, sidecar entries, its voxels.

    Returns
    -------
    columns : pd.DataFrame
        (T, K) ``t_comp_cor_XX`` then ``cosine_XX`` (the pre-filter basis;
        none when the run is too short for one cosine below 1/128 Hz).
    metadata : dict
        Column -> sidecar entry.
    high_variance : np.ndarray
        (V,) bool, the voxels tCompCor selected.
    """
    from nipype.algorithms.confounds import TCompCor

    bold = _pseudo_4d(series, repetition_time, work / "tcompcor_bold.nii")
    interface = TCompCor(
        realigned_file=str(bold), mask_files=[str(_mask_file(np.ones(series.shape[1], bool), work / "brain.nii"))],
        percentile_threshold=TCOMPCOR_PERCENTILE, num_components="all", components_file="tcompcor.tsv",
        header_prefix="t_comp_cor_", pre_filter="cosine", high_pass_cutoff=COSINE_CUTOFF_S,
        repetition_time=float(repetition_time), save_pre_filter=True, save_metadata=True, failure_mode="NaN",
    )
    result = interface.run(cwd=str(work))
    components = _read_components(result.outputs.components_file)
    meta = _read_metadata(result.outputs.metadata_file)
    rows = meta[meta["retained"]]
    columns, metadata = {}, {}
    for _, row in rows.head(n_columns_to_write(rows["cumulative_variance_explained"])).iterrows():
        columns[row["component"]] = components[row["component"]].to_numpy()
        metadata[row["component"]] = _compcor_entry(row, "tCompCor", None)
    pre_filter = Path(result.outputs.pre_filter_file)
    if pre_filter.stat().st_size > 0:  # nipype writes an empty file when the basis has no cosine
        basis = pd.read_csv(pre_filter, sep="\t")
        for k, name in enumerate(c for c in basis.columns if c.startswith("Cosine")):
            columns[f"cosine_{k:02d}"] = basis[name].to_numpy()
            metadata[f"cosine_{k:02d}"] = {"Description": f"discrete cosine basis function {k} of the CompCor "
                                                          f"high-pass filter ({COSINE_CUTOFF_S:g} s cut-off)"}
    masks = result.outputs.high_variance_masks
    mask_path = masks if isinstance(masks, str) else masks[0]  # a str when there is one mask
    high_variance = np.asarray(nib.load(mask_path).dataobj).reshape(-1) > 0
    return pd.DataFrame(columns, index=range(len(series))), metadata, high_variance


def dvars(*, series: np.ndarray, repetition_time: float, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """nipype ``ComputeDVARS`` on the brain voxels: (T,) ``dvars`` and ``std_dvars``, NaN in the first row."""
    from nipype.algorithms.confounds import ComputeDVARS

    bold = _pseudo_4d(series, repetition_time, work / "dvars_bold.nii")
    interface = ComputeDVARS(in_file=str(bold), in_mask=str(_mask_file(np.ones(series.shape[1], bool),
                                                                        work / "dvars_mask.nii")),
                             save_std=True, save_nstd=True, remove_zerovariance=True)
    result = interface.run(cwd=str(work))
    nstd = np.loadtxt(result.outputs.out_nstd, ndmin=1)
    std = np.loadtxt(result.outputs.out_std, ndmin=1)
    return np.concatenate([[np.nan], nstd]), np.concatenate([[np.nan], std])


def spike_regressors(*, fd: np.ndarray, std_dvars: np.ndarray) -> pd.DataFrame:
    """fMRIPrep's ``motion_outlier_XX``: one-hot columns for frames with FD > 0.5 mm or std DVARS > 1.5."""
    with np.errstate(invalid="ignore"):
        outliers = np.flatnonzero((np.nan_to_num(fd) > SPIKE_FD_MM) | (np.nan_to_num(std_dvars) > SPIKE_STD_DVARS))
    columns = {}
    for k, frame in enumerate(outliers):
        column = np.zeros(len(fd))
        column[frame] = 1.0
        columns[f"motion_outlier_{k:02d}"] = column
    return pd.DataFrame(columns, index=range(len(fd)))


# --------------------------------------------------------------------------- the run's table


@dataclass(frozen=True)
class VoxelSets:
    """Rows of the sampled voxel series that make each confound's voxel set (in view in every volume)."""

    brain: np.ndarray  # brain-mask lattice
    masks: dict[str, np.ndarray]  # "CSF", "WM", "combined"
    grey: np.ndarray  # GM posterior > 0.5 (tSNR)


@dataclass(frozen=True)
class Confounds:
    """The run's confound table, its sidecar entries and QC measures."""

    table: pd.DataFrame  # (T, columns), fMRIPrep names
    metadata: dict[str, dict]  # column -> sidecar entry
    mask_voxels: dict[str, int]  # voxels per CompCor / mean-signal set
    tcompcor_rows: np.ndarray  # rows of the voxel series tCompCor selected
    tsnr_gm: float
    notes: list[str] = field(default_factory=list)


def temporal_snr(series: np.ndarray) -> float:
    """Median over voxels of mean / std over time (ddof 0, no detrending); std <= 1e-3 voxels left out."""
    series = np.asarray(series, dtype=np.float64)
    if series.shape[1] == 0:
        return float("nan")
    std = series.std(axis=0)
    valid = std > 1e-3
    return float(np.median(series.mean(axis=0)[valid] / std[valid])) if valid.any() else float("nan")


def _mean_signals(series: np.ndarray, sets: VoxelSets) -> pd.DataFrame:
    """global_signal, csf, white_matter, csf_wm (NaN when a set is empty)."""
    def mean(rows: np.ndarray) -> np.ndarray:
        return series[:, rows].mean(axis=1, dtype=np.float64) if rows.size else np.full(len(series), np.nan)

    table = pd.DataFrame({"global_signal": mean(sets.brain)})
    for name, column in MASK_COLUMNS.items():
        table[column] = mean(sets.masks[name])
    return table


def compute_confounds(*, series: np.ndarray, sets: VoxelSets, params: np.ndarray, fd: np.ndarray,
                      repetition_time: float) -> Confounds:
    """Every confound column of one run from its resampled voxel series.

    Parameters
    ----------
    series : np.ndarray
        (T, N) voxel series on the template grid (raw, motion-corrected by the one-shot resampling).
    sets : VoxelSets
        Rows of ``series`` per voxel set.
    params : np.ndarray
        (T, 6) motion parameters (mm, rad).
    fd : np.ndarray
        (T,) framewise displacement, NaN first.
    repetition_time : float
        Seconds.
    """
    notes = []
    means = _mean_signals(series, sets)
    all_mask_rows = np.unique(np.concatenate([sets.masks[n] for n in MASK_COLUMNS]))
    local = {n: np.isin(all_mask_rows, sets.masks[n]) for n in MASK_COLUMNS}
    small = [f"{n} ({int(v.sum())})" for n, v in local.items() if v.sum() < MIN_MASK_VOXELS]
    if small:
        notes.append(f"aCompCor masks with fewer than {MIN_MASK_VOXELS} voxels in the field of view give no "
                     f"components: {', '.join(small)}")
    with tempfile.TemporaryDirectory(prefix="bh-confounds-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network
        (work / "a").mkdir(), (work / "t").mkdir(), (work / "d").mkdir()
        acc, acc_meta = acompcor(series=series[:, all_mask_rows], masks=local, repetition_time=repetition_time,
                                 work=work / "a")
        brain_series = series[:, sets.brain]
        tcc, tcc_meta, high_variance = tcompcor(series=brain_series, repetition_time=repetition_time,
                                                work=work / "t")
        step = -(-brain_series.shape[1] // DVARS_MAX_VOXELS)  # ceil
        dv, std_dv = dvars(series=brain_series[:, ::step], repetition_time=repetition_time, work=work / "d")
    means["tcompcor"] = brain_series[:, high_variance].mean(axis=1, dtype=np.float64)
    table = pd.concat([
        expand_terms(means, ["global_signal", "csf", "white_matter"]), means[["csf_wm", "tcompcor"]],
        pd.DataFrame({"std_dvars": std_dv, "dvars": dv, "framewise_displacement": fd}),
        tcc[[c for c in tcc.columns if c.startswith("t_comp_cor_")]], acc,
        tcc[[c for c in tcc.columns if c.startswith("cosine_")]], motion_table(params),
        spike_regressors(fd=fd, std_dvars=std_dv),
    ], axis=1)
    metadata = {**_basic_metadata(), **tcc_meta, **acc_meta}
    voxels = {"brain": int(sets.brain.size), "dvars": int(brain_series[:, ::step].shape[1]),
              **{n: int(v.size) for n, v in sets.masks.items()},
              "tcompcor": int(high_variance.sum()), "grey": int(sets.grey.size)}
    grey = sets.grey[::-(-sets.grey.size // TSNR_MAX_VOXELS)] if sets.grey.size else sets.grey
    return Confounds(table=table, metadata={k: metadata[k] for k in table.columns if k in metadata},
                     mask_voxels=voxels, tcompcor_rows=sets.brain[high_variance],
                     tsnr_gm=temporal_snr(series[:, grey]), notes=notes)


def _basic_metadata() -> dict[str, dict]:
    meta = {}
    for axis, name in zip("xyz", ("left-right", "anterior-posterior", "superior-inferior")):
        meta[f"trans_{axis}"] = {"Description": f"Translation along the {name} axis (RAS+ {axis}), relative to "
                                                "the reference volume.", "Units": "mm"}
        meta[f"rot_{axis}"] = {"Description": f"Rotation about the {name} axis (extrinsic x-y-z Euler angle about "
                                              "the field-of-view centre), relative to the reference volume.",
                               "Units": "rad"}
    meta["framewise_displacement"] = {"Description": "Power et al. 2012 FD (nipype FramewiseDisplacement, "
                                                     f"{FD_RADIUS_MM:g} mm radius); n/a for the first frame",
                                      "Units": "mm"}
    meta["dvars"] = {"Description": "DVARS (nipype ComputeDVARS), intensities normalised to a median of 1000; "
                                    "n/a for the first frame"}
    meta["std_dvars"] = {"Description": "DVARS divided by its expected value under an AR(1) model "
                                        "(nipype ComputeDVARS); n/a for the first frame"}
    for name, mask in (("global_signal", "the brain mask (lattice)"), ("csf", "the CSF aCompCor mask"),
                       ("white_matter", "the WM aCompCor mask"), ("csf_wm", "the combined aCompCor mask"),
                       ("tcompcor", "the tCompCor voxels")):
        meta[name] = {"Method": "Mean", "Description": f"mean signal over {mask}"}
    return meta
