"""Tests of bh_models.func.resample: one-shot resampling equals ANTs' per-volume loop."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bh_models.func.resample import (
    block_downsample,
    coregister_to_t1w,
    grid_points,
    map_points,
    resample_bold,
    sample_volumes,
    sampling_grid,
    volumes_tensor,
)

FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


def rigid(degrees, shift) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    out[:3, 3] = shift
    return out


def write_ants_affine(matrix: np.ndarray, path: Path) -> Path:
    """A RAS 4x4 point map as an ANTs .mat (which works in LPS)."""
    import ants

    lps = np.diag([*FLIP, 1.0]) @ matrix @ np.diag([*FLIP, 1.0])
    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=lps[:3, :3], translation=lps[:3, 3]
    )
    ants.write_transform(transform, str(path))
    return path


def write_displacement_field(shape, affine, path: Path, seed: int = 0) -> Path:
    """A smooth non-linear warp (up to 3 mm) on an axis-aligned grid, as ANTs reads it."""
    import ants

    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((*shape, 3)), (3, 3, 3, 0))
    field *= 3.0 / np.abs(field).max()
    image = ants.from_numpy(
        field.astype(np.float32), origin=(affine[:3, 3] * FLIP).tolist(),
        spacing=np.diag(affine)[:3].tolist(), direction=np.diag(FLIP), has_components=True,
    )
    ants.image_write(image, str(path))
    return path


def smooth_run(shape, n_volumes, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.standard_normal((*shape, n_volumes)), (2, 2, 2, 0))
    return np.asfortranarray((100 + 50 * data / data.std()).astype(np.float32))


def test_sampling_at_voxel_centres_is_exact_and_matches_scipy():
    data = smooth_run((9, 10, 11), 2)
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [-5, 7, 1]
    ijk = np.argwhere(np.ones(data.shape[:3], dtype=bool)).astype(np.float64)
    points = torch.from_numpy(grid_points(indices=ijk, affine=affine).astype(np.float32))
    identity = np.tile(np.eye(4), (2, 1, 1))
    grid = sampling_grid(points=points, matrices=identity, affine=affine, shape=data.shape)
    values = sample_volumes(volumes=volumes_tensor(data), grid=grid).numpy()
    # Exact up to float32 rounding of the grid coordinates: a 1e-7 voxel offset
    # mixes in a neighbour, so compare on the data's scale, not relative to
    # values that happen to lie near zero.
    scale = float(np.abs(data).max())
    np.testing.assert_allclose(values, data.reshape(-1, 2).T, rtol=0, atol=1e-6 * scale)

    inside = np.random.default_rng(1).uniform(0, 1, (500, 3)) * (np.array(data.shape[:3]) - 1)
    points = torch.from_numpy(grid_points(indices=inside, affine=affine).astype(np.float32))
    values = sample_volumes(volumes=volumes_tensor(data),
                            grid=sampling_grid(points=points, matrices=identity, affine=affine,
                                               shape=data.shape)).numpy()
    expected = np.stack([ndimage.map_coordinates(data[..., t], inside.T, order=1) for t in range(2)])
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-5 * scale)


def test_map_points_flips_to_lps_and_applies_the_first_transform_first(tmp_path):
    """The list is read as ants.apply_transforms reads it: first listed, first applied to the points."""
    first = rigid([5, -3, 10], [4, -2, 7])
    second = rigid([-8, 2, 0], [-1, 3, 0.5])
    write_ants_affine(first, tmp_path / "first.mat")
    write_ants_affine(second, tmp_path / "second.mat")
    points = np.random.default_rng(0).uniform(-60, 60, (20, 3))
    apply = lambda m, p: p @ m[:3, :3].T + m[:3, 3]  # noqa: E731
    np.testing.assert_allclose(map_points(points=points, transforms=[tmp_path / "first.mat"]),
                               apply(first, points), atol=1e-4)
    chained = map_points(points=points, transforms=[tmp_path / "first.mat", tmp_path / "second.mat"])
    np.testing.assert_allclose(chained, apply(second, apply(first, points)), atol=1e-4)


def test_ants_apply_transforms_applies_the_first_listed_transform_first(tmp_path):
    """The convention map_points relies on, checked on images: output(x) = moving(second(first(x)))."""
    import ants

    from bh_models.core.antsio import ants_to_nifti, nifti_to_ants

    first = write_ants_affine(rigid([5, -3, 10], [4, -2, 7]), tmp_path / "first.mat")
    second = write_ants_affine(rigid([-8, 2, 0], [-1, 3, 0.5]), tmp_path / "second.mat")
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -45
    data = smooth_run((30, 30, 30), 1)[..., 0]
    img = nib.Nifti1Image(data, affine)
    out = ants.apply_transforms(fixed=nifti_to_ants(img), moving=nifti_to_ants(img),
                                transformlist=[str(first), str(second)], interpolator="linear")
    out = np.asarray(ants_to_nifti(out).dataobj)
    ijk = np.argwhere(np.ones(data.shape, dtype=bool))[::7]
    moved = map_points(points=grid_points(indices=ijk.astype(float), affine=affine), transforms=[first, second])
    vox = (moved - affine[:3, 3]) / 3.0
    inside = ((vox > 0) & (vox < 29)).all(axis=1)
    assert inside.mean() > 0.3
    expected = ndimage.map_coordinates(data, vox[inside].T, order=1)
    np.testing.assert_allclose(out[tuple(ijk[inside].T)], expected, rtol=0, atol=1e-3)


def test_one_shot_equals_per_volume_ants_apply_transforms(tmp_path):
    """Motion + coregistration + affine + non-linear warp, composed once, as ANTs applies them one volume at a time."""
    import ants

    from bh_models.core.antsio import ants_to_nifti, nifti_to_ants

    # Oblique native BOLD grid, 4 mm; axis-aligned target grid, 5 mm.
    bold_affine = rigid([8, -5, 12], [-40, -50, -30]) @ np.diag([4.0, 4.0, 4.0, 1.0])
    data = smooth_run((22, 24, 20), 4)
    target_affine = np.diag([5.0, 5.0, 5.0, 1.0])
    target_affine[:3, 3] = [-45, -55, -35]
    target = nib.Nifti1Image(np.zeros((18, 20, 16), dtype=np.float32), target_affine)

    warp = write_displacement_field(target.shape, target_affine, tmp_path / "t1w_from_mni_Warp.nii.gz")
    affine_part = write_ants_affine(rigid([3, 2, -4], [2, -3, 1]), tmp_path / "t1w_from_mni_affine.mat")
    coreg = write_ants_affine(rigid([-2, 4, 1], [1.5, 0.5, -2]), tmp_path / "bold_from_t1w.mat")
    motion = np.stack([rigid(np.array([0.5, -0.3, 0.2]) * t, np.array([0.4, 0.2, -0.3]) * t) for t in range(4)])

    ijk = np.argwhere(np.ones(target.shape, dtype=bool))  # (N, 3), C order
    # As ANTs lists them for MNI -> BOLD: the SyN field (on the MNI grid) first,
    # then its affine, then the coregistration; the motion comes last, per volume.
    points = map_points(points=grid_points(indices=ijk.astype(float), affine=target_affine),
                        transforms=[warp, affine_part, coreg])
    ours, in_view = resample_bold(bold=data, affine=bold_affine, motion=motion, reference_points=points, chunk=3)
    assert ours.shape == (4, len(ijk)) and 0.3 < in_view.mean() < 1.0

    for t in range(4):
        moved = write_ants_affine(motion[t], tmp_path / f"motion_{t}.mat")
        theirs = ants.apply_transforms(
            fixed=nifti_to_ants(target), moving=nifti_to_ants(nib.Nifti1Image(data[..., t], bold_affine)),
            transformlist=[str(warp), str(affine_part), str(coreg), str(moved)], interpolator="linear",
        )
        theirs = np.asarray(ants_to_nifti(theirs).dataobj)[tuple(ijk.T)]
        np.testing.assert_allclose(ours[t, in_view], theirs[in_view], rtol=1e-4, atol=1e-3)


def test_block_downsample_keeps_world_positions():
    img = nib.Nifti1Image(np.arange(6 * 4 * 5, dtype=np.float32).reshape(6, 4, 5), np.diag([1.0, 1.0, 1.0, 1.0]))
    small = block_downsample(img, target_mm=2.0)
    assert small.shape == (3, 2, 2)
    np.testing.assert_allclose(np.linalg.norm(small.affine[:3, :3], axis=0), 2.0)
    # Block (0,0,0) averages voxels 0..1 per axis: centre at world 0.5.
    np.testing.assert_allclose(small.affine[:3, 3], 0.5)
    assert small.get_fdata()[0, 0, 0] == pytest.approx(img.get_fdata()[:2, :2, :2].mean())


def test_coregistration_recovers_a_known_rigid(tmp_path):
    """EPI-like contrast at 3 mm vs the brain template at 2 mm, 4 degrees and 5 mm apart."""
    from bh_models.core.templates import load_template

    t1w, mask, _ = load_template(2.0)
    template = np.asarray(t1w.dataobj, dtype=np.float64)
    truth = rigid([4, -3, 2], [5, -3, 2])  # T1w point -> BOLD point
    bold_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    bold_affine[:3, 3] = [-96, -132, -78]
    # BOLD shows at y what the T1w shows at truth^-1 y, with inverted (EPI-like) contrast.
    pull = np.linalg.inv(t1w.affine) @ np.linalg.inv(truth) @ bold_affine
    moved = ndimage.affine_transform(template, pull[:3, :3], offset=pull[:3, 3], output_shape=(65, 77, 63), order=1)
    epi = np.where(moved > 0.05 * moved.max(), 1.5 * moved.max() - moved, 0.0)
    bold_reference = nib.Nifti1Image(epi.astype(np.float32), bold_affine)

    mi = coregister_to_t1w(bold_reference=bold_reference, t1w=t1w, t1w_mask=mask,
                           out_transform=tmp_path / "coreg.mat", seed=0)
    assert mi < -0.2
    brain = np.argwhere(np.asarray(mask.dataobj) > 0)[::200]
    points = grid_points(indices=brain.astype(float), affine=t1w.affine)
    found = map_points(points=points, transforms=[tmp_path / "coreg.mat"])
    expected = points @ truth[:3, :3].T + truth[:3, 3]
    assert np.median(np.linalg.norm(found - expected, axis=1)) < 0.5  # mm, a sixth of a BOLD voxel
