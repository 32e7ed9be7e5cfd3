"""Demo cohort: three small synthetic BIDS "sites" with known ground truth.

``write_demo_cohort(out_dir)`` (CLI: ``bh demo OUT_DIR``) writes, following the
paper's protocol (pretrain on some cohorts, evaluate on another)::

    out_dir/siteA/            pretraining site, 6 subjects, TR 0.735 s, 160 volumes per run
    out_dir/siteB/            pretraining site, 6 subjects, TR 2.0 s, 100 volumes per run
    out_dir/siteC/            downstream site, 16 subjects, TR 1.5 s, 100 volumes per run
    out_dir/ground_truth/<site>/subjects.tsv                       latents, affine, noise amplitudes, tissue volumes
    out_dir/ground_truth/<site>/<bold stem>_timeseries.tsv        true (clean, neural) parcel series
    out_dir/ground_truth/<site>/<bold stem>_motion.tsv            true head motion
    out_dir/ground_truth/<site>/<bold stem>_noise.tsv             true physiological sources and scanner drift

where ``<bold stem>`` is the BOLD file name without ``_bold.nii.gz`` (e.g.
``sub-01_task-rest_run-1``), so a run's truth is found from its path.

Generative model
----------------
Subject latents (``ground_truth/<site>/subjects.tsv``)
    * ``diagnosis``: exactly ``n // 2`` patients per site, in random order.
    * ``score_latent`` z ~ N(0, 1) clipped to +-2.5; ``score = 50 + 10 z + e``,
      e ~ N(0, 1.5). ``age`` ~ U(20, 70) and ``sex`` are nuisance columns that
      drive nothing.
    * Default-network coupling gain ``default_gain``: U(0.3, 0.6) for controls,
      U(1.2, 1.6) for patients; Default amplitude ``default_amplitude``:
      U(0.9, 1.1) vs U(2.2, 2.6) (strong enough that the pooled 16-subject demo
      can show it through tiny CPU-trained models).
    * Somatomotor coupling ``sommot_gain = max(0, 0.8 + 0.3 z)`` and amplitude
      ``sommot_amplitude = 1 + 0.25 z``.
    * Structure: ventricle dilation radius U(0, 1) mm (controls) vs U(2.5, 3.5) mm
      (patients); periventricular white-matter T1 hypointensity 0-5 % vs 25-35 %;
      cortical grey-matter T1 darkening ``gm_contrast = 0.06 z``.
    * Head pose: MNI -> scanner affine ``A = [R(rx, ry, rz) diag(s) | t]`` with
      rotations U(-10, 10) degrees, scalings U(0.95, 1.05), translations
      U(-10, 10) mm, written as ``affine_<row><col>`` (rows 0-2, row-major).
    * Noise (drawn after everything above, so the latents above keep their
      earlier values): ``motion_level`` ~ exp(0.7 N(0, 1)) clipped to
      [0.25, 4] (how much the subject moves), ``physio_pct`` ~ U(1, 2),
      ``drift_pct`` ~ U(1, 3); ``spin_history_pct_per_mm`` is the population
      constant. ``gm_ml``, ``wm_ml``, ``csf_ml``: true tissue volumes in MNI
      space inside the template brain mask (:func:`tissue_truth`).

True parcel series (Schaefer-400, 7 networks; ``<stem>_timeseries.tsv``)
    White noise at the site TR, band-passed to 0.01-0.1 Hz in the Fourier
    domain (2nd-order Butterworth magnitude, on a 4x longer periodic
    realisation so the cropped run has no edge effects), z-scored, then mixed
    with a square root of the HCP group connectivity matrix (eigenvalues
    clipped, so it is a valid correlation matrix). Default (``_Default_``) and
    Somatomotor (``_SomMot_``) parcels get one shared band-passed factor each,
    ``x_p <- (x_p + g f) / sqrt(1 + g^2)``, then per-network amplitudes. Values
    are percent signal change: ``2 % x amplitude x global amplitude`` (global
    amplitude U(0.9, 1.1)). Row t is BOLD volume t (no slice timing).

T1w
    The MNI152 2009c brain (1 mm) with the subject's ventricle dilation, white
    matter hypointensity and grey-matter contrast, inside a synthetic head made
    of shells at a distance from the brain mask (CSF, bone, diploe, bone,
    muscle, bright fat, skin; thickness scaled per subject and jittered by a
    fixed smooth field). It is resampled (trilinear) onto a 1 mm grid axis-aligned
    with the scanner frame and cropped to the head, multiplied by a smooth
    bias field ``exp(q_x(x) + q_y(y) + q_z(z))`` with random quadratics (about +-20 %), given Rician noise
    (2 % of white matter) and stored as int16 with that scanner affine.

BOLD
    An EPI-like baseline in MNI space (``0.75 WM + 1.0 GM + 1.6 CSF``, bright
    CSF shell, dark bone and scalp, Gaussian blur 1.2 mm; dilated ventricles as
    in the T1w) carries each parcel's series in its atlas voxels:
    ``I(x, t) = E(x) (1 + pct_label(x)(t) / 100)``. Each 4 mm voxel of the
    scanner-aligned BOLD grid averages 64 sub-samples (4 x 4 x 4, 1 mm apart) of this image taken
    through the same MNI -> scanner affine as the T1w (a box point-spread
    function), so BOLD and T1w share one subject space. Head motion is a smooth
    rigid displacement ``u(x, t) = tau(t) + omega(t) x (x - 0)`` about the
    scanner origin, at most 0.3 mm anywhere in the field of view, applied to
    first order, ``I(x - u) = I(x) - grad I . u`` (exact to well below the noise
    at these amplitudes). Gaussian noise of 1.5 % of the mean brain baseline is
    added inside the head; the background stays zero to keep the files small.

Noise worth removing (known amplitudes; the clean neural series stay outside the BIDS folders)
    * Jerky motion: besides the smooth drift (largest displacement
      U(0.1, 0.3) mm), brief head jerks of 1-3 frames that return, Poisson with
      rate ``JERK_RATE x motion_level`` per frame, each Exp(``JERK_MM x
      motion_level``) mm (at most 1.5 mm) in a random rigid direction; every
      voxel moves at most 2 mm. Mean FD ranges from ~0.03 to ~0.2 mm over the
      demo.
    * Spin-history artefact: each voxel loses ``spin_history_pct_per_mm`` % of
      its signal per mm of its own frame-to-frame displacement, weighted by
      ``exp(-depth / 10 mm)`` inside the brain (1 at and outside its edge), in
      that frame and half, then a quarter, of it in the next two: it scales with
      FD, is strongest at the brain's edge, and, through the rotations, varies
      smoothly in space (nearby parcels share it).
    * Physiology: three unit-variance sources band-limited to 0.01-0.2 Hz
      (capped below Nyquist), written to ``<stem>_noise.tsv``; each loads
      ``physio_pct`` % x (CSF, WM, GM) = (1.0, 0.3, 0.3), (0.4, 1.0, 0.3),
      (0.7, 0.6, 0.3) of the local tissue fractions, times a smooth spatial
      modulation ``1 + 0.5 cos`` along one MNI axis per source: shared by WM and
      CSF, leaking into GM; three sources, so the mean WM and CSF signals cannot
      span them all.
    * Scanner drift: a random linear + quadratic trend of ``drift_pct`` % at its
      largest, 50 % stronger 80 mm along a random direction.
    RepetitionTime is in the top-level ``task-rest_bold.json`` (BIDS
    inheritance; run sidecars do not repeat it) and in the NIfTI header
    (pixdim[4], units seconds).

Every random draw comes from ``numpy.random.SeedSequence([seed, site, subject,
stream])``, so a subject's data do not depend on how many subjects are written,
and files are written with fixed gzip headers: two runs with the same seed give
byte-identical files.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, sparse

from bh_models import __version__
from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import dumps, read_json
from bh_models.core.templates import (
    atlas_in_template_space,
    atlas_labels,
    data_dir,
    load_template,
)

__desc__ = (
    "The demo cohort was simulated with bh_models.demo: two pretraining sites (TR 0.735 s "
    "and 2.0 s) and a downstream site (TR 1.5 s) whose T1w images are the MNI152NLin2009cAsym brain inside a "
    "synthetic head under a random per-subject affine, bias field and Rician "
    "noise, and whose rest BOLD runs carry band-passed (0.01-0.1 Hz) "
    "Schaefer-400 parcel time series with HCP group connectivity, plus head jerks whose rate and size vary "
    "between subjects, spin-history signal loss scaling with each voxel's displacement and strongest at the "
    "brain's edge, three physiological sources shared by white matter and CSF and leaking into grey matter, "
    "and slow scanner drift; diagnosis "
    "changes Default-network coupling and amplitude and ventricle size, and a "
    "continuous score drives Somatomotor amplitude and grey-matter contrast."
)

GENERATOR_NAME = "bh_models.demo"  # recorded in every demo dataset's GeneratedBy
TASK = "rest"
NETWORKS = 7
PERCENT_PER_UNIT = 2.0        # BOLD percent signal change of a unit-variance parcel series
BAND_HZ = (0.01, 0.1)         # resting-state band of the true series
MOTION_MAX_MM = 0.3           # ceiling of the smooth (slow) head drift, any voxel, any volume
BOLD_NOISE = 0.015            # noise sd as a fraction of the mean brain baseline
T1_NOISE = 0.02               # Rician sigma as a fraction of white matter intensity
BOLD_VOXEL_MM = 4.0           # coarse on purpose: small files, fast downstream demo
T1_VOXEL_MM = 1.0
MAX_HEAD_SCALE = 1.2          # largest per-subject scaling of the head shells
MIN_HEAD_SCALE = 0.85
BOUND_STEP = 2                # lattice (voxels) of the points that bound a field of view
# Shells of the synthetic head, as (distance outside the brain mask in mm,
# T1 intensity on the template's 0-1 scale), interpolated linearly.
HEAD_PROFILE_T1 = (
    (0.0, 0.22), (0.8, 0.13), (2.2, 0.13),       # CSF
    (2.8, 0.05), (3.6, 0.05),                      # inner table (bone)
    (4.4, 0.50), (5.6, 0.50),                      # diploe (marrow)
    (6.4, 0.06), (7.2, 0.06),                      # outer table
    (8.0, 0.35), (9.6, 0.35),                      # galea / muscle
    (10.4, 0.95), (13.6, 0.95),                    # subcutaneous fat
    (14.4, 0.55), (15.4, 0.55),                    # skin
    (16.0, 0.0),
)
# EPI: bright CSF shell; bone and fat-suppressed scalp give no signal.
HEAD_PROFILE_EPI = ((0.0, 1.6), (2.2, 1.6), (2.8, 0.0))
EPI_TISSUE_WEIGHTS = {"wm": 0.75, "gm": 1.0, "csf": 1.6}

# Noise worth removing (issue 21). Per-subject amplitudes are drawn with the
# latents and written to ground_truth/<site>/subjects.tsv; these are the
# population constants.
JERK_RATE = 0.05              # abrupt head movements per frame at motion_level 1 (Poisson)
JERK_MM = 0.5                 # mean size (mm, largest voxel displacement) of a jerk at motion_level 1
JERK_MAX_MM = 1.5             # no single jerk is larger
DISPLACEMENT_MAX_MM = 2.0     # ceiling of any voxel's displacement, drift and jerks together
SPIN_HISTORY_PCT_PER_MM = 10.0    # signal loss (% of baseline) per mm of a voxel's own frame-to-frame move, at the edge
SPIN_HISTORY_KERNEL = (1.0, 0.5, 0.25)   # the loss in that frame and its recovery over the next two
EDGE_DEPTH_MM = 10.0          # spin-history gain exp(-depth / EDGE_DEPTH_MM) inside the brain, 1 outside it
CSF_SHELL_MM = 2.5            # CSF between brain and skull: the first 2.5 mm outside the brain (T1 and EPI shells)
PHYSIO_BAND_HZ = (0.01, 0.2)  # band of the physiological sources (capped at 0.9 x Nyquist)
#: (CSF, WM, GM) loading of each physiological source: shared by WM and CSF, leaking into GM.
PHYSIO_LOADINGS = ((1.0, 0.3, 0.3), (0.4, 1.0, 0.3), (0.7, 0.6, 0.3))
PHYSIO_WAVELENGTH_MM = 150.0  # smooth spatial modulation 1 + 0.5 cos(2 pi x.d_k / wavelength + phase_k) per source
DRIFT_GRADIENT = 0.5          # scanner drift varies by +-50 % across 80 mm along a random direction


@dataclass(frozen=True)
class SiteSpec:
    """Acquisition of one demo site, and what the demo config uses it for."""

    name: str
    role: str                   # config role: pretraining sites carry no targets
    n_subjects: int             # default size
    repetition_time: float      # seconds
    n_volumes: int
    t1_gain: float              # int16 units per template intensity unit
    bold_gain: float            # int16 units per EPI baseline unit
    bias_strength: float        # sd of the log bias-field polynomial coefficients
    echo_time: float            # seconds, sidecar only
    flip_angle: float           # degrees, sidecar only
    field_strength: float       # tesla, sidecar only


# Two pretraining sites and a labelled downstream site with a TR of its own, as in the
# paper's protocol (pretrain on large cohorts, evaluate on others never trained on).
SITES = (
    SiteSpec("siteA", "pretrain", 6, 0.735, 160, 1150.0, 600.0, 0.06, 0.030, 52.0, 3.0),
    SiteSpec("siteB", "pretrain", 6, 2.0, 100, 800.0, 900.0, 0.09, 0.030, 90.0, 1.5),
    SiteSpec("siteC", "downstream", 16, 1.5, 100, 1000.0, 750.0, 0.07, 0.035, 75.0, 3.0),
)


@dataclass(frozen=True)
class SubjectLatents:
    """Everything that makes one demo subject, as written to ``subjects.tsv``."""

    participant_id: str
    diagnosis: str
    score: float
    age: float
    sex: str
    score_latent: float
    default_gain: float
    default_amplitude: float
    sommot_gain: float
    sommot_amplitude: float
    global_amplitude: float
    ventricle_dilation_mm: float
    wm_hypointensity: float
    gm_contrast: float
    head_thickness_scale: float
    rotation_deg: tuple[float, float, float]
    scaling: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    n_runs: int
    motion_level: float = 1.0       # scales the rate and size of head jerks (lognormal across subjects)
    physio_pct: float = 0.0         # % of baseline of each physiological source in CSF (loading 1)
    drift_pct: float = 0.0          # % of baseline of the slow scanner drift at its largest

    def mni_to_scanner(self) -> np.ndarray:
        """4x4 affine from MNI world (mm) to this subject's scanner world (mm)."""
        rx, ry, rz = np.deg2rad(self.rotation_deg)
        rot_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
        rot_y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
        rot_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
        out = np.eye(4)
        out[:3, :3] = rot_z @ rot_y @ rot_x @ np.diag(self.scaling)
        out[:3, 3] = self.translation_mm
        return out

    def as_row(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if not isinstance(v, tuple)}
        for axis, rot, scale, shift in zip("xyz", self.rotation_deg, self.scaling, self.translation_mm):
            row[f"rotation_{axis}_deg"] = rot
            row[f"scaling_{axis}"] = scale
            row[f"translation_{axis}_mm"] = shift
        row["has_bold"] = self.n_runs > 0
        row["spin_history_pct_per_mm"] = SPIN_HISTORY_PCT_PER_MM
        affine = self.mni_to_scanner()
        for r in range(3):
            for c in range(4):
                row[f"affine_{r}{c}"] = affine[r, c]
        return row


# --------------------------------------------------------------------------- reference anatomy


@dataclass(frozen=True)
class _Reference:
    """MNI-space ingredients shared by every subject (built once per process)."""

    affine: np.ndarray          # template voxel -> MNI mm
    t1: np.ndarray              # brain-only template (0 outside the mask), 0-1, float32
    gm: np.ndarray              # GM probability, float32
    wm: np.ndarray              # WM probability, float32
    brain: np.ndarray           # bool brain mask
    head_distance: np.ndarray   # mm outside the brain (0 inside) + fixed jitter, float32
    shell_index: np.ndarray     # flat indices of non-brain voxels close enough to be head
    shell_distance: np.ndarray  # their head_distance (mm)
    head_surface_points: np.ndarray   # (P, 4) i, j, k, head_distance where any head's surface can lie
    epi_surface_points: np.ndarray    # (Q, 3) i, j, k around the surface of the EPI signal
    epi: np.ndarray             # EPI-like baseline, float32
    csf: np.ndarray             # CSF fraction: 1 - GM - WM in the brain, the CSF shell outside, float32
    edge_gain: np.ndarray       # spin-history gain exp(-depth / EDGE_DEPTH_MM) in the brain, 1 outside, float32
    labels: np.ndarray          # Schaefer-400 labels on the template grid, int16
    ventricle_box: tuple[slice, slice, slice]
    ventricle_distance: np.ndarray  # mm to the template ventricles, inside the box
    csf_t1: float               # T1 intensity of template ventricles
    wm_t1: float                # T1 intensity of template white matter
    network_default: np.ndarray     # bool (400,)
    network_sommot: np.ndarray      # bool (400,)
    roi_names: tuple[str, ...]
    connectivity_root: np.ndarray   # (400, 400) L with L L^T = group correlation


def _interp_profile(distance: np.ndarray, profile: tuple[tuple[float, float], ...]) -> np.ndarray:
    xp, fp = zip(*profile)
    return np.interp(distance, xp, fp).astype(np.float32)


def _smooth_jitter(shape: tuple[int, ...], amplitude_mm: float) -> np.ndarray:
    """Fixed smooth field (a few low-frequency cosines) that roughens the head shells.

    It is part of the population head, the same for every seed, so it needs no
    random state.
    """
    grids = np.meshgrid(*[np.linspace(0, 2 * np.pi, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    field = (
        np.cos(2 * grids[0] + 0.7) * np.cos(grids[1] + 1.3)
        + np.cos(3 * grids[1] + 2.1) * np.cos(2 * grids[2] + 0.4)
        + np.cos(grids[0] + 3 * grids[2] + 1.9)
    )
    return (amplitude_mm / 3.0 * field).astype(np.float32)


def _connectivity_root() -> np.ndarray:
    """Square root L (L L^T = C) of the group connectivity C after eigenvalue clipping."""
    path = data_dir() / "fslr32k" / "schaefer_400_mean_connectivity_matrix.csv"
    corr = pd.read_csv(path, header=None).to_numpy(dtype=np.float64)
    values, vectors = np.linalg.eigh((corr + corr.T) / 2)
    # Positive definite; the shipped matrix already is, and passes unchanged.
    values = np.clip(values, 1e-4 * values.max(), None)
    root = vectors * np.sqrt(values)                          # (400, 400)
    return root / np.linalg.norm(root, axis=1, keepdims=True)   # unit diagonal: a correlation


def _distance_outside(mask: np.ndarray, *, inside: bool = False) -> np.ndarray:
    """Euclidean distance (mm) to ``mask`` (or, with ``inside``, to its complement).

    Computed on a 2 mm grid and interpolated back: ten times cheaper than at
    1 mm, and a millimetre of error only moves shell boundaries that are drawn
    by hand anyway.
    """
    coarse = mask[::2, ::2, ::2]      # coarse voxel k sits on fine voxel 2k
    distance = ndimage.distance_transform_edt(coarse if inside else ~coarse, sampling=2.0)
    # Output shape 2c - 1 makes zoom map fine index i to coarse index i / 2 exactly.
    fine = ndimage.zoom(distance.astype(np.float32), [(2 * c - 1) / c for c in coarse.shape], order=1)
    return np.pad(fine, [(0, n - f) for n, f in zip(mask.shape, fine.shape)], mode="edge")


def _lateral_ventricles(
    *, t1: np.ndarray, brain: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray, depth: np.ndarray
) -> np.ndarray:
    """The template's two lateral ventricles: the largest deep CSF components off the midline.

    ``depth`` is the distance (mm) of each brain voxel to the outside of the brain.
    """
    dark = brain & (t1 < 0.4) & (depth > 12) & (gm < 0.3) & (wm < 0.3)
    components, n_components = ndimage.label(dark)
    x_world = affine[0, 0] * np.arange(brain.shape[0]) + affine[0, 3]
    lateral = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        x = x_world[box[0]]
        if x.max() < 0 or x.min() > 0:      # midline CSF (cisterns, fissure) crosses x = 0
            lateral.append((int((components[box] == index).sum()), index))
    keep = [index for _, index in sorted(lateral, reverse=True)[:2]]
    return np.isin(components, keep)


@functools.lru_cache(maxsize=1)
def _reference() -> _Reference:
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    def load(img: nib.Nifti1Image, dtype: type) -> np.ndarray:
        # C order: nibabel hands out Fortran-ordered arrays, and the flat indexing
        # and resampling below are several times faster on C-ordered ones.
        return np.ascontiguousarray(np.asarray(img.dataobj), dtype=dtype)

    template, mask, _ = load_template(1.0)
    affine = template.affine
    t1 = load(template, np.float32)
    brain = load(mask, np.uint8) > 0
    gm = load(load_mni152_gm_template(resolution=1), np.float32)
    wm = load(load_mni152_wm_template(resolution=1), np.float32)
    labels = load(atlas_in_template_space(NETWORKS, 1.0), np.int16)

    # The template stops at the brainstem (bottom slice): extend the mask below
    # it so the head shells stay open there, like a field of view cut at the neck.
    pad = 24
    padded = np.concatenate([np.repeat(brain[:, :, :1], pad, axis=2), brain], axis=2)
    outside = _distance_outside(padded)[:, :, pad:]
    head_distance = np.where(brain, 0.0, np.maximum(outside + _smooth_jitter(brain.shape, 1.5), 0.0))
    head_distance = head_distance.astype(np.float32)
    shell_index = np.flatnonzero(~brain & (head_distance < HEAD_PROFILE_T1[-1][0] * MAX_HEAD_SCALE))

    depth = _distance_outside(brain, inside=True)     # mm to the outside of the brain
    ventricles = _lateral_ventricles(t1=t1, brain=brain, gm=gm, wm=wm, affine=affine, depth=depth)
    where = np.argwhere(ventricles)
    lo = np.maximum(where.min(0) - 12, 0)
    hi = np.minimum(where.max(0) + 13, brain.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    ventricle_distance = ndimage.distance_transform_edt(~ventricles[box]).astype(np.float32)
    csf_t1 = float(np.median(t1[ventricles]))

    # A field of view is bounded by the extreme points of the head, which lie on
    # its surface: keep only surface bands, so bounding a subject costs little.
    outer = HEAD_PROFILE_T1[-1][0]
    band = (head_distance > outer * MIN_HEAD_SCALE - BOUND_STEP) & (head_distance <= outer * MAX_HEAD_SCALE)
    band_ijk = _lattice_points(band)
    band_distance = head_distance[tuple(band_ijk.astype(np.int64).T)]
    csf = np.clip(1 - gm - wm, 0, 1) * brain
    epi_inside = (
        EPI_TISSUE_WEIGHTS["wm"] * wm + EPI_TISSUE_WEIGHTS["gm"] * gm + EPI_TISSUE_WEIGHTS["csf"] * csf
    )
    epi = np.where(brain, epi_inside, _interp_profile(head_distance, HEAD_PROFILE_EPI))
    epi = ndimage.gaussian_filter(epi.astype(np.float32), sigma=1.2)  # EPI point-spread: blurred contrast

    csf_all = np.where(brain, csf, head_distance < CSF_SHELL_MM).astype(np.float32)
    edge_gain = np.where(brain, np.exp(-depth / EDGE_DEPTH_MM), 1.0).astype(np.float32)

    epi_surface = (epi > 0.02) & ~brain
    names = tuple(atlas_labels(NETWORKS)["name"].astype(str))
    return _Reference(
        affine=affine,
        t1=np.where(brain, t1, 0).astype(np.float32),
        gm=gm,
        wm=wm,
        brain=brain,
        head_distance=head_distance,
        shell_index=shell_index,
        shell_distance=head_distance.ravel()[shell_index],
        head_surface_points=np.column_stack([band_ijk, band_distance]),
        epi_surface_points=_lattice_points(epi_surface),
        epi=epi,
        csf=csf_all,
        edge_gain=edge_gain,
        labels=labels,
        ventricle_box=box,
        ventricle_distance=ventricle_distance,
        csf_t1=csf_t1,
        wm_t1=float(np.median(t1[wm > 0.9])),
        network_default=np.array(["_Default_" in n for n in names]),
        network_sommot=np.array(["_SomMot_" in n for n in names]),
        roi_names=names,
        connectivity_root=_connectivity_root(),
    )


# --------------------------------------------------------------------------- latents


def _rng(seed: int, site_index: int, subject_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, site_index, subject_index, stream]))


def _draw_latents(
    *, rng: np.random.Generator, participant_id: str, patient: bool, n_runs: int
) -> SubjectLatents:
    z = float(np.clip(rng.standard_normal(), -2.5, 2.5))
    return SubjectLatents(
        participant_id=participant_id,
        diagnosis="patient" if patient else "control",
        score=round(50 + 10 * z + 1.5 * float(rng.standard_normal()), 3),
        age=round(float(rng.uniform(20, 70)), 1),
        sex=str(rng.choice(["F", "M"])),
        score_latent=z,
        default_gain=float(rng.uniform(1.2, 1.6) if patient else rng.uniform(0.3, 0.6)),
        default_amplitude=float(rng.uniform(2.2, 2.6) if patient else rng.uniform(0.9, 1.1)),
        sommot_gain=max(0.0, 0.8 + 0.3 * z),
        sommot_amplitude=1 + 0.25 * z,
        global_amplitude=float(rng.uniform(0.9, 1.1)),
        ventricle_dilation_mm=float(rng.uniform(2.5, 3.5) if patient else rng.uniform(0.0, 1.0)),
        wm_hypointensity=float(rng.uniform(0.25, 0.35) if patient else rng.uniform(0.0, 0.05)),
        gm_contrast=0.06 * z,
        head_thickness_scale=float(rng.uniform(MIN_HEAD_SCALE, MAX_HEAD_SCALE)),
        rotation_deg=tuple(float(v) for v in rng.uniform(-10, 10, 3)),
        scaling=tuple(float(v) for v in rng.uniform(0.95, 1.05, 3)),
        translation_mm=tuple(float(v) for v in rng.uniform(-10, 10, 3)),
        n_runs=n_runs,
        # Drawn last, so every latent above keeps the value earlier versions drew.
        motion_level=float(np.clip(np.exp(0.7 * rng.standard_normal()), 0.25, 4.0)),
        physio_pct=float(rng.uniform(1.0, 2.0)),
        drift_pct=float(rng.uniform(1.0, 3.0)),
    )


# --------------------------------------------------------------------------- time series


def _band_limited_noise(
    *, rng: np.random.Generator, n_volumes: int, repetition_time: float, n_series: int,
    band_hz: tuple[float, float] = BAND_HZ,
) -> np.ndarray:
    """(n_volumes, n_series) unit-variance noise with a band-limited spectrum (default: resting-state BOLD)."""
    n_fft = 1 << math.ceil(math.log2(4 * n_volumes))  # periodic realisation 4x longer, then crop
    white = rng.standard_normal((n_fft, n_series))
    freq = np.fft.rfftfreq(n_fft, d=repetition_time)
    low, high = band_hz
    with np.errstate(divide="ignore"):
        high_pass = 1 / np.sqrt(1 + (low / freq) ** 4)   # 2nd-order Butterworth magnitudes
    low_pass = 1 / np.sqrt(1 + (freq / high) ** 4)
    gain = np.nan_to_num(high_pass) * low_pass
    series = np.fft.irfft(np.fft.rfft(white, axis=0) * gain[:, None], n=n_fft, axis=0)[:n_volumes]
    series -= series.mean(axis=0)
    return series / series.std(axis=0)


def _parcel_series(
    *, ref: _Reference, latents: SubjectLatents, site: SiteSpec, rng: np.random.Generator
) -> np.ndarray:
    """True Schaefer-400 series of one run, percent signal change, (T, 400)."""
    n_rois = ref.connectivity_root.shape[0]
    innovations = _band_limited_noise(
        rng=rng, n_volumes=site.n_volumes, repetition_time=site.repetition_time, n_series=n_rois + 2
    )
    series = innovations[:, :n_rois] @ ref.connectivity_root.T    # (T, 400), covariance = group FC
    for network, factor, gain in (
        (ref.network_default, innovations[:, n_rois], latents.default_gain),
        (ref.network_sommot, innovations[:, n_rois + 1], latents.sommot_gain),
    ):
        # A shared factor raises within-network coupling without changing variance.
        series[:, network] = (series[:, network] + gain * factor[:, None]) / np.sqrt(1 + gain**2)
    amplitude = np.full(n_rois, PERCENT_PER_UNIT * latents.global_amplitude)
    amplitude[ref.network_default] *= latents.default_amplitude
    amplitude[ref.network_sommot] *= latents.sommot_amplitude
    return series * amplitude


# --------------------------------------------------------------------------- images


def _ventricle_weight(ref: _Reference, latents: SubjectLatents) -> np.ndarray:
    """Soft mask (inside ``ref.ventricle_box``) of the subject's dilated ventricles."""
    return np.clip(latents.ventricle_dilation_mm + 0.5 - ref.ventricle_distance, 0, 1)


def _subject_t1_in_mni(ref: _Reference, latents: SubjectLatents) -> np.ndarray:
    """The subject's head (brain + shells) on the template grid, template intensity units."""
    image = ref.t1 * (1 - np.float32(latents.gm_contrast) * ref.gm)
    box = ref.ventricle_box
    beyond = ref.ventricle_distance - latents.ventricle_dilation_mm
    # Periventricular white-matter hypointensity: a band 1-6 mm outside the ventricles.
    band = np.exp(-(((beyond - 3.0) / 2.5) ** 2)) * ref.wm[box]
    image[box] *= 1 - latents.wm_hypointensity * band
    weight = _ventricle_weight(ref, latents)
    image[box] = image[box] * (1 - weight) + ref.csf_t1 * weight
    image.ravel()[ref.shell_index] = _interp_profile(
        ref.shell_distance / np.float32(latents.head_thickness_scale), HEAD_PROFILE_T1
    )
    return image


def _subject_epi_in_mni(ref: _Reference, latents: SubjectLatents) -> np.ndarray:
    epi = ref.epi.copy()
    weight = _ventricle_weight(ref, latents)
    box = ref.ventricle_box
    epi[box] = epi[box] * (1 - weight) + EPI_TISSUE_WEIGHTS["csf"] * weight
    return epi


def _subject_tissues_in_mni(ref: _Reference, latents: SubjectLatents, *, csf_outside: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(GM, WM, CSF) fractions of the subject on the 1 mm template grid, float32.

    The template's GM and WM inside its brain mask, CSF the rest of the brain
    plus ``csf_outside`` (the CSF shell between brain and skull); the subject's
    dilated ventricles turn tissue into CSF as in its T1w and EPI.
    """
    gm = np.where(ref.brain, ref.gm, 0).astype(np.float32)
    wm = np.where(ref.brain, ref.wm, 0).astype(np.float32)
    csf = np.where(ref.brain, np.clip(1 - ref.gm - ref.wm, 0, 1), csf_outside).astype(np.float32)
    box = ref.ventricle_box
    weight = _ventricle_weight(ref, latents) * ref.brain[box]
    gm[box] *= 1 - weight
    wm[box] *= 1 - weight
    csf[box] = csf[box] * (1 - weight) + weight
    return gm, wm, csf


def tissue_truth(latents: SubjectLatents) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The subject's true tissue fractions in MNI space, as its T1w was drawn.

    Returns
    -------
    maps : dict
        ``"GM"``, ``"WM"``, ``"CSF"``: (X, Y, Z) float32 fractions on the 1 mm
        template grid (nilearn's MNI152 tissue maps inside the template brain,
        with this subject's ventricle dilation; CSF also fills the
        :data:`CSF_SHELL_MM` shell between brain and skull, scaled like the
        subject's head, which a brain mask may include).
    affine : np.ndarray
        (4, 4) template voxel -> MNI mm.
    """
    ref = _reference()
    shell = ~ref.brain & (ref.head_distance / np.float32(latents.head_thickness_scale) < CSF_SHELL_MM)
    gm, wm, csf = _subject_tissues_in_mni(ref, latents, csf_outside=shell)
    return {"GM": gm, "WM": wm, "CSF": csf}, ref.affine.copy()


def _tissue_volumes_ml(latents: SubjectLatents) -> dict[str, float]:
    """True GM, WM and CSF volumes (mL, MNI space) inside the template brain mask (no CSF shell)."""
    ref = _reference()
    maps, _ = tissue_truth(latents)
    return {f"{name.lower()}_ml": round(float(maps[name][ref.brain].sum(dtype=np.float64)) / 1000.0, 3)
            for name in ("GM", "WM", "CSF")}


def _scanner_grid(
    *, support_ijk: np.ndarray, ref_affine: np.ndarray, mni_to_scanner: np.ndarray, voxel_mm: float, margin_mm: float
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An axis-aligned grid in scanner space around template voxels ``support_ijk`` (N, 3)."""
    world = nib.affines.apply_affine(mni_to_scanner @ ref_affine, support_ijk)
    lo = np.floor(world.min(axis=0) - margin_mm)
    hi = np.ceil(world.max(axis=0) + margin_mm)
    shape = tuple(int(n) for n in np.ceil((hi - lo) / voxel_mm).astype(int) + 1)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = lo
    return affine, shape


def _lattice_points(mask: np.ndarray, step: int = BOUND_STEP) -> np.ndarray:
    """Template voxel coordinates of ``mask`` on a lattice of spacing ``step`` (N, 3)."""
    return np.argwhere(mask[::step, ::step, ::step]).astype(np.float64) * step


def _bias_profiles(*, rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> list[np.ndarray]:
    """Smooth multiplicative bias field as three 1-D factors, one per axis.

    ``exp(quadratic in x) * exp(quadratic in y) * exp(quadratic in z)``: an
    oblique intensity ramp with curvature; separable, so applying it costs three
    broadcast multiplications instead of a full 3-D polynomial.
    """
    profiles = []
    for axis, n in enumerate(shape):
        position = np.linspace(-1, 1, n)
        linear, quadratic = rng.normal(0, strength, 2)
        profile = np.exp(linear * position + quadratic * position**2).astype(np.float32)
        profiles.append(profile.reshape([n if a == axis else 1 for a in range(len(shape))]))
    return profiles


def _nifti(data: np.ndarray, affine: np.ndarray, zooms: tuple[float, ...] | None = None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    header = img.header
    header.set_data_dtype(data.dtype)
    header.set_sform(affine, code=1)   # scanner coordinates
    header.set_qform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    if zooms is not None:
        header.set_zooms(zooms)
    return img


def _to_int16(values: np.ndarray) -> np.ndarray:
    """Round and saturate in place, keeping the memory order (NIfTI is Fortran-ordered)."""
    np.rint(values, out=values)
    np.clip(values, 0, np.iinfo(np.int16).max, out=values)
    return values.astype(np.int16, order="K")


def _synthesize_t1w(
    *, ref: _Reference, latents: SubjectLatents, site: SiteSpec, rng: np.random.Generator
) -> nib.Nifti1Image:
    mni_head = _subject_t1_in_mni(ref, latents)
    to_scanner = latents.mni_to_scanner()
    points = ref.head_surface_points
    surface = points[points[:, 3] < HEAD_PROFILE_T1[-1][0] * latents.head_thickness_scale, :3]
    affine, shape = _scanner_grid(
        support_ijk=surface, ref_affine=ref.affine,
        mni_to_scanner=to_scanner, voxel_mm=T1_VOXEL_MM, margin_mm=2.0 + BOUND_STEP,
    )
    # Output voxel -> template voxel, for scipy's pull-back resampling.
    pull = np.linalg.inv(ref.affine) @ np.linalg.inv(to_scanner) @ affine
    image = ndimage.affine_transform(
        mni_head, pull[:3, :3], offset=pull[:3, 3], output_shape=shape, output=np.float32, order=1
    )
    for profile in _bias_profiles(rng=rng, shape=shape, strength=site.bias_strength):
        image *= profile
    image *= np.float32(site.t1_gain)
    sigma = np.float32(T1_NOISE * site.t1_gain * ref.wm_t1)
    # Rician magnitude |image + sigma (n1 + i n2)|, the noise of a magnitude MR image.
    real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag)
    return _nifti(np.asfortranarray(_to_int16(image)), affine)   # NIfTI is Fortran-ordered


@dataclass(frozen=True)
class _BoldGeometry:
    """Native BOLD grid of one subject and its linear model of the imaged head.

    Voxels are flattened in Fortran order (x fastest), the NIfTI order; only
    the ``support`` voxels (inside the head) carry signal and noise.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    support: np.ndarray         # (N,) bool over the whole grid
    base: np.ndarray            # (S,) EPI baseline of the support voxels
    parcel_weights: sparse.csr_matrix  # (S, 400) baseline x parcel fraction / 100
    motion_basis: np.ndarray    # (S, 6) dI / d(tau_xyz, omega_xyz), first order
    corners: np.ndarray         # (8, 3) scanner mm of the field-of-view corners
    centres: np.ndarray         # (S, 3) scanner mm of the support voxels
    physio_weights: np.ndarray  # (S, K) baseline x loading x spatial modulation of each physiological source
    edge_weights: np.ndarray    # (S,) baseline x spin-history gain


def _physio_modulation(mni_mm: np.ndarray) -> np.ndarray:
    """(N, K) smooth spatial modulation of each physiological source at MNI points (N, 3).

    ``1 + 0.5 cos(2 pi x.d_k / wavelength + phase_k)`` with source k varying
    along MNI axis k: a fixed population pattern, so the sources differ in space
    and the WM and CSF means cannot stand in for all of them.
    """
    phases = (0.3, 1.7, 2.9)
    columns = [1 + 0.5 * np.cos(2 * np.pi * mni_mm[:, k % 3] / PHYSIO_WAVELENGTH_MM + phases[k % 3])
               for k in range(len(PHYSIO_LOADINGS))]
    return np.stack(columns, axis=1)


def _bold_geometry(*, ref: _Reference, latents: SubjectLatents) -> _BoldGeometry:
    epi = _subject_epi_in_mni(ref, latents)
    to_scanner = latents.mni_to_scanner()
    affine, shape = _scanner_grid(
        support_ijk=ref.epi_surface_points, ref_affine=ref.affine,
        mni_to_scanner=to_scanner, voxel_mm=BOLD_VOXEL_MM, margin_mm=3.0 + BOUND_STEP,
    )
    n_voxels = int(np.prod(shape))
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1, order="F").T   # (N, 3), x fastest
    centres = nib.affines.apply_affine(affine, ijk)                         # (N, 3) scanner mm
    to_template = np.linalg.inv(ref.affine) @ np.linalg.inv(to_scanner)
    # One voxel of zeros around the template: points outside it clamp onto zeros.
    epi = np.pad(epi, 1).ravel()
    labels = np.pad(ref.labels, 1)
    strides = np.array([labels.shape[1] * labels.shape[2], labels.shape[2], 1])
    upper = np.array(labels.shape) - 1
    labels = labels.ravel()
    # Tissue fractions as the EPI sees them (CSF shell of the EPI profile) and the spin-history gain.
    tissues = [np.pad(t, 1).ravel() for t in _subject_tissues_in_mni(ref, latents, csf_outside=ref.csf)]
    edge_gain = np.pad(ref.edge_gain, 1).ravel()
    head_distance = np.pad(ref.head_distance, 1, constant_values=np.inf).ravel()
    centres_in_template = centres @ to_template[:3, :3].T + to_template[:3, 3] + 1   # (N, 3), +1: pad

    def nearest(points: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(points).astype(np.int64), 0, upper) @ strides   # flat template index

    # Only voxels near the head can see EPI signal: the profile ends at 2.8 mm and
    # the 1.2 mm blur falls below the support threshold ~3 mm further out; add
    # the reach of the sub-samples (half a voxel diagonal) and a 1 mm margin.
    reach = 2.8 + 3.2 + 0.5 * math.sqrt(3) * BOLD_VOXEL_MM + 1.0
    candidate = np.flatnonzero(head_distance[nearest(centres_in_template)] < reach)
    centres_in_template = centres_in_template[candidate]
    base = np.zeros(candidate.size)
    tissue_base = np.zeros((candidate.size, 3))     # baseline-weighted GM, WM, CSF fractions
    edge = np.zeros(candidate.size)
    rows, cols, vals = [], [], []
    # Box point-spread function: n^3 sub-samples 1 mm apart, centred in the voxel.
    n_sub = max(1, int(round(BOLD_VOXEL_MM / T1_VOXEL_MM)))
    axis = (np.arange(n_sub) - (n_sub - 1) / 2) * (BOLD_VOXEL_MM / n_sub)
    offsets = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    for offset in offsets:
        flat = nearest(centres_in_template + to_template[:3, :3] @ offset)
        value = epi[flat] / len(offsets)
        base += value
        for k, tissue in enumerate(tissues):
            tissue_base[:, k] += value * tissue[flat]
        edge += value * edge_gain[flat]
        label = labels[flat]
        voxel = np.flatnonzero(label)
        rows.append(voxel)
        cols.append(label[voxel].astype(np.int64) - 1)
        vals.append(value[voxel] / 100.0)       # percent -> fraction of the baseline
    parcel_weights = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(candidate.size, len(ref.roi_names)), dtype=np.float32,
    )
    full_base = np.zeros(n_voxels)
    full_base[candidate] = base
    support = full_base > 0.02
    keep = base > 0.02                          # the support, indexed within the candidates
    # First order: I(x - u) = I(x) - g.(tau + omega x x) = I - g.tau - omega.(x x g).
    gradient = np.stack(np.gradient(full_base.reshape(shape, order="F"), BOLD_VOXEL_MM), axis=-1)
    gradient = gradient.reshape(-1, 3, order="F")[support]                       # (S, 3)
    motion_basis = -np.concatenate([gradient, np.cross(centres[support], gradient)], axis=1)
    corner_ijk = np.stack(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    # Loadings of the physiological sources: (GM, WM, CSF) weights, then a smooth spatial modulation.
    loadings = np.array([[gm, wm, csf] for csf, wm, gm in PHYSIO_LOADINGS])        # (K, 3) in GM, WM, CSF order
    mni_centres = nib.affines.apply_affine(np.linalg.inv(to_scanner), centres[support])
    physio_weights = (tissue_base[keep] @ loadings.T) * _physio_modulation(mni_centres)   # (S, K)
    return _BoldGeometry(
        affine=affine,
        shape=shape,
        support=support,
        base=base[keep].astype(np.float32),
        parcel_weights=parcel_weights[keep],
        motion_basis=motion_basis.astype(np.float32),
        corners=nib.affines.apply_affine(affine, corner_ijk),
        centres=centres[support].astype(np.float32),
        physio_weights=physio_weights.astype(np.float32),
        edge_weights=edge[keep].astype(np.float32),
    )


def _peak_displacement(params: np.ndarray, corners: np.ndarray) -> float:
    """Largest displacement (mm) of any field-of-view point in any volume of (T, 6) rigid motion."""
    # |u| is convex in x, so its maximum over the field of view sits at a corner.
    displacement = params[:, None, :3] + np.cross(params[:, None, 3:], corners[None])   # (T, 8, 3)
    return float(np.linalg.norm(displacement, axis=-1).max())


def _motion(*, rng: np.random.Generator, n_volumes: int, corners: np.ndarray,
            jerk_rng: np.random.Generator | None = None, motion_level: float = 1.0) -> np.ndarray:
    """(T, 6) rigid motion (tau mm, omega rad): a smooth drift, plus jerks when ``jerk_rng`` is given.

    The drift's largest displacement is U(0.1, :data:`MOTION_MAX_MM`) mm. Jerks
    (Poisson, :data:`JERK_RATE` x ``motion_level`` per frame) are brief
    displacements of 1-3 frames that return, each of size ~ Exp(:data:`JERK_MM` x
    ``motion_level``) mm (at most :data:`JERK_MAX_MM`) in a random rigid
    direction; they are scaled down together if drift and jerks would move a
    voxel more than :data:`DISPLACEMENT_MAX_MM`.
    """
    steps = rng.standard_normal((n_volumes, 6)) * np.array([1, 1, 1, 0.01, 0.01, 0.01])
    params = ndimage.gaussian_filter1d(np.cumsum(steps, axis=0), sigma=2.0, axis=0)
    params -= params[0]                                  # first volume is the reference pose
    peak = _peak_displacement(params, corners)
    target = rng.uniform(0.1, MOTION_MAX_MM)
    params = params * (target / peak) if peak > 0 else params
    if jerk_rng is None:
        return params
    jerks = np.zeros_like(params)
    for _ in range(int(jerk_rng.poisson(JERK_RATE * motion_level * n_volumes))):
        onset = int(jerk_rng.integers(1, n_volumes))     # never the reference volume
        duration = int(jerk_rng.integers(1, 4))
        size = min(float(jerk_rng.exponential(JERK_MM * motion_level)), JERK_MAX_MM)
        direction = jerk_rng.standard_normal(6) * np.array([1, 1, 1, 0.02, 0.02, 0.02])
        reach = _peak_displacement(direction[None], corners)
        jerks[onset:onset + duration] += direction * (size / reach)
    total = params + jerks
    if _peak_displacement(total, corners) > DISPLACEMENT_MAX_MM:
        # Shrink the jerks until drift + jerks fit (bisection: |u| is not linear in the scale).
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _peak_displacement(params + mid * jerks, corners) <= DISPLACEMENT_MAX_MM else (lo, mid)
        total = params + lo * jerks
    return total


def _spin_history(*, motion: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(S, T) spin-history drive: each voxel's own frame-to-frame displacement (mm), with recovery.

    ``|u(x, t) - u(x, t - 1)|`` for the first-order rigid motion
    ``u = tau + omega x x`` (0 for the first frame), convolved in time with
    :data:`SPIN_HISTORY_KERNEL`. ``|d tau + W x|^2`` (``W`` the cross-product
    matrix of ``d omega``) is a quadratic in ``x``: one (S, 10) x (10, T)
    product instead of an (S, T, 3) array.
    """
    delta = np.diff(motion, axis=0, prepend=motion[:1]).astype(np.float64)          # (T, 6)
    d_tau, d_omega = delta[:, :3], delta[:, 3:]
    cross = np.zeros((len(delta), 3, 3))                                            # (T, 3, 3): W x = d_omega x x
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -d_omega[:, 2], d_omega[:, 1], -d_omega[:, 0]
    cross -= cross.transpose(0, 2, 1)
    quad = cross.transpose(0, 2, 1) @ cross                                         # (T, 3, 3) W^T W
    lin = 2 * np.einsum("tji,tj->ti", cross, d_tau)                                 # (T, 3) 2 W^T d_tau
    x = np.asarray(centres, dtype=np.float64)                                       # (S, 3)
    features = np.column_stack([x[:, 0]**2, x[:, 1]**2, x[:, 2]**2, 2 * x[:, 0] * x[:, 1],
                                2 * x[:, 0] * x[:, 2], 2 * x[:, 1] * x[:, 2], x, np.ones(len(x))])   # (S, 10)
    coefficients = np.column_stack([quad[:, 0, 0], quad[:, 1, 1], quad[:, 2, 2], quad[:, 0, 1], quad[:, 0, 2],
                                    quad[:, 1, 2], lin, (d_tau**2).sum(axis=1)])                    # (T, 10)
    step = np.sqrt(np.clip(features @ coefficients.T, 0.0, None)).astype(np.float32)   # (S, T)
    drive = np.zeros_like(step)
    for lag, weight in enumerate(SPIN_HISTORY_KERNEL):
        drive[:, lag:] += np.float32(weight) * step[:, :step.shape[1] - lag]
    return drive


def _drift(*, rng: np.random.Generator, n_volumes: int, centres: np.ndarray, drift_pct: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Slow scanner drift: (S, T) fraction of the baseline, and its (T,) course in % at the centre.

    A random mix of a linear and a quadratic (Legendre) trend, scaled to
    ``drift_pct`` % at its largest, growing by :data:`DRIFT_GRADIENT` per 80 mm
    along a random direction.
    """
    time = np.linspace(-1, 1, n_volumes)
    a, b = rng.standard_normal(2)
    course = a * time + b * (1.5 * time**2 - 0.5)
    course = course / max(float(np.abs(course).max()), 1e-12) * drift_pct          # (T,) %
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    gain = 1 + DRIFT_GRADIENT * ((centres - centres.mean(axis=0)) @ direction) / 80.0   # (S,)
    return np.outer(gain, course / 100.0).astype(np.float32), course


def _synthesize_bold(
    *, geometry: _BoldGeometry, series_pct: np.ndarray, site: SiteSpec, rng: np.random.Generator,
    latents: SubjectLatents | None = None, noise_rng: np.random.Generator | None = None,
) -> tuple[nib.Nifti1Image, np.ndarray, pd.DataFrame]:
    """The BOLD run (int16 NIfTI), its true motion (T, 6) and its true nuisance courses.

    With ``latents`` and ``noise_rng`` the run also carries the noise worth
    removing (module docstring): jerky motion, spin-history artifacts,
    physiological signals and scanner drift; without them, the clean run of
    earlier versions (smooth motion and thermal noise only).
    """
    n_volumes = series_pct.shape[0]
    noisy = latents is not None and noise_rng is not None
    motion = _motion(rng=rng, n_volumes=n_volumes, corners=geometry.corners,
                     jerk_rng=noise_rng if noisy else None,
                     motion_level=latents.motion_level if noisy else 1.0)
    # Built as (S, T): the sparse product comes out C-ordered that way.
    series = np.ascontiguousarray(series_pct.T, dtype=np.float32)                   # (400, T)
    volumes = geometry.parcel_weights @ series                                     # (S, T)
    nuisance = pd.DataFrame(index=range(n_volumes))
    if noisy:
        physio = _band_limited_noise(
            rng=noise_rng, n_volumes=n_volumes, repetition_time=site.repetition_time,
            n_series=len(PHYSIO_LOADINGS),
            band_hz=(PHYSIO_BAND_HZ[0], min(PHYSIO_BAND_HZ[1], 0.9 * 0.5 / site.repetition_time)),
        )                                                                          # (T, K) unit variance
        volumes += (geometry.physio_weights * np.float32(latents.physio_pct / 100.0)) @ physio.T.astype(np.float32)
        drift, course = _drift(rng=noise_rng, n_volumes=n_volumes, centres=geometry.centres,
                               drift_pct=latents.drift_pct)
        volumes += geometry.base[:, None] * drift
        spin = _spin_history(motion=motion, centres=geometry.centres)              # (S, T) mm
        volumes -= (geometry.edge_weights * np.float32(SPIN_HISTORY_PCT_PER_MM / 100.0))[:, None] * spin
        for k in range(physio.shape[1]):
            nuisance[f"physio_{k}"] = physio[:, k]
        nuisance["drift_pct"] = course
    volumes += geometry.motion_basis @ motion.T.astype(np.float32)
    volumes += geometry.base[:, None]
    sigma = np.float32(BOLD_NOISE * geometry.base.mean())
    volumes += sigma * rng.standard_normal(volumes.shape, dtype=np.float32)
    volumes *= np.float32(site.bold_gain)
    data = np.zeros((n_volumes, geometry.support.size), dtype=np.int16)   # noise-free background
    data[:, geometry.support] = _to_int16(volumes).T
    x, y, z = geometry.shape
    data = data.reshape(n_volumes, z, y, x).transpose(3, 2, 1, 0)        # (X, Y, Z, T), Fortran-contiguous
    zooms = (BOLD_VOXEL_MM,) * 3 + (site.repetition_time,)
    return _nifti(data, geometry.affine, zooms), motion, nuisance


# --------------------------------------------------------------------------- writing

FILE_MODE = 0o644   # mkstemp creates 0600; data files should be readable like any other


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_nifti_gz(path: Path, img: nib.Nifti1Image) -> None:
    """Write ``.nii.gz`` whose bytes depend on the data only.

    zlib's own gzip header has mtime 0 and no file name. The run-length
    strategy suits noisy images with zero background: on the demo BOLD it is
    twice as fast as nibabel's default (level 1) and the file is 6 % smaller.
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_RLE)
    raw = img.to_bytes()
    _atomic_write_bytes(path, compressor.compress(raw) + compressor.flush())


def _write_json(path: Path, obj: Any) -> None:
    """Deterministic JSON (``jsonio.dumps``), world-readable like the other demo files."""
    _atomic_write_bytes(path, dumps(obj).encode())


def _write_tsv(path: Path, table: pd.DataFrame) -> None:
    buffer = io.StringIO()
    table.to_csv(buffer, sep="\t", index=False, float_format="%.6g", lineterminator="\n")
    _atomic_write_bytes(path, buffer.getvalue().encode())


def _write_matrix_tsv(path: Path, values: np.ndarray, columns: list[str] | tuple[str, ...]) -> None:
    """A float matrix as TSV (``%.6g``, like ``_write_tsv``), without pandas' per-cell cost."""
    buffer = io.StringIO()
    np.savetxt(buffer, values, fmt="%.6g", delimiter="\t", header="\t".join(columns), comments="")
    _atomic_write_bytes(path, buffer.getvalue().encode())


def _site_readme(site: SiteSpec, n_subjects: int, t1_only: list[str]) -> str:
    return (
        f"# bh_models demo cohort, {site.name}\n\n"
        f"Synthetic data written by `{GENERATOR_NAME}` (bh_models {__version__}); not real people.\n"
        f"{n_subjects} subjects, one T1w each, resting-state BOLD with TR {site.repetition_time} s "
        f"and {site.n_volumes} volumes per run.\n"
        f"Subjects without BOLD (T1w only): {', '.join(t1_only) if t1_only else 'none'}.\n"
        "RepetitionTime is given once in task-rest_bold.json (BIDS inheritance).\n"
        "The ground truth lies outside this folder, in ../ground_truth/.\n"
    )


PARTICIPANTS_JSON = {
    "participant_id": {"Description": "Subject label"},
    "age": {"Description": "Age (synthetic nuisance variable; drives no signal)", "Units": "years"},
    "sex": {"Description": "Sex (synthetic nuisance variable)", "Levels": {"F": "female", "M": "male"}},
    "diagnosis": {
        "Description": "Binary diagnosis; patients have stronger Default-network coupling and "
        "amplitude, larger ventricles and periventricular T1 hypointensity",
        "Levels": {"control": "control", "patient": "patient"},
    },
    "score": {
        "Description": "Continuous score = 50 + 10 z + noise; z drives Somatomotor amplitude and "
        "coupling and cortical grey-matter T1 contrast",
        "Units": "arbitrary",
    },
}
MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
#: Seed stream of a run's noise (jerks, physiology, drift): stream ``NOISE_STREAM + run`` of its subject.
NOISE_STREAM = 100


def _remove_previous_output(out_dir: Path) -> None:
    """Delete what an earlier demo run wrote in ``out_dir``; refuse to touch anything else."""
    for site in SITES:
        site_dir = out_dir / site.name
        truth_dir = out_dir / "ground_truth" / site.name
        if site_dir.exists():
            try:
                generated_by = read_json(site_dir / "dataset_description.json")["GeneratedBy"][0]["Name"]
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                generated_by = None
            if generated_by != GENERATOR_NAME:
                raise BHInputError(
                    site_dir, "exists and was not written by the demo generator",
                    "choose an empty or new OUT_DIR for `bh demo`",
                )
            shutil.rmtree(site_dir)
        if truth_dir.exists():
            if not (truth_dir / "subjects.tsv").is_file():
                raise BHInputError(
                    truth_dir, "exists and does not hold demo ground truth",
                    "choose an empty or new OUT_DIR for `bh demo`",
                )
            shutil.rmtree(truth_dir)


def _site_sizes(subjects_per_site: int | None) -> dict[str, int]:
    return {site.name: site.n_subjects if subjects_per_site is None else subjects_per_site for site in SITES}


def _cohort_latents(*, seed: int, subjects_per_site: int | None = None) -> dict[str, list[SubjectLatents]]:
    """Latents of every subject: balanced diagnosis per site, siteB's last subject T1w only."""
    cohort = {}
    for site_index, site in enumerate(SITES):
        n_subjects = _site_sizes(subjects_per_site)[site.name]
        order = _rng(seed, site_index, 0, 0).permutation(n_subjects)
        patients = set(order[: n_subjects // 2].tolist())
        subjects = []
        for i in range(n_subjects):
            if site.name == "siteB" and i == n_subjects - 1:
                n_runs = 0      # unpaired subject: the pipeline must handle T1w without BOLD
            elif site.name == "siteA" and i == 0:
                n_runs = 2      # two runs of one subject: run entities and per-run outputs
            else:
                n_runs = 1
            subjects.append(_draw_latents(
                rng=_rng(seed, site_index, i + 1, 0), participant_id=f"sub-{i + 1:02d}",
                patient=i in patients, n_runs=n_runs,
            ))
        cohort[site.name] = subjects
    return cohort


def _write_site_metadata(*, bids: Path, site: SiteSpec, subjects: list[SubjectLatents], seed: int) -> None:
    _write_json(bids / "dataset_description.json", {
        "Name": f"bh_models demo cohort {site.name}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["bh_models demo generator"],
        "GeneratedBy": [{"Name": GENERATOR_NAME, "Version": __version__,
                         "Description": f"synthetic cohort, seed {seed}"}],
    })
    _write_json(bids / f"task-{TASK}_bold.json", {
        "TaskName": TASK, "RepetitionTime": site.repetition_time,
        "MagneticFieldStrength": site.field_strength, "Manufacturer": "bh_models synthetic",
    })
    t1_only = [s.participant_id for s in subjects if s.n_runs == 0]
    _atomic_write_bytes(bids / "README", _site_readme(site, len(subjects), t1_only).encode())
    participants = pd.DataFrame([{
        "participant_id": s.participant_id, "age": s.age, "sex": s.sex,
        "diagnosis": s.diagnosis, "score": s.score,
    } for s in subjects])
    _write_tsv(bids / "participants.tsv", participants)
    _write_json(bids / "participants.json", PARTICIPANTS_JSON)


@dataclass(frozen=True)
class _SubjectJob:
    out_dir: Path
    seed: int
    site_index: int
    subject_index: int
    latents: SubjectLatents


def _write_subject(job: _SubjectJob) -> list[dict[str, str]]:
    """Synthesise and write one subject's images and ground truth; return its BOLD runs."""
    ref = _reference()
    site, latents = SITES[job.site_index], job.latents
    label = latents.participant_id
    subject_dir = job.out_dir / site.name / label
    truth_dir = job.out_dir / "ground_truth" / site.name
    stream = functools.partial(_rng, job.seed, job.site_index, job.subject_index + 1)
    t1w = _synthesize_t1w(ref=ref, latents=latents, site=site, rng=stream(1))
    _write_nifti_gz(subject_dir / "anat" / f"{label}_T1w.nii.gz", t1w)
    runs = []
    if latents.n_runs == 0:
        return runs
    geometry = _bold_geometry(ref=ref, latents=latents)
    for run in range(1, latents.n_runs + 1):
        stem = f"{label}_task-{TASK}" + (f"_run-{run}" if latents.n_runs > 1 else "")
        rng = stream(1 + run)
        series = _parcel_series(ref=ref, latents=latents, site=site, rng=rng)
        bold, motion, nuisance = _synthesize_bold(geometry=geometry, series_pct=series, site=site, rng=rng,
                                                  latents=latents, noise_rng=stream(NOISE_STREAM + run))
        bold_path = subject_dir / "func" / f"{stem}_bold.nii.gz"
        _write_nifti_gz(bold_path, bold)
        _write_json(
            subject_dir / "func" / f"{stem}_bold.json",
            {"TaskName": TASK, "EchoTime": site.echo_time, "FlipAngle": site.flip_angle},
        )
        truth = truth_dir / f"{stem}_timeseries.tsv"
        _write_matrix_tsv(truth, series, ref.roi_names)
        motion_path = truth_dir / f"{stem}_motion.tsv"
        _write_matrix_tsv(motion_path, motion, MOTION_COLUMNS)
        noise_path = truth_dir / f"{stem}_noise.tsv"
        _write_matrix_tsv(noise_path, nuisance.to_numpy(), list(nuisance.columns))
        runs.append({
            "site": site.name, "subject": label,
            "bold": bold_path.relative_to(job.out_dir).as_posix(),
            "timeseries": truth.relative_to(job.out_dir).as_posix(),
            "motion": motion_path.relative_to(job.out_dir).as_posix(),
            "noise": noise_path.relative_to(job.out_dir).as_posix(),
        })
    return runs


def _n_workers(n_jobs: int) -> int:
    """Worker processes: the CPUs this process may use (at most 4), on Linux only.

    Subjects are independent and seeded one by one, so the files do not depend
    on the number of workers. Workers are forked so they share the reference
    anatomy already in memory; fork is only relied on where it is the
    platform's tested default.
    """
    if not sys.platform.startswith("linux"):
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 4, n_jobs))


def _map_subjects(jobs: list[_SubjectJob]) -> list[list[dict[str, str]]]:
    from tqdm import tqdm

    n_workers = _n_workers(len(jobs))
    progress = functools.partial(tqdm, total=len(jobs), desc="demo subjects", unit="subject", disable=None)
    if n_workers == 1:
        return [_write_subject(job) for job in progress(jobs)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _reference()        # build once here; forked workers inherit it
    with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(progress(pool.map(_write_subject, jobs)))


def write_demo_cohort(out_dir: Path, *, seed: int = 0, subjects_per_site: int | None = None) -> dict:
    """Write the three-site demo cohort (BIDS) and its ground truth under ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Destination. ``siteA/``, ``siteB/``, ``siteC/`` and ``ground_truth/`` are
        created in it; earlier demo output there is replaced, anything else is
        refused. Nothing is written outside ``out_dir``.
    seed : int
        Seed of every random draw; the same seed writes byte-identical files.
    subjects_per_site : int, optional
        Subjects of every site (>= 2); None = each site's default (:data:`SITES`:
        6, 6 and 16). In siteB the last subject has a T1w only; in siteA
        ``sub-01`` has two BOLD runs (``run-1``, ``run-2``).

    Returns
    -------
    dict
        ``out_dir``, ``seed``, ``subjects_per_site``; ``sites`` (per site: BIDS
        root, TR, volumes per run, subjects, patients, T1w-only subjects, BOLD
        run count); ``ground_truth`` folder; ``runs`` (per BOLD run: site,
        subject, and the BOLD, true-series and motion paths relative to
        ``out_dir``); ``n_files`` and ``n_bytes`` written.
    """
    if subjects_per_site is not None and (
            isinstance(subjects_per_site, bool) or not isinstance(subjects_per_site, (int, np.integer))
            or subjects_per_site < 2):
        raise BHConfigError(
            "subjects_per_site", f"{subjects_per_site!r} is too small",
            "use an integer >= 2 (both diagnoses per site, and siteB keeps one T1w-only subject)",
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BHConfigError("seed", f"{seed!r} is not a non-negative integer", "use e.g. --seed 0")
    seed = int(seed)
    subjects_per_site = None if subjects_per_site is None else int(subjects_per_site)
    sizes = _site_sizes(subjects_per_site)
    out_dir = Path(out_dir)
    truth_root = out_dir / "ground_truth"
    _remove_previous_output(out_dir)
    cohort = _cohort_latents(seed=seed, subjects_per_site=subjects_per_site)
    for site in SITES:
        # Metadata first: a half-written cohort is still recognisable as demo output.
        _write_site_metadata(bids=out_dir / site.name, site=site, subjects=cohort[site.name], seed=seed)
        _write_tsv(truth_root / site.name / "subjects.tsv",
                   pd.DataFrame([{**s.as_row(), **_tissue_volumes_ml(s)} for s in cohort[site.name]]))
    jobs = [
        _SubjectJob(out_dir, seed, k, i, cohort[site.name][i])
        for k, site in enumerate(SITES) for i in range(sizes[site.name])
    ]
    runs = [run for subject_runs in _map_subjects(jobs) for run in subject_runs]
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    return {
        "out_dir": str(out_dir),
        "seed": seed,
        "subjects_per_site": sizes,
        "sites": {
            site.name: {
                "bids_root": str(out_dir / site.name),
                "role": site.role,
                "repetition_time": site.repetition_time,
                "n_volumes": site.n_volumes,
                "subjects": [s.participant_id for s in cohort[site.name]],
                "patients": [s.participant_id for s in cohort[site.name] if s.diagnosis == "patient"],
                "t1w_only": [s.participant_id for s in cohort[site.name] if s.n_runs == 0],
                "n_bold_runs": sum(s.n_runs for s in cohort[site.name]),
            }
            for site in SITES
        },
        "ground_truth": str(truth_root),
        "runs": runs,
        "n_files": len(files),
        "n_bytes": sum(p.stat().st_size for p in files),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m bh_models.demo.cohort OUT_DIR [--seed N] [--subjects-per-site N]``."""
    parser = argparse.ArgumentParser(
        prog="bh demo", description="Write the synthetic three-site demo cohort (BIDS + ground truth)."
    )
    parser.add_argument("out_dir", type=Path, help="destination folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--subjects-per-site", type=int, default=None,
        help="subjects of every site (default: " + ", ".join(f"{s.name} {s.n_subjects}" for s in SITES) + ")",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    summary = write_demo_cohort(args.out_dir, seed=args.seed, subjects_per_site=args.subjects_per_site)
    for name, info in summary["sites"].items():
        print(
            f"{name}: {len(info['subjects'])} subjects, {info['n_bold_runs']} BOLD runs, "
            f"TR {info['repetition_time']} s, T1w only: {', '.join(info['t1w_only']) or 'none'}"
        )
    print(
        f"wrote {summary['n_files']} files ({summary['n_bytes'] / 1e6:.1f} MB) to {summary['out_dir']} "
        f"in {time.perf_counter() - started:.1f} s; ground truth in {summary['ground_truth']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
