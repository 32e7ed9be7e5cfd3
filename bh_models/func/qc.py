"""QC figure of one BOLD run: FD trace over a carpet plot (Power 2017 style).

Three panels share the time axis (seconds, so runs with different TRs read
alike): framewise displacement with the censoring threshold; the carpet of
MNI-space voxel series inside the Schaefer-400 parcels (detrended, z-scored,
rows ordered by parcel so networks form bands); and the cleaned parcel series
that go to the models. Matplotlib's Agg backend with fixed size, colour limits
and metadata makes the PNG byte-identical for identical inputs.
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
) -> Path:
    """Write the FD trace + carpet PNG of one run.

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
        axes[0].axhline(fd_threshold, color="k", linestyle="--", linewidth=0.6)
        censored = np.setdiff1d(np.arange(n_frames), kept_frames)
        axes[0].plot(time_s[censored], np.nan_to_num(fd[censored]), "kx", markersize=3)
    finite = fd[np.isfinite(fd)]
    axes[0].set_ylabel("FD (mm)")
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

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd_tmp, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".png")
    os.close(fd_tmp)
    try:
        # No "Software" stamp: the bytes then depend on the data only.
        fig.savefig(tmp, dpi=80, metadata={"Software": None})
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out_png
