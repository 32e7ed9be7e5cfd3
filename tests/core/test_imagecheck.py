import nibabel as nib
import numpy as np
import pytest

from bh_models.core.errors import BHInputError
from bh_models.core.imagecheck import load_image, read_data


def save(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4)), path)
    return path


def test_3d_where_4d_expected(tmp_path):
    path = save(tmp_path / "sub-01_task-rest_bold.nii.gz", np.ones((4, 4, 4)))
    with pytest.raises(BHInputError, match=r"sub-01_task-rest_bold.nii.gz: BOLD run is 3D.*expected 4D.*Fix"):
        load_image(path, ndim=4, what="BOLD run")


def test_4d_where_3d_expected(tmp_path):
    path = save(tmp_path / "sub-01_T1w.nii.gz", np.ones((4, 4, 4, 3)))
    with pytest.raises(BHInputError, match="T1w is 4D"):
        load_image(path, ndim=3, what="T1w")
    # a single-volume 4D file is a 3D image in disguise
    one = save(tmp_path / "one.nii.gz", np.ones((4, 4, 4, 1)))
    assert read_data(load_image(one, ndim=3), one).shape == (4, 4, 4)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    with pytest.raises(BHInputError, match="sub-01_T1w.nii.gz: T1w is not a readable NIfTI"):
        load_image(path, ndim=3, what="T1w")


def test_truncated_gzip(tmp_path):
    path = save(tmp_path / "sub-01_T1w.nii.gz", np.random.default_rng(0).random((20, 20, 20)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BHInputError, match="sub-01_T1w.nii.gz: T1w (data is corrupt|is not a readable)"):
        read_data(load_image(path, ndim=3, what="T1w"), path, what="T1w")


def test_empty_nan_and_zero(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.touch()
    with pytest.raises(BHInputError, match="empty"):
        load_image(empty, ndim=3)
    data = np.ones((4, 4, 4))
    data[0, 0, 0] = np.nan
    nan = save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(BHInputError, match="1 NaN"):
        read_data(load_image(nan, ndim=3), nan)
    zero = save(tmp_path / "zero.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(BHInputError, match="all zeros"):
        read_data(load_image(zero, ndim=3), zero)
