"""Schaefer-400 parcel time series with a fixed 400-column layout.

The mean over a parcel's voxels inside the mask is what
``nilearn.maskers.NiftiLabelsMasker(labels_img=atlas, mask_img=mask,
strategy="mean")`` computes (tested to 1e-5), but written as one sparse
(N voxels x 400) product on voxels that the one-shot resampler produced, so no
MNI-space 4D image has to exist. Unlike the masker, which silently drops
labels that have no voxel left inside the mask, the output always has 400
columns in atlas order (the models need a fixed layout): a parcel with fewer
than ``min_parcel_voxels`` usable voxels is filled with 0 (a flat series that
carries no signal; NaN would break cleaning and training) and listed in the
sidecar's ``EmptyParcels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import sparse

from bh_models.core.templates import atlas_labels

__desc__ = (
    "The mean BOLD signal was extracted from each of the 400 parcels of the "
    "Schaefer et al. 2018 atlas ({networks}-network version) over the voxels "
    "inside the subject's MNI-space brain mask and the BOLD field of view "
    "(equivalent to nilearn's NiftiLabelsMasker; Abraham et al. 2014); parcels "
    "with fewer than {min_parcel_voxels} such voxels were kept as zero series "
    "and listed in the run's sidecar."
)

N_PARCELS = 400
EMPTY_PARCEL_FILL = 0.0
# 5 voxels = 40 mm^3 at 2 mm: below that a "parcel mean" is a few voxels of partial volume.
MIN_PARCEL_VOXELS = 5


@dataclass(frozen=True)
class ParcelLayout:
    """Which template voxels feed which parcel.

    Attributes
    ----------
    indices : np.ndarray
        (N, 3) int voxel indices on the template grid (atlas label > 0 and in mask).
    labels : np.ndarray
        (N,) int parcel label (1..400) of each voxel.
    names : tuple of str
        The 400 ROI names in atlas order (column headers).
    affine : np.ndarray
        (4, 4) template grid affine.
    shape : tuple of int
        Template grid shape.
    """

    indices: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    affine: np.ndarray
    shape: tuple[int, int, int]

    def subset(self, keep: np.ndarray) -> ParcelLayout:
        """The layout restricted to voxels where ``keep`` (N,) is True."""
        return ParcelLayout(self.indices[keep], self.labels[keep], self.names, self.affine, self.shape)


def _same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-4)


def parcel_layout(
    *, atlas: nib.Nifti1Image, mask: nib.Nifti1Image | None = None, networks: int = 7
) -> ParcelLayout:
    """Voxels of the atlas inside the mask, in C order over the grid.

    Parameters
    ----------
    atlas : Nifti1Image
        Label image (0 = background, 1..400) on the template grid.
    mask : Nifti1Image or None
        Brain mask on the same grid; None keeps every atlas voxel.
    networks : int
        7 or 17: which label table names the columns.

    Returns
    -------
    ParcelLayout
    """
    labels = np.asarray(atlas.dataobj).astype(np.int64)
    keep = labels > 0
    if mask is not None:
        if not _same_grid(atlas, mask):
            raise ValueError("mask and atlas are not on the same grid; resample the mask first")
        keep &= np.asarray(mask.dataobj) > 0
    indices = np.argwhere(keep)  # (N, 3)
    names = tuple(atlas_labels(networks)["name"].astype(str))
    return ParcelLayout(
        indices=indices,
        labels=labels[keep],
        names=names,
        affine=atlas.affine,
        shape=tuple(int(n) for n in atlas.shape[:3]),
    )


def parcel_means(*, series: np.ndarray, labels: np.ndarray, n_parcels: int = N_PARCELS) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the voxel series per parcel.

    Parameters
    ----------
    series : np.ndarray
        (T, N) voxel time series.
    labels : np.ndarray
        (N,) parcel label (1..n_parcels) per voxel.
    n_parcels : int
        Number of columns of the output.

    Returns
    -------
    means : np.ndarray
        (T, n_parcels) float64; NaN for parcels without voxels.
    counts : np.ndarray
        (n_parcels,) int voxels per parcel.
    """
    n_voxels = len(labels)
    # One-hot (N, P) membership: the sum over a parcel is one sparse product.
    membership = sparse.csr_matrix(
        (np.ones(n_voxels), (np.arange(n_voxels), labels - 1)), shape=(n_voxels, n_parcels)
    )
    counts = np.bincount(labels - 1, minlength=n_parcels)[:n_parcels]
    sums = np.asarray((membership.T @ np.asarray(series, dtype=np.float64).T).T)  # (T, P)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return means, counts


def fill_empty_parcels(
    *, means: np.ndarray, counts: np.ndarray, min_parcel_voxels: int = MIN_PARCEL_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Replace parcels with too few voxels by :data:`EMPTY_PARCEL_FILL`.

    Returns
    -------
    filled : np.ndarray
        (T, P) with the sparse parcels' columns set to the fill value.
    empty : np.ndarray
        (P,) bool, True for the filled parcels.
    """
    empty = counts < max(int(min_parcel_voxels), 1)
    filled = means.copy()
    filled[:, empty] = EMPTY_PARCEL_FILL
    return filled, empty


def extract_parcel_series(
    *,
    img: nib.Nifti1Image,
    atlas: nib.Nifti1Image,
    mask: nib.Nifti1Image | None = None,
    networks: int = 7,
) -> tuple[np.ndarray, np.ndarray]:
    """Parcel means of a 4D image already on the atlas grid.

    Parameters
    ----------
    img : Nifti1Image
        4D image (X, Y, Z, T) on the template grid.
    atlas, mask, networks
        As in :func:`parcel_layout`.

    Returns
    -------
    means : np.ndarray
        (T, 400) float64; NaN where a parcel has no voxel.
    counts : np.ndarray
        (400,) voxels per parcel.
    """
    if not _same_grid(img, atlas):
        raise ValueError("image and atlas are not on the same grid; resample the image first")
    layout = parcel_layout(atlas=atlas, mask=mask, networks=networks)
    data = np.asarray(img.dataobj, dtype=np.float32)
    series = data[tuple(layout.indices.T)].T  # (N, T) -> (T, N)
    return parcel_means(series=series, labels=layout.labels)
