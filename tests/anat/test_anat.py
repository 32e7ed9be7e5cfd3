"""Anatomical chain on real data: Colin27 (``ch2`` of Debian's mricron-data).

The full chain runs three times (module-scoped fixture, ~1-2 min on 2 cores):
the Colin27 head under a known random affine (oblique header, RAS storage),
the same image stored LPI, and a rerun of the first for byte identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import sidecar_path

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
CH2BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")

pytestmark = pytest.mark.skipif(
    not CH2.is_file() or not CH2BET.is_file(),
    reason="needs Debian's mricron-data (/usr/share/mricron/templates/ch2.nii.gz, ch2bet.nii.gz)",
)

THREADS = 2
OUTPUTS = {
    "out_t1w": "desc-preproc_T1w.nii.gz",
    "out_mask": "desc-brain_mask.nii.gz",
    "out_mni_t1w": "space-MNI152NLin2009cAsym_res-2_desc-preproc_T1w.nii.gz",
    "out_mni_mask": "space-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz",
    "out_forward": "from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5",
    "out_inverse": "from-MNI152NLin2009cAsym_to-T1w_mode-image_xfm.h5",
    "out_tensor": "desc-encoder_T1w.npy",
    "out_qc_mask": "desc-brain_mask.png",
    "out_qc_registration": "space-MNI152NLin2009cAsym_T1w.png",
    "out_gm_probseg": "space-MNI152NLin2009cAsym_res-2_label-GM_probseg.nii.gz",
    "out_wm_probseg": "space-MNI152NLin2009cAsym_res-2_label-WM_probseg.nii.gz",
    "out_csf_probseg": "space-MNI152NLin2009cAsym_res-2_label-CSF_probseg.nii.gz",
    "out_dseg": "space-MNI152NLin2009cAsym_res-2_dseg.nii.gz",
    "out_qc_segmentation": "space-MNI152NLin2009cAsym_desc-segmentation_T1w.png",
}


def random_world_affine(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """Rotation <= 15 deg about each axis, translation <= 20 mm, scaling within 10 %, about ``centre``."""
    ax, ay, az = np.deg2rad(rng.uniform(-15, 15, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    linear = rz @ ry @ rx @ np.diag(rng.uniform(0.9, 1.1, 3))
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre + rng.uniform(-20, 20, 3) - linear @ centre
    return out


def perturbed_ch2(path: Path, seed: int = 7) -> tuple[Path, np.ndarray]:
    """ch2 with a random world affine written into its header (oblique; scaled voxels)."""
    img = nib.load(CH2)
    centre = nib.affines.apply_affine(img.affine, (np.array(img.shape) - 1) / 2)
    move = random_world_affine(np.random.default_rng(seed), centre)
    out = nib.Nifti1Image(np.asarray(img.dataobj), move @ img.affine)
    out.header.set_data_dtype(np.uint8)
    nib.save(out, path)
    return path, move


def to_lpi(src: Path, dst: Path) -> Path:
    """Same world image, voxels stored with x and y reversed (LPI for an axial RAS image)."""
    img = nib.load(src)
    data = np.asarray(img.dataobj)[::-1, ::-1, :]
    flip = np.eye(4)
    for axis in (0, 1):
        flip[axis, axis] = -1
        flip[axis, 3] = img.shape[axis] - 1
    out = nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip)
    out.header.set_data_dtype(img.get_data_dtype())
    nib.save(out, dst)
    return dst


def run_chain(t1w: Path, folder: Path, subject: str) -> tuple[dict, dict[str, Path]]:
    from bh_models.anat.preprocess import preprocess_anat

    anat = folder / f"sub-{subject}" / "anat"
    outs = {key: anat / f"sub-{subject}_{name}" for key, name in OUTPUTS.items()}
    result = preprocess_anat(t1w=t1w, **outs, resolution=2, registration_resolution=2,
                             tensor_grid=(48, 56, 48), seed=0, threads=THREADS)
    return result, outs


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    raw = tmp_path_factory.mktemp("raw")
    oblique, move = perturbed_ch2(raw / "sub-01_T1w.nii.gz")
    lpi = to_lpi(oblique, raw / "sub-02_T1w.nii.gz")
    out = tmp_path_factory.mktemp("derivatives")
    first = run_chain(oblique, out / "dsA", "01")
    second = run_chain(lpi, out / "dsB", "02")
    rerun = run_chain(oblique, out / "rerun", "01")
    return {"move": move, "oblique": first, "lpi": second, "rerun": rerun, "root": out}


@pytest.mark.slow
@pytest.mark.parametrize("method, min_dice", [("deepbet", 0.93), ("ants", 0.93)])
def test_skullstrip_colin27_against_bet(method: str, min_dice: float) -> None:
    from bh_models.anat.registration import limit_itk_threads
    from bh_models.anat.skullstrip import dice, skullstrip, tiv_ml

    limit_itk_threads(1)  # as preprocess_anat does; ITK reads it once per process
    img = nib.load(CH2)
    mask = skullstrip(img, method=method, threads=THREADS)
    assert mask.shape == img.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask.affine, img.affine)
    reference = np.asarray(nib.load(CH2BET).dataobj) > 0
    overlap = dice(np.asarray(mask.dataobj), reference)
    print(f"{method}: Dice vs ch2bet {overlap:.4f}, TIV {tiv_ml(mask):.0f} mL")
    assert overlap >= min_dice


@pytest.mark.slow
def test_registration_recovers_random_affine(chain: dict) -> None:
    from bh_models.core.templates import load_template

    result, outs = chain["oblique"]
    _, template_mask, _ = load_template(2.0)
    mni_mask = nib.load(outs["out_mni_mask"])
    assert mni_mask.shape == template_mask.shape
    np.testing.assert_allclose(mni_mask.affine, template_mask.affine)
    assert mni_mask.get_data_dtype() == np.uint8
    from bh_models.anat.skullstrip import dice

    overlap = dice(np.asarray(mni_mask.dataobj), np.asarray(template_mask.dataobj))
    print(f"random affine {np.round(chain['move'], 3).tolist()}: Dice {overlap:.4f}, NCC {result['ncc']:.3f}")
    assert overlap >= 0.97
    assert result["dice"] == pytest.approx(overlap)
    assert result["ncc"] > 0.6
    meta = json.loads(sidecar_path(outs["out_t1w"]).read_text())
    assert meta["DiceMNIMaskVsTemplate"] == pytest.approx(overlap, abs=1e-6)
    for key in ("TIV_mL", "SkullStripMethod", "NCCMNIT1wVsTemplate", "Timing", "TemplateSource",
                "TypeOfTransform", "Seed"):
        assert key in meta
    assert set(meta["Timing"]) >= {"skullstrip", "n4", "registration", "resample", "qc", "total"}
    # Scaled voxels: the TIV follows the world volume of the mask.
    assert 1500 < meta["TIV_mL"] < 2500


@pytest.mark.slow
def test_native_outputs_keep_world_geometry(chain: dict, tmp_path: Path) -> None:
    _, outs = chain["oblique"]
    raw = nib.load(perturbed_ch2(tmp_path / "sub-01_T1w.nii.gz")[0])
    for key, dtype in (("out_t1w", np.float32), ("out_mask", np.uint8)):
        img = nib.load(outs[key])
        assert img.shape == raw.shape and img.get_data_dtype() == dtype
        np.testing.assert_allclose(img.affine, raw.affine, atol=1e-5)
    brain = np.asarray(nib.load(outs["out_t1w"]).dataobj)
    mask = np.asarray(nib.load(outs["out_mask"]).dataobj) > 0
    assert np.all(brain[~mask] == 0) and np.all(np.isfinite(brain))
    for key in ("out_forward", "out_inverse", "out_qc_mask", "out_qc_registration"):
        assert outs[key].stat().st_size > 0
    assert outs["out_qc_mask"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_lpi_storage_gives_the_ras_result(chain: dict) -> None:
    from bh_models.anat.skullstrip import dice

    (res_ras, ras), (res_lpi, lpi) = chain["oblique"], chain["lpi"]
    mask_ras = np.asarray(nib.load(ras["out_mask"]).dataobj)
    mask_lpi = np.asarray(nib.load(lpi["out_mask"]).dataobj)[::-1, ::-1, :]
    assert dice(mask_ras, mask_lpi) > 0.999
    mni_ras = np.asarray(nib.load(ras["out_mni_mask"]).dataobj)
    mni_lpi = np.asarray(nib.load(lpi["out_mni_mask"]).dataobj)
    assert dice(mni_ras, mni_lpi) > 0.99
    # The two headers differ by float32 rounding (~1e-6 mm), which SyN turns into
    # slightly different (equally good) warps: compare within tolerance.
    t_ras, t_lpi = np.load(ras["out_tensor"]), np.load(lpi["out_tensor"])
    assert dice(t_ras != 0, t_lpi != 0) > 0.99
    both = (t_ras != 0) & (t_lpi != 0)
    assert np.corrcoef(t_ras[both], t_lpi[both])[0, 1] > 0.97
    assert res_lpi["ncc"] == pytest.approx(res_ras["ncc"], abs=0.02)
    assert res_lpi["tiv_ml"] == pytest.approx(res_ras["tiv_ml"], rel=0.005)
    assert res_lpi["dice"] == pytest.approx(res_ras["dice"], abs=0.01)


@pytest.mark.slow
def test_encoder_tensor(chain: dict) -> None:
    from bh_models.anat.preprocess import TENSOR_CENTRE_MM, tensor_reference

    _, outs = chain["oblique"]
    tensor = np.load(outs["out_tensor"])
    assert tensor.shape == (48, 56, 48) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    inside = tensor != 0
    meta = json.loads(sidecar_path(outs["out_tensor"]).read_text())
    assert abs(int(inside.sum()) - meta["BrainVoxels"]) <= meta["BrainVoxels"] * 0.001
    assert abs(float(tensor[inside].mean())) < 1e-3
    assert float(tensor[inside].std()) == pytest.approx(1.0, abs=1e-3)
    # The paper's box holds the whole cerebrum: the brain does not reach its
    # left/right, front/back or top faces. (Its bottom face cuts the lower
    # cerebellum and brainstem, as the paper's centre crop of the FSL grid does.)
    assert 0.2 < inside.mean() < 0.8
    for axis in range(2):
        assert not np.take(inside, [0, -1], axis=axis).any()
    assert not inside[:, :, -1].any()
    # The paper's grid: 1 mm voxels on FSL's integer-mm lattice of the 160 x 192 x 160 crop.
    paper = tensor_reference((160, 192, 160))
    np.testing.assert_allclose(np.diag(paper.affine)[:3], 1.0)
    np.testing.assert_allclose(paper.affine[:3, 3], [-80, -113, -61])
    centre = nib.affines.apply_affine(paper.affine, (np.array(paper.shape) - 1) / 2)
    np.testing.assert_allclose(centre, TENSOR_CENTRE_MM)


@pytest.mark.slow
def test_rerun_is_byte_identical(chain: dict) -> None:
    _, first = chain["oblique"]
    _, again = chain["rerun"]
    for key, path in first.items():
        assert path.read_bytes() == again[key].read_bytes(), f"{key} differs between two runs"
    for path in [sidecar_path(first["out_tensor"]), sidecar_path(first["out_mni_t1w"])]:
        assert path.read_bytes() == sidecar_path(again["out_tensor"] if "encoder" in path.name
                                                 else again["out_mni_t1w"]).read_bytes()
    meta_a = json.loads(sidecar_path(first["out_t1w"]).read_text())
    meta_b = json.loads(sidecar_path(again["out_t1w"]).read_text())
    meta_a.pop("Timing"), meta_b.pop("Timing")  # wall-clock seconds differ by nature
    assert meta_a == meta_b


@pytest.mark.slow
def test_qc_table(chain: dict) -> None:
    from bh_models.anat.preprocess import anat_qc_table

    sidecars = [sidecar_path(chain["lpi"][1]["out_t1w"]), sidecar_path(chain["oblique"][1]["out_t1w"])]
    out = chain["root"] / "anat_qc.tsv"
    summary = anat_qc_table(sidecars=sidecars, out_table=out)
    table = pd.read_csv(out, sep="\t", dtype={"subject": str})
    assert list(table["subject"]) == ["01", "02"]
    assert list(table["dataset"]) == ["dsA", "dsB"]
    assert {"DiceMNIMaskVsTemplate", "NCCMNIT1wVsTemplate", "TIV_mL", "seconds"} <= set(table.columns)
    assert summary["n_subjects"] == 2 and summary["min_dice"] >= 0.97
    assert str(chain["root"]) not in out.read_text()


def _write(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _outputs(folder: Path) -> dict[str, Path]:
    return {key: folder / f"sub-x_{name}" for key, name in OUTPUTS.items()}


@pytest.mark.parametrize("case", ["nan", "zeros", "4d", "missing"])
def test_bad_t1w_names_the_file(case: str, tmp_path: Path) -> None:
    from bh_models.anat.preprocess import preprocess_anat

    data = np.random.default_rng(0).uniform(1, 100, (20, 20, 20)).astype(np.float32)
    path = tmp_path / f"sub-x_{case}_T1w.nii.gz"
    if case == "nan":
        data[3, 4, 5] = np.nan
        _write(path, data)
    elif case == "zeros":
        _write(path, np.zeros_like(data))
    elif case == "4d":
        _write(path, np.stack([data, data, data], axis=-1))
    with pytest.raises(BHInputError) as info:
        preprocess_anat(t1w=path, **_outputs(tmp_path / "out"))
    message = str(info.value)
    assert str(path) in message and "Fix:" in message
    assert {"nan": "NaN", "zeros": "all zeros", "4d": "4D", "missing": "not found"}[case] in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_config_is_refused(tmp_path: Path) -> None:
    from bh_models.anat.preprocess import preprocess_anat
    from bh_models.core.errors import BHConfigError

    with pytest.raises(BHConfigError, match="anat.skullstrip"):
        preprocess_anat(t1w=CH2, **_outputs(tmp_path), skullstrip_method="bet")
    with pytest.raises(BHConfigError, match="anat.tensor_grid"):
        preprocess_anat(t1w=CH2, **_outputs(tmp_path), tensor_grid=(48, 56))
