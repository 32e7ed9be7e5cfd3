"""QC figures of the geometry stage: eigenmodes and functional gradients on the surface, the parcel matrix.

Both figures are drawn with matplotlib's Agg backend and saved without a
software-version stamp, so the same data give the same PNG bytes.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

_HEMI_NAMES = {"L": "left", "R": "right"}
_VIEWS = (("L", "lateral"), ("L", "medial"), ("R", "lateral"), ("R", "medial"))


def save_png(fig: plt.Figure, out_png: Path, dpi: int = 100) -> Path:
    """Save ``fig`` atomically as a byte-stable PNG and close it."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".png")
    os.close(fd)
    try:
        # No "Software" text chunk: the PNG then depends on the pixels only.
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out_png


def plot_modes_on_surface(
    *,
    meshes: dict[str, tuple[np.ndarray, np.ndarray]],
    values: dict[str, np.ndarray],
    mode_numbers: list[int],
    out_png: Path,
    row_label: str = "mode",
    title: str = "Laplace-Beltrami eigenmodes (red > 0 > blue; zero on the medial wall)",
) -> Path:
    """Maps on both hemispheres (eigenmodes, gradients): one row per map, lateral and medial views.

    Parameters
    ----------
    meshes : dict
        ``{"L": (vertices (n, 3), triangles (m, 3)), "R": ...}``.
    values : dict
        ``{"L": (n, len(mode_numbers)), "R": ...}`` mode values per vertex.
    mode_numbers : list of int
        1-based mode numbers, for the row titles.
    out_png : Path
    row_label, title : str
        Row-title word (``mode``, ``gradient``) and figure title.

    Returns
    -------
    Path
        ``out_png``.
    """
    from nilearn.plotting import plot_surf

    n_rows = len(mode_numbers)
    fig, axes = plt.subplots(n_rows, len(_VIEWS), figsize=(3.0 * len(_VIEWS), 2.4 * n_rows),
                             subplot_kw={"projection": "3d"}, squeeze=False)
    for row, mode in enumerate(mode_numbers):
        # One symmetric colour range per mode across hemispheres: signs and amplitudes compare.
        vmax = max(float(np.abs(values[h][:, row]).max()) for h in values) or 1.0
        for col, (hemi, view) in enumerate(_VIEWS):
            plot_surf(meshes[hemi], surf_map=values[hemi][:, row], hemi=_HEMI_NAMES[hemi], view=view,
                      engine="matplotlib", cmap="RdBu_r", vmin=-vmax, vmax=vmax, colorbar=False,
                      axes=axes[row, col], figure=fig)
            axes[row, col].set_title(f"{row_label} {mode}, {hemi} {view}" if col == 0 else f"{hemi} {view}",
                                     fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, out_png, dpi=80)


def _network_blocks(names: list[str]) -> list[tuple[int, int, str]]:
    """Runs of consecutive ROIs with the same hemisphere and network: (start, stop, label)."""
    keys = [" ".join(re.sub(r"^\d+Networks_", "", n).split("_")[:2]) for n in names]
    blocks, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            blocks.append((start, i, keys[start]))
            start = i
    return blocks


def plot_parcel_matrix(*, matrix: np.ndarray, names: list[str], out_png: Path) -> Path:
    """Heatmap of the 400 x M parcel embedding, rows grouped by hemisphere and network.

    Each column is divided by its largest absolute value, so the colour shows
    the spatial pattern of every mode (the constant mode 1 is uniform red).

    Parameters
    ----------
    matrix : ndarray, (n_rois, M)
    names : list of str
        ROI names in row order (``7Networks_LH_Vis_1`` style).
    out_png : Path

    Returns
    -------
    Path
        ``out_png``.
    """
    scale = np.abs(matrix).max(axis=0)
    scale[scale == 0] = 1.0
    fig, ax = plt.subplots(figsize=(9, 8))
    image = ax.imshow(matrix / scale, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    blocks = _network_blocks(names)
    for start, _, _ in blocks[1:]:
        ax.axhline(start - 0.5, color="black", linewidth=0.4)
    ax.set_yticks([(a + b - 1) / 2 for a, b, _ in blocks], [label for _, _, label in blocks], fontsize=5)
    ax.set_xlabel("mode")
    ax.set_xticks(np.arange(0, matrix.shape[1], max(1, matrix.shape[1] // 10)),
                  [str(i + 1) for i in range(0, matrix.shape[1], max(1, matrix.shape[1] // 10))])
    ax.set_title(f"Geometric embedding: {matrix.shape[0]} parcels x {matrix.shape[1]} eigenmodes "
                 "(each mode scaled to max |value| = 1)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return save_png(fig, out_png, dpi=100)
