"""Tests of bh_models.func.motion: batched rigid realignment, parameters, FD."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bh_models.func.motion import (
    estimate_motion,
    field_of_view_centre,
    framewise_displacement,
    matrices_to_params,
    motion_corrected_mean,
    rigid_matrices,
)
from bh_models.core.templates import load_template

# Known motion, reference = volume 0: shifts (mm) and rotation vectors (degrees).
SHIFTS = np.array([[0, 0, 0], [0.3, -0.2, 0.1], [1.2, 0.5, -0.8], [-0.6, 1.0, 0.4], [0.1, 0.1, 1.5]])
ROTATIONS_DEG = np.array([[0, 0, 0], [0.2, 0.0, -0.1], [1.0, -0.5, 0.3], [-0.4, 0.8, 1.2], [0.0, 0.3, 0.0]])


@pytest.fixture(scope="module")
def moved_run():
    """Template brain at 3 mm moved by known rigid maps, 1 % noise: (data, affine, truth, noise-free reference)."""
    template, _, _ = load_template(3.0)
    reference = np.asarray(template.dataobj, dtype=np.float64)
    affine = template.affine
    centre = field_of_view_centre(shape=reference.shape, affine=affine)
    truth = rigid_matrices(rotvec=np.deg2rad(ROTATIONS_DEG), shift=SHIFTS, centre=centre)
    rng = np.random.default_rng(0)
    volumes = []
    for matrix in truth:
        # Volume t shows at y what the reference shows at M_t^-1 y.
        pull = np.linalg.inv(affine) @ np.linalg.inv(matrix) @ affine
        moved = ndimage.affine_transform(reference, pull[:3, :3], offset=pull[:3, 3], order=3)
        volumes.append(moved + 0.01 * reference.max() * rng.standard_normal(reference.shape))
    data = np.asfortranarray(np.stack(volumes, axis=-1).astype(np.float32))
    return data, affine, truth, reference


def test_parameters_round_trip():
    centre = np.array([1.0, -20.0, 15.0])
    matrices = rigid_matrices(rotvec=np.deg2rad(ROTATIONS_DEG), shift=SHIFTS, centre=centre)
    params = matrices_to_params(matrices=matrices, centre=centre)
    np.testing.assert_allclose(params[:, :3], SHIFTS, atol=1e-12)
    # Small rotations: Euler angles ~ rotation vector components.
    np.testing.assert_allclose(params[:, 3:], np.deg2rad(ROTATIONS_DEG), atol=2e-4)


def test_recovers_known_motion(moved_run):
    data, affine, truth, _ = moved_run
    estimate = estimate_motion(bold=data, affine=affine, reference_index=0)
    centre = field_of_view_centre(shape=data.shape, affine=affine)
    expected = matrices_to_params(matrices=truth, centre=centre)
    assert estimate.reference_index == 0 and estimate.iterations < 64
    np.testing.assert_allclose(estimate.params[:, :3], expected[:, :3], atol=0.05)  # mm
    np.testing.assert_allclose(estimate.params[:, 3:], expected[:, 3:], atol=np.deg2rad(0.05))
    assert (estimate.params[0] == 0).all()


def test_default_reference_is_the_middle_volume(moved_run):
    data, affine, truth, _ = moved_run
    estimate = estimate_motion(bold=data, affine=affine)
    assert estimate.reference_index == 2
    # Relative motion: M_t = truth_t o truth_2^-1.
    relative = truth @ np.linalg.inv(truth[2])
    centre = field_of_view_centre(shape=data.shape, affine=affine)
    np.testing.assert_allclose(estimate.params, matrices_to_params(matrices=relative, centre=centre), atol=0.05)


def test_same_convention_as_ants_rigid(moved_run):
    """ANTs' forward transform (fixed=reference) maps reference points into the moving volume, as ours does."""
    import ants

    from bh_models.core.antsio import nifti_to_ants

    data, affine, _, _ = moved_run
    estimate = estimate_motion(bold=data, affine=affine, reference_index=0)
    fixed = nifti_to_ants(nib.Nifti1Image(data[..., 0], affine))
    moving = nifti_to_ants(nib.Nifti1Image(data[..., 2], affine))
    result = ants.registration(fixed=fixed, moving=moving, type_of_transform="Rigid",
                               aff_metric="meansquares", random_seed="0")
    transform = ants.read_transform(result["fwdtransforms"][0])
    points = np.array([[0.0, -20.0, 10.0], [30.0, 10.0, -5.0], [-40.0, -60.0, 30.0]])  # RAS mm
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    theirs = np.array([transform.apply_to_point((p * flip).tolist()) for p in points]) * flip
    ours = points @ estimate.matrices[2][:3, :3].T + estimate.matrices[2][:3, 3]
    assert np.abs(theirs - ours).max() < 0.15


def test_framewise_displacement_is_power_2012():
    params = np.cumsum(np.random.default_rng(1).normal(0, 0.1, (30, 6)) * [1, 1, 1, 0.01, 0.01, 0.01], axis=0)
    fd = framewise_displacement(params=params)
    diff = np.abs(np.diff(params, axis=0))
    expected = diff[:, :3].sum(1) + 50 * diff[:, 3:].sum(1)
    assert np.isnan(fd[0]) and fd.shape == (30,)
    np.testing.assert_allclose(fd[1:], expected, rtol=1e-6)


def test_realigned_mean_undoes_whole_voxel_shifts_exactly():
    """Shifts by whole voxels make trilinear sampling exact, so the realigned mean is the reference."""
    template, _, _ = load_template(3.0)
    reference = np.asarray(template.dataobj, dtype=np.float32)
    affine = template.affine
    voxel_shifts = np.array([[0, 0, 0], [1, 0, 0], [0, -2, 1], [2, 1, -1]])
    # Tissue at reference voxel v is at v + s in volume t (np.roll moves content by +s).
    data = np.stack([np.roll(reference, tuple(s), axis=(0, 1, 2)) for s in voxel_shifts], axis=-1)
    matrices = np.tile(np.eye(4), (4, 1, 1))
    matrices[:, :3, 3] = voxel_shifts @ affine[:3, :3].T  # world displacement of each shift
    realigned = motion_corrected_mean(bold=np.asfortranarray(data), affine=affine, matrices=matrices)
    interior = (slice(3, -3),) * 3
    np.testing.assert_allclose(realigned[interior], reference[interior], atol=1e-4 * reference.max())
    assert np.abs(data.mean(axis=3) - reference)[interior].max() > 0.1 * reference.max()  # plain mean blurs
