"""BOLD -> T1w -> MNI: coregistration, transform composition, one-shot resampling.

The output voxel ``y`` (MNI grid) of volume ``t`` samples the raw volume at

    M_t( C( W(y) ) )

where ``W`` is the anatomical T1w -> MNI composite transform (an ANTs ``.h5``,
affine + SyN field; as a point map it takes template points to T1w points),
``C`` the rigid BOLD -> T1w coregistration (as a point map, T1w points to
BOLD-reference points) and ``M_t`` the rigid head motion (reference to volume
``t``, :mod:`bh_models.func.motion`). Per volume this is exactly
``ants.apply_transforms(fixed=mni, moving=volume_t, transformlist=[W, C, M_t])``
(ANTs applies the first listed transform first to the fixed-grid points).
``C(W(y))`` does not depend on ``t``: it is
computed once for all target voxels with ``ants.apply_transforms_to_points``;
the per-volume rigid ``M_t`` is a 4x4 product; then every volume is
interpolated (trilinear) at its own coordinates in one batched
``torch.nn.functional.grid_sample`` call per chunk of volumes. Each output
value is thus a single interpolation of the raw data, and the cost no longer
grows with ``T`` times the cost of evaluating the non-linear warp (the
per-volume ``ants.apply_transforms`` loop that :mod:`benchmarks.bench_func`
compares against).

Only the target voxels that are needed are computed: the atlas voxels inside
the brain mask for the parcel series, or the whole brain mask when the MNI-space
BOLD is written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from bh_models.core.errors import BHInputError

__desc__ = (
    "The BOLD reference (temporal mean of the realigned run) was co-registered "
    "to the brain-extracted T1w with a rigid transform (mutual information, "
    "antsRegistration via antspyx; Avants et al. 2008). The head-motion, "
    "BOLD-to-T1w and T1w-to-MNI152NLin2009cAsym transforms were composed and "
    "applied in a single trilinear interpolation of the original volumes onto "
    "the {resolution:g} mm template grid."
)

# RAS+ (nibabel) <-> LPS+ (ITK/ANTs): flip the sign of x and y.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def sampling_grid(
    *, points: torch.Tensor, matrices: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]
) -> torch.Tensor:
    """grid_sample coordinates of world points moved by per-volume rigid maps.

    The world -> voxel -> [-1, 1] steps are folded into one 4x4 per volume
    (in float64), so the (T, N, 3) grid is written to memory once.

    Parameters
    ----------
    points : torch.Tensor
        (N, 3) float32 world points (RAS+ mm) in the reference frame.
    matrices : np.ndarray
        (T, 4, 4) world maps, reference -> volume ``t``.
    affine : np.ndarray
        (4, 4) voxel -> world affine of the sampled grid.
    shape : tuple of int
        Spatial shape (X, Y, Z) of the sampled grid.

    Returns
    -------
    torch.Tensor
        (T, N, 3) float32 normalised coordinates (i, j, k order, as grid_sample
        wants for a (T, Z, Y, X) input with ``align_corners=True``); a point is
        inside the grid where all three lie in [-1, 1].
    """
    # align_corners=True: -1 and +1 are the centres of the first and last voxels.
    normalise = np.diag([*(2.0 / np.maximum(np.asarray(shape[:3], dtype=float) - 1, 1)), 1.0])
    normalise[:3, 3] = -1.0
    to_grid = normalise @ np.linalg.inv(affine) @ matrices  # (T, 4, 4) world_ref -> grid_t
    linear = torch.from_numpy(to_grid[:, :3, :3].transpose(0, 2, 1).astype(np.float32))  # (T, 3, 3)
    offset = torch.from_numpy(to_grid[:, None, :3, 3].astype(np.float32))  # (T, 1, 3)
    return torch.baddbmm(offset, points.expand(len(matrices), -1, -1), linear)  # (T, N, 3)


def sample_volumes(*, volumes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of every volume at its own points, in one call.

    Parameters
    ----------
    volumes : torch.Tensor
        (T, Z, Y, X) float32: a nibabel (X, Y, Z, T) array seen transposed
        (``array.T``; free for nibabel's Fortran-ordered arrays).
    grid : torch.Tensor
        (T, N, 3) coordinates from :func:`sampling_grid`.

    Returns
    -------
    torch.Tensor
        (T, N) float32 values; points outside the grid read 0.
    """
    out = F.grid_sample(
        volumes[:, None],  # (T, 1, Z, Y, X)
        grid[:, None, None],  # (T, 1, 1, N, 3)
        mode="bilinear",  # trilinear for 5D input
        padding_mode="zeros",
        align_corners=True,
    )  # (T, 1, 1, 1, N)
    return out[:, 0, 0, 0]


def volumes_tensor(bold: np.ndarray) -> torch.Tensor:
    """(X, Y, Z, T) array -> (T, Z, Y, X) float32 tensor, without a copy when possible."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(bold, dtype=np.float32).T))


def map_points(*, points: np.ndarray, transforms: list[Path]) -> np.ndarray:
    """Map world points through a chain of ANTs transform files.

    Parameters
    ----------
    points : np.ndarray
        (N, 3) RAS+ world points (mm).
    transforms : list of Path
        ANTs transform files, none inverted, in the order ``ants.apply_transforms``
        takes them to resample a moving image onto a fixed grid: as point maps
        the **first** is applied first to the (fixed-grid) points.
        ``[t1w_to_mni, bold_from_t1w]`` (the anatomical forward composite, a
        point map MNI -> T1w, then the coregistration, T1w -> BOLD) takes MNI
        points to BOLD-reference points, the same list that resamples the BOLD
        reference onto the MNI grid (fMRIPrep's order). The often quoted
        "the last transform is applied first" describes the moving *image*,
        not the points (checked against ``ants.apply_transforms`` in
        tests/test_resample.py).

    Returns
    -------
    np.ndarray
        (N, 3) RAS+ world points (mm), float64.
    """
    import ants
    import pandas as pd

    for path in transforms:
        if not Path(path).is_file():
            raise BHInputError(path, "transform file not found", "run the anatomical workflow first")
    table = pd.DataFrame(points * _RAS_TO_LPS, columns=["x", "y", "z"])
    moved = ants.apply_transforms_to_points(
        3, table, [str(p) for p in transforms], whichtoinvert=[False] * len(transforms)
    )
    return moved[["x", "y", "z"]].to_numpy(dtype=np.float64) * _RAS_TO_LPS


def block_downsample(img: nib.Nifti1Image, *, target_mm: float = 2.0, binary: bool = False) -> nib.Nifti1Image:
    """Average blocks of voxels so the spacing approaches ``target_mm`` (never upsamples).

    Cheaper than interpolating: one reshape and mean. The new voxel centre is
    the centre of its block, which the affine accounts for.
    """
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
    factor = np.maximum(1, np.floor(target_mm / zooms + 1e-6)).astype(int)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if (factor == 1).all():
        return nib.Nifti1Image(data, img.affine)
    crop = [n - n % f for n, f in zip(data.shape, factor)]
    data = data[: crop[0], : crop[1], : crop[2]]
    blocks = data.reshape(crop[0] // factor[0], factor[0], crop[1] // factor[1], factor[1],
                          crop[2] // factor[2], factor[2])  # (X', fx, Y', fy, Z', fz)
    out = blocks.mean(axis=(1, 3, 5))
    if binary:
        out = (out >= 0.5).astype(np.float32)
    scale = np.diag([*factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    return nib.Nifti1Image(out, img.affine @ scale)


def ants_seed(seed: int) -> str:
    """``--random-seed`` value for antsRegistration that is never 0.

    ANTs treats a seed of 0 as "not set" and seeds its sampler from the clock,
    so ``seed=0`` would make every run different; shift by one instead.
    """
    return str(int(seed) % (2**31 - 2) + 1)


def coregister_to_t1w(
    *,
    bold_reference: nib.Nifti1Image,
    t1w: nib.Nifti1Image,
    t1w_mask: nib.Nifti1Image,
    out_transform: Path,
    seed: int = 0,
) -> float:
    """Rigid mutual-information registration of the BOLD reference to the T1w.

    The BOLD reference is the fixed image, so the metric is evaluated on its
    coarse grid, and the T1w is block-averaged to 2 mm first (ANTs smooths the
    moving image at every level; at 1 mm that dominated the cost). The T1w
    brain mask restricts the metric to brain tissue, so scalp signal in the
    EPI does not pull the fit.

    Parameters
    ----------
    bold_reference : Nifti1Image
        3D BOLD reference (e.g. the realigned temporal mean).
    t1w, t1w_mask : Nifti1Image
        Brain-extracted T1w and its brain mask (native space).
    out_transform : Path
        Written: ANTs affine ``.mat`` that maps T1w points to BOLD-reference
        points, the direction used to resample BOLD data into T1w/MNI space.
    seed : int
        Seed of the metric's random sampling (any int, 0 included; see
        :func:`ants_seed`). Identical results also need a fixed ITK thread count.

    Returns
    -------
    float
        Mattes mutual information inside the brain after registration
        (negative; more negative is better), for QC.
    """
    import ants

    from bh_models.core.antsio import nifti_to_ants

    fixed = nifti_to_ants(bold_reference)
    moving = nifti_to_ants(block_downsample(t1w))
    moving_mask = nifti_to_ants(block_downsample(t1w_mask, binary=True))
    with tempfile.TemporaryDirectory(prefix="bh-coreg-") as work:
        result = ants.registration(
            fixed=fixed, moving=moving, type_of_transform="Rigid", moving_mask=moving_mask,
            aff_shrink_factors=(4, 2, 1), aff_smoothing_sigmas=(2, 1, 0), aff_iterations=(100, 50, 25),
            outprefix=str(Path(work) / "coreg_"), random_seed=ants_seed(seed),
        )
        # Forward maps BOLD (fixed) points to T1w (moving) points; resampling needs T1w -> BOLD.
        forward = ants.read_transform(result["fwdtransforms"][0])
        ants.write_transform(forward.invert(), str(out_transform))
        brain = ants.apply_transforms(
            fixed=fixed, moving=moving_mask, transformlist=result["fwdtransforms"],
            interpolator="nearestNeighbor",
        )
        metric = ants.image_mutual_information(fixed * brain, result["warpedmovout"] * brain)
    return float(metric)


def resample_bold(
    *,
    bold: np.ndarray,
    affine: np.ndarray,
    motion: np.ndarray,
    reference_points: np.ndarray,
    chunk: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate every volume once at its target points.

    Parameters
    ----------
    bold : np.ndarray
        (X, Y, Z, T) raw BOLD data.
    affine : np.ndarray
        (4, 4) voxel -> world affine of the BOLD grid.
    motion : np.ndarray
        (T, 4, 4) world maps, BOLD reference -> volume ``t``.
    reference_points : np.ndarray
        (N, 3) world points in the BOLD reference frame: the target voxels
        already mapped through ``C(W(.))`` by :func:`map_points`.
    chunk : int
        Volumes per grid_sample call; bounds memory at ``chunk * N * 16`` bytes.

    Returns
    -------
    series : np.ndarray
        (T, N) float32 resampled values.
    in_view : np.ndarray
        (N,) bool, True where every volume's sample point lies inside the BOLD
        field of view (elsewhere the value is partly or wholly padding).
    """
    volumes = volumes_tensor(bold)
    points = torch.from_numpy(np.asarray(reference_points, dtype=np.float32))
    series = np.empty((bold.shape[3], len(points)), dtype=np.float32)
    in_view = torch.ones(len(points), dtype=torch.bool)
    for start in range(0, bold.shape[3], chunk):
        stop = min(start + chunk, bold.shape[3])
        grid = sampling_grid(points=points, matrices=motion[start:stop], affine=affine, shape=bold.shape)
        in_view &= (grid.abs() <= 1.0).all(dim=2).all(dim=0)
        series[start:stop] = sample_volumes(volumes=volumes[start:stop], grid=grid).numpy()
    return series, in_view.numpy()


def grid_points(*, indices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates (N, 3) of voxel indices (N, 3) of a grid."""
    return indices @ affine[:3, :3].T + affine[:3, 3]
