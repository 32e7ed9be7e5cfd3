"""Transform storage (issue 20.4): displacement fields rounded to TRANSFORM_QUANTUM_MM and compressed,
still read by ITK, and moving images by at most half a quantum more or less than the exact field."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from bh_models.anat.preprocess import TRANSFORM_QUANTUM_MM, strip_hdf5_times
from bh_models.anat.registration import apply_transform


def _itk_composite(path: Path, field: np.ndarray, *, spacing: float, origin: tuple[float, float, float]) -> None:
    """An ITK composite HDF5 transform (affine identity, then a displacement field), laid out as ITK writes it."""
    def text(group, name, value):
        group.create_dataset(name, data=np.array([value.encode()], dtype=object), dtype=h5py.string_dtype(encoding="ascii"))

    with h5py.File(path, "w") as h5:
        for name, value in (("HDFVersion", "HDF5 library version: 1.12.1"), ("ITKVersion", "5.4.3"),
                            ("OSName", "Linux"), ("OSVersion", "test")):
            text(h5, name, value)
        groups = h5.create_group("TransformGroup")
        text(groups.create_group("0"), "TransformType", "CompositeTransform_float_3_3")
        affine = groups.create_group("1")
        text(affine, "TransformType", "AffineTransform_float_3_3")
        affine.create_dataset("TransformFixedParameters", data=np.zeros(3))
        affine.create_dataset("TransformParameters", data=np.r_[np.eye(3).ravel(), np.zeros(3)].astype(np.float32))
        displacement = groups.create_group("2")
        text(displacement, "TransformType", "DisplacementFieldTransform_float_3_3")
        size = field.shape[:3]
        # size, origin, spacing (mm), direction (LPS identity): ITK's fixed parameters of a field.
        fixed = np.r_[size, origin, [spacing] * 3, np.eye(3).ravel()].astype(np.float64)
        displacement.create_dataset("TransformFixedParameters", data=fixed)
        # ITK stores the vectors x-fastest: transpose (x, y, z, 3) to (z, y, x, 3) before flattening.
        displacement.create_dataset("TransformParameters",
                                    data=np.ascontiguousarray(field.transpose(2, 1, 0, 3)).ravel().astype(np.float32))


def test_rounded_compressed_fields_are_read_by_itk_and_move_images_alike(tmp_path):
    rng = np.random.default_rng(0)
    shape, spacing = (16, 18, 14), 2.0
    # A smooth field (mm) in LPS, with values that are not multiples of the quantum.
    grid = np.stack(np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij"), axis=-1)
    field = (1.7 * np.sin(grid) + 0.3 * rng.normal(size=grid.shape) * 1e-3).astype(np.float32)
    exact, rounded = tmp_path / "exact.h5", tmp_path / "rounded.h5"
    origin = (-16.0, -18.0, -14.0)
    _itk_composite(exact, field, spacing=spacing, origin=origin)
    _itk_composite(rounded, field, spacing=spacing, origin=origin)
    strip_hdf5_times(exact)
    strip_hdf5_times(rounded, quantum_mm=TRANSFORM_QUANTUM_MM)

    with h5py.File(exact) as a, h5py.File(rounded) as b:
        stored = b["TransformGroup/2/TransformParameters"]
        assert stored.compression == "gzip" and stored.shuffle and stored.dtype == np.float32
        values = stored[()]
        difference = values - a["TransformGroup/2/TransformParameters"][()]
        assert np.abs(difference).max() <= TRANSFORM_QUANTUM_MM / 2 + 1e-7
        assert np.allclose(values / TRANSFORM_QUANTUM_MM, np.round(values / TRANSFORM_QUANTUM_MM))
        for name in ("TransformGroup/1/TransformParameters", "TransformGroup/2/TransformFixedParameters"):
            assert np.array_equal(a[name][()], b[name][()]) and b[name].compression is None

    # ITK reads both; a smooth image moves alike through either (linear interpolation).
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-15.0, -17.0, -13.0]
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    image = nib.Nifti1Image((100 + 50 * np.sin(coords[..., 0] / 3.0) * np.cos(coords[..., 1] / 4.0))
                            .astype(np.float32), affine)
    moved_exact = np.asarray(apply_transform(image=image, reference=image, transform=exact).dataobj)
    moved_rounded = np.asarray(apply_transform(image=image, reference=image, transform=rounded).dataobj)
    identity = np.asarray(image.dataobj)
    assert np.abs(moved_exact - identity).max() > 1.0  # the field really moves the image
    # Gradient <= 50 / 3 per voxel (2 mm): half a quantum moves a value by < 0.01.
    assert np.abs(moved_rounded - moved_exact).max() < 0.01
