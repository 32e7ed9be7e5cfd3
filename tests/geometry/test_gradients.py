"""Functional gradients: training split only, Fisher-z mean connectivity, BrainSpace embedding aligned to the
shipped HCP reference (stable signs and order), written in the configured network order."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bh_models.core.templates import atlas_labels, data_dir, parcel_order
from bh_models.geometry import gradients as G

N_COMPONENTS = 30


def hcp_connectivity() -> np.ndarray:
    return pd.read_csv(data_dir() / "fslr32k" / G.HCP_CONNECTIVITY_FILE, header=None).to_numpy(np.float64)


def test_shipped_reference_is_the_hcp_embedding_with_fixed_signs():
    shipped = pd.read_csv(data_dir() / "fslr32k" / G.REFERENCE_FILE, sep="\t")
    assert shipped["name"].tolist() == atlas_labels(7)["name"].tolist()
    assert list(shipped.columns[1:]) == G.gradient_columns(N_COMPONENTS)
    values = shipped.iloc[:, 1:].to_numpy()
    assert np.abs(values - G.hcp_reference_gradients(n_components=N_COMPONENTS)).max() < 1e-8
    peaks = values[np.abs(values).argmax(axis=0), np.arange(N_COMPONENTS)]
    assert (peaks > 0).all()


def test_fix_signs_makes_the_largest_entry_positive():
    values = np.array([[1.0, -3.0], [-2.0, 1.0]])
    np.testing.assert_array_equal(G.fix_signs(values), [[-1.0, 3.0], [2.0, -1.0]])


def test_reference_follows_the_network_order():
    seven = G.reference_gradients(networks=7, n_components=5)
    seventeen = G.reference_gradients(networks=17, n_components=5)
    np.testing.assert_array_equal(seventeen, seven[parcel_order(source=7, target=17)])


def test_alignment_fixes_sign_and_order_of_the_reference_itself():
    """The reference connectivity, embedded again and aligned, returns the reference: a sign flip or a
    rotation of the solver's output is undone."""
    reference = G.reference_gradients(networks=7, n_components=10)
    aligned, _ = G.diffusion_gradients(connectivity=hcp_connectivity(), n_components=10, reference=reference)
    for i in range(10):
        assert np.corrcoef(aligned[:, i], reference[:, i])[0, 1] > 0.99


def write_runs(root, *, networks: int, subjects: dict, seed: int = 0) -> list:
    """Synthetic cleaned series with the HCP connectivity as covariance: <dataset>/sub-<s>/func/ layout."""
    names = atlas_labels(networks)["name"].tolist()
    covariance = hcp_connectivity()[np.ix_(parcel_order(source=7, target=networks),
                                           parcel_order(source=7, target=networks))]
    factor = np.linalg.cholesky(covariance + 1e-3 * np.eye(400))
    rng = np.random.default_rng(seed)
    paths = []
    for (dataset, subject), runs in subjects.items():
        for run in range(runs):
            values = rng.standard_normal((150, 400)) @ factor.T
            path = root / dataset / f"sub-{subject}" / "func" / (
                f"sub-{subject}_task-rest_run-{run + 1}_atlas-Schaefer2018_seg-{networks}n_scale-400_timeseries.tsv")
            path.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(values, columns=names).to_csv(path, sep="\t", index=False, float_format="%.5g")
            paths.append(path)
    return paths


def write_splits(root, table: dict) -> list:
    paths = []
    for dataset, rows in table.items():
        path = root / f"{dataset}_splits.tsv"
        pd.DataFrame([(dataset, s, split) for s, split in rows.items()],
                     columns=["dataset", "subject", "split"]).to_csv(path, sep="\t", index=False)
        paths.append(path)
    return paths


def test_mean_connectivity_averages_fisher_z_per_subject_then_over_subjects(tmp_path):
    subjects = {("a", "01"): 2, ("a", "02"): 1, ("b", "01"): 1}
    paths = write_runs(tmp_path, networks=7, subjects=subjects)
    names = atlas_labels(7)["name"].tolist()
    keep = {("a", "01"), ("b", "01")}  # ("a", "02") is not a training subject
    ours, summary = G.mean_connectivity(timeseries=paths, keep=keep, names=names)
    assert summary == {"subjects": 2, "runs": 3, "constant_parcel_runs": 0}

    def z(path):
        r = np.corrcoef(pd.read_csv(path, sep="\t").to_numpy(np.float64), rowvar=False)
        np.fill_diagonal(r, 0)
        return np.arctanh(r)

    a01_run1, a01_run2, _, b01 = paths  # written in this order
    subject_a = (z(a01_run1) + z(a01_run2)) / 2  # both runs of a/01
    expected = np.tanh((subject_a + z(b01)) / 2)
    np.fill_diagonal(expected, 1)
    assert np.abs(ours - expected).max() < 1e-6  # the series are read as float32


def test_compute_gradients_uses_the_training_split_and_aligns_to_the_reference(tmp_path):
    subjects = {("siteA", "01"): 1, ("siteA", "02"): 2, ("siteB", "01"): 1, ("siteB", "02"): 1}
    timeseries = write_runs(tmp_path / "derivatives", networks=17, subjects=subjects)
    splits = write_splits(tmp_path, {"siteA": {"01": "train", "02": "train"}, "siteB": {"01": "train", "02": "val"}})
    out = tmp_path / "gradients.tsv"
    summary = G.compute_gradients(splits=splits, timeseries=timeseries, out_gradients=out,
                                  out_figure=tmp_path / "gradients.png", networks=17)
    assert summary["subjects"] == 3 and summary["runs"] == 4  # siteB/02 (val) left out
    table = pd.read_csv(out, sep="\t")
    assert table["name"].tolist() == atlas_labels(17)["name"].tolist()
    assert list(table.columns[1:]) == G.gradient_columns(N_COMPONENTS)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["Networks"] == 17 and sidecar["Embedding"]["kernel"] == "normalized_angle"
    assert sidecar["Embedding"]["sparsity"] == 0.9
    # Signals drawn with the HCP connectivity: the leading gradients match the reference, same sign.
    assert min(summary["reference_correlation"]) > 0.9, summary
    assert (tmp_path / "gradients.png").stat().st_size > 10000

    # The validation subject's data do not matter; a rerun is byte-identical.
    val = [p for p in timeseries if "siteB/sub-02" in p.as_posix()][0]
    pd.read_csv(val, sep="\t").mul(-3.0).to_csv(val, sep="\t", index=False)
    again = tmp_path / "again.tsv"
    G.compute_gradients(splits=splits, timeseries=timeseries, out_gradients=again,
                        out_figure=tmp_path / "again.png", networks=17)
    assert again.read_bytes() == out.read_bytes()
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "gradients.png").read_bytes()


def test_series_in_another_network_order_are_refused(tmp_path):
    from bh_models.core.errors import BHInputError

    timeseries = write_runs(tmp_path, networks=7, subjects={("a", "01"): 1})
    splits = write_splits(tmp_path, {"a": {"01": "train"}})
    with pytest.raises(BHInputError, match="configured Schaefer-400 order"):
        G.compute_gradients(splits=splits, timeseries=timeseries, out_gradients=tmp_path / "g.tsv",
                            out_figure=tmp_path / "g.png", networks=17)
