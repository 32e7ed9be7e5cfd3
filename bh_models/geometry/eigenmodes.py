"""Geometric eigenmodes of the cortex and their Schaefer-400 parcel embedding.

The fMRI encoder's ROI positions come from the geometry of the cortical sheet
("function follows structure", Pang et al. 2023): the first ``M`` eigenfunctions
of the Laplace-Beltrami operator (LBO) of a population-average midthickness
surface, averaged within each Schaefer-400 parcel, give a 400 x M matrix.

Pipeline, per hemisphere
------------------------
1. Load the closed hemisphere mesh and check it (:func:`check_closed_surface`):
   a hole, a non-manifold edge or vertex, a degenerate triangle, an unused
   vertex, several pieces, a handle or mixed triangle winding is a
   :class:`~bh_models.core.errors.BHInputError`. One defect is *repaired*, because it
   cannot change the result: a surface whose triangles all wind inwards
   (negative enclosed volume) has its winding reversed. The linear FEM
   matrices use unsigned areas, so the eigenmodes do not depend on the winding;
   the repair is recorded in the sidecar (``Repairs``).
2. Remove the medial wall (Pang et al. 2023): keep the triangles whose three
   vertices are cortex. The cut mesh must be one manifold piece.
3. Solve ``A phi = lambda M phi`` (LaPy's linear FEM stiffness ``A`` and mass
   ``M``, natural Neumann condition on the cut) for the ``M`` smallest
   eigenvalues by shift-invert Lanczos (ARPACK) around a small negative shift.
   The modes are mass-orthonormal: ``Phi.T @ M @ Phi = I``.
4. Write the modes back to full-length arrays, zero on the medial wall.

Determinism convention
----------------------
An eigenvector is defined up to its sign, and a degenerate eigenspace (several
equal eigenvalues, as on a sphere) up to a rotation. Both are fixed by fixed
*probe vectors* ``P = 1 + G``. ``G`` holds standard-normal values drawn with
``numpy.random.default_rng(0)`` (:data:`PROBE_SEED`), one column after the
other, over the *full-length* vertex list of the surface file, and is then
restricted to the solved (cortex) vertices. On fsLR, vertex ``i`` of the left
and of the right hemisphere are homologous, so both hemispheres see the same
probe field and homologous modes mostly share their sign (17 of the first 19
modes on fsLR-32k); nothing beyond that is promised across hemispheres.

- Eigenvalues are grouped into clusters of consecutive values whose relative
  gap is at most ``degeneracy_rtol`` (default 1e-6; true degeneracies agree to
  ~1e-12, distinct cortical eigenvalues differ by >1e-4).
- For a cluster with basis ``Phi_c`` (``n x d``), compute the overlaps
  ``C = Phi_c.T @ M @ P[:, :d]`` and their QR decomposition ``C = Q R``. The
  canonical basis is ``Phi_c @ Q @ diag(sign(diag(R)))``. It is the mass-
  orthonormal Gram-Schmidt basis of the projections of ``p_1 .. p_d`` onto the
  eigenspace, so it depends only on the eigenspace, not on the basis the
  solver returned.
- For a simple eigenvalue this says: the sign makes ``phi.T @ M @ p_1 > 0``.
  The constant ``1`` in the probe makes the first (constant) mode positive and
  is invisible to every other mode (they are mass-orthogonal to constants).
- Asking for ``M`` modes when eigenvalue ``M`` and ``M + 1`` are degenerate
  would cut an eigenspace arbitrarily; that is a
  :class:`~bh_models.core.errors.BHConfigError` (choose another ``n_modes``).

The solver's start vector is drawn from ``seed`` and BLAS runs on one thread
inside the solve, so the same inputs give byte-identical files.

Parcel embedding
----------------
The parcel value of a mode is the plain mean over the parcel's cortex vertices
(as BrainSpace's ``reduce_by_labels``); vertices that carry a parcel label but
lie inside the medial-wall mask (672 on fsLR-32k) are left out, so mode 1 stays
exactly constant per hemisphere. The fsLR-32k vertex labels
(``schaefer_400_conte69.csv``) are in the 7-network order. The 17-network
Schaefer-400 atlas has the *same 400 parcels* in another order; the
correspondence is read off the two volumetric CBIG atlases shipped in the
package (every voxel of 7-network parcel ``i`` carries the same 17-network
label, checked at run time, see :func:`schaefer_7_to_17`).

Surfaces
--------
``fsLR32k`` (default): Conte69 fsLR-32k midthickness with its medial-wall mask
(BrainSpace). ``fsaverage5``: nilearn's offline copy; the midthickness is the
mean of the white and pial coordinates (they share triangles). No
fsaverage5 medial-wall mask or Schaefer-400 vertex labels ship offline, so on
fsaverage5 the modes are solved on the *whole closed* hemisphere (sidecar:
``MedialWallRemoved: false``) and the parcel projection refuses to run
(it would need labels that do not exist here; re-projecting the fsLR labels by
nearest vertex would not be the published parcellation).
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lapy
import nibabel as nib
import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.linalg import LinearOperator, eigsh, splu
from threadpoolctl import threadpool_limits

from bh_models.core.hashing import sha256_file
from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import atomic_write_text, read_json, sidecar_path, write_json
from bh_models.core.templates import atlas_labels, data_dir, schaefer_7_to_17

__desc__ = (
    "Geometric eigenmodes of the cortex were computed as the first {n_modes} "
    "eigenfunctions of the Laplace-Beltrami operator of the {surface} midthickness "
    "surface of each hemisphere (linear finite elements with LaPy; Reuter et al. 2006; "
    "Wachinger et al. 2015), after removing the medial wall (Pang et al. 2023). "
    "The mass-orthonormal modes were given a canonical sign and, within degenerate "
    "eigenspaces, a canonical basis, and each mode was averaged within the "
    "Schaefer-400 parcels (Schaefer et al. 2018) to give the regions' geometric "
    "positional embedding."
)

SURFACES = ("fsLR32k", "fsaverage5")
HEMIS = ("L", "R")
#: Seed of the probe vectors that fix signs and degenerate bases (a file-format convention).
PROBE_SEED = 0
#: Relative eigenvalue gap below which consecutive eigenvalues form one degenerate eigenspace.
DEGENERACY_RTOL = 1e-6
#: Largest tolerated deviation of ``Phi.T @ M @ Phi`` from the identity.
ORTHONORMALITY_ATOL = 1e-6
#: Vertices per hemisphere of fsLR-32k.
FSLR32K_VERTICES = 32492
N_PARCELS = 400

_FSLR_FILES = {"L": "conte69_32k_lh", "R": "conte69_32k_rh"}
_NILEARN_HEMI = {"L": "left", "R": "right"}


# --------------------------------------------------------------------------- meshes


@dataclass(frozen=True)
class HemisphereMesh:
    """A closed hemisphere surface and which of its vertices are cortex.

    Attributes
    ----------
    vertices : ndarray, (n_vertices, 3) float64, mm
    triangles : ndarray, (n_triangles, 3) int64, outward winding
    cortex : ndarray, (n_vertices,) bool; False on the medial wall
    medial_wall_removed : bool
        False when no medial-wall mask exists for the surface (all cortex).
    sources : dict[str, str]
        File name -> sha256 of every file the mesh was built from.
    repairs : list[str]
        Repairs applied to the input (see the module docstring).
    """

    vertices: np.ndarray
    triangles: np.ndarray
    cortex: np.ndarray
    medial_wall_removed: bool
    sources: dict[str, str]
    repairs: list[str] = field(default_factory=list)


def read_surface(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(n, 3)`` float64 and triangles ``(m, 3)`` int64 of a surface file.

    GIFTI (``.gii``, or gzipped ``.gii.gz`` as nilearn ships fsaverage5) or
    FreeSurfer geometry (``lh.pial`` ...). Read with nibabel: importing
    nilearn's surface module costs seconds for nothing here.
    """
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "surface file not found", "check the path or the geometry.surface setting")
    try:
        if path.name.endswith((".gii", ".gii.gz")):
            raw = path.read_bytes()
            image = nib.GiftiImage.from_bytes(gzip.decompress(raw) if path.name.endswith(".gz") else raw)
            vertices = image.agg_data("NIFTI_INTENT_POINTSET")
            triangles = image.agg_data("NIFTI_INTENT_TRIANGLE")
        else:
            vertices, triangles = nib.freesurfer.read_geometry(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise BHInputError(path, f"not a readable surface mesh ({exc})", "give a GIFTI or FreeSurfer surface") from exc
    if not isinstance(vertices, np.ndarray) or not isinstance(triangles, np.ndarray):
        raise BHInputError(path, "no single vertex array and triangle array", "give one hemisphere mesh per file")
    return np.asarray(vertices, dtype=np.float64), np.asarray(triangles, dtype=np.int64)


def read_medial_wall_mask(path: Path, n_vertices: int) -> np.ndarray:
    """Cortex mask ``(n_vertices,)`` bool from a one-column 0/1 CSV (1 = cortex)."""
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "medial-wall mask not found", "check the path")
    values = pd.read_csv(path, header=None).to_numpy().ravel()
    if values.size != n_vertices or not np.isin(values, (0, 1)).all():
        raise BHInputError(
            path, f"expected {n_vertices} values of 0 or 1, got {values.size}",
            "give the mask that belongs to this surface (1 = cortex, 0 = medial wall)",
        )
    return values.astype(bool)


def check_closed_surface(
    *, vertices: np.ndarray, triangles: np.ndarray, path: Path | str
) -> tuple[np.ndarray, list[str]]:
    """Check that a hemisphere surface is one closed, oriented, genus-0 manifold.

    Parameters
    ----------
    vertices : ndarray, (n, 3)
    triangles : ndarray, (m, 3) int
    path : Path or str
        Named in every error.

    Returns
    -------
    triangles : ndarray, (m, 3) int64
        The input triangles, or with reversed winding when every triangle wound
        inwards (the only repair; the LBO does not depend on winding).
    repairs : list[str]
        What was repaired (empty when nothing was).

    Raises
    ------
    BHInputError
        Non-finite coordinates, bad indices, degenerate triangles, unused
        vertices, non-manifold edges or vertices, holes, several pieces,
        handles (genus > 0) or mixed triangle winding.
    """
    fix = "use a closed, manifold population-average midthickness surface (e.g. the packaged fsLR-32k)"
    if vertices.ndim != 2 or vertices.shape[1] != 3 or triangles.ndim != 2 or triangles.shape[1] != 3:
        raise BHInputError(path, "vertices and triangles must be (n, 3) arrays", fix)
    if not np.isfinite(vertices).all():
        raise BHInputError(path, "non-finite vertex coordinates", fix)
    if triangles.min() < 0 or triangles.max() >= len(vertices):
        raise BHInputError(path, "triangle indices outside the vertex list", fix)
    triangles = triangles.astype(np.int64)
    if np.any(np.diff(np.sort(triangles, axis=1), axis=1) == 0):
        raise BHInputError(path, "triangles that repeat a vertex", fix)
    edge_a = vertices[triangles[:, 1]] - vertices[triangles[:, 0]]
    edge_b = vertices[triangles[:, 2]] - vertices[triangles[:, 0]]
    areas = 0.5 * np.linalg.norm(np.cross(edge_a, edge_b), axis=1)
    # LaPy silently replaces zero areas by a small value; a zero-area triangle means a broken mesh.
    if np.any(areas <= 1e-12 * areas.mean()):
        raise BHInputError(path, f"{int(np.sum(areas <= 1e-12 * areas.mean()))} zero-area triangles", fix)
    n_unused = len(vertices) - len(np.unique(triangles))
    if n_unused:
        raise BHInputError(path, f"{n_unused} vertices belong to no triangle", fix)
    mesh = lapy.TriaMesh(vertices, triangles)
    # adj_sym counts the triangles on each edge: >2 is a non-manifold edge, 1 a hole's rim.
    if mesh.adj_sym.data.max() > 2:
        n_bad = int(np.sum(mesh.adj_sym.data > 2) // 2)
        raise BHInputError(path, f"{n_bad} non-manifold edges (shared by more than two triangles)", fix)
    n_pinch = len(mesh.pinch_vertices())
    if n_pinch:
        raise BHInputError(path, f"{n_pinch} non-manifold vertices (several triangle fans meet)", fix)
    n_boundary = int(np.sum(mesh.adj_sym.data == 1) // 2)
    if n_boundary:
        raise BHInputError(
            path, f"the surface has a hole ({n_boundary} boundary edges); a closed hemisphere is expected",
            "give the closed surface; the medial wall is removed with the mask, not by deleting triangles",
        )
    n_pieces, _ = mesh.connected_components()
    if n_pieces != 1:
        raise BHInputError(path, f"the surface has {n_pieces} separate pieces", fix)
    if mesh.euler() != 2:
        raise BHInputError(path, f"Euler characteristic {mesh.euler()} (a sphere has 2): the surface has handles", fix)
    if not mesh.is_oriented():
        raise BHInputError(
            path, "inconsistent triangle winding (some triangles are flipped)",
            "re-export the surface with consistent winding (e.g. lapy.TriaMesh.orient_())",
        )
    if mesh.volume() < 0:
        return triangles[:, ::-1].copy(), ["reversed triangle winding: all triangles wound inwards"]
    return triangles, []


def remove_medial_wall(
    *, vertices: np.ndarray, triangles: np.ndarray, cortex: np.ndarray, path: Path | str
) -> tuple[np.ndarray, np.ndarray]:
    """The cortex-only mesh: the triangles whose three vertices are all cortex.

    Parameters
    ----------
    vertices : ndarray, (n, 3)
    triangles : ndarray, (m, 3) int
    cortex : ndarray, (n,) bool
    path : Path or str
        The mask file, named in errors.

    Returns
    -------
    vertices : ndarray, (n_cortex, 3)
        Cortex vertices in their original order.
    triangles : ndarray, (m_cortex, 3) int64
        Re-indexed into the cortex vertices.
    """
    keep = cortex[triangles].all(axis=1)
    new_index = np.full(len(vertices), -1, dtype=np.int64)
    new_index[cortex] = np.arange(int(cortex.sum()))
    cut_triangles = new_index[triangles[keep]]
    cut_vertices = vertices[cortex]
    fix = "use the medial-wall mask made for this surface"
    n_isolated = int(cortex.sum()) - len(np.unique(cut_triangles))
    if n_isolated:
        raise BHInputError(path, f"{n_isolated} cortex vertices have no all-cortex triangle", fix)
    mesh = lapy.TriaMesh(cut_vertices, cut_triangles)
    n_pieces, _ = mesh.connected_components()
    if n_pieces != 1:
        raise BHInputError(path, f"removing the medial wall splits the cortex into {n_pieces} pieces", fix)
    if len(mesh.pinch_vertices()):
        raise BHInputError(path, "removing the medial wall leaves non-manifold vertices", fix)
    return cut_vertices, cut_triangles


def _midthickness_fsaverage5(hemi: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    # nilearn ships fsaverage5 inside its wheel: fetch_surf_fsaverage never downloads it.
    from nilearn.datasets import fetch_surf_fsaverage

    files = fetch_surf_fsaverage("fsaverage5")
    side = _NILEARN_HEMI[hemi]
    white_path, pial_path = Path(files[f"white_{side}"]), Path(files[f"pial_{side}"])
    white_v, white_t = read_surface(white_path)
    pial_v, pial_t = read_surface(pial_path)
    if not np.array_equal(white_t, pial_t):
        raise BHInputError(pial_path, "white and pial surfaces do not share triangles", "reinstall nilearn")
    sources = {white_path.name: sha256_file(path=white_path), pial_path.name: sha256_file(path=pial_path)}
    return 0.5 * (white_v + pial_v), white_t, sources


def load_hemisphere(
    *, surface: str = "fsLR32k", hemi: str = "L", surface_file: Path | None = None,
    medial_wall_file: Path | None = None,
) -> HemisphereMesh:
    """Load, check and (optionally) mask one hemisphere surface.

    Parameters
    ----------
    surface : {"fsLR32k", "fsaverage5"}
        Named surface; its packaged files are used unless ``surface_file`` is given.
    hemi : {"L", "R"}
    surface_file : Path, optional
        A closed hemisphere surface to use instead (any format nilearn reads).
    medial_wall_file : Path, optional
        One-column 0/1 CSV (1 = cortex). Defaults to the packaged fsLR-32k mask
        for the packaged fsLR-32k surface, and to no mask otherwise.

    Returns
    -------
    HemisphereMesh
    """
    _check_surface_name(surface)
    if hemi not in HEMIS:
        raise BHConfigError("geometry.hemi", f"unknown hemisphere '{hemi}'", "use 'L' or 'R'")
    sources: dict[str, str] = {}
    if surface_file is not None:
        path = Path(surface_file)
        vertices, triangles = read_surface(path)
        sources[path.name] = sha256_file(path=path)
    elif surface == "fsLR32k":
        path = data_dir() / "fslr32k" / f"{_FSLR_FILES[hemi]}.gii"
        vertices, triangles = read_surface(path)
        sources[path.name] = sha256_file(path=path)
        medial_wall_file = medial_wall_file or data_dir() / "fslr32k" / f"{_FSLR_FILES[hemi]}_mask.csv"
    else:
        vertices, triangles, sources = _midthickness_fsaverage5(hemi)
        path = Path(next(iter(sources)))
    triangles, repairs = check_closed_surface(vertices=vertices, triangles=triangles, path=path)
    if medial_wall_file is None:
        cortex = np.ones(len(vertices), dtype=bool)
    else:
        cortex = read_medial_wall_mask(Path(medial_wall_file), len(vertices))
        sources[Path(medial_wall_file).name] = sha256_file(path=Path(medial_wall_file))
    return HemisphereMesh(
        vertices=vertices, triangles=triangles, cortex=cortex,
        medial_wall_removed=medial_wall_file is not None, sources=sources, repairs=repairs,
    )


def _check_surface_name(surface: str) -> None:
    if surface not in SURFACES:
        raise BHConfigError("geometry.surface", f"unknown surface '{surface}'", f"use one of {list(SURFACES)}")


# --------------------------------------------------------------------------- eigenmodes


@dataclass(frozen=True)
class Eigenmodes:
    """Canonical LBO eigenpairs of one (cut) mesh.

    Attributes
    ----------
    eigenvalues : ndarray, (M,) float64, ascending, mm^-2
    modes : ndarray, (n_vertices, M) float64, mass-orthonormal, canonical sign/basis
    degenerate_clusters : list[tuple[int, int]]
        ``(first, size)`` of every eigenspace of dimension > 1 (0-based mode index).
    orthonormality_error : float
        ``max |Phi.T M Phi - I|``.
    max_relative_residual : float
        ``max_i ||A phi_i - lambda_i M phi_i|| / ||A phi_i||`` over the non-constant modes.
    """

    eigenvalues: np.ndarray
    modes: np.ndarray
    degenerate_clusters: list[tuple[int, int]]
    orthonormality_error: float
    max_relative_residual: float


def degenerate_clusters(eigenvalues: np.ndarray, rtol: float = DEGENERACY_RTOL) -> list[tuple[int, int]]:
    """Runs of consecutive eigenvalues whose relative gaps are at most ``rtol``.

    Returns
    -------
    list of (first, stop)
        Half-open index ranges covering ``eigenvalues`` in order (simple
        eigenvalues are ranges of length 1).
    """
    values = np.asarray(eigenvalues, dtype=np.float64)
    gaps = np.diff(values)
    scale = np.maximum(np.abs(values[1:]), np.abs(values[:-1]))
    breaks = np.flatnonzero(gaps > rtol * scale) + 1
    bounds = np.concatenate(([0], breaks, [len(values)]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def probe_vectors(*, solved: np.ndarray, n_columns: int) -> np.ndarray:
    """The probes ``P = 1 + G`` of the determinism convention, on the solved vertices.

    Parameters
    ----------
    solved : ndarray, (n_vertices_full,) bool
        Which vertices of the surface file were solved (the cortex).
    n_columns : int

    Returns
    -------
    ndarray, (solved.sum(), n_columns)
        Column ``j`` does not depend on ``n_columns`` (drawn column by column).
    """
    draws = np.random.default_rng(PROBE_SEED).standard_normal((n_columns, len(solved)))  # (d, n_full)
    return 1.0 + draws.T[solved]                                                           # (n, d)


def canonicalize_modes(
    *, eigenvalues: np.ndarray, modes: np.ndarray, mass: sparse.spmatrix, solved: np.ndarray | None = None,
    rtol: float = DEGENERACY_RTOL,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Fix signs and degenerate bases with the probe convention of the module docstring.

    Parameters
    ----------
    eigenvalues : ndarray, (M,) ascending
    modes : ndarray, (n, M) mass-orthonormal
    mass : sparse (n, n)
    solved : ndarray, (n_vertices_full,) bool, optional
        Where the ``n`` solved vertices sit in the surface file (default: all of it).
    rtol : float
        Relative gap that separates eigenspaces.

    Returns
    -------
    modes : ndarray, (n, M)
        Canonical modes (same eigenspaces, still mass-orthonormal).
    clusters : list of (first, stop)
        The eigenspaces, as from :func:`degenerate_clusters`.
    """
    clusters = degenerate_clusters(eigenvalues, rtol)
    widest = max(stop - first for first, stop in clusters)
    solved = np.ones(modes.shape[0], dtype=bool) if solved is None else solved
    if int(solved.sum()) != modes.shape[0]:
        raise ValueError(f"solved marks {int(solved.sum())} vertices, the modes have {modes.shape[0]} rows")
    probes = probe_vectors(solved=solved, n_columns=widest)                                     # (n, d_max)
    overlaps = modes.T @ (mass @ probes)                                                         # (M, d_max)
    # Simple eigenvalues (d = 1): QR of a 1 x 1 overlap is just its sign.
    out = modes * np.where(overlaps[:, 0] < 0, -1.0, 1.0)                                       # (n, M)
    for first, stop in clusters:
        if stop - first == 1:
            continue
        q, r = np.linalg.qr(overlaps[first:stop, : stop - first])                               # (d, d)
        signs = np.where(np.diag(r) < 0, -1.0, 1.0)
        out[:, first:stop] = modes[:, first:stop] @ (q * signs)                                 # (n, d)
    return out, clusters


def solve_eigenmodes(
    *, vertices: np.ndarray, triangles: np.ndarray, n_modes: int, solved: np.ndarray | None = None,
    seed: int = 0, rtol: float = DEGENERACY_RTOL, path: Path | str = "<mesh>",
) -> Eigenmodes:
    """The ``n_modes`` smallest LBO eigenpairs of a checked mesh, in canonical form.

    LaPy builds the linear FEM stiffness ``A`` and mass ``M`` (Neumann boundary).
    ARPACK's shift-invert Lanczos finds the eigenvalues nearest a shift just
    below zero, ``sigma = -1 / area`` (scales with the mesh unit, unlike a fixed
    number). ``A - sigma M`` is symmetric positive definite, so it is factorised
    by SuperLU in symmetric mode (minimum-degree ordering on ``A + A.T``, no
    pivoting): about half the fill of the general LU that ``lapy.Solver.eigs``
    uses, hence faster solves for the same eigenpairs.

    Parameters
    ----------
    vertices : ndarray, (n, 3)
    triangles : ndarray, (m, 3) int
    n_modes : int
        Number of eigenpairs, including the constant mode.
    solved : ndarray, (n_vertices_full,) bool, optional
        Where these vertices sit in the surface file (the cortex mask); fixes
        the probe values per original vertex. Default: the mesh is the whole file.
    seed : int
        Seed of the solver's start vector (the results do not depend on it
        beyond rounding; fixing it makes the files byte-identical).
    rtol : float
        Relative gap that separates degenerate eigenspaces.
    path : Path or str
        Named in errors.

    Returns
    -------
    Eigenmodes
    """
    n_vertices = len(vertices)
    if not 2 <= n_modes < n_vertices - 1:
        raise BHConfigError("geometry.n_modes", f"{n_modes} modes for {n_vertices} vertices",
                            f"choose 2 <= n_modes < {n_vertices - 1}")
    fem = lapy.Solver(lapy.TriaMesh(vertices, triangles), lump=False)
    stiffness, mass = fem.stiffness.tocsc(), fem.mass.tocsc()
    sigma = -1.0 / float(mass.sum())
    lu = splu((stiffness - sigma * mass).tocsc(), permc_spec="MMD_AT_PLUS_A",
              diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    shift_invert = LinearOperator(stiffness.shape, matvec=lu.solve, dtype=np.float64)
    start = np.random.default_rng(seed).uniform(-1.0, 1.0, n_vertices)
    # One extra pair tells whether mode n_modes shares an eigenspace with the next one.
    n_solve = n_modes + 1
    # BLAS on one thread: every sum (Lanczos, canonical basis, QC) then runs in one fixed
    # order whatever the core count, so the files are byte-identical.
    with threadpool_limits(limits=1, user_api="blas"):
        values, vectors = eigsh(stiffness, k=n_solve, M=mass, sigma=sigma, which="LM",
                                OPinv=shift_invert, v0=start)
        order = np.argsort(values, kind="stable")
        values, vectors = values[order], vectors[:, order]
        vectors, clusters = canonicalize_modes(eigenvalues=values, modes=vectors, mass=mass, solved=solved,
                                               rtol=rtol)
        first, stop = clusters[-1]
        if stop - first > 1 and first < n_modes:
            raise BHConfigError(
                "geometry.n_modes", f"mode {n_modes} lies inside a degenerate eigenspace (modes {first + 1}.."
                f"{stop} at least share one eigenvalue), so the cut after it would be arbitrary",
                f"use n_modes = {first}, or a larger value past this eigenspace",
            )
        values, vectors = values[:n_modes], np.ascontiguousarray(vectors[:, :n_modes])
        gram = vectors.T @ (mass @ vectors)                                              # (M, M)
        orth_error = float(np.abs(gram - np.eye(n_modes)).max())
        stiff_vectors = stiffness @ vectors                                              # (n, M)
        residual = stiff_vectors - (mass @ vectors) * values                            # (n, M)
        max_residual = float(np.max(np.linalg.norm(residual[:, 1:], axis=0)
                                    / np.linalg.norm(stiff_vectors[:, 1:], axis=0)))
    if orth_error > ORTHONORMALITY_ATOL or not np.isfinite(values).all():
        raise BHInputError(path, f"the eigensolver did not converge (orthonormality error {orth_error:.2e})",
                           "check the mesh quality (very thin or very small triangles)")
    return Eigenmodes(
        eigenvalues=values, modes=vectors,
        degenerate_clusters=[(a, b - a) for a, b in clusters if b - a > 1 and a < n_modes],
        orthonormality_error=orth_error, max_relative_residual=max_residual,
    )


def to_full_length(*, modes: np.ndarray, cortex: np.ndarray) -> np.ndarray:
    """Modes on all surface vertices: ``(n_vertices, M)``, zero on the medial wall."""
    full = np.zeros((len(cortex), modes.shape[1]), dtype=np.float64)  # (n_vertices, M)
    full[cortex] = modes
    return full


# --------------------------------------------------------------------------- parcels


def fslr32k_schaefer_labels() -> tuple[np.ndarray, np.ndarray]:
    """Schaefer-400 labels (7-network order) and cortex mask on fsLR-32k, left then right.

    Returns
    -------
    labels : ndarray, (2 * 32492,) int64; 0 = no parcel
    cortex : ndarray, (2 * 32492,) bool; the medial-wall masks of both hemispheres
    """
    folder = data_dir() / "fslr32k"
    labels = pd.read_csv(folder / "schaefer_400_conte69.csv", header=None).to_numpy().ravel().astype(np.int64)
    cortex = np.concatenate([
        read_medial_wall_mask(folder / f"{_FSLR_FILES[h]}_mask.csv", FSLR32K_VERTICES) for h in HEMIS
    ])
    return labels, cortex


def parcel_means(*, modes: np.ndarray, labels: np.ndarray, cortex: np.ndarray) -> np.ndarray:
    """Mean of each mode over each parcel's cortex vertices.

    Parameters
    ----------
    modes : ndarray, (n_vertices, M)
    labels : ndarray, (n_vertices,) int, 1..400 (0 = none)
    cortex : ndarray, (n_vertices,) bool; only these vertices count

    Returns
    -------
    ndarray, (400, M); row ``i`` is parcel ``i + 1``.
    """
    use = cortex & (labels > 0)
    rows = labels[use] - 1
    counts = np.bincount(rows, minlength=N_PARCELS)
    if np.any(counts == 0):
        raise BHInputError("schaefer_400_conte69.csv", f"parcels without cortex vertices: "
                           f"{(np.flatnonzero(counts == 0) + 1).tolist()}", "restore the packaged labels")
    average = sparse.csr_matrix(
        (1.0 / counts[rows], (rows, np.flatnonzero(use))), shape=(N_PARCELS, len(labels))
    )  # (400, n_vertices), each row sums to 1
    return np.asarray(average @ modes)


def mode_columns(n_modes: int) -> list[str]:
    """Column names ``mode_001`` .. of the embedding TSV (1-based, zero-padded)."""
    width = max(3, len(str(n_modes)))
    return [f"mode_{i:0{width}d}" for i in range(1, n_modes + 1)]


def read_embedding(*, path: Path) -> tuple[list[str], np.ndarray]:
    """ROI names and the ``(400, M)`` matrix of a parcel embedding TSV."""
    table = pd.read_csv(path, sep="\t")
    return table["name"].tolist(), table.drop(columns="name").to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------- file writing


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_tsv(path: Path, table: pd.DataFrame, float_format: str) -> None:
    atomic_write_text(path, table.to_csv(sep="\t", index=False, float_format=float_format, lineterminator="\n"))


def _density(surface: str) -> str:
    return {"fsLR32k": "32k", "fsaverage5": "10k"}[surface]


# --------------------------------------------------------------------------- step functions


def compute_eigenmodes(
    *,
    out_eigenvalues: Path,
    out_eigenmodes: Path,
    surface: str = "fsLR32k",
    hemi: str = "L",
    n_modes: int = 200,
    surface_file: Path | None = None,
    medial_wall_file: Path | None = None,
    seed: int = 0,
    threads: int = 1,
) -> dict:
    """Laplace-Beltrami eigenmodes of one hemisphere (step function).

    Parameters
    ----------
    out_eigenvalues : Path
        TSV with columns ``mode`` (1..M) and ``eigenvalue`` (mm^-2), + JSON sidecar.
    out_eigenmodes : Path
        ``.npy`` float64 ``(n_vertices, M)``: mode ``j`` in column ``j - 1``,
        mass-orthonormal on the cortex, zero on the medial wall; + JSON sidecar.
    surface : {"fsLR32k", "fsaverage5"}
        Population-average surface (config ``geometry.surface``).
    hemi : {"L", "R"}
    n_modes : int
        Modes per hemisphere, the constant mode included (config ``geometry.n_modes``).
    surface_file, medial_wall_file : Path, optional
        Own closed surface and 0/1 cortex CSV instead of the packaged ones.
    seed : int
        Seed of the eigensolver's start vector.
    threads : int
        Accepted for the runner; the solve is sequential (see :func:`solve_eigenmodes`).

    Returns
    -------
    dict
        ``n_vertices``, ``n_cortex_vertices``, ``first_eigenvalues``, ``orthonormality_error``.
    """
    out_eigenvalues, out_eigenmodes = Path(out_eigenvalues), Path(out_eigenmodes)
    mesh = load_hemisphere(surface=surface, hemi=hemi, surface_file=surface_file, medial_wall_file=medial_wall_file)
    if mesh.medial_wall_removed:
        vertices, triangles = remove_medial_wall(
            vertices=mesh.vertices, triangles=mesh.triangles, cortex=mesh.cortex,
            path=medial_wall_file or f"{_FSLR_FILES[hemi]}_mask.csv",
        )
    else:
        vertices, triangles = mesh.vertices, mesh.triangles
    result = solve_eigenmodes(vertices=vertices, triangles=triangles, n_modes=n_modes, solved=mesh.cortex,
                              seed=seed, path=surface_file or surface)
    full = to_full_length(modes=result.modes, cortex=mesh.cortex)   # (n_vertices, M)
    _save_npy(out_eigenmodes, full)
    _write_tsv(out_eigenvalues, pd.DataFrame({"mode": np.arange(1, n_modes + 1), "eigenvalue": result.eigenvalues}),
               float_format="%.10g")
    common = {
        "Surface": surface,
        "Density": _density(surface),
        "Hemisphere": hemi,
        "NumberOfModes": n_modes,
        "Sources": mesh.sources,
        "MedialWallRemoved": mesh.medial_wall_removed,
        "Software": f"LaPy {lapy.__version__} (linear FEM), SciPy ARPACK shift-invert Lanczos",
    }
    if not mesh.medial_wall_removed:
        common["MedialWallNote"] = (
            "no medial-wall mask is available for this surface offline: the modes were solved "
            "on the whole closed hemisphere, and no Schaefer-400 projection exists for it"
        )
    write_json(sidecar_path(out_eigenvalues), {
        **common,
        "mode": {"Description": "1-based mode number; mode 1 is the constant mode"},
        "eigenvalue": {"Description": "Laplace-Beltrami eigenvalue", "Units": "mm^-2"},
    })
    write_json(sidecar_path(out_eigenmodes), {
        **common,
        "Shape": list(full.shape),
        "Layout": "rows = surface vertices in file order, columns = modes 1..M",
        "NumberOfVertices": int(full.shape[0]),
        "NumberOfCortexVertices": int(mesh.cortex.sum()),
        "Normalization": "mass-orthonormal on the solved mesh (Phi.T M Phi = I, M = FEM mass matrix in mm^2)",
        "SignConvention": (
            f"canonical sign and degenerate-eigenspace basis: QR of Phi_c.T M P with positive diagonal; "
            f"probes P = 1 + N(0, 1), drawn column by column by numpy default_rng({PROBE_SEED}) over all "
            f"vertices of the surface file, restricted to the solved ones; eigenspaces = runs of "
            f"eigenvalues with relative gaps <= {DEGENERACY_RTOL:g}"
        ),
        "DegenerateEigenspaces": [{"FirstMode": a + 1, "Dimension": d} for a, d in result.degenerate_clusters],
        "Repairs": mesh.repairs,
        "OrthonormalityError": result.orthonormality_error,
        "MaxRelativeResidual": result.max_relative_residual,
        "Seed": seed,
    })
    return {
        "n_vertices": int(full.shape[0]),
        "n_cortex_vertices": int(mesh.cortex.sum()),
        "first_eigenvalues": result.eigenvalues[:5].tolist(),
        "orthonormality_error": result.orthonormality_error,
    }


def _read_hemisphere_modes(path: Path, hemi: str) -> tuple[np.ndarray, dict]:
    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.is_file() or not meta_path.is_file():
        raise BHInputError(path, "eigenmodes file or its JSON sidecar not found", "run compute_eigenmodes first")
    meta = read_json(meta_path)
    if meta.get("Hemisphere") != hemi:
        raise BHInputError(path, f"sidecar says hemisphere {meta.get('Hemisphere')!r}, expected {hemi!r}",
                           "pass the left modes as eigenmodes_lh and the right as eigenmodes_rh")
    return np.load(path, allow_pickle=False), meta


def project_eigenmodes(
    *,
    eigenmodes_lh: Path,
    eigenmodes_rh: Path,
    out_matrix: Path,
    out_figure: Path,
    networks: int = 7,
    threads: int = 1,
) -> dict:
    """Average the eigenmodes within the Schaefer-400 parcels (step function).

    Parameters
    ----------
    eigenmodes_lh, eigenmodes_rh : Path
        Outputs of :func:`compute_eigenmodes` for hemispheres L and R (fsLR-32k).
    out_matrix : Path
        TSV, 400 rows in the order of ``templates.atlas_labels(networks)``:
        column ``name`` (ROI name) then ``mode_001`` .. ``mode_M``; + JSON sidecar.
    out_figure : Path
        PNG heatmap of the matrix (QC).
    networks : {7, 17}
        Schaefer-400 ordering (config ``atlas.networks``).
    threads : int
        Accepted for the runner (the projection is one sparse product).

    Returns
    -------
    dict
        ``n_modes`` and ``networks``.
    """
    from bh_models.geometry.qc import plot_parcel_matrix

    table = atlas_labels(networks)
    modes_lh, meta_lh = _read_hemisphere_modes(eigenmodes_lh, "L")
    modes_rh, meta_rh = _read_hemisphere_modes(eigenmodes_rh, "R")
    for meta, path in ((meta_lh, eigenmodes_lh), (meta_rh, eigenmodes_rh)):
        if meta.get("Surface") != "fsLR32k" or not meta.get("MedialWallRemoved"):
            raise BHConfigError(
                "geometry.surface", f"{Path(path).name}: Schaefer-400 vertex labels exist only for fsLR-32k "
                f"with its medial wall removed (these modes: {meta.get('Surface')})",
                "use geometry.surface: fsLR32k for the parcel embedding",
            )
    if modes_lh.shape[0] != FSLR32K_VERTICES or modes_lh.shape != modes_rh.shape:
        raise BHInputError(eigenmodes_rh, f"shapes {modes_lh.shape} and {modes_rh.shape} do not pair up",
                           f"compute both hemispheres on fsLR-32k ({FSLR32K_VERTICES} vertices) with the same n_modes")
    labels, cortex = fslr32k_schaefer_labels()
    modes = np.concatenate([modes_lh, modes_rh])                         # (2 * 32492, M)
    if np.any(modes[~cortex] != 0):
        raise BHInputError(eigenmodes_lh, "modes are non-zero on the packaged medial wall",
                           "compute the modes with the packaged fsLR-32k medial-wall masks")
    matrix7 = parcel_means(modes=modes, labels=labels, cortex=cortex)  # (400, M), 7-network order
    if networks == 7:
        matrix = matrix7
    else:
        matrix = np.empty_like(matrix7)
        matrix[schaefer_7_to_17() - 1] = matrix7                        # (400, M), 17-network order
    n_modes = matrix.shape[1]
    out = pd.DataFrame(matrix, columns=mode_columns(n_modes))
    out.insert(0, "name", table["name"].to_numpy())
    out_matrix = Path(out_matrix)
    _write_tsv(out_matrix, out, float_format="%.8g")
    write_json(sidecar_path(out_matrix), {
        "Atlas": "Schaefer2018",
        "Parcels": N_PARCELS,
        "Networks": networks,
        "Surface": "fsLR32k",
        "NumberOfModes": n_modes,
        "Rows": f"ROIs in the order of the Schaefer-400 {networks}-network label table",
        "Columns": "name, then mode_001..: mean of each eigenmode over the parcel's cortex vertices",
        "VertexLabels": "schaefer_400_conte69.csv (7-network order, BrainSpace)",
        "NetworkOrder": (
            "7-network order as labelled" if networks == 7 else
            "rows permuted from the 7-network order by the parcel correspondence of the CBIG "
            "7- and 17-network volumes (same 400 parcels, checked voxel by voxel)"
        ),
        "Sources": {**meta_lh["Sources"], **meta_rh["Sources"]},
    })
    plot_parcel_matrix(matrix=matrix, names=table["name"].tolist(), out_png=Path(out_figure))
    return {"n_modes": n_modes, "networks": networks}


def plot_eigenmodes(
    *,
    eigenmodes_lh: Path,
    eigenmodes_rh: Path,
    out_figure: Path,
    modes: Sequence[int] = (2, 3, 4),
    threads: int = 1,
) -> dict:
    """Render the first non-constant modes on both hemispheres (QC step function).

    Kept apart from :func:`compute_eigenmodes` because drawing four views of
    ~65,000 triangles per mode with matplotlib takes longer than the solve.

    Parameters
    ----------
    eigenmodes_lh, eigenmodes_rh : Path
        Outputs of :func:`compute_eigenmodes`; their sidecars name the surface.
    out_figure : Path
        PNG: one row per mode, lateral and medial views of each hemisphere.
    modes : sequence of int
        1-based mode numbers to draw.
    threads : int
        Accepted for the runner.

    Returns
    -------
    dict
        ``modes`` drawn.
    """
    from bh_models.geometry.qc import plot_modes_on_surface

    meshes, values = {}, {}
    for hemi, path in (("L", eigenmodes_lh), ("R", eigenmodes_rh)):
        array, meta = _read_hemisphere_modes(path, hemi)
        if any(not 1 <= m <= array.shape[1] for m in modes):
            raise BHConfigError("geometry.qc_modes", f"modes {list(modes)} outside 1..{array.shape[1]}",
                                "choose mode numbers within n_modes")
        mesh = load_hemisphere(surface=meta["Surface"], hemi=hemi)
        if len(mesh.vertices) != array.shape[0]:
            raise BHInputError(path, f"{array.shape[0]} rows but the packaged {meta['Surface']} surface has "
                               f"{len(mesh.vertices)} vertices", "plot modes computed on a packaged surface")
        meshes[hemi] = (mesh.vertices, mesh.triangles)
        values[hemi] = array[:, [m - 1 for m in modes]]   # (n_vertices, len(modes))
    plot_modes_on_surface(meshes=meshes, values=values, mode_numbers=list(modes), out_png=Path(out_figure))
    return {"modes": list(modes)}


def geometry_description(*, out_description: Path, threads: int = 1) -> dict:
    """Step function: the ``dataset_description.json`` of the ``bh-geometry`` derivative dataset.

    Its sources are the reference files shipped in ``bh_models/data``: the
    fsLR-32k midthickness surfaces (Conte69, as distributed by BrainSpace) and
    the Schaefer-400 parcellation (CBIG).
    """
    del threads
    from bh_models import __version__
    from bh_models.core.provenance import code_url, write_dataset_description

    write_dataset_description(
        path=Path(out_description), name="bh-geometry", pipeline_version=__version__, code_url=code_url(),
        source_datasets=["doi:10.1038/s42003-020-0794-7", "doi:10.1093/cercor/bhx179"],
        description="Laplace-Beltrami eigenmodes of the fsLR-32k midthickness (LaPy) and their "
                    "Schaefer-400 parcel averages",
    )
    return {"dataset": "bh-geometry"}
