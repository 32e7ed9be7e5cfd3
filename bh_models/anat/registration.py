"""Bias-field correction (N4) and registration to the MNI template with antspyx.

Images travel between nibabel (RAS+ world coordinates, the project's I/O) and
ANTs (LPS+ physical coordinates) in memory through
:func:`bh_models.core.antsio.nifti_to_ants` and ``ants_to_nifti``, so oblique
and LPI-stored inputs keep their exact world geometry without temporary files.

Registration writes ANTs composite transforms (one HDF5 file per direction):
the forward file resamples a T1w-space image into template space, the inverse
file resamples a template-space image into T1w space. The functional chain
reuses them as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from bh_models.core.antsio import ants_to_nifti, nifti_to_ants

__desc__ = (
    "The T1w image was corrected for intensity non-uniformity with N4 "
    "(Tustison et al. 2010) inside the brain mask and spatially normalised to "
    "MNI152NLin2009cAsym with antsRegistration (ANTs, via antspyx; Avants et al. "
    "2008), using the '{type_of_transform}' preset (mutual information, then "
    "symmetric normalisation) at {registration_resolution:g} mm on the "
    "brain-extracted images."
)

# antspyx presets that map a T1w onto the template with an affine stage and a
# deformable stage; single-stage linear presets are allowed for quick checks.
SUPPORTED_TRANSFORMS = ("SyN", "SyNRA", "SyNCC", "SyNAggro", "ElasticSyN", "Affine", "Rigid")

def limit_itk_threads(threads: int) -> None:
    """Cap ITK (ANTs) threads for this process.

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` when it first needs a
    thread pool and keeps that value for the life of the process, so call this
    before the first antspyx call. Seeded antsRegistration with the Mattes
    mutual-information metric is byte-reproducible with one thread only (the
    per-thread partial sums meet in a scheduling-dependent order; measured with
    antspyx 0.6.1), so steps that promise identical bytes use ``threads=1``.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))


def n4_bias_correct(
    *, image: nib.Nifti1Image, mask: nib.Nifti1Image, shrink_factor: int = 4
) -> nib.Nifti1Image:
    """N4 bias-field correction estimated inside ``mask``.

    Parameters
    ----------
    image : Nifti1Image
        T1w head or brain image (float).
    mask : Nifti1Image
        Brain mask on the same grid; N4 fits the bias field to these voxels only,
        so scalp and background do not pull the fit.
    shrink_factor : int
        Downsampling of the fit (ANTs default 4); the field is smooth, so this
        costs no accuracy and saves most of the time.

    Returns
    -------
    Nifti1Image
        Corrected image (float32, same grid); voxels outside the mask keep the
        extrapolated correction and are removed later by the brain mask.
    """
    import ants

    data = np.asarray(image.dataobj, dtype=np.float32)
    # N4 works on log intensities: clip negatives from interpolation or
    # scanner offsets and lift zeros so every masked voxel has a finite log.
    floor = max(float(np.percentile(data[data > 0], 0.1)), 1e-3) if (data > 0).any() else 1.0
    data = np.clip(data, floor, None)
    corrected = ants.n4_bias_field_correction(
        nifti_to_ants(nib.Nifti1Image(data, image.affine)),
        mask=nifti_to_ants(mask),
        shrink_factor=shrink_factor,
    )
    return ants_to_nifti(corrected)


def _check_transform_type(type_of_transform: str) -> None:
    from bh_models.core.errors import BHConfigError

    if type_of_transform not in SUPPORTED_TRANSFORMS:
        raise BHConfigError(
            "anat.type_of_transform",
            f"'{type_of_transform}' is not a supported antspyx preset",
            f"use one of {', '.join(SUPPORTED_TRANSFORMS)}",
        )


def register_to_template(
    *,
    moving: nib.Nifti1Image,
    template: nib.Nifti1Image,
    out_forward: Path,
    out_inverse: Path,
    type_of_transform: str = "SyN",
    seed: int = 0,
) -> None:
    """Register a brain-extracted T1w to a brain-extracted template.

    Parameters
    ----------
    moving : Nifti1Image
        Brain-extracted, bias-corrected T1w in native space.
    template : Nifti1Image
        Brain-extracted template at the working resolution; its grid sets the
        cost of the registration.
    out_forward : Path
        Written: composite transform (HDF5) that resamples T1w-space images into
        template space (``ants.apply_transforms(template, t1w, [out_forward])``).
    out_inverse : Path
        Written: composite transform that resamples template-space images into
        T1w space.
    type_of_transform : str
        antspyx preset, one of :data:`SUPPORTED_TRANSFORMS`.
    seed : int
        Seed of the metric's random sampling; with a fixed ITK thread count
        (:func:`limit_itk_threads`) two runs write identical transforms.
    """
    import ants

    _check_transform_type(type_of_transform)
    out_forward, out_inverse = Path(out_forward), Path(out_inverse)
    for out in (out_forward, out_inverse):
        out.parent.mkdir(parents=True, exist_ok=True)
    # ANTs writes <prefix>Composite.h5; keep those files next to the outputs so
    # the final rename is atomic, and never in a shared temp folder.
    with tempfile.TemporaryDirectory(dir=out_forward.parent, prefix=".ants-") as work:
        result = ants.registration(
            fixed=nifti_to_ants(template),
            moving=nifti_to_ants(moving),
            type_of_transform=type_of_transform,
            outprefix=str(Path(work) / "reg_"),
            write_composite_transform=True,
            # ANTs reads --random-seed 0 as "unset" and seeds from the clock: shift by one.
            random_seed=str(int(seed) % (2**31 - 2) + 1),
        )
        # shutil.move renames (atomic) when the output is on the same file system.
        shutil.move(result["fwdtransforms"], out_forward)
        shutil.move(result["invtransforms"], out_inverse)


def apply_transform(
    *,
    image: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    transform: Path,
    interpolation: str = "linear",
) -> nib.Nifti1Image:
    """Resample ``image`` onto the grid of ``reference`` through an ANTs transform.

    Parameters
    ----------
    image : Nifti1Image
        Image to move (3D).
    reference : Nifti1Image
        Target grid (only its geometry is used).
    transform : Path
        ANTs transform file (composite ``.h5`` or affine ``.mat``).
    interpolation : str
        ANTs interpolator name: ``linear``, ``nearestNeighbor``,
        ``lanczosWindowedSinc``, ...

    Returns
    -------
    Nifti1Image
        float32 image on the reference grid; outside the moved image: 0.
    """
    import ants

    moved = ants.apply_transforms(
        fixed=nifti_to_ants(reference),
        moving=nifti_to_ants(image),
        transformlist=[str(transform)],
        interpolator=interpolation,
    )
    out = ants_to_nifti(moved)
    # Keep the reference affine bit-for-bit (the LPS round trip can leave 1e-16 noise).
    return nib.Nifti1Image(np.asarray(out.dataobj, dtype=np.float32), reference.affine)
