"""Rigid head-motion estimation for one BOLD run, all volumes solved together.

Method
------
Least-squares realignment as in SPM's ``spm_realign``: every volume and the
reference are smoothed, and the rigid parameters of volume ``t`` minimise
``sum_x (V_t(M_t x) - (1 + s_t) R(x))^2`` over sample points ``x`` of the
reference. Gauss-Newton with the *reference's* gradient makes the Jacobian the
same for every volume, so its pseudo-inverse is computed once and each
iteration is one batched trilinear interpolation of all volumes
(:func:`bh_models.func.resample.sample_volumes`) plus a (T, N) x (N, 7) product.

Why not ``ants.registration`` per volume (or ``ants.motion_correction``, which
loops over it): on this project's 2-core machine one rigid ANTs registration of
a 3 mm volume costs 0.7 s (``QuickRigid``) to 4.5 s (``BOLDRigid``), i.e. 2-15
minutes for a 200-volume run against a 45 s budget for the whole functional
chain; the batched solve takes about a second (``benchmarks/bench_func.py``
prints both). Framewise displacement is nipype's ``FramewiseDisplacement``
(Power 2012), run on the parameters written in SPM order.

Conventions
-----------
World coordinates are RAS+ millimetres (nibabel). ``matrices[t]`` maps a point
of the reference volume to where the same tissue lies in volume ``t``, which
is exactly the map the one-shot resampler needs. Parameters are reported about
the centre ``c`` of the field of view, ``M_t x = Rot_t (x - c) + c + d_t``:
translations ``d_t`` (mm) are the displacement of the centre, rotations are
``Rot_t``'s extrinsic x-y-z Euler angles (radians).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bh_models.func.resample import sample_volumes, sampling_grid, volumes_tensor

__desc__ = (
    "Head motion was estimated by rigid-body least-squares realignment of every "
    "BOLD volume to the middle volume (Gauss-Newton with the reference gradient, "
    "as in SPM's realignment, on images smoothed with a {fwhm_mm:g} mm FWHM "
    "Gaussian; all volumes solved jointly), giving six parameters per volume, "
    "and framewise displacement (FD) was computed from them following Power "
    "et al. 2012 with nipype's FramewiseDisplacement (Gorgolewski et al. 2011; "
    "50 mm head radius)."
)

PARAMETER_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
FD_RADIUS_MM = 50.0  # Power et al. 2012: rotations as arc length on a 50 mm sphere


@dataclass(frozen=True)
class MotionEstimate:
    """Result of :func:`estimate_motion` for a run of ``T`` volumes.

    Attributes
    ----------
    matrices : np.ndarray
        (T, 4, 4) RAS+ world maps from the reference volume to volume ``t``.
    params : np.ndarray
        (T, 6) ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (rad).
    reference_index : int
        The volume everything was aligned to (its parameters are zero).
    iterations : int
        Gauss-Newton iterations used (at most ``max_iterations``).
    """

    matrices: np.ndarray
    params: np.ndarray
    reference_index: int
    iterations: int


def rigid_matrices(*, rotvec: np.ndarray, shift: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(T, 4, 4) maps ``x -> Rot(rotvec) (x - centre) + centre + shift``.

    Parameters
    ----------
    rotvec : np.ndarray
        (T, 3) rotation vectors (rad).
    shift : np.ndarray
        (T, 3) displacement of ``centre`` (mm).
    centre : np.ndarray
        (3,) rotation centre (mm).
    """
    rot = Rotation.from_rotvec(rotvec).as_matrix()  # (T, 3, 3)
    out = np.tile(np.eye(4), (len(rot), 1, 1))
    out[:, :3, :3] = rot
    out[:, :3, 3] = centre + shift - rot @ centre
    return out


def matrices_to_params(*, matrices: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(T, 6) motion parameters of (T, 4, 4) rigid maps (see module conventions)."""
    shift = matrices[:, :3, :3] @ centre + matrices[:, :3, 3] - centre  # M c - c
    angles = Rotation.from_matrix(matrices[:, :3, :3]).as_euler("xyz")
    return np.concatenate([shift, angles], axis=1)


def field_of_view_centre(*, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of the centre of a grid."""
    centre_ijk = (np.asarray(shape[:3], dtype=float) - 1) / 2
    return affine[:3, :3] @ centre_ijk + affine[:3, 3]


def _sample_points(
    reference: np.ndarray, *, zooms: np.ndarray, separation_mm: float
) -> np.ndarray:
    """Voxel indices (N, 3) where the reference carries signal, on a sparse lattice.

    A lattice every ``separation_mm`` is plenty for seven parameters on images
    smoothed to 5 mm (SPM samples every 4 mm); a 2-voxel margin keeps moved
    points inside the field of view.
    """
    step = np.maximum(1, np.rint(separation_mm / zooms)).astype(int)
    margin = 2
    axes = [np.arange(margin, n - margin, s) for n, s in zip(reference.shape, step)]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)  # (N, 3)
    values = reference[tuple(ijk.T)]
    # Smoothed brain edges fall off slowly, so a low threshold keeps the edges
    # (where the information is) and drops empty background.
    keep = values > 0.05 * np.percentile(reference, 99)
    return ijk[keep]


def estimate_motion(
    *,
    bold: np.ndarray,
    affine: np.ndarray,
    reference_index: int | None = None,
    fwhm_mm: float = 5.0,
    separation_mm: float = 6.0,
    max_iterations: int = 64,
    tolerance_mm: float = 1e-3,
) -> MotionEstimate:
    """Estimate rigid head motion of every volume relative to a reference volume.

    Parameters
    ----------
    bold : np.ndarray
        (X, Y, Z, T) BOLD data (any real dtype; used as float32).
    affine : np.ndarray
        (4, 4) voxel -> RAS+ world affine of the BOLD grid.
    reference_index : int or None
        Volume to align to; ``None`` takes the middle volume (as MCFLIRT does),
        the one least far in time from every other.
    fwhm_mm : float
        Gaussian smoothing before estimation (SPM's default is 5 mm).
    separation_mm : float
        Spacing of the sample lattice in the reference.
    max_iterations : int
        Gauss-Newton iterations at most.
    tolerance_mm : float
        Stop when no volume's update moves any point within 50 mm of the
        centre by more than this.

    Returns
    -------
    MotionEstimate
        Matrices and parameters per volume (see the module conventions).
    """
    n_volumes = bold.shape[3]
    ref_index = n_volumes // 2 if reference_index is None else int(reference_index)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    centre = field_of_view_centre(shape=bold.shape, affine=affine)

    sigma_vox = fwhm_mm / (2 * np.sqrt(2 * np.log(2))) / zooms
    bold = np.asarray(bold, dtype=np.float32)
    # Fortran order, like nibabel's arrays, so the (T, Z, Y, X) view below is free.
    smoothed = np.empty(bold.shape, dtype=np.float32, order="F")
    ndimage.gaussian_filter(bold, sigma=(*sigma_vox, 0.0), mode="nearest", truncate=3.0, output=smoothed)
    reference = smoothed[..., ref_index]
    ijk = _sample_points(reference, zooms=zooms, separation_mm=separation_mm)
    points = ijk @ affine[:3, :3].T + affine[:3, 3]  # (N, 3) world mm

    # Jacobian of the residual w.r.t. (shift, rotation vector, intensity scale)
    # at zero motion, from the reference's gradient (constant across volumes).
    grad_vox = np.stack([g[tuple(ijk.T)] for g in np.gradient(reference)], axis=1)  # (N, 3)
    grad_world = grad_vox @ np.linalg.inv(affine[:3, :3])  # chain rule through voxel = A^-1 (x - b)
    ref_values = reference[tuple(ijk.T)].astype(np.float64)
    jacobian = np.concatenate(
        [grad_world, np.cross(points - centre, grad_world), -ref_values[:, None]], axis=1
    )  # (N, 7)
    solve = np.linalg.pinv(jacobian)  # (7, N) least-squares update operator

    volumes = volumes_tensor(smoothed)  # (T, Z, Y, X)
    points_t = torch.from_numpy(points.astype(np.float32))
    ref_t = torch.from_numpy(ref_values.astype(np.float32))
    solve_t = torch.from_numpy(solve.T.astype(np.float32))  # (N, 7)
    rotvec = np.zeros((n_volumes, 3))
    shift = np.zeros((n_volumes, 3))
    scale = np.zeros(n_volumes)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        matrices = rigid_matrices(rotvec=rotvec, shift=shift, centre=centre)
        grid = sampling_grid(points=points_t, matrices=matrices, affine=affine, shape=bold.shape)
        moved = sample_volumes(volumes=volumes, grid=grid)  # (T, N)
        residual = moved - (1 + torch.from_numpy(scale.astype(np.float32)))[:, None] * ref_t
        update = -(residual @ solve_t).double().numpy()  # (T, 7)
        shift += update[:, :3]
        rotvec += update[:, 3:6]
        scale += update[:, 6]
        step_mm = np.abs(update[:, :3]).max() + FD_RADIUS_MM * np.abs(update[:, 3:6]).max()
        if step_mm < tolerance_mm:
            break
    # The reference is aligned to itself by definition; pin it against round-off.
    rotvec[ref_index] = 0.0
    shift[ref_index] = 0.0
    matrices = rigid_matrices(rotvec=rotvec, shift=shift, centre=centre)
    return MotionEstimate(
        matrices=matrices,
        params=matrices_to_params(matrices=matrices, centre=centre),
        reference_index=ref_index,
        iterations=iterations,
    )


def framewise_displacement(*, params: np.ndarray, radius_mm: float = FD_RADIUS_MM) -> np.ndarray:
    """Power et al. (2012) framewise displacement with nipype's implementation.

    Parameters
    ----------
    params : np.ndarray
        (T, 6) translations (mm) then rotations (rad), the order nipype calls "SPM".
    radius_mm : float
        Head radius that turns rotations into arc lengths.

    Returns
    -------
    np.ndarray
        (T,) FD in mm; the first frame has no predecessor and is NaN (``n/a`` in TSVs).
    """
    from nipype.algorithms.confounds import FramewiseDisplacement

    if len(params) < 2:
        return np.full(len(params), np.nan)
    # nipype reads and writes text files; keep them in a private folder.
    with tempfile.TemporaryDirectory(prefix="bh-fd-") as work:
        par_file = Path(work) / "motion.par"
        np.savetxt(par_file, params, fmt="%.10e")
        interface = FramewiseDisplacement(
            in_file=str(par_file),
            parameter_source="SPM",
            radius=float(radius_mm),
            out_file=str(Path(work) / "fd.txt"),
            save_plot=False,
        )
        result = interface.run(cwd=work)
        fd = np.loadtxt(result.outputs.out_file, skiprows=1, ndmin=1)
    return np.concatenate([[np.nan], fd])


def motion_corrected_mean(
    *, bold: np.ndarray, affine: np.ndarray, matrices: np.ndarray, max_volumes: int = 24
) -> np.ndarray:
    """Temporal mean of the realigned run on the native grid, (X, Y, Z) float32.

    A high-SNR reference for coregistration to the T1w; it never enters the
    output data, which are interpolated once, from the raw volumes. At most
    ``max_volumes`` evenly spaced volumes are averaged: noise falls as the
    square root of their number, so more buys little and costs a full
    interpolation each.
    """
    shape = bold.shape[:3]
    picked = np.unique(np.linspace(0, bold.shape[3] - 1, min(max_volumes, bold.shape[3])).round().astype(int))
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1).T  # (N, 3), C order over (X, Y, Z)
    points = torch.from_numpy((ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32))
    volumes = volumes_tensor(bold)[picked]  # (t, Z, Y, X)
    grid = sampling_grid(points=points, matrices=matrices[picked], affine=affine, shape=shape)
    mean = sample_volumes(volumes=volumes, grid=grid).double().mean(0)  # (N,)
    return mean.float().numpy().reshape(shape)
