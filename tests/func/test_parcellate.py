"""Tests of bh_models.func.parcellate: NiftiLabelsMasker equivalence and the fixed layout."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from bh_models.func.parcellate import (
    EMPTY_PARCEL_FILL,
    N_PARCELS,
    extract_parcel_series,
    fill_empty_parcels,
    parcel_layout,
    parcel_means,
)
from bh_models.core.templates import atlas_in_template_space, atlas_labels, load_template

RESOLUTION = 4.0  # small grid; every parcel still has voxels


@pytest.fixture(scope="module")
def atlas() -> nib.Nifti1Image:
    return atlas_in_template_space(7, RESOLUTION)


@pytest.fixture(scope="module")
def mask_without_two_parcels(atlas) -> nib.Nifti1Image:
    """Template brain mask minus parcels 3 and 250 (as if outside the field of view)."""
    _, mask, _ = load_template(RESOLUTION)
    labels = np.asarray(atlas.dataobj)
    data = (np.asarray(mask.dataobj) > 0) & ~np.isin(labels, [3, 250])
    return nib.Nifti1Image(data.astype(np.uint8), atlas.affine)


def test_equivalent_to_nilearn_labels_masker(atlas, mask_without_two_parcels):
    from nilearn.maskers import NiftiLabelsMasker

    rng = np.random.default_rng(0)
    data = (1 + rng.standard_normal((*atlas.shape, 12))).astype(np.float32)
    img = nib.Nifti1Image(data, atlas.affine)

    ours, counts = extract_parcel_series(img=img, atlas=atlas, mask=mask_without_two_parcels)
    masker = NiftiLabelsMasker(labels_img=atlas, mask_img=mask_without_two_parcels, strategy="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = masker.fit_transform(img)
    # region_ids_: output column -> label (plus a "background" entry).
    columns = {k: v for k, v in masker.region_ids_.items() if k != "background"}
    present = np.array([int(columns[k]) for k in sorted(columns)])

    assert ours.shape == (12, N_PARCELS)
    assert theirs.shape[1] == N_PARCELS - 2  # nilearn drops the masked-out parcels ...
    assert sorted(set(range(1, 401)) - set(present)) == [3, 250]
    np.testing.assert_allclose(ours[:, present - 1], theirs, rtol=0, atol=1e-5)
    # ... we keep them, with no voxels, so the layout stays 400 wide.
    assert counts[2] == 0 and counts[249] == 0
    assert np.isnan(ours[:, [2, 249]]).all()


def test_layout_names_columns_in_atlas_order(atlas):
    layout = parcel_layout(atlas=atlas, networks=7)
    assert layout.names == tuple(atlas_labels(7)["name"])
    assert len(layout.names) == N_PARCELS and layout.names[0].startswith("7Networks_LH_Vis")
    assert set(np.unique(layout.labels)) == set(range(1, 401))
    assert (np.asarray(atlas.dataobj)[tuple(layout.indices.T)] == layout.labels).all()
    assert parcel_layout(atlas=atlas_in_template_space(17, RESOLUTION), networks=17).names[0].startswith("17Networks")


def test_sparse_and_empty_parcels_are_filled_and_flagged():
    labels = np.array([1, 1, 1, 2, 3, 3, 3, 3])
    series = np.arange(16, dtype=float).reshape(2, 8) + 1
    means, counts = parcel_means(series=series, labels=labels, n_parcels=4)
    assert counts.tolist() == [3, 1, 4, 0]
    np.testing.assert_allclose(means[:, 0], series[:, :3].mean(1))
    filled, empty = fill_empty_parcels(means=means, counts=counts, min_parcel_voxels=2)
    assert empty.tolist() == [False, True, False, True]
    assert (filled[:, empty] == EMPTY_PARCEL_FILL).all()
    assert np.isfinite(filled).all()
    np.testing.assert_allclose(filled[:, 2], means[:, 2])


def test_mask_on_another_grid_is_refused(atlas):
    other = nib.Nifti1Image(np.ones((5, 5, 5), dtype=np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="same grid"):
        parcel_layout(atlas=atlas, mask=other)
