"""QC-FC: how much functional connectivity still follows head motion after denoising.

Benchmarks of denoising strategies (Ciric et al. 2017; Parkes et al. 2018):

* per subject, functional connectivity (FC) of every pair of the 400 parcels:
  Pearson r of the cleaned series, Fisher z (``atanh``);
* per edge, QC-FC: the partial correlation across subjects between FC and the
  subject's mean framewise displacement, controlling for covariates (age, sex,
  site); its p-value from the t distribution with ``n - 2 - k`` degrees of
  freedom;
* summaries: the percentage of edges with p < 0.05 (uncorrected, and after
  Benjamini-Hochberg FDR at q = 0.05), the median absolute QC-FC, and QC-FC
  distance dependence: Spearman's rho between each edge's QC-FC and the
  Euclidean distance between its parcels' centroids (negative when motion
  inflates short-range connectivity more than long-range, the classic artefact).

Edges are not independent, so the p-values of rho and the FDR percentages are
descriptive, as in the papers.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

def fc_edges(series: np.ndarray) -> np.ndarray:
    """(E,) Fisher-z connectivity of the upper triangle of (T, P) series; NaN for edges of flat series."""
    series = np.asarray(series, dtype=np.float64)
    centred = series - series.mean(axis=0)
    norm = np.sqrt((centred**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = centred / norm
        r = unit.T @ unit
    upper = np.triu_indices(series.shape[1], 1)
    return np.arctanh(np.clip(r[upper], -0.999999, 0.999999))


def _residualise(values: np.ndarray, design: np.ndarray) -> np.ndarray:
    beta, *_ = np.linalg.lstsq(design, values, rcond=None)
    return values - design @ beta


def qc_fc(*, fc: np.ndarray, motion: np.ndarray, covariates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Edge-wise partial correlation of FC with motion across subjects.

    Parameters
    ----------
    fc : np.ndarray
        (n subjects, E) connectivity; an edge with a NaN in any subject gets NaN.
    motion : np.ndarray
        (n,) mean framewise displacement per subject.
    covariates : np.ndarray or None
        (n, k) nuisance covariates (an intercept is always added).

    Returns
    -------
    r, p : np.ndarray
        (E,) partial correlations and their two-sided p-values (df = n - 2 - k).
    """
    fc = np.asarray(fc, dtype=np.float64)
    n = fc.shape[0]
    extra = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=np.float64).reshape(n, -1)
    design = np.column_stack([np.ones(n), extra])
    df = n - 2 - extra.shape[1]
    if df < 1:
        raise ValueError(f"{n} subjects are too few for {extra.shape[1]} covariates")
    valid = np.isfinite(fc).all(axis=0)
    r = np.full(fc.shape[1], np.nan)
    rm = _residualise(np.asarray(motion, dtype=np.float64), design)
    rf = _residualise(fc[:, valid], design)
    rm_c, rf_c = rm - rm.mean(), rf - rf.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r[valid] = (rm_c @ rf_c) / np.sqrt((rm_c**2).sum() * (rf_c**2).sum(axis=0))
        t = r * np.sqrt(df / np.clip(1 - r**2, 1e-12, None))
    p = 2 * stats.t.sf(np.abs(t), df)
    return r, p


def fdr_significant(p: np.ndarray, q: float = 0.05) -> np.ndarray:
    """Benjamini-Hochberg: (E,) bool, True for p-values significant at false discovery rate ``q`` (NaN: False)."""
    p = np.asarray(p, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    out = np.zeros(p.shape, dtype=bool)
    if finite.size == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    ranked = p[order] * finite.size / np.arange(1, finite.size + 1)
    passed = np.flatnonzero(ranked <= q)
    if passed.size:
        out[order[: passed[-1] + 1]] = True
    return out


def parcel_centroids(*, networks: int = 7, resolution: float = 2.0) -> np.ndarray:
    """(400, 3) centre of mass (MNI mm) of every Schaefer-400 parcel on the template grid."""
    import nibabel as nib
    from scipy import ndimage

    from bh_models.core.templates import atlas_in_template_space

    atlas = atlas_in_template_space(networks, resolution)
    labels = np.asarray(atlas.dataobj).astype(np.int64)
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, np.arange(1, 401)))  # (400, 3) voxels
    return nib.affines.apply_affine(atlas.affine, centres)


def edge_distances(centroids: np.ndarray) -> np.ndarray:
    """(E,) Euclidean distance between the parcels of each upper-triangle edge."""
    diff = centroids[:, None, :] - centroids[None, :, :]
    return np.sqrt((diff**2).sum(axis=-1))[np.triu_indices(len(centroids), 1)]


def summarise(*, r: np.ndarray, p: np.ndarray, distances: np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """``pct_sig``, ``pct_sig_fdr``, ``median_abs_qcfc``, ``distance_rho``, ``distance_p`` over finite edges."""
    finite = np.isfinite(r)
    rho, rho_p = stats.spearmanr(r[finite], distances[finite])
    return {
        "pct_sig": float(100 * np.mean(p[finite] < alpha)),
        "pct_sig_fdr": float(100 * fdr_significant(p[finite], alpha).mean()),
        "median_abs_qcfc": float(np.median(np.abs(r[finite]))),
        "distance_rho": float(rho),
        "distance_p": float(rho_p),
    }
