"""Brain extraction of a T1w image: deepbet (default) or template-based with antspyx.

``deepbet``
    The deepbet CNN (Fisch et al. 2024; weights ship inside its wheel) run
    in-process on the CPU: a bounding-box network on a 128^3 copy, then the
    mask network on the 256^3 crop, largest component, holes filled. Its mask
    is intracranial (brain plus the CSF up to the inner skull), so its volume
    is the total intracranial volume (TIV).
``ants``
    Template-based extraction in the spirit of ``antsBrainExtraction``: the head
    is resampled to 2 mm, N4-corrected inside an Otsu head mask, registered
    (affine, mutual information) to the brain-extracted MNI152NLin2009cAsym
    template (no head template ships offline), the template brain mask is
    pulled back onto the native grid, and its boundary is refined within
    +-3 voxels by an Otsu threshold of the native intensities (largest
    component, closing, holes filled). This mask is tighter (BET-like).

On Colin27 (``ch2`` of mricron-data) against FSL BET's ``ch2bet``: deepbet
Dice 0.936 (its mask also holds the extra-cerebral CSF that BET leaves out),
ants Dice 0.972 -- a figure that flatters the template method, because
Colin27 already lives in MNI space; see ``benchmarks/bench_anat.py``.
Both run in seconds on two cores.
"""

from __future__ import annotations

import functools
import logging
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from bh_models.core.errors import BHConfigError
from bh_models.core.step import torch_threads

__desc__ = (
    "The T1w image was skull-stripped with {skullstrip} (deepbet: a convolutional "
    "network, Fisch et al. 2024, run on the CPU; ants: the template brain mask "
    "mapped by an affine antsRegistration and refined at the brain boundary), and "
    "the total intracranial volume was taken as the volume of the brain mask."
)

METHODS = ("deepbet", "ants")
DEFAULT_METHOD = "deepbet"
SKULLSTRIP = DEFAULT_METHOD  # boilerplate default for the {skullstrip} placeholder

_METHOD_WORDS = {
    "deepbet": "deepbet (Fisch et al. 2024), a convolutional network run on the CPU "
               "(mask threshold 0.5, largest component, holes filled)",
    "ants": "a template-based method with antspyx (Avants et al. 2008): N4 (Tustison et al. 2010) "
            "at 2 mm, affine registration of the head to the brain-extracted MNI152NLin2009cAsym "
            "template, the template brain mask mapped back and its boundary refined by an Otsu "
            "threshold within 3 voxels",
}

log = logging.getLogger("bh_models")

#: Work spacing (mm) of the ``ants`` method's N4 and registration.
ANTS_WORK_MM = 2.0
#: Half-width (voxels of the native grid) of the band where ``ants`` refines the mask.
ANTS_REFINE_VOXELS = 3


def describe_methods(*, config: Mapping[str, Any]) -> str:
    """Methods sentence for the configured method (used by :mod:`bh_models.records.boilerplate`)."""
    from bh_models.core.methods import placeholder_value

    method = placeholder_value(name="skullstrip", config=config, module=sys.modules[__name__])
    words = _METHOD_WORDS.get(str(method), str(method))
    volume = ("the total intracranial volume was taken as the volume of the brain mask"
              if method == "deepbet" else "the volume of the brain mask was recorded")
    return f"The T1w image was skull-stripped with {words}; {volume}."


def check_method(method: str) -> None:
    """Raise :class:`BHConfigError` unless ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise BHConfigError("anat.skullstrip", f"'{method}' is not a skull-stripping method",
                            f"use one of {', '.join(METHODS)}")


def tiv_ml(mask: nib.Nifti1Image) -> float:
    """Volume of a binary mask in millilitres (the TIV of a deepbet mask)."""
    voxel_ml = abs(float(np.linalg.det(mask.affine[:3, :3]))) / 1000.0
    return float(np.count_nonzero(np.asarray(mask.dataobj))) * voxel_ml


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary arrays (0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else 0.0




@functools.lru_cache(maxsize=1)
def _deepbet_model():
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=True)  # CPU: same bytes on every machine


def _deepbet_mask(image: nib.Nifti1Image, threads: int) -> np.ndarray:
    with torch_threads(threads):
        model = _deepbet_model()
        try:
            # BrainExtraction.run takes an in-memory image; it works on the closest
            # RAS orientation and hands the mask back in the input's voxel order.
            _, mask, _ = model.run(image, threshold=0.5, n_dilate=0)
        except (AssertionError, ValueError, IndexError) as exc:
            raise ValueError(f"deepbet found no brain ({exc})") from exc
    return np.asarray(mask.dataobj) > 0


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    mass = np.cumsum(hist * centres)
    total_w, total_m = weight[-1], mass[-1]
    between = (total_m * weight / total_w - mass) ** 2 / (weight * (total_w - weight) + 1e-12)
    return float(centres[np.argmax(between[:-1])])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _ants_mask(image: nib.Nifti1Image, seed: int = 0) -> np.ndarray:
    import ants

    from bh_models.core.antsio import nifti_to_ants
    from bh_models.core.templates import load_template

    data = np.asarray(image.dataobj, dtype=np.float32)
    native = nifti_to_ants(image)
    small = ants.resample_image(native, (ANTS_WORK_MM,) * 3, use_voxels=False, interp_type=0)
    head = ants.get_mask(small, cleanup=2)
    floor = max(float(np.percentile(data[data > 0], 0.1)), 1e-3) if (data > 0).any() else 1.0
    # N4 works on log intensities: lift zeros so every voxel has a finite log.
    small = small.new_image_like(np.clip(small.numpy(), floor, None))
    small = ants.n4_bias_field_correction(small, mask=head, shrink_factor=4)
    template, template_mask, _ = load_template(ANTS_WORK_MM)
    mask_image = nib.Nifti1Image(np.asarray(template_mask.dataobj, np.float32), template_mask.affine)
    with tempfile.TemporaryDirectory(prefix="bh-skullstrip-") as work:
        reg = ants.registration(fixed=nifti_to_ants(template), moving=small, type_of_transform="Affine",
                                random_seed=str(int(seed) % (2**31 - 2) + 1), outprefix=str(Path(work) / "head_"))
        prior = ants.apply_transforms(
            fixed=native, moving=nifti_to_ants(mask_image), transformlist=reg["invtransforms"],
            whichtoinvert=[True], interpolator="linear",
        ).numpy() > 0.5
    if not prior.any():
        raise ValueError("the template brain mask falls outside the image after registration")
    structure = ndimage.generate_binary_structure(3, 1)
    outer = ndimage.binary_dilation(prior, structure, ANTS_REFINE_VOXELS)
    inner = ndimage.binary_erosion(prior, structure, ANTS_REFINE_VOXELS)
    band = outer & ~inner
    mask = inner | (band & (data > _otsu(data[band])))
    mask = ndimage.binary_opening(mask, structure, 1)
    mask = _largest_component(mask)
    mask = ndimage.binary_closing(mask, structure, 2)
    return ndimage.binary_fill_holes(mask)


def skullstrip(image: nib.Nifti1Image, *, method: str = DEFAULT_METHOD, threads: int = 1,
               seed: int = 0) -> nib.Nifti1Image:
    """Brain mask of a T1w head image.

    Parameters
    ----------
    image : Nifti1Image
        3D T1w head image (any orientation; only data and affine are used).
    method : str
        ``"deepbet"`` or ``"ants"`` (see the module docstring).
    threads : int
        Torch threads for deepbet (ITK threads are set by the caller, see
        :func:`bh_models.anat.registration.limit_itk_threads`).
    seed : int
        Seed of the ``ants`` registration's metric sampling.

    Returns
    -------
    Nifti1Image
        uint8 mask (1 = brain) on the input grid, with the input affine.

    Raises
    ------
    BHConfigError
        Unknown method.
    ValueError
        No brain found (the caller names the file).
    """
    check_method(method)
    if len(image.shape) != 3:
        raise ValueError(f"skull-stripping needs a 3D image, got shape {image.shape}")
    img = nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    if method == "deepbet":
        mask = _deepbet_mask(img, threads)
    else:
        mask = _ants_mask(img, seed=seed)
    if not mask.any():
        raise ValueError(f"{method} skull-stripping found no brain")
    return nib.Nifti1Image(mask.astype(np.uint8), image.affine)
