"""Multi-echo BOLD: the T2*-weighted optimal combination of the echoes (Posse et al. 1999).

A multi-echo run is acquired at several echo times TE_1 < ... < TE_E; the signal of a
voxel decays as S(TE) = S0 exp(-TE / T2*). Posse et al. (1999) weight each echo by
its BOLD contrast-to-noise, which is proportional to TE exp(-TE / T2*):

    w_i = TE_i exp(-TE_i / T2*) / sum_j TE_j exp(-TE_j / T2*),   combined(t) = sum_i w_i S_i(t).

T2* is estimated per voxel from the time-averaged signal of each echo by the
log-linear least-squares fit log S(TE) = log S0 - TE / T2* (as tedana's ``t2smap``
does). Where the fit is not usable (a non-positive mean in some echo, or no decay:
the fitted T2* is not positive and finite), the T2* -> infinity limit is used,
w_i = TE_i / sum_j TE_j; outside the head every echo is ~0 and the weights do not
matter. The combined series then goes through the single-echo chain unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from bh_models.core.errors import BHInputError
from bh_models.core.imagecheck import load_image, read_data

__desc__ = (
    "Multi-echo runs, if any, were combined into one series by the T2*-weighted optimal combination "
    "(Posse et al. 1999): T2* was estimated per voxel by a log-linear least-squares fit of the "
    "time-averaged signal across echoes, and the echoes were averaged with weights proportional "
    "to TE exp(-TE / T2*) (proportional to TE where the fit failed)."
)

#: Longest T2* kept from the fit (s); beyond it (or at no decay) the TE-proportional limit is used.
MAX_T2STAR_S = 1.0


def fit_t2star(*, means: np.ndarray, echo_times: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel T2* (s) from time-averaged echo signals, and where the fit is usable.

    Parameters
    ----------
    means : numpy.ndarray, shape (n_echoes, n_voxels)
        Mean signal of each echo over time.
    echo_times : sequence of float
        Echo times (s), one per row of ``means``.

    Returns
    -------
    t2star : numpy.ndarray, shape (n_voxels,)
        ``inf`` where the fit is not usable.
    valid : numpy.ndarray of bool, shape (n_voxels,)
    """
    te = np.asarray(echo_times, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    positive = np.all(means > 0, axis=0)
    logs = np.log(np.where(means > 0, means, 1.0))  # (E, V)
    te_centred = te - te.mean()
    # Least-squares slope of log S against TE, per voxel: -1 / T2*.
    slope = (te_centred[:, None] * (logs - logs.mean(axis=0))).sum(axis=0) / (te_centred**2).sum()
    with np.errstate(divide="ignore"):
        t2star = np.where(slope < 0, -1.0 / slope, np.inf)
    valid = positive & np.isfinite(t2star) & (t2star > 0) & (t2star <= MAX_T2STAR_S)
    return np.where(valid, t2star, np.inf), valid


def optimal_weights(*, t2star: np.ndarray, echo_times: Sequence[float]) -> np.ndarray:
    """Posse weights ``TE exp(-TE / T2*)``, normalised per voxel; shape (n_echoes, n_voxels).

    ``t2star`` = inf gives the limit ``TE / sum(TE)``.
    """
    te = np.asarray(echo_times, dtype=np.float64)[:, None]  # (E, 1)
    t2star = np.asarray(t2star, dtype=np.float64)[None, :]  # (1, V)
    with np.errstate(divide="ignore", invalid="ignore"):
        decay = np.where(np.isfinite(t2star), np.exp(-te / t2star), 1.0)
    raw = te * decay  # (E, V)
    return raw / raw.sum(axis=0, keepdims=True)


def combine_echoes(*, echoes: Sequence[np.ndarray], echo_times: Sequence[float]) -> tuple[np.ndarray, dict]:
    """The optimally combined series of a multi-echo run.

    Parameters
    ----------
    echoes : sequence of numpy.ndarray, each shape (X, Y, Z, T)
        The echoes' data, in the order of ``echo_times``.
    echo_times : sequence of float
        Echo times (s), increasing.

    Returns
    -------
    combined : numpy.ndarray, shape (X, Y, Z, T), float32
    info : dict
        What the sidecar records: method, echo times, the share of voxels whose T2*
        fit was usable, the median T2* (s) of those voxels.
    """
    te = np.asarray(echo_times, dtype=np.float64)
    if len(echoes) != len(te) or len(te) < 2:
        raise ValueError("one echo time per echo, and at least two echoes")
    if np.any(np.diff(te) <= 0):
        raise ValueError(f"echo times must increase, got {list(te)}")
    shape = echoes[0].shape
    means = np.stack([np.asarray(e, dtype=np.float64).mean(axis=3).reshape(-1) for e in echoes])  # (E, V)
    t2star, valid = fit_t2star(means=means, echo_times=te)
    weights = optimal_weights(t2star=t2star, echo_times=te).reshape(len(te), *shape[:3], 1)  # (E, X, Y, Z, 1)
    combined = np.zeros(shape, dtype=np.float64)
    for weight, echo in zip(weights, echoes):
        combined += weight * echo
    inside = np.any(means > 0, axis=0)
    info = {
        "Method": "T2*-weighted optimal combination (Posse et al. 1999)",
        "EchoTimes": [float(t) for t in te],
        "FractionOfVoxelsWithT2starFit": float(valid[inside].mean()) if inside.any() else 0.0,
        "MedianT2star": float(np.median(t2star[valid])) if valid.any() else None,
    }
    return combined.astype(np.float32), info


def load_combined(*, paths: Sequence[Path], echo_times: Sequence[float] | None,
                  what: str = "BOLD run") -> tuple[nib.Nifti1Image, np.ndarray, dict]:
    """Load a multi-echo run's echoes (checked like any BOLD image) and combine them.

    Returns the first echo's image (header, affine), the combined data and the info
    of :func:`combine_echoes` with the echo files' names.

    Raises
    ------
    BHInputError
        When an echo is unreadable or 3D, the echoes differ in shape or affine, or
        an echo time is missing.
    """
    paths = [Path(p) for p in paths]
    if echo_times is None or len(echo_times) != len(paths) or any(t is None or not t > 0 for t in echo_times):
        raise BHInputError(paths[0], f"multi-echo run of {len(paths)} echoes without an EchoTime for each",
                           "add EchoTime (s) to every echo's sidecar, or set datasets.<name>.filters.echo")
    images = [load_image(p, ndim=4, what=f"{what} echo") for p in paths]
    for path, img in zip(paths[1:], images[1:]):
        if img.shape != images[0].shape or not np.allclose(img.affine, images[0].affine, atol=1e-4):
            raise BHInputError(path, f"echo has shape {img.shape} and affine unlike the first echo's "
                               f"{images[0].shape}", "check that the files are echoes of one acquisition")
    data = [read_data(img, path, what=f"{what} echo") for path, img in zip(paths, images)]
    order = np.argsort(np.asarray(echo_times, dtype=float), kind="stable")
    combined, info = combine_echoes(echoes=[data[i] for i in order], echo_times=[echo_times[i] for i in order])
    info["Files"] = [paths[i].name for i in order]
    return images[0], combined, info
