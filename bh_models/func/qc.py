"""QC figures of one BOLD run: FD and DVARS over a carpet plot (Power 2017 style), and the confound masks.

:func:`plot_carpet`: three panels share the time axis (seconds, so runs with
different TRs read alike): framewise displacement and standardised DVARS with
the censoring thresholds and censored frames; the carpet of MNI-space voxel
series inside the Schaefer-400 parcels (detrended, z-scored, rows ordered by
parcel so networks form bands); and the cleaned parcel series that go to the
models.

:func:`plot_rois`: the brain mask and the eroded aCompCor masks (CSF, WM,
combined) the confounds came from, and the tCompCor voxels, over the T1w on the
template grid the BOLD was resampled onto (fMRIPrep's "ROIs" reportlet).

Matplotlib's Agg backend with fixed size, colour limits and metadata makes the
PNGs byte-identical for identical inputs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

MAX_CARPET_ROWS = 1500  # a screen shows ~1000 rows; more only costs file size


def _zscore_rows(series: np.ndarray) -> np.ndarray:
    """(T, N) -> (N, T) linearly detrended, z-scored rows for display."""
    t = np.arange(series.shape[0], dtype=np.float64)
    design = np.stack([np.ones_like(t), t - t.mean()], axis=1)  # (T, 2)
    beta, *_ = np.linalg.lstsq(design, series.astype(np.float64), rcond=None)
    residual = series - design @ beta
    std = residual.std(axis=0)
    std[std == 0] = 1.0
    return (residual / std).T


def plot_carpet(
    *,
    voxel_series: np.ndarray,
    voxel_labels: np.ndarray,
    cleaned: np.ndarray,
    kept_frames: np.ndarray,
    fd: np.ndarray,
    repetition_time: float,
    fd_threshold: float | None,
    title: str,
    out_png: Path,
    std_dvars: np.ndarray | None = None,
    std_dvars_threshold: float | None = None,
) -> Path:
    """Write the FD/DVARS traces + carpet PNG of one run.

    Parameters
    ----------
    voxel_series : np.ndarray
        (T, N) MNI-space voxel series (uncleaned) inside the parcels.
    voxel_labels : np.ndarray
        (N,) parcel label per voxel (rows are sorted by it).
    cleaned : np.ndarray
        (T_kept, 400) cleaned parcel series.
    kept_frames : np.ndarray
        (T_kept,) indices of the frames that ``cleaned`` holds.
    fd : np.ndarray
        (T,) framewise displacement (mm), NaN for the first frame.
    repetition_time : float
        Seconds per frame.
    fd_threshold : float or None
        Censoring threshold, drawn when given.
    title : str
        Figure title (the run's name; no paths).
    out_png : Path
        Written atomically.
    std_dvars : np.ndarray or None
        (T,) standardised DVARS (NaN first), drawn on a second axis when given.
    std_dvars_threshold : float or None
        Its censoring threshold, drawn when given.

    Returns
    -------
    Path
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_frames = voxel_series.shape[0]
    order = np.argsort(voxel_labels, kind="stable")
    step = max(1, int(np.ceil(len(order) / MAX_CARPET_ROWS)))
    rows = order[::step]  # deterministic thinning, keeps the parcel order
    carpet = _zscore_rows(voxel_series[:, rows])
    seconds = n_frames * repetition_time

    fig, axes = plt.subplots(
        3, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [1, 3, 2]}
    )
    time_s = np.arange(n_frames) * repetition_time
    axes[0].plot(time_s, fd, color="tab:red", linewidth=0.8)
    if fd_threshold is not None:
        axes[0].axhline(fd_threshold, color="tab:red", linestyle="--", linewidth=0.6)
    censored = np.setdiff1d(np.arange(n_frames), kept_frames)
    if censored.size:
        axes[0].plot(time_s[censored], np.nan_to_num(fd[censored]), "kx", markersize=3)
    if std_dvars is not None:
        twin = axes[0].twinx()
        twin.plot(time_s, std_dvars, color="tab:blue", linewidth=0.6)
        if std_dvars_threshold is not None:
            twin.axhline(std_dvars_threshold, color="tab:blue", linestyle="--", linewidth=0.6)
        twin.set_ylabel("std DVARS", color="tab:blue")
    finite = fd[np.isfinite(fd)]
    axes[0].set_ylabel("FD (mm)", color="tab:red")
    axes[0].set_title(f"{title}   mean FD {finite.mean() if finite.size else 0:.3f} mm, TR {repetition_time:g} s")

    extent = (0, seconds, len(rows), 0)
    axes[1].imshow(carpet, aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest", extent=extent)
    axes[1].set_ylabel("voxels\n(by parcel)")
    axes[1].set_yticks([])

    full = np.full((n_frames, cleaned.shape[1]), np.nan)
    full[kept_frames] = cleaned
    limit = float(np.nanpercentile(np.abs(cleaned), 98)) if cleaned.size and np.isfinite(cleaned).any() else 1.0
    axes[2].imshow(
        full.T, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest",
        extent=(0, seconds, cleaned.shape[1], 0),
    )
    axes[2].set_ylabel("parcels\n(cleaned)")
    axes[2].set_xlabel("time (s)")
    fig.tight_layout()

    return _save(fig, out_png)


def _save(fig, out_png: Path, **kwargs) -> Path:
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd_tmp, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".png")
    os.close(fd_tmp)
    try:
        # No "Software" stamp: the bytes then depend on the data only.
        fig.savefig(tmp, dpi=80, metadata={"Software": None}, **kwargs)
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out_png


# Drawn in this order: the combined mask (WM + CSF) shows where neither WM nor CSF covers it.
ROI_COLOURS = {"combined": "lime", "WM": "cyan", "CSF": "magenta"}
N_ROI_SLICES = 5


def plot_rois(*, background: np.ndarray, brain: np.ndarray, masks: dict[str, np.ndarray],
              tcompcor_voxels: np.ndarray, title: str, out_png: Path) -> Path:
    """The confound masks over the template-space T1w: 3 rows (sagittal, coronal, axial) x 5 slices.

    Parameters
    ----------
    background : np.ndarray
        (X, Y, Z) T1w on the template grid (RAS voxel axes).
    brain : np.ndarray
        (X, Y, Z) bool brain mask.
    masks : dict
        ``"CSF"``, ``"WM"``, ``"combined"``: (X, Y, Z) bool aCompCor masks.
    tcompcor_voxels : np.ndarray
        (M, 3) template voxels tCompCor selected (drawn as dots: they lie on a lattice).
    title : str
        Figure title (the run's name; no paths).
    out_png : Path
        Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    background = np.asarray(background, dtype=np.float32)
    values = background[brain] if brain.any() else background.ravel()
    vmin, vmax = (float(v) for v in np.percentile(values, [2, 99.5]))
    fig, axes = plt.subplots(3, N_ROI_SLICES, figsize=(2.0 * N_ROI_SLICES, 6.6), facecolor="black")
    for row, axis in enumerate((0, 1, 2)):
        present = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = (present[0], present[-1]) if present.size else (0, brain.shape[axis] - 1)
        positions = np.round(np.linspace(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), N_ROI_SLICES)).astype(int)
        for col, index in enumerate(positions):
            ax = axes[row, col]
            ax.set_axis_off()
            ax.imshow(np.take(background, index, axis=axis).T, cmap="gray", vmin=vmin, vmax=vmax,
                      origin="lower", interpolation="nearest")
            plane = np.take(brain, index, axis=axis).T.astype(np.float32)
            if plane.min() < 0.5 < plane.max():
                ax.contour(plane, levels=[0.5], colors="red", linewidths=0.7)
            # Masks as translucent colour (one image per panel: contours of every mask cost 10x more).
            overlay = np.zeros((*plane.shape, 4), dtype=np.float32)
            for name, colour in ROI_COLOURS.items():
                inside = np.take(masks[name], index, axis=axis).T
                overlay[inside] = (*matplotlib.colors.to_rgb(colour), 0.55)
            ax.imshow(overlay, origin="lower", interpolation="nearest")
            on_slice = tcompcor_voxels[tcompcor_voxels[:, axis] == index]
            other = [a for a in range(3) if a != axis]
            if len(on_slice):
                ax.plot(on_slice[:, other[0]], on_slice[:, other[1]], ".", color="yellow", markersize=2)
    fig.suptitle(title, color="white", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.02, hspace=0.05)
    return _save(fig, out_png, facecolor="black")
