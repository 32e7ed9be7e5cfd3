"""The T2*-weighted optimal combination (bh_models.func.multiecho) against independent computations."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bh_models.core.errors import BHInputError
from bh_models.func.multiecho import combine_echoes, fit_t2star, load_combined, optimal_weights

TE = (0.012, 0.028, 0.044)


def _simulate(seed: int = 0, shape=(4, 5, 3), frames: int = 60):
    """Echoes S_i(t) = S0 exp(-TE_i / T2*) (1 + BOLD(t) TE_i / T2*) + noise, T2* in 20..60 ms."""
    rng = np.random.default_rng(seed)
    s0 = rng.uniform(800, 1200, size=shape)
    t2star = rng.uniform(0.02, 0.06, size=shape)
    bold = 0.01 * rng.standard_normal(frames)
    echoes = []
    for te in TE:
        clean = s0[..., None] * np.exp(-te / t2star[..., None]) * (1 + bold * te / t2star[..., None])
        echoes.append(clean + rng.normal(0, 2.0, size=(*shape, frames)))
    return [e.astype(np.float32) for e in echoes], t2star


def test_t2star_fit_equals_a_per_voxel_log_linear_polyfit():
    echoes, truth = _simulate()
    means = np.stack([e.astype(np.float64).mean(axis=3).reshape(-1) for e in echoes])
    t2star, valid = fit_t2star(means=means, echo_times=TE)
    assert valid.all()
    independent = np.array([-1.0 / np.polyfit(TE, np.log(means[:, v]), 1)[0] for v in range(means.shape[1])])
    np.testing.assert_allclose(t2star, independent, rtol=1e-10)
    np.testing.assert_allclose(t2star, truth.reshape(-1), rtol=0.05)  # and close to the simulated T2*


def test_weights_and_combination_equal_the_posse_formula_computed_voxel_by_voxel():
    echoes, _ = _simulate(seed=1)
    combined, info = combine_echoes(echoes=echoes, echo_times=TE)
    shape = echoes[0].shape
    expected = np.zeros(shape)
    for index in np.ndindex(shape[:3]):
        mean = [e[index].mean() for e in echoes]
        t2 = -1.0 / np.polyfit(TE, np.log(mean), 1)[0]
        raw = [te * np.exp(-te / t2) for te in TE]
        for weight, echo in zip(raw, echoes):
            expected[index] += weight / sum(raw) * echo[index]
    np.testing.assert_allclose(combined, expected, rtol=1e-5)
    assert combined.dtype == np.float32
    assert info["FractionOfVoxelsWithT2starFit"] == 1.0 and 0.02 < info["MedianT2star"] < 0.06
    assert info["EchoTimes"] == list(TE)


def test_the_combination_has_a_higher_bold_contrast_to_noise_than_any_echo():
    """What the weights are for (Posse 1999): the BOLD fluctuation over the noise beats every single echo."""
    rng = np.random.default_rng(2)
    frames, voxels = 400, 200
    s0, t2 = 1000.0, 0.035
    bold = 0.02 * rng.standard_normal(frames)
    echoes, clean = [], []
    for te in TE:
        signal = s0 * np.exp(-te / t2) * (1 + bold * te / t2)
        clean.append(signal)
        echoes.append((signal[None, :] + rng.normal(0, 5.0, size=(voxels, frames)))[:, None, None, :])
    combined, _ = combine_echoes(echoes=echoes, echo_times=TE)

    def cnr(series):  # correlation of each voxel's series with the true BOLD fluctuation
        x = series.reshape(voxels, frames)
        return np.mean([np.corrcoef(v, bold)[0, 1] for v in x])

    assert cnr(combined) > max(cnr(e) for e in echoes)


def test_voxels_without_a_usable_fit_use_the_te_proportional_limit():
    means = np.array([[100.0, 0.0, 50.0], [80.0, 0.0, 60.0], [60.0, 0.0, 70.0]])  # decays, zeros, grows
    t2star, valid = fit_t2star(means=means, echo_times=TE)
    assert valid.tolist() == [True, False, False] and np.isinf(t2star[1:]).all()
    weights = optimal_weights(t2star=t2star, echo_times=TE)
    np.testing.assert_allclose(weights[:, 1], np.array(TE) / sum(TE))
    np.testing.assert_allclose(weights.sum(axis=0), 1.0)


def test_load_combined_reads_checks_and_combines_the_echo_files(tmp_path):
    echoes, _ = _simulate(seed=3)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    paths = []
    for i, echo in enumerate(echoes, start=1):
        path = tmp_path / f"sub-01_task-rest_echo-{i}_bold.nii.gz"
        nib.save(nib.Nifti1Image(echo, affine), path)
        paths.append(path)
    img, data, info = load_combined(paths=list(reversed(paths)), echo_times=list(reversed(TE)))
    np.testing.assert_allclose(data, combine_echoes(echoes=echoes, echo_times=TE)[0], rtol=1e-6)
    assert info["Files"] == [p.name for p in paths] and img.shape == echoes[0].shape
    with pytest.raises(BHInputError, match="without an EchoTime"):
        load_combined(paths=paths, echo_times=[TE[0], None, TE[2]])
    nib.save(nib.Nifti1Image(echoes[0][:, :, :2], affine), paths[1])
    with pytest.raises(BHInputError, match="unlike the first echo"):
        load_combined(paths=paths, echo_times=TE)
