"""QC figures of the anatomical chain (fMRIPrep style), byte-reproducible.

Three mosaics, each three rows of slices (sagittal, coronal, axial):

- :func:`plot_mask_contour`: the brain-mask contour (red) over the native T1w;
- :func:`plot_registration`: edges of the template (cyan: brain outline and
  the white-matter boundary, contours of the smoothed template) over the T1w
  resampled into template space;
- :func:`plot_segmentation`: the tissue labels (white matter and CSF in
  colour) over the template-space T1w.

Slices are shown in the closest RAS orientation of the image (radiological
conventions aside, left is left). Matplotlib's Agg backend with a fixed size,
fixed colour limits and no ``Software`` stamp makes identical inputs give
identical PNG bytes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

N_SLICES = 7
_AXES = (("sagittal", 0), ("coronal", 1), ("axial", 2))


def _canonical(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)


def _slice_positions(extent_mask: np.ndarray, axis: int, n: int) -> np.ndarray:
    """``n`` slice indices spread over the central 80 % of the mask along ``axis``."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(extent_mask.any(axis=other))
    if present.size == 0:
        present = np.arange(extent_mask.shape[axis])
    lo, hi = present[0], present[-1]
    return np.unique(np.round(np.linspace(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo), n)).astype(int))


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    # Rows = second remaining axis (up), columns = first; origin lower.
    return np.take(volume, index, axis=axis).T


def _window(image: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    values = image[where] if where.any() else image.ravel()
    lo, hi = np.percentile(values, [2, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _save(fig, out_png: Path) -> Path:
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".png")
    os.close(fd)
    try:
        # No "Software" stamp: the bytes then depend on the data only.
        fig.savefig(tmp, dpi=80, metadata={"Software": None}, facecolor="black")
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out_png


def _slice_grid(plt, *, extent_mask: np.ndarray, aspect) -> tuple:
    """A black 3 x N_SLICES figure and, per drawable cell, (axes, plane name, axis, slice index, aspect ratio)."""
    fig, axes = plt.subplots(3, N_SLICES, figsize=(2.0 * N_SLICES, 6.6), facecolor="black")
    cells = []
    for row, (name, axis) in enumerate(_AXES):
        positions = _slice_positions(extent_mask, axis, N_SLICES)
        other = [a for a in range(3) if a != axis]
        ratio = aspect[other[1]] / aspect[other[0]]
        for col in range(N_SLICES):
            axes[row, col].set_axis_off()
            if col < len(positions):
                cells.append((axes[row, col], name, axis, int(positions[col]), ratio))
    return fig, cells


def _mosaic(*, background: np.ndarray, overlays: list[tuple[np.ndarray, float, str]], extent_mask: np.ndarray,
            window: tuple[float, float], aspect: tuple[float, float, float], title: str, out_png: Path) -> Path:
    """Three rows of slices of ``background`` with contour ``overlays`` (volume, level, colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, cells = _slice_grid(plt, extent_mask=extent_mask, aspect=aspect)
    for ax, name, axis, index, ratio in cells:
        ax.imshow(_take(background, axis, index), cmap="gray", vmin=window[0], vmax=window[1],
                  origin="lower", interpolation="nearest", aspect=ratio)
        for volume, level, colour in overlays:
            plane = _take(volume, axis, index)
            if plane.min() < level < plane.max():
                ax.contour(plane, levels=[level], colors=colour, linewidths=0.8)
        ax.set_title(f"{name} {index}", color="white", fontsize=7)
    fig.suptitle(title, color="white", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.02, hspace=0.12)
    return _save(fig, out_png)


def plot_mask_contour(*, image: nib.Nifti1Image, mask: nib.Nifti1Image, title: str, out_png: Path) -> Path:
    """Brain-mask contour over the native T1w (3 rows x :data:`N_SLICES`).

    Parameters
    ----------
    image : Nifti1Image
        T1w head image (bias-corrected or raw).
    mask : Nifti1Image
        Brain mask on the same grid.
    title : str
        Figure title (file name stem; no paths).
    out_png : Path
        Written atomically.
    """
    data = _canonical(image)
    brain = _canonical(mask) > 0
    zooms = nib.as_closest_canonical(image).header.get_zooms()[:3]
    head = data > np.percentile(data, 60)
    return _mosaic(background=data, overlays=[(brain.astype(np.float32), 0.5, "red")], extent_mask=brain,
                   window=_window(data, head | brain), aspect=tuple(float(z) for z in zooms),
                   title=title, out_png=out_png)


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    mass = np.cumsum(hist * centres)
    between = (mass[-1] * weight / weight[-1] - mass) ** 2 / (weight * (weight[-1] - weight) + 1e-12)
    return float(centres[np.argmax(between[:-1])])


def template_edges(template: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Smoothed template and the level of its grey/white boundary.

    Two Otsu thresholds inside the mask: the first parts CSF from tissue, the
    second (over the tissue) grey from white matter.
    """
    smooth = ndimage.gaussian_filter(template.astype(np.float32), 1.0)
    values = smooth[mask]
    tissue = values[values > _otsu(values)]
    return smooth, _otsu(tissue)


def plot_registration(*, image: nib.Nifti1Image, template: nib.Nifti1Image, template_mask: nib.Nifti1Image,
                      title: str, out_png: Path) -> Path:
    """Template edges over the T1w registered to it (3 rows x :data:`N_SLICES`).

    Parameters
    ----------
    image : Nifti1Image
        Subject T1w in template space.
    template, template_mask : Nifti1Image
        Template and its brain mask on the same grid.
    title : str
        Figure title.
    out_png : Path
        Written atomically.
    """
    data = _canonical(image)
    tpl = _canonical(template)
    tmask = _canonical(template_mask) > 0
    smooth, wm_level = template_edges(tpl, tmask)
    outline = ndimage.gaussian_filter(tmask.astype(np.float32), 0.7)
    zooms = nib.as_closest_canonical(image).header.get_zooms()[:3]
    return _mosaic(background=data, overlays=[(outline, 0.5, "cyan"), (smooth, wm_level, "yellow")],
                   extent_mask=tmask, window=_window(data, data > 0), aspect=tuple(float(z) for z in zooms),
                   title=title, out_png=out_png)


def plot_segmentation(*, image: nib.Nifti1Image, probseg: dict[str, np.ndarray], mask: np.ndarray, title: str,
                      out_png: Path) -> Path:
    """Tissue labels over the template-space T1w (3 rows x :data:`N_SLICES`).

    Translucent colour where the posterior is highest: white matter cyan, CSF
    magenta; grey matter left uncoloured. (Colour images, not contours: a third
    of the drawing time of :func:`plot_registration`'s contours.)

    Parameters
    ----------
    image : Nifti1Image
        T1w on the grid of the posteriors (RAS template grid).
    probseg : dict
        ``"GM"``, ``"WM"`` and ``"CSF"`` posteriors, (X, Y, Z) arrays on that grid.
    mask : np.ndarray
        (X, Y, Z) brain mask.
    title : str
        Figure title.
    out_png : Path
        Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canonical = nib.as_closest_canonical(image)
    if not np.allclose(canonical.affine, image.affine):
        raise ValueError("plot_segmentation expects an image stored RAS (the template grid)")
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    brain = np.asarray(mask, dtype=bool)
    label = np.argmax(np.stack([probseg[name] for name in ("GM", "WM", "CSF")]), axis=0)
    colours = {1: (0.0, 1.0, 1.0, 0.45), 2: (1.0, 0.0, 1.0, 0.55)}  # WM, CSF
    zooms = canonical.header.get_zooms()[:3]
    window = _window(data, brain)
    fig, cells = _slice_grid(plt, extent_mask=brain, aspect=zooms)
    for ax, name, axis, index, ratio in cells:
        ax.imshow(_take(data, axis, index), cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                  interpolation="nearest", aspect=ratio)
        labels, inside = _take(label, axis, index), _take(brain, axis, index)
        overlay = np.zeros((*labels.shape, 4), dtype=np.float32)
        for value, rgba in colours.items():
            overlay[(labels == value) & inside] = rgba
        ax.imshow(overlay, origin="lower", interpolation="nearest", aspect=ratio)
        ax.set_title(f"{name} {index}", color="white", fontsize=7)
    fig.suptitle(title, color="white", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.02, hspace=0.12)
    return _save(fig, out_png)
