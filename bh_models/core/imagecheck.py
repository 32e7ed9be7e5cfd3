"""NIfTI I/O: open images defensively (every failure names the file and the fix), save atomically."""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from bh_models.core.errors import BHInputError

_READ_ERRORS = (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError)


def load_image(path: str | os.PathLike, *, ndim: int, what: str = "image") -> nib.spatialimages.SpatialImage:
    """Load a NIfTI header and check its dimensionality.

    Parameters
    ----------
    path
        The image file.
    ndim
        3 for a T1w volume, 4 for a BOLD series. A 4D image with one volume
        counts as 3D, and a 3D image is never accepted where 4D is expected.
    what
        Words for the message, e.g. "T1w" or "BOLD run".
    """
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, f"{what} file not found", "check the BIDS dataset")
    if path.stat().st_size == 0:
        raise BHInputError(path, f"{what} file is empty (0 bytes)", "re-export or re-download the image")
    try:
        img = nib.load(path)
        shape = img.shape
    except _READ_ERRORS as exc:
        raise BHInputError(path, f"{what} is not a readable NIfTI file ({type(exc).__name__}: {exc})",
                           "re-export the image (e.g. with dcm2niix) or exclude the subject") from exc
    effective = len(shape) if not (len(shape) == 4 and shape[3] == 1) else 3
    if effective != ndim:
        hint = ("a 4D series was given where one 3D volume is expected; pick one volume or the right file"
                if ndim == 3 else "a 3D volume was given where a 4D time series is expected; use the BOLD series")
        raise BHInputError(path, f"{what} is {len(shape)}D with shape {shape}, expected {ndim}D", hint)
    return img


def read_data(img: nib.spatialimages.SpatialImage, path: str | os.PathLike, *, what: str = "image",
              dtype: type = np.float32) -> np.ndarray:
    """Read the voxel data, turning truncation and NaNs into clear errors."""
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except _READ_ERRORS as exc:
        raise BHInputError(path, f"{what} data is corrupt or truncated ({type(exc).__name__}: {exc})",
                           "re-export the image or exclude the subject") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise BHInputError(path, f"{what} has {n_bad} NaN or infinite voxels",
                           "fix the conversion that produced the image, or exclude the subject")
    if not np.any(data):
        raise BHInputError(path, f"{what} is all zeros", "check the file; it holds no image")
    return data


def save_nifti(path: Path, img: nib.Nifti1Image) -> None:
    """Save atomically (temporary file, then rename): a killed job leaves no partial image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(img, tmp)  # nibabel's gzip writer stores no time stamp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
