"""Template and atlas resolution, offline.

Space policy
------------
The registration target is MNI152NLin2009cAsym (the "MNI152 2009c" template that
nilearn ships, or TemplateFlow's copy when its cache holds it). The Schaefer-400
volumes are published in FSL MNI152 space (MNI152NLin6Asym). The two are
different named spaces, so :func:`atlas_in_template_space` is the single explicit
step that moves the atlas onto the template grid (nearest-neighbour resampling
in world coordinates; both templates share the MNI world frame, and their
residual misalignment is a few millimetres). Every output names its space.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bh_models.core.errors import BHConfigError

TEMPLATE_SPACE = "MNI152NLin2009cAsym"
ATLAS_SOURCE_SPACE = "MNI152NLin6Asym"
SUPPORTED_NETWORKS = (7, 17)

__desc__ = (
    "Spatial normalisation targeted the MNI152NLin2009cAsym template "
    "(Fonov et al. 2011), and the Schaefer-400 atlas (Schaefer et al. 2018), "
    "published in MNI152NLin6Asym space, was resampled onto the template grid "
    "with nearest-neighbour interpolation."
)


def data_dir() -> Path:
    """Folder of the reference files that ship inside the package."""
    return Path(str(resources.files("bh_models") / "data"))


def _templateflow_file(name: str, suffix: str) -> Path | None:
    """A TemplateFlow file if its cache already holds it (never downloads)."""
    home = Path(os.environ.get("TEMPLATEFLOW_HOME", Path.home() / ".cache" / "templateflow"))
    path = home / f"tpl-{name}" / f"tpl-{name}_res-01_{suffix}.nii.gz"
    return path if path.is_file() and path.stat().st_size > 0 else None


def _grid_affine(affine: np.ndarray, resolution: float) -> np.ndarray:
    out = affine.copy()
    out[:3, :3] = np.diag(np.sign(np.diag(affine[:3, :3])) * resolution)
    return out


def _resample(img: nib.Nifti1Image, resolution: float, interpolation: str) -> nib.Nifti1Image:
    from nilearn.image import resample_img

    if np.allclose(np.abs(np.diag(img.affine[:3, :3])), resolution):
        return img
    zooms = np.abs(np.diag(img.affine[:3, :3]))
    shape = tuple(int(np.ceil(s * z / resolution)) for s, z in zip(img.shape[:3], zooms))
    return resample_img(
        img,
        target_affine=_grid_affine(img.affine, resolution),
        target_shape=shape,
        interpolation=interpolation,
        force_resample=True,
        copy_header=True,
    )


@functools.lru_cache(maxsize=8)
def load_template(resolution: float = 1.0, name: str = TEMPLATE_SPACE) -> tuple[nib.Nifti1Image, nib.Nifti1Image, str]:
    """Brain-extracted T1w template and its brain mask at ``resolution`` mm.

    Returns
    -------
    template, mask, source
        ``source`` says where the file came from (``templateflow-cache`` or
        ``nilearn``), for provenance.
    """
    if name != TEMPLATE_SPACE:
        raise BHConfigError(
            "template.name", f"unsupported template '{name}'", f"use '{TEMPLATE_SPACE}'"
        )
    tf_t1 = _templateflow_file(name, "desc-brain_T1w")
    tf_mask = _templateflow_file(name, "desc-brain_mask")
    if tf_t1 is not None and tf_mask is not None:
        t1, mask, source = nib.load(tf_t1), nib.load(tf_mask), "templateflow-cache"
    else:
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

        t1 = load_mni152_template(resolution=1)
        mask = load_mni152_brain_mask(resolution=1)
        source = "nilearn"
    t1 = nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32), t1.affine)
    mask = nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), mask.affine)
    t1 = _resample(t1, resolution, "continuous")
    mask = _resample(mask, resolution, "nearest")
    mask = nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), mask.affine)
    return t1, mask, source


def atlas_labels(networks: int = 7) -> pd.DataFrame:
    """Schaefer-400 label table: columns ``index`` (1..400) and ``name``."""
    _check_networks(networks)
    folder = data_dir() / "schaefer2018"
    tsv = next(folder.glob(f"tpl-*_atlas-Schaefer2018_desc-400Parcels{networks}Networks_dseg.tsv"))
    table = pd.read_csv(tsv, sep="\t")
    return table[["index", "name"]].sort_values("index").reset_index(drop=True)


def _check_networks(networks: int) -> None:
    if networks not in SUPPORTED_NETWORKS:
        raise BHConfigError("atlas.networks", f"{networks} is not available", "use 7 or 17")


def atlas_source_file(networks: int = 7, resolution: int = 1) -> Path:
    """The published Schaefer-400 volume (MNI152NLin6Asym) shipped in the package."""
    _check_networks(networks)
    res = 1 if resolution < 2 else 2
    return data_dir() / "schaefer2018" / (
        f"space-MNI152_atlas-schaefer2018_res-{res}mm_den-400_desc-{networks}networks_dseg.nii.gz"
    )


@functools.lru_cache(maxsize=8)
def atlas_in_template_space(networks: int = 7, resolution: float = 2.0) -> nib.Nifti1Image:
    """Schaefer-400 resampled from MNI152NLin6Asym onto the template grid.

    Nearest-neighbour in world coordinates from the 1 mm source, so no label is
    invented and small parcels survive at coarse resolutions.
    """
    from nilearn.image import resample_to_img

    template, _, _ = load_template(resolution)
    source = nib.load(atlas_source_file(networks, 1))
    out = resample_to_img(
        source, template, interpolation="nearest", force_resample=True, copy_header=True
    )
    data = np.asarray(out.dataobj).astype(np.int16)
    return nib.Nifti1Image(data, template.affine)


@functools.lru_cache(maxsize=1)
def schaefer_7_to_17() -> np.ndarray:
    """17-network label of each 7-network Schaefer-400 parcel.

    Both CBIG orderings label the same 400 parcels. The correspondence is read
    off the packaged 1 mm volumes and checked to be exact: every voxel of a
    7-network parcel carries one and the same 17-network label, and the map is
    one-to-one.

    Returns
    -------
    ndarray, (400,) int64
        ``out[i - 1]`` is the 17-network label of 7-network parcel ``i``.
    """
    from bh_models.core.errors import BHInputError

    path7, path17 = atlas_source_file(7, 1), atlas_source_file(17, 1)
    labels7 = np.asarray(nib.load(path7).dataobj, dtype=np.int64).ravel()
    labels17 = np.asarray(nib.load(path17).dataobj, dtype=np.int64).ravel()
    inside = labels7 > 0
    if not np.array_equal(inside, labels17 > 0):
        raise BHInputError(path17, "the 7- and 17-network atlases cover different voxels", "restore the packaged atlases")
    pairs = np.unique(np.stack([labels7[inside], labels17[inside]]), axis=1)  # (2, n_pairs) sorted by 7-label
    n_parcels = len(atlas_labels(7))
    if pairs.shape[1] != n_parcels or not np.array_equal(pairs[0], np.arange(1, n_parcels + 1)) \
            or len(np.unique(pairs[1])) != n_parcels:
        raise BHInputError(path17, "the 7- and 17-network atlases do not share the same 400 parcels",
                           "restore the packaged atlases")
    return pairs[1]


def parcel_order(*, source: int, target: int) -> np.ndarray:
    """Row permutation from one Schaefer-400 network order to another (same parcels).

    Returns
    -------
    ndarray, (400,) int64
        ``values_target = values_source[parcel_order(source=s, target=t)]``: row ``j`` of the
        ``target``-order table is row ``out[j]`` of the ``source``-order table.
    """
    _check_networks(source)
    _check_networks(target)
    identity = np.arange(len(atlas_labels(7)))
    if source == target:
        return identity
    seven_to_seventeen = schaefer_7_to_17() - 1  # 0-based 17-row of each 7-row
    if source == 7:  # target 17: 17-row j holds 7-row inverse[j]
        return np.argsort(seven_to_seventeen)
    return seven_to_seventeen  # source 17, target 7: 7-row i holds 17-row seven_to_seventeen[i]


def network_order_of(names: list[str] | tuple[str, ...]) -> int:
    """7 or 17: the Schaefer-400 network order whose label table lists exactly these ROI names."""
    names = list(names)
    for networks in SUPPORTED_NETWORKS:
        if names == atlas_labels(networks)["name"].tolist():
            return networks
    raise BHConfigError("atlas.networks", f"ROI names ({names[0] if names else 'none'} ...) are not the "
                        "Schaefer-400 7- or 17-network label table", "extract the series with the packaged atlas")
