"""Tests of bh_models.func.qcfc: QC-FC and its distance dependence on planted effects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bh_models.func import qcfc


def test_fc_edges_are_fisher_z_of_the_upper_triangle():
    rng = np.random.default_rng(0)
    series = rng.standard_normal((200, 5))
    series[:, 1] += series[:, 0]
    series[:, 4] = 3.0                                                          # a flat (empty) parcel
    edges = qcfc.fc_edges(series)
    assert edges.shape == (10,)
    r = np.corrcoef(series[:, :4].T)
    assert edges[0] == pytest.approx(np.arctanh(r[0, 1]))
    assert np.isnan(edges[3]) and np.isnan(edges[-1])                          # edges of parcel 4
    assert np.isfinite(edges[[0, 1, 2, 4, 5, 7]]).all()


def test_qc_fc_is_the_partial_correlation_with_its_t_test():
    rng = np.random.default_rng(1)
    n = 30
    age = rng.uniform(20, 70, n)
    motion = 0.1 + 0.002 * age + rng.exponential(0.05, n)
    fc = np.column_stack([0.5 * motion + 0.01 * age + rng.normal(0, 0.02, n),   # motion-driven edge
                          rng.normal(0, 0.1, n),                                 # independent edge
                          np.full(n, np.nan)])                                   # an edge missing somewhere
    r, p = qcfc.qc_fc(fc=fc, motion=motion, covariates=age[:, None])
    # Partial correlation = correlation of the residuals after regressing the covariate (and intercept).
    design = np.column_stack([np.ones(n), age])
    res = lambda y: y - design @ np.linalg.lstsq(design, y, rcond=None)[0]  # noqa: E731
    expected = stats.pearsonr(res(motion), res(fc[:, 0]))[0]
    assert r[0] == pytest.approx(expected) and r[0] > 0.5
    t = expected * np.sqrt((n - 3) / (1 - expected**2))
    assert p[0] == pytest.approx(2 * stats.t.sf(abs(t), n - 3))
    assert p[0] < 1e-3 and p[1] > 0.01 and np.isnan(r[2])
    with pytest.raises(ValueError, match="too few"):
        qcfc.qc_fc(fc=fc[:3], motion=motion[:3], covariates=np.ones((3, 2)))


def test_fdr_and_summaries():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, np.nan])
    assert qcfc.fdr_significant(p, 0.05).tolist() == [True, True, False, False, False, False, False, False, False]
    # Motion that inflates short-range connectivity: QC-FC falls with distance.
    rng = np.random.default_rng(2)
    centroids = rng.uniform(-60, 60, (40, 3))
    distances = qcfc.edge_distances(centroids)
    assert distances.shape == (40 * 39 // 2,)
    assert distances[0] == pytest.approx(np.linalg.norm(centroids[0] - centroids[1]))
    r = 0.6 * np.exp(-distances / 30) + rng.normal(0, 0.05, distances.size)
    p = np.where(np.abs(r) > 0.3, 0.001, 0.5)
    summary = qcfc.summarise(r=r, p=p, distances=distances)
    assert summary["distance_rho"] < -0.5
    assert summary["pct_sig"] == pytest.approx(100 * np.mean(np.abs(r) > 0.3))
    assert summary["median_abs_qcfc"] == pytest.approx(np.median(np.abs(r)))


def test_parcel_centroids_lie_in_the_brain():
    centroids = qcfc.parcel_centroids(networks=7, resolution=2.0)
    assert centroids.shape == (400, 3)
    # Schaefer's first 200 parcels are the left hemisphere.
    assert (centroids[:200, 0] < 0).mean() > 0.95 and (centroids[200:, 0] > 0).mean() > 0.95
    assert np.abs(centroids).max() < 110
