"""Brain tissue segmentation (GM, WM, CSF) of the T1w on the template grid.

Method
------
ANTs Atropos (Avants et al. 2011, ``ants.atropos``) on the subject's T1w in
MNI152NLin2009cAsym space at the output resolution (the grid the BOLD is
resampled onto, so no further interpolation is needed downstream), inside the
subject's brain mask, with three classes initialised by and weighted with the
MNI152 tissue probability maps that ship with nilearn (GM and WM maps; CSF =
``clip(1 - GM - WM, 0, 1)``, so whatever the subject's mask holds beyond the
template brain is CSF a priori), prior weight
:data:`PRIOR_WEIGHT`, five EM iterations, no Markov random field.

Choices, measured on the demo cohort (MNI-space T1w of the demo run, 2 mm, 2-core machine):

* prior weight 0.5: GM, WM and CSF volumes within 9 % of the demo's truth on
  every subject tried; 0.3 put CSF 18-50 % and WM 10-14 % off, 0.7 pulled CSF
  27-40 % below the truth, 0 (priors for initialisation only) gave CSF +50-85 %;
* no MRF smoothing: the 3-D MRF (``[0.1,1x1x1]``) took 3-4 times longer (7-14 s
  against 2-4 s per subject) and moved CSF *away* from the truth (-13 to -18 %);
* the grid is cropped to the brain mask's bounding box first (same result,
  less work);
* Atropos seeds its random number generator randomly unless told
  ``--use-random-seed 0``, which is passed: posteriors then come out
  byte-identical run after run (with a random seed they moved by up to 1e-4).

The priors are the MNI152 2009a (symmetric) maps nilearn ships; the subject
image is in 2009c (asymmetric) space. The two differ by a millimetre or two,
well inside what a prior (weighted 0.5, not a mask) tolerates.

Outputs follow fMRIPrep/sMRIPrep: ``*_label-{GM,WM,CSF}_probseg.nii.gz``
(posterior probabilities, float32, 0 outside the brain mask) and
``*_dseg.nii.gz`` (uint8; 0 background, 1 GM, 2 WM, 3 CSF: sMRIPrep's order).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass

import nibabel as nib
import numpy as np

__desc__ = (
    "Brain tissue was segmented into grey matter, white matter and CSF on the T1w resampled to "
    "MNI152NLin2009cAsym at {resolution:g} mm, inside the brain mask, with ANTs Atropos "
    "(Avants et al. 2011) initialised by and weighted with the MNI152 tissue probability maps "
    "(prior weight 0.5, no Markov random field)."
)

#: Tissue classes in label order: ``dseg`` value k + 1 is ``TISSUES[k]`` (sMRIPrep's 1 GM, 2 WM, 3 CSF).
TISSUES = ("GM", "WM", "CSF")
#: Weight of the template priors in Atropos' posterior (0 = initialisation only).
PRIOR_WEIGHT = 0.5
#: Atropos MRF ``[smoothing factor, radius]``: 0 switches the MRF off (see the module notes).
MRF = "[0.0,1x1x1]"
#: Atropos convergence ``[iterations, threshold]``.
CONVERGENCE = "[5,0]"


@dataclass(frozen=True)
class TissueMaps:
    """Posteriors and labels of one segmentation on the template grid."""

    probseg: dict[str, np.ndarray]  # tissue -> (X, Y, Z) float32 posterior, 0 outside the mask
    dseg: np.ndarray  # (X, Y, Z) uint8, 0 background, k + 1 = TISSUES[k]
    affine: np.ndarray

    def volumes_ml(self) -> dict[str, float]:
        """Partial-volume tissue volumes (sum of posteriors x voxel volume), mL."""
        voxel_ml = float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        return {name: float(self.probseg[name].sum(dtype=np.float64)) * voxel_ml for name in TISSUES}


@functools.lru_cache(maxsize=4)
def tissue_priors(resolution: float) -> dict[str, np.ndarray]:
    """GM, WM and CSF prior probabilities on the template grid at ``resolution`` mm (float32).

    nilearn's MNI152 GM and WM maps (1 mm), resampled (trilinear, world
    coordinates) onto the grid of :func:`bh_models.core.templates.load_template`;
    CSF is the rest, ``clip(1 - GM - WM, 0, 1)`` (used inside the subject's brain mask).
    """
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template
    from scipy import ndimage

    from bh_models.core.templates import load_template

    _, mask, _ = load_template(float(resolution))
    maps = {}
    for name, loader in (("GM", load_mni152_gm_template), ("WM", load_mni152_wm_template)):
        img = loader(resolution=1)
        # Target voxel -> source voxel, then trilinear interpolation (0 outside the source).
        pull = np.linalg.inv(img.affine) @ mask.affine
        data = ndimage.affine_transform(np.asarray(img.dataobj, dtype=np.float32), pull[:3, :3], offset=pull[:3, 3],
                                        output_shape=mask.shape[:3], order=1, mode="constant", cval=0.0)
        maps[name] = np.clip(data, 0.0, 1.0).astype(np.float32)
    # Not cut to the template's brain mask: a subject's mask reaches a little
    # further, and what lies there is CSF (cut, those voxels had no prior at all).
    maps["CSF"] = np.clip(1.0 - maps["GM"] - maps["WM"], 0.0, 1.0).astype(np.float32)
    return maps


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def segment_tissues(*, t1w: nib.Nifti1Image, mask: np.ndarray, resolution: float) -> TissueMaps:
    """Atropos segmentation of a template-space T1w inside ``mask``.

    Parameters
    ----------
    t1w : Nifti1Image
        Brain-extracted T1w on the template grid at ``resolution`` mm.
    mask : np.ndarray
        (X, Y, Z) bool brain mask on the same grid.
    resolution : float
        Template grid spacing (mm); selects the priors.

    Returns
    -------
    TissueMaps
        Posteriors (summing to 1 inside the mask) and the maximum-posterior labels.
    """
    import ants

    from bh_models.core.antsio import nifti_to_ants

    mask = np.asarray(mask, dtype=bool)
    priors = tissue_priors(float(resolution))
    if priors["GM"].shape != mask.shape or t1w.shape[:3] != mask.shape:
        raise ValueError(f"T1w {t1w.shape}, mask {mask.shape} and priors {priors['GM'].shape} are not one grid")
    box = _bounding_box(mask)
    box_affine = t1w.affine.copy()
    box_affine[:3, 3] = t1w.affine[:3, :3] @ np.array([s.start for s in box]) + t1w.affine[:3, 3]

    def to_ants(data: np.ndarray):
        return nifti_to_ants(nib.Nifti1Image(np.ascontiguousarray(data[box], dtype=np.float32), box_affine))

    image = to_ants(np.asarray(t1w.dataobj, dtype=np.float32) * mask)
    # ants.atropos writes its prior and posterior images under tempfile's folder
    # and never deletes them: give it a private one that goes away with the call.
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="bh-atropos-") as work:
        tempfile.tempdir = work
        try:
            result = ants.atropos(a=image, x=to_ants(mask.astype(np.float32)),
                                  i=[to_ants(priors[name] * mask) for name in TISSUES],
                                  m=MRF, c=CONVERGENCE, priorweight=PRIOR_WEIGHT,
                                  r=0)  # --use-random-seed 0: Atropos' fixed seed (its default is a random one)
            posteriors = [p.numpy() for p in result["probabilityimages"]]  # label order = TISSUES
        finally:
            tempfile.tempdir = previous
    probseg = {}
    for name, posterior in zip(TISSUES, posteriors):
        full = np.zeros(mask.shape, dtype=np.float32)
        full[box] = np.where(mask[box], posterior, 0.0)
        probseg[name] = full
    stacked = np.stack([probseg[name] for name in TISSUES])  # (3, X, Y, Z)
    dseg = np.where(mask, stacked.argmax(axis=0) + 1, 0).astype(np.uint8)
    return TissueMaps(probseg=probseg, dseg=dseg, affine=t1w.affine.copy())
