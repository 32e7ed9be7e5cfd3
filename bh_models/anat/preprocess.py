"""Anatomical preprocessing of one T1w image -> native brain, MNI outputs, encoder tensor.

Chain (each step in its own module):

1. checks (:mod:`bh_models.core.imagecheck`): 3D, readable, finite, not all zero;
2. skull-stripping (:mod:`bh_models.anat.skullstrip`): deepbet (default) or ants;
   TIV = mask volume;
3. N4 inside the brain mask (:mod:`bh_models.anat.registration`); the native
   brain-extracted, bias-corrected T1w and its mask are written on the input
   grid with the input's exact world geometry (oblique and LPI inputs alike);
4. registration of the brain to the brain-extracted MNI152NLin2009cAsym
   template at ``registration_resolution`` mm (antspyx preset, seeded);
   forward and inverse ANTs composite transforms (.h5), their displacement
   fields rounded to :data:`TRANSFORM_QUANTUM_MM` and compressed (4x smaller;
   see :func:`strip_hdf5_times`);
5. resampling: T1w (linear) and mask (nearest neighbour) onto the template
   grid at ``resolution`` mm; the encoder tensor (see below) straight from
   the native image, so every output is interpolated once;
6. tissue segmentation (:mod:`bh_models.anat.tissues`): GM, WM and CSF
   posteriors and labels of the MNI-space T1w (Atropos with template priors),
   on the grid the functional chain samples the BOLD on;
7. QC: Dice of the subject's MNI mask with the template mask, NCC of the MNI
   T1w with the template inside the template mask, tissue volumes, three PNG
   mosaics, and a JSON sidecar with TIV, timings and provenance.

All computations run on the closest-RAS copy of the image (a lossless
permutation/flip of voxels), so RAS- and LPI-stored files go through the same
arithmetic; ITK runs on one thread (:data:`ITK_THREADS`), the only setting in
which seeded antsRegistration is byte-reproducible.

Encoder tensor
--------------
The T1 encoder sees a fixed box of MNI space: the paper's 160 x 192 x 160 mm
crop of the FSL 182 x 218 x 182 grid at 1 mm, centred at MNI
(-0.5, -17.5, 18.5) mm (:data:`TENSOR_FOV_MM`, :data:`TENSOR_CENTRE_MM`).
``tensor_grid`` voxels sample that box on an isotropic grid of spacing
``max(TENSOR_FOV_MM / tensor_grid)``: the paper's (160, 192, 160) gives exactly
its 1 mm tensor (voxel centres on FSL's integer-mm lattice), and the demo's
(48, 56, 48) the same brain at 3.43 mm instead of a 96 mm crop of it. The
tensor is the native brain resampled (linear) through the forward transform,
z-scored over the subject's brain-mask voxels, 0 elsewhere, float32 C-order.

:func:`anat_qc_table` gathers the sidecars of a cohort into one table.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bh_models.anat.qc import plot_mask_contour, plot_registration, plot_segmentation
from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.imagecheck import load_image, read_data, save_nifti
from bh_models.core.jsonio import atomic_write_text, read_json, sidecar_path, write_json
from bh_models.anat.registration import (
    apply_transform,
    limit_itk_threads,
    n4_bias_correct,
    register_to_template,
)
from bh_models.anat.skullstrip import check_method, dice, skullstrip, tiv_ml
from bh_models.anat.tissues import TISSUES, TissueMaps, segment_tissues
from bh_models.core.templates import TEMPLATE_SPACE, load_template

__desc__ = (
    "Each T1w image was skull-stripped, corrected for intensity non-uniformity "
    "inside the brain mask and normalised to MNI152NLin2009cAsym (details below); "
    "the brain-extracted T1w was then resampled once into template space "
    "at {resolution:g} mm and, for the T1 encoder, onto a {tensor_grid} voxel "
    "grid covering the 160 x 192 x 160 mm MNI box of the paper (Dong et al. 2025), "
    "z-scored within the brain mask."
)

#: MNI box (mm) that the encoder tensor covers, and its centre (MNI mm).
TENSOR_FOV_MM = (160.0, 192.0, 160.0)
TENSOR_CENTRE_MM = (-0.5, -17.5, 18.5)
#: A brain mask smaller than this (mL) means the image is not a usable T1w head scan.
MIN_TIV_ML = 200.0
#: ITK threads of the chain: 1, the only count with byte-identical registrations.
ITK_THREADS = 1
#: N4 fits its field on a grid no finer than this (mm); see :func:`n4_shrink_factor`.
N4_MIN_FIT_MM = 4.0
#: Voxels kept around the brain mask's bounding box for N4.
N4_MARGIN_VOXELS = 4
#: Compact storage (``compact_storage=True``, the default; benchmarks/bench_storage.py
#: measures what it changes downstream). Displacement fields of the transforms are stored
#: rounded to this step (mm): 2^-10 mm = 0.98 um, three orders of magnitude below any
#: image's voxel size; with shuffle + gzip each transform is 4x smaller (13.2 -> 3.2 MB
#: for a demo subject).
TRANSFORM_QUANTUM_MM = 2.0 ** -10
#: (The native T1w is stored exactly: rounding it to 12 mantissa bits saved 2.7 MB per
#: subject but moved the functional coregistration, which reads it, by up to 10 % of a
#: parcel series' SD, beyond the tolerance bench_storage.py checks.)

log = logging.getLogger("bh_models")


def _check_params(*, skullstrip_method: str, type_of_transform: str, resolution: float,
                  registration_resolution: float, tensor_grid) -> tuple[int, int, int]:
    from bh_models.anat.registration import _check_transform_type

    check_method(skullstrip_method)
    _check_transform_type(type_of_transform)
    for key, value in (("template.resolution", resolution),
                       ("anat.registration_resolution", registration_resolution)):
        if not (isinstance(value, (int, float)) and 0.5 <= float(value) <= 4):
            raise BHConfigError(key, f"{value!r} is not a voxel size in mm", "use 1 or 2")
    grid = tuple(int(n) for n in tensor_grid)
    if len(grid) != 3 or min(grid) < 8 or any(int(n) != n for n in tensor_grid):
        raise BHConfigError("anat.tensor_grid", f"{list(tensor_grid)} is not three voxel counts >= 8",
                            "use e.g. [160, 192, 160] (the paper) or [48, 56, 48] (demo)")
    return grid


def tensor_reference(grid: tuple[int, int, int]) -> nib.Nifti1Image:
    """Empty image on the encoder tensor's grid (RAS, isotropic, MNI world)."""
    grid = tuple(int(n) for n in grid)
    spacing = max(f / n for f, n in zip(TENSOR_FOV_MM, grid))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(TENSOR_CENTRE_MM) - spacing * (np.asarray(grid) - 1) / 2.0
    return nib.Nifti1Image(np.zeros(grid, dtype=np.uint8), affine)


def zscore_in_mask(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the mask voxels; 0 outside; float32."""
    mask = mask > 0
    values = volume[mask].astype(np.float64)
    std = values.std()
    out = np.zeros(volume.shape, dtype=np.float32)
    out[mask] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def ncc_in_mask(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation (Pearson r) of two images inside ``mask``."""
    x = a[mask > 0].astype(np.float64)
    y = b[mask > 0].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def n4_shrink_factor(affine: np.ndarray, registration_resolution: float) -> int:
    """N4 shrink factor: fit the field on a grid of ``max(4, 3 x registration_resolution)`` mm.

    4 mm (ANTs' default shrink of 4 on a 1 mm image) for a 1 mm registration;
    6 mm for 2 mm, which costs a third of the time and moves the corrected
    intensities by a few percent at most -- below what the 2 mm registration
    and the z-scored tensor can tell apart.
    """
    finest = float(min(nib.affines.voxel_sizes(affine)))
    spacing = max(N4_MIN_FIT_MM, 3.0 * float(registration_resolution))
    return int(min(8, max(1, round(spacing / finest))))


def _bounding_box(mask: np.ndarray, affine: np.ndarray, margin: int) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of the mask's bounding box (+ ``margin`` voxels) and the box's affine."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    box_affine = affine.copy()
    box_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), box_affine


def downsample(img: nib.Nifti1Image, spacing: float) -> nib.Nifti1Image:
    """Anti-aliased (Gaussian) linear resampling to ``spacing`` mm, same orientation and origin.

    Images already at ``spacing`` or coarser come back unchanged. The
    registration then works on images of matching resolution: faster, and on
    ch2 a better fit of the 2 mm template than the 1 mm image gives.
    """
    import ants

    from bh_models.core.antsio import ants_to_nifti, nifti_to_ants

    zooms = nib.affines.voxel_sizes(img.affine)
    if np.all(zooms >= spacing * 0.95):
        return img
    # Gaussian whose FWHM brings each axis from its voxel size up to ``spacing``.
    sigma = [float(np.sqrt(max(spacing**2 - z**2, 0.0)) / 2.3548) for z in zooms]
    image = ants.smooth_image(nifti_to_ants(img), sigma, sigma_in_physical_coordinates=True)
    image = ants.resample_image(image, (spacing,) * 3, use_voxels=False, interp_type=0)
    return ants_to_nifti(image)


def _native_image(data: np.ndarray, source: nib.Nifti1Image, dtype: type) -> nib.Nifti1Image:
    """``data`` on the source grid with the source's world geometry and codes."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), source.affine)
    sform_code = qform_code = 0
    if isinstance(source.header, nib.Nifti1Header):  # Nifti2Header is one too
        sform_code = int(source.header.get_sform(coded=True)[1])
        qform_code = int(source.header.get_qform(coded=True)[1])
    img.header.set_sform(source.affine, code=sform_code or 1)
    img.header.set_qform(source.affine, code=qform_code or 1)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(dtype)
    return img


def _write_npy(path: Path, array: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def strip_hdf5_times(path: Path, *, quantum_mm: float | None = None) -> None:
    """Rewrite an ITK HDF5 transform without object time stamps, its displacement fields made compact.

    ITK's HDF5 transform writer stores creation and modification times in
    every object header, so two identical registrations give different bytes.
    The copy keeps each dataset's HDF5 type and data and drops only the times.

    With ``quantum_mm``, the parameters of displacement-field transforms (the
    field's vectors, mm) are rounded to multiples of it and stored with HDF5's
    shuffle and gzip filters, which ITK reads transparently. Affine parameters
    and every other dataset are copied unchanged.
    """
    import h5py

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".h5")
    os.close(fd)

    def copy(src: h5py.Group, dst: h5py.Group) -> None:
        for name in src:  # h5py lists names in alphabetical (= ITK's index) order
            item = src[name]
            if isinstance(item, h5py.Group):
                gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
                gcpl.set_obj_track_times(False)
                group = h5py.Group(h5py.h5g.create(dst.id, name.encode(), gcpl=gcpl))
                copy(item, group)
            else:
                data, options = item[()], {}
                transform_type = src.get("TransformType")
                displacement = transform_type is not None and "DisplacementField" in str(transform_type[()][0])
                if quantum_mm and name == "TransformParameters" and displacement:
                    data = (np.round(data / quantum_mm) * quantum_mm).astype(item.dtype)
                    options = dict(compression="gzip", compression_opts=6, shuffle=True, chunks=True)
                dst.create_dataset(name, data=data, dtype=item.dtype, track_times=False, **options)
            for key, value in item.attrs.items():
                dst[name].attrs[key] = value

    try:
        with h5py.File(path, "r") as src, h5py.File(tmp, "w", track_order=False) as dst:
            copy(src, dst)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _stem(path: Path) -> str:
    return Path(path).name.removesuffix(".nii.gz").removesuffix(".nii")


class _Laps:
    """Wall-clock seconds per stage of one T1w (the sidecar's ``Timing``), each logged when done."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.timing: dict[str, float] = {}
        self.started = self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timing[stage] = round(now - self.last, 3)
        log.info("anat %s: %s done in %.1f s", self.name, stage, now - self.last)
        self.last = now

    def total(self) -> float:
        self.timing["total"] = round(time.perf_counter() - self.started, 3)
        return self.timing["total"]


@dataclass(frozen=True)
class _ClosestRas:
    """The checked T1w as stored, and its closest-RAS copy that all computations use."""

    img: nib.Nifti1Image  # as stored: native outputs return to its voxel order and world geometry
    canon: nib.Nifti1Image  # the same world image, voxels permuted/flipped to RAS
    back: np.ndarray  # orientation transform from the RAS copy back to the stored voxel order


@dataclass(frozen=True)
class _MniImages:
    """The T1w and its brain mask on the template grid at the output resolution, and the template."""

    template: nib.Nifti1Image
    template_mask: nib.Nifti1Image
    t1w: nib.Nifti1Image
    mask_data: np.ndarray  # bool


def _load_closest_ras(t1w: Path) -> _ClosestRas:
    """1. Load and check the T1w; its closest-RAS copy."""
    img = load_image(t1w, ndim=3, what="T1w")
    data = read_data(img, t1w, what="T1w")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise BHInputError(t1w, "T1w has a singular or non-finite affine (sform/qform)",
                           "fix the header's orientation (e.g. re-convert with dcm2niix)")
    # Work on the closest-RAS copy (a lossless permutation/flip of the voxels, same
    # world image): an LPI- or RAS-stored file then goes through identical
    # computations; native outputs return to the input's voxel order and affine.
    ornt = nib.io_orientation(affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    canon_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    canon = nib.Nifti1Image(np.ascontiguousarray(nib.apply_orientation(data, ornt)), canon_affine)
    return _ClosestRas(img=img, canon=canon, back=back)


def _skullstrip(native: _ClosestRas, *, t1w: Path, method: str, threads: int, seed: int) -> tuple[np.ndarray, float]:
    """2. Skull-strip: the brain mask (bool, RAS copy) and the TIV (mL); an implausible mask fails."""
    try:
        mask = skullstrip(native.canon, method=method, threads=threads, seed=seed)
    except ValueError as exc:
        raise BHInputError(t1w, f"skull-stripping failed: {exc}",
                           "check that the file is a T1w head image, or exclude the subject") from exc
    tiv = tiv_ml(mask)
    if tiv < MIN_TIV_ML:
        raise BHInputError(t1w, f"the brain mask holds only {tiv:.0f} mL (expected >= {MIN_TIV_ML:g} mL)",
                           "check that the file is a whole-head T1w image, or exclude the subject")
    return np.asarray(mask.dataobj) > 0, tiv


def _bias_correct(native: _ClosestRas, mask_data: np.ndarray, *, registration_resolution: float) -> nib.Nifti1Image:
    """3. N4 inside the mask (on the mask's bounding box): the brain-extracted, corrected T1w (RAS copy)."""
    canon_data, canon_affine = np.asarray(native.canon.dataobj), native.canon.affine
    box, box_affine = _bounding_box(mask_data, canon_affine, margin=N4_MARGIN_VOXELS)
    corrected = n4_bias_correct(
        image=nib.Nifti1Image(canon_data[box], box_affine),
        mask=nib.Nifti1Image(mask_data[box].astype(np.uint8), box_affine),
        shrink_factor=n4_shrink_factor(native.img.affine, registration_resolution),
    )
    brain_data = np.zeros(canon_data.shape, dtype=np.float32)
    brain_data[box] = np.where(mask_data[box], np.asarray(corrected.dataobj, dtype=np.float32), 0)
    return nib.Nifti1Image(brain_data, canon_affine)


def _write_native_outputs(native: _ClosestRas, brain: nib.Nifti1Image, mask_data: np.ndarray, *,
                          out_t1w: Path, out_mask: Path) -> None:
    """3. The brain and its mask on the input grid, with the input's voxel order and world geometry."""
    brain_data = np.asarray(brain.dataobj)
    save_nifti(Path(out_t1w), _native_image(nib.apply_orientation(brain_data, native.back), native.img, np.float32))
    save_nifti(Path(out_mask), _native_image(nib.apply_orientation(mask_data, native.back), native.img, np.uint8))


def _register(brain: nib.Nifti1Image, *, registration_resolution: float, type_of_transform: str, seed: int,
              out_forward: Path, out_inverse: Path, quantum_mm: float | None) -> str:
    """4. Registration to the brain-extracted template; writes both transforms, returns the template's source."""
    reg_template, reg_mask, source = load_template(float(registration_resolution))
    reg_fixed = nib.Nifti1Image(np.asarray(reg_template.dataobj, np.float32) * (np.asarray(reg_mask.dataobj) > 0),
                                reg_template.affine)
    register_to_template(moving=downsample(brain, float(registration_resolution)), template=reg_fixed,
                         out_forward=Path(out_forward), out_inverse=Path(out_inverse),
                         type_of_transform=type_of_transform, seed=seed)
    for transform in (out_forward, out_inverse):
        strip_hdf5_times(Path(transform), quantum_mm=quantum_mm)
    return source


def _mask_image(mask_data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The brain mask as float32 (0/1), for ITK's nearest-neighbour resampling."""
    return nib.Nifti1Image(mask_data.astype(np.float32), affine)


def _write_mni_outputs(brain: nib.Nifti1Image, mask_data: np.ndarray, *, resolution: float, forward: Path,
                       out_mni_t1w: Path, out_mni_mask: Path) -> _MniImages:
    """5. The T1w (linear) and the mask (nearest neighbour) onto the template grid at ``resolution`` mm."""
    template, template_mask, _ = load_template(float(resolution))
    mask_float = _mask_image(mask_data, brain.affine)
    mni_t1w = apply_transform(image=brain, reference=template, transform=forward)
    mni_mask_data = np.asarray(apply_transform(image=mask_float, reference=template, transform=forward,
                                               interpolation="nearestNeighbor").dataobj) > 0.5
    mni_t1w = nib.Nifti1Image(np.asarray(mni_t1w.dataobj, np.float32), template.affine)
    mni_mask = nib.Nifti1Image(mni_mask_data.astype(np.uint8), template.affine)
    for out_img in (mni_t1w, mni_mask):
        out_img.header.set_sform(template.affine, code=4)  # MNI
        out_img.header.set_qform(template.affine, code=4)
        out_img.header.set_xyzt_units("mm")
    save_nifti(Path(out_mni_t1w), mni_t1w)
    save_nifti(Path(out_mni_mask), mni_mask)
    return _MniImages(template=template, template_mask=template_mask, t1w=mni_t1w, mask_data=mni_mask_data)


def _encoder_tensor(brain: nib.Nifti1Image, mask_data: np.ndarray, *, grid: tuple[int, int, int], forward: Path,
                    t1w: Path) -> tuple[np.ndarray, nib.Nifti1Image, int]:
    """5. The native brain straight onto the tensor grid, z-scored in the brain: tensor, its grid, brain voxels."""
    tensor_ref = tensor_reference(grid)
    tensor_t1 = np.asarray(apply_transform(image=brain, reference=tensor_ref, transform=forward).dataobj)
    tensor_mask = np.asarray(apply_transform(image=_mask_image(mask_data, brain.affine), reference=tensor_ref,
                                             transform=forward, interpolation="nearestNeighbor").dataobj) > 0.5
    if tensor_mask.sum() < 100:
        raise BHInputError(t1w, "the registered brain falls outside the encoder tensor's MNI box",
                           "check the registration QC figure; the T1w may be mislabelled or not a brain")
    return zscore_in_mask(tensor_t1, tensor_mask), tensor_ref, int(tensor_mask.sum())


def _write_tensor(out_tensor: Path, tensor: np.ndarray, tensor_ref: nib.Nifti1Image, *, brain_voxels: int,
                  grid: tuple[int, int, int], out_t1w: Path, out_forward: Path) -> None:
    """5. The encoder tensor ``.npy`` and its sidecar (grid, affine, field of view, normalisation)."""
    _write_npy(Path(out_tensor), tensor)
    write_json(sidecar_path(out_tensor), {
        "Space": TEMPLATE_SPACE, "Shape": list(grid), "VoxelSize": float(tensor_ref.affine[0, 0]),
        "Affine": tensor_ref.affine.tolist(), "Layout": "C-order float32 (x, y, z), RAS voxel axes",
        "FieldOfViewMM": list(TENSOR_FOV_MM), "CentreMM": list(TENSOR_CENTRE_MM),
        "Normalization": "z-score over the brain-mask voxels; 0 outside the brain",
        "BrainVoxels": brain_voxels,
        "Sources": [Path(out_t1w).name, Path(out_forward).name],
    })


def _segment(mni: _MniImages, *, resolution: float, t1w: Path, out_probseg: dict[str, Path],
             out_dseg: Path, out_qc_segmentation: Path) -> TissueMaps:
    """6. GM/WM/CSF posteriors and labels of the MNI-space T1w, their images and the QC mosaic."""
    tissues = segment_tissues(t1w=mni.t1w, mask=mni.mask_data, resolution=float(resolution))
    affine = mni.template.affine
    for name, path in out_probseg.items():
        _save_template_image(Path(path), tissues.probseg[name], affine, np.float32)
    _save_template_image(Path(out_dseg), tissues.dseg, affine, np.uint8)
    write_json(sidecar_path(out_dseg), {
        "Space": TEMPLATE_SPACE, "Resolution": float(resolution),
        "Labels": {str(k + 1): name for k, name in enumerate(TISSUES)},
        "Method": "ANTs Atropos with MNI152 tissue priors (bh_models.anat.tissues)",
        "Sources": [Path(path).name for path in out_probseg.values()],
    })
    volumes = tissues.volumes_ml()
    plot_segmentation(image=mni.t1w, probseg=tissues.probseg, mask=mni.mask_data,
                      title=f"{_stem(t1w)}: tissues (WM cyan, CSF magenta, GM grey), GM {volumes['GM']:.0f} mL, "
                            f"WM {volumes['WM']:.0f} mL, CSF {volumes['CSF']:.0f} mL",
                      out_png=Path(out_qc_segmentation))
    return tissues


def _save_template_image(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_sform(affine, code=4)  # MNI
    img.header.set_qform(affine, code=4)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(dtype)
    save_nifti(path, img)


def _write_qc(native: _ClosestRas, mask_data: np.ndarray, mni: _MniImages, *, t1w: Path, skullstrip_method: str,
              type_of_transform: str, out_qc_mask: Path, out_qc_registration: Path) -> tuple[float, float]:
    """6. Dice of the MNI mask with the template mask, NCC in the template mask, and the two PNG mosaics."""
    template_mask_data = np.asarray(mni.template_mask.dataobj) > 0
    mask_dice = dice(mni.mask_data, template_mask_data)
    ncc = ncc_in_mask(np.asarray(mni.t1w.dataobj), np.asarray(mni.template.dataobj), template_mask_data)
    stem = _stem(t1w)
    native_mask = nib.Nifti1Image(mask_data.astype(np.uint8), native.canon.affine)
    plot_mask_contour(image=native.canon, mask=native_mask, title=f"{stem}: brain mask ({skullstrip_method})",
                      out_png=Path(out_qc_mask))
    plot_registration(image=mni.t1w, template=mni.template, template_mask=mni.template_mask,
                      title=f"{stem} in {TEMPLATE_SPACE} ({type_of_transform}): Dice {mask_dice:.3f}, "
                            f"NCC {ncc:.3f}",
                      out_png=Path(out_qc_registration))
    return mask_dice, ncc


def _write_sidecars(*, t1w: Path, out_t1w: Path, out_mni_t1w: Path, out_forward: Path, skullstrip_method: str,
                    tiv: float, voxel_size: list[float], source: str, type_of_transform: str,
                    registration_resolution: float, resolution: float, grid: tuple[int, int, int],
                    tensor_spacing: float, seed: int, threads: int, mask_dice: float, ncc: float,
                    tissue_volumes: dict[str, float], timing: dict[str, float]) -> None:
    """7. The native T1w's sidecar (TIV, QC values, tissue volumes, timings, provenance) and the MNI T1w's."""
    warnings = []
    if mask_dice < 0.9:
        warnings.append(f"Dice of the MNI brain mask with the template mask is {mask_dice:.3f} (< 0.9): "
                        "check the registration figure")
    write_json(sidecar_path(out_t1w), {
        "SkullStripped": True,
        "SkullStripMethod": skullstrip_method,
        "TIV_mL": round(tiv, 3),
        "BiasCorrection": "N4 inside the brain mask (antspyx)",
        "Space": "T1w",
        "VoxelSize": voxel_size,
        "Sources": [t1w.name],
        "Template": TEMPLATE_SPACE,
        "TemplateSource": source,
        "TypeOfTransform": type_of_transform,
        "RegistrationResolution": float(registration_resolution),
        "Resolution": float(resolution),
        "TensorGrid": list(grid),
        "TensorVoxelSize": tensor_spacing,
        "Seed": int(seed),
        "Threads": int(threads),
        "ITKThreads": ITK_THREADS,
        "DiceMNIMaskVsTemplate": round(mask_dice, 6),
        "NCCMNIT1wVsTemplate": round(ncc, 6),
        # Sums of the posteriors in MNI space (the template's volume, not the subject's).
        "TissueVolumesMNI_mL": {name: round(volume, 3) for name, volume in tissue_volumes.items()},
        "Timing": timing,
        "warnings": warnings,
    })
    write_json(sidecar_path(out_mni_t1w), {"Space": TEMPLATE_SPACE, "Resolution": float(resolution),
                                           "SkullStripped": True, "Interpolation": "linear",
                                           "Sources": [Path(out_t1w).name, Path(out_forward).name]})


def preprocess_anat(
    *,
    t1w: Path,
    out_t1w: Path,
    out_mask: Path,
    out_mni_t1w: Path,
    out_mni_mask: Path,
    out_forward: Path,
    out_inverse: Path,
    out_tensor: Path,
    out_qc_mask: Path,
    out_qc_registration: Path,
    out_gm_probseg: Path,
    out_wm_probseg: Path,
    out_csf_probseg: Path,
    out_dseg: Path,
    out_qc_segmentation: Path,
    skullstrip_method: str = "deepbet",
    type_of_transform: str = "SyN",
    resolution: float = 2,
    registration_resolution: float = 2,
    tensor_grid: tuple[int, int, int] = (48, 56, 48),
    seed: int = 0,
    compact_storage: bool = True,
    threads: int = 1,
) -> dict:
    """Step function: one raw T1w -> native brain + mask, MNI T1w + mask, transforms, tensor, QC.

    Parameters
    ----------
    t1w : Path
        Raw T1w NIfTI (read only); any orientation, oblique allowed.
    out_t1w : Path
        Written: brain-extracted, N4-corrected T1w on the input grid
        (``*_desc-preproc_T1w.nii.gz``, float32), plus its JSON sidecar
        (TIV, Dice, NCC, timings, provenance; read by :func:`anat_qc_table`).
    out_mask : Path
        Written: native brain mask (uint8) on the input grid.
    out_mni_t1w, out_mni_mask : Path
        Written: the T1w (linear) and the mask (nearest neighbour) on the
        template grid at ``resolution`` mm.
    out_forward, out_inverse : Path
        Written: ANTs composite transforms T1w -> MNI (resamples T1w-space
        images into the template) and MNI -> T1w.
    out_tensor : Path
        Written: encoder tensor ``tensor_grid`` float32 C-order ``.npy`` (see
        the module docstring), plus a JSON sidecar with its affine.
    out_qc_mask, out_qc_registration : Path
        Written: PNG mosaics (mask contour on the native T1w; template edges on
        the MNI T1w).
    out_gm_probseg, out_wm_probseg, out_csf_probseg : Path
        Written: tissue posteriors of the MNI T1w on the template grid at
        ``resolution`` mm (float32, 0 outside the brain mask;
        ``*_label-{GM,WM,CSF}_probseg.nii.gz``), see :mod:`bh_models.anat.tissues`.
    out_dseg : Path
        Written: maximum-posterior labels (uint8; 1 GM, 2 WM, 3 CSF) on the
        same grid, plus a JSON sidecar naming the labels.
    out_qc_segmentation : Path
        Written: PNG mosaic of the tissue boundaries on the MNI T1w.
    skullstrip_method : str
        ``"deepbet"`` or ``"ants"`` (:mod:`bh_models.anat.skullstrip`).
    type_of_transform : str
        antspyx registration preset (:data:`bh_models.anat.registration.SUPPORTED_TRANSFORMS`).
    resolution : float
        Template grid spacing (mm) of the MNI outputs.
    registration_resolution : float
        Template spacing (mm) the registration works at.
    tensor_grid : tuple of int
        Encoder tensor shape (voxels); paper: (160, 192, 160).
    seed : int
        Seed of the registration's metric sampling.
    compact_storage : bool
        Store the transforms' displacement fields rounded to
        :data:`TRANSFORM_QUANTUM_MM` and compressed (half the subject's bytes);
        False keeps ITK's values exactly. Every output computed through the
        forward transform uses the stored one.
    threads : int
        Torch threads (deepbet). ITK (N4, registration, resampling) runs on
        :data:`ITK_THREADS` = 1 thread, the only count whose registrations are
        byte-identical between runs.

    Returns
    -------
    dict
        ``tiv_ml``, ``dice``, ``ncc``, ``seconds``, ``skullstrip_method``,
        ``tissue_volumes_ml`` (GM, WM, CSF in MNI space).

    Raises
    ------
    BHInputError
        Missing, unreadable, 4D, non-finite or all-zero T1w; no brain found.
    BHConfigError
        Unknown method or preset, bad resolution or tensor grid.
    """
    t1w = Path(t1w)
    grid = _check_params(skullstrip_method=skullstrip_method, type_of_transform=type_of_transform,
                         resolution=resolution, registration_resolution=registration_resolution,
                         tensor_grid=tensor_grid)
    # ITK single-threaded: multi-threaded Mattes MI in antsRegistration is not
    # byte-reproducible even with a fixed seed (see limit_itk_threads); ITK
    # reads this once per process, before its first use. ``threads`` goes to torch.
    limit_itk_threads(ITK_THREADS)
    laps = _Laps(t1w.name)

    native = _load_closest_ras(t1w)
    laps.lap("load")
    mask_data, tiv = _skullstrip(native, t1w=t1w, method=skullstrip_method, threads=threads, seed=seed)
    laps.lap("skullstrip")
    brain = _bias_correct(native, mask_data, registration_resolution=registration_resolution)
    _write_native_outputs(native, brain, mask_data, out_t1w=out_t1w, out_mask=out_mask)
    laps.lap("n4")
    source = _register(brain, registration_resolution=registration_resolution, type_of_transform=type_of_transform,
                       seed=seed, out_forward=out_forward, out_inverse=out_inverse,
                       quantum_mm=TRANSFORM_QUANTUM_MM if compact_storage else None)
    laps.lap("registration")
    mni = _write_mni_outputs(brain, mask_data, resolution=resolution, forward=Path(out_forward),
                             out_mni_t1w=out_mni_t1w, out_mni_mask=out_mni_mask)
    tensor, tensor_ref, brain_voxels = _encoder_tensor(brain, mask_data, grid=grid, forward=Path(out_forward),
                                                       t1w=t1w)
    _write_tensor(out_tensor, tensor, tensor_ref, brain_voxels=brain_voxels, grid=grid, out_t1w=out_t1w,
                  out_forward=out_forward)
    laps.lap("resample")
    tissues = _segment(mni, resolution=resolution, t1w=t1w,
                       out_probseg={"GM": out_gm_probseg, "WM": out_wm_probseg, "CSF": out_csf_probseg},
                       out_dseg=out_dseg, out_qc_segmentation=out_qc_segmentation)
    laps.lap("segmentation")
    mask_dice, ncc = _write_qc(native, mask_data, mni, t1w=t1w, skullstrip_method=skullstrip_method,
                               type_of_transform=type_of_transform, out_qc_mask=out_qc_mask,
                               out_qc_registration=out_qc_registration)
    laps.lap("qc")
    seconds = laps.total()

    _write_sidecars(t1w=t1w, out_t1w=out_t1w, out_mni_t1w=out_mni_t1w, out_forward=out_forward,
                    skullstrip_method=skullstrip_method, tiv=tiv,
                    voxel_size=[float(z) for z in nib.affines.voxel_sizes(native.img.affine)], source=source,
                    type_of_transform=type_of_transform, registration_resolution=registration_resolution,
                    resolution=resolution, grid=grid, tensor_spacing=float(tensor_ref.affine[0, 0]), seed=seed,
                    threads=threads, mask_dice=mask_dice, ncc=ncc, tissue_volumes=tissues.volumes_ml(),
                    timing=laps.timing)
    log.info("anat %s: TIV %.0f mL, Dice %.3f, NCC %.3f, %.1f s", t1w.name, tiv, mask_dice, ncc, seconds)
    return {"tiv_ml": tiv, "dice": mask_dice, "ncc": ncc, "seconds": seconds,
            "skullstrip_method": skullstrip_method, "tissue_volumes_ml": tissues.volumes_ml()}


QC_COLUMNS = ("DiceMNIMaskVsTemplate", "NCCMNIT1wVsTemplate", "TIV_mL", "GM_mL", "WM_mL", "CSF_mL", "seconds",
              "SkullStripMethod")
_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")


def _dataset_of(path: Path) -> str:
    """The folder above ``sub-<label>/`` (derivatives layout ``<dataset>/sub-X/anat/``), else ''."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if _SUBJECT.fullmatch(parts[i]):
            return parts[i - 1]
    return ""


def anat_qc_table(*, sidecars: list[Path], out_table: Path, threads: int = 1) -> dict:
    """Step function: one row per T1w from the ``desc-preproc_T1w`` sidecars.

    Parameters
    ----------
    sidecars : list of Path
        JSON sidecars written by :func:`preprocess_anat` (of ``out_t1w``).
    out_table : Path
        Written: TSV sorted by ``file`` (the sidecar's name) with ``subject``,
        ``dataset`` (the folder above ``sub-<label>/``, empty when the path has
        none), Dice, NCC, TIV (mL), GM, WM and CSF volumes (mL, MNI space), total
        seconds, skull-strip method and ``n_warnings``.
    threads : int
        Unused (the runner passes it to every step).

    Returns
    -------
    dict
        ``n_subjects``, ``min_dice``, ``median_ncc``, ``median_tiv_ml``, ``n_with_warnings``.
    """
    out_table = Path(out_table)
    rows = []
    for path in sidecars:
        path = Path(path)
        meta = read_json(path)
        match = _SUBJECT.search(path.name)
        rows.append({
            "file": path.name,
            "subject": match.group(1) if match else "",
            "dataset": _dataset_of(path),
            "DiceMNIMaskVsTemplate": meta.get("DiceMNIMaskVsTemplate"),
            "NCCMNIT1wVsTemplate": meta.get("NCCMNIT1wVsTemplate"),
            "TIV_mL": meta.get("TIV_mL"),
            **{f"{name}_mL": (meta.get("TissueVolumesMNI_mL") or {}).get(name) for name in TISSUES},
            "seconds": (meta.get("Timing") or {}).get("total"),
            "SkullStripMethod": meta.get("SkullStripMethod"),
            "n_warnings": len(meta.get("warnings", [])),
        })
    columns = ["file", "subject", "dataset", *QC_COLUMNS, "n_warnings"]
    table = pd.DataFrame(rows, columns=columns)
    table = table.sort_values(["file", "dataset"], kind="stable").reset_index(drop=True)
    buffer = io.StringIO()
    table.to_csv(buffer, sep="\t", index=False, float_format="%.6g", na_rep="n/a", lineterminator="\n")
    atomic_write_text(out_table, buffer.getvalue())
    numeric = table[["DiceMNIMaskVsTemplate", "NCCMNIT1wVsTemplate", "TIV_mL"]].apply(pd.to_numeric)
    return {
        "n_subjects": len(table),
        "min_dice": float(numeric["DiceMNIMaskVsTemplate"].min()) if len(table) else float("nan"),
        "median_ncc": float(numeric["NCCMNIT1wVsTemplate"].median()) if len(table) else float("nan"),
        "median_tiv_ml": float(numeric["TIV_mL"].median()) if len(table) else float("nan"),
        "n_with_warnings": int((table["n_warnings"] > 0).sum()),
    }
