"""nibabel <-> antspyx images in memory, with the exact world geometry (RAS+ <-> LPS+).

The anatomical chain (N4, registration, skull-strip checks) and the functional
chain (coregistration) both hand images to ANTs; this is the one place that
converts them, so oblique and LPI-stored inputs keep their geometry without
temporary files.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

# RAS+ (nibabel) <-> LPS+ (ITK/ANTs): flip the sign of x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_to_ants(img: nib.Nifti1Image):
    """Convert a 3D nibabel image to an ANTs image with the same world geometry."""
    import ants

    affine = img.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = _RAS_TO_LPS @ affine[:3, :3] / spacing  # unit columns, LPS+
    origin = _RAS_TO_LPS @ affine[:3, 3]
    data = np.asarray(img.dataobj, dtype=np.float32)
    return ants.from_numpy(
        data, origin=origin.tolist(), spacing=spacing.tolist(), direction=direction
    )


def ants_to_nifti(image, *, dtype: type = np.float32) -> nib.Nifti1Image:
    """Convert an ANTs image back to nibabel (RAS+ affine, voxel order unchanged)."""
    spacing = np.asarray(image.spacing, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ (np.asarray(image.direction, dtype=float) * spacing)
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.origin, dtype=float)
    return nib.Nifti1Image(image.numpy().astype(dtype), affine)
