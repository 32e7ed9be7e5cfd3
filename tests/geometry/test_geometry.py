"""Tests of bh_models.geometry.eigenmodes and bh_models.geometry.qc.

Real solves on small inputs: an icosphere (2,562 vertices) for the analytic
spectrum, and the packaged fsLR-32k hemispheres with 20 modes (the full 200 are
in benchmarks/bench_geometry.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lapy
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bh_models.geometry import eigenmodes as geometry
from bh_models.core.templates import schaefer_7_to_17
from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.templates import atlas_labels, atlas_source_file

N_FSLR_MODES = 20
SPHERE_RADIUS = 10.0
SPHERE_MODES = 36  # l = 0..5: sum of (2l + 1)


# --------------------------------------------------------------------------- helpers


def icosphere(subdivisions: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Outward-wound icosphere: 10 * 4**s + 2 vertices on a sphere of ``radius``."""
    phi = (1 + 5**0.5) / 2
    vertices = np.array([
        (-1, phi, 0), (1, phi, 0), (-1, -phi, 0), (1, -phi, 0), (0, -1, phi), (0, 1, phi),
        (0, -1, -phi), (0, 1, -phi), (phi, 0, -1), (phi, 0, 1), (-phi, 0, -1), (-phi, 0, 1),
    ], dtype=float)
    faces = np.array([
        (0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4),
        (11, 10, 2), (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8),
        (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1),
    ])
    vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
    for _ in range(subdivisions):
        edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
        unique, inverse = np.unique(edges, axis=0, return_inverse=True)
        middle = vertices[unique].mean(axis=1)
        middle /= np.linalg.norm(middle, axis=1, keepdims=True)
        mid = inverse.reshape(3, -1).T + len(vertices)  # (n_faces, 3): midpoints of ab, bc, ca
        vertices = np.vstack([vertices, middle])
        a, b, c = faces.T
        ab, bc, ca = mid.T
        faces = np.vstack([np.c_[a, ab, ca], np.c_[b, bc, ab], np.c_[c, ca, bc], np.c_[ab, bc, ca]])
    return vertices * radius, faces


def write_gifti(path: Path, vertices: np.ndarray, triangles: np.ndarray) -> Path:
    image = nib.gifti.GiftiImage(darrays=[
        nib.gifti.GiftiDataArray(vertices.astype(np.float32), intent="NIFTI_INTENT_POINTSET"),
        nib.gifti.GiftiDataArray(triangles.astype(np.int32), intent="NIFTI_INTENT_TRIANGLE"),
    ])
    nib.save(image, path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mass_matrix(vertices: np.ndarray, triangles: np.ndarray):
    return lapy.Solver(lapy.TriaMesh(vertices, triangles)).mass


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sphere() -> tuple[np.ndarray, np.ndarray]:
    vertices, triangles = icosphere(4, SPHERE_RADIUS)
    assert len(vertices) >= 2500
    return vertices, triangles


@pytest.fixture(scope="module")
def sphere_modes(sphere) -> geometry.Eigenmodes:
    vertices, triangles = sphere
    return geometry.solve_eigenmodes(vertices=vertices, triangles=triangles, n_modes=SPHERE_MODES)


@pytest.fixture(scope="module")
def fslr(tmp_path_factory) -> dict[str, Path]:
    """Both fsLR-32k hemispheres (20 modes) and their 7- and 17-network embeddings."""
    out = tmp_path_factory.mktemp("geometry")
    files: dict[str, Path] = {"dir": out}
    for hemi in geometry.HEMIS:
        files[f"values_{hemi}"] = out / f"tpl-fsLR_den-32k_hemi-{hemi}_desc-LBO_eigenvalues.tsv"
        files[f"modes_{hemi}"] = out / f"tpl-fsLR_den-32k_hemi-{hemi}_desc-LBO_eigenmodes.npy"
        geometry.compute_eigenmodes(out_eigenvalues=files[f"values_{hemi}"], out_eigenmodes=files[f"modes_{hemi}"],
                                    surface="fsLR32k", hemi=hemi, n_modes=N_FSLR_MODES)
    for networks in (7, 17):
        stem = f"tpl-fsLR_den-32k_atlas-Schaefer2018_seg-{networks}n_scale-400_desc-LBO"
        files[f"matrix_{networks}"] = out / f"{stem}_embedding.tsv"
        files[f"figure_{networks}"] = out / f"{stem}_embedding.png"
        geometry.project_eigenmodes(eigenmodes_lh=files["modes_L"], eigenmodes_rh=files["modes_R"],
                                    out_matrix=files[f"matrix_{networks}"], out_figure=files[f"figure_{networks}"],
                                    networks=networks)
    return files


# --------------------------------------------------------------------------- sphere: analytic spectrum


def test_sphere_eigenvalues_match_spherical_harmonics(sphere_modes):
    """l(l+1)/R^2 within 2% for l <= 5, each with multiplicity 2l + 1."""
    values = sphere_modes.eigenvalues
    for degree in range(1, 6):
        expected = degree * (degree + 1) / SPHERE_RADIUS**2
        close = np.abs(values / expected - 1) <= 0.02
        assert close.sum() == 2 * degree + 1, (degree, values[close])
    # The shells come in order: mode index -> degree l.
    degrees = np.repeat(np.arange(6), [2 * d + 1 for d in range(6)])
    np.testing.assert_allclose(values[1:], degrees[1:] * (degrees[1:] + 1) / SPHERE_RADIUS**2, rtol=0.02)


def test_sphere_first_mode_is_zero_and_constant(sphere_modes):
    assert abs(sphere_modes.eigenvalues[0]) < 1e-8
    first = sphere_modes.modes[:, 0]
    assert first.min() > 0  # the sign convention makes the constant mode positive
    assert np.ptp(first) < 1e-8 * first.mean()


def test_sphere_modes_are_mass_orthonormal(sphere, sphere_modes):
    mass = mass_matrix(*sphere)
    gram = sphere_modes.modes.T @ (mass @ sphere_modes.modes)
    np.testing.assert_allclose(gram, np.eye(SPHERE_MODES), atol=1e-6)
    assert sphere_modes.orthonormality_error < 1e-6


def test_sphere_degenerate_eigenspaces_cover_each_shell(sphere_modes):
    """The icosphere keeps the symmetry's degeneracies (3, 5, 3+4, 4+5, 3+3+5 for l = 1..5)."""
    sizes = {first: size for first, size in sphere_modes.degenerate_clusters}
    assert sizes[1] == 3 and sizes[4] == 5
    shell_start = np.cumsum([0] + [2 * d + 1 for d in range(6)])
    for degree in range(1, 6):
        inside = [s for f, s in sizes.items() if shell_start[degree] <= f < shell_start[degree + 1]]
        assert sum(inside) == 2 * degree + 1


def test_canonical_basis_ignores_solver_rotation_and_sign(sphere, sphere_modes):
    """Any rotation inside an eigenspace and any sign flip map back to the same files."""
    mass = mass_matrix(*sphere)
    rng = np.random.default_rng(3)
    scrambled = sphere_modes.modes.copy()
    for first, size in sphere_modes.degenerate_clusters:
        rotation, _ = np.linalg.qr(rng.standard_normal((size, size)))
        scrambled[:, first:first + size] = scrambled[:, first:first + size] @ rotation
    scrambled *= rng.choice([-1.0, 1.0], size=SPHERE_MODES)
    again, _ = geometry.canonicalize_modes(eigenvalues=sphere_modes.eigenvalues, modes=scrambled, mass=mass)
    np.testing.assert_allclose(again, sphere_modes.modes, atol=1e-10)


def test_n_modes_inside_a_degenerate_eigenspace_is_refused(sphere):
    with pytest.raises(BHConfigError, match="degenerate eigenspace"):
        geometry.solve_eigenmodes(vertices=sphere[0], triangles=sphere[1], n_modes=3)  # cuts l = 1 (modes 2-4)


def test_sphere_step_outputs_are_byte_identical(tmp_path, sphere):
    """Two runs, even with different BLAS thread counts around them, write the same bytes."""
    from threadpoolctl import threadpool_limits

    surface = write_gifti(tmp_path / "sphere.gii", *sphere)
    digests = []
    for run, blas_threads in (("a", 1), ("b", 2)):
        values, modes = tmp_path / run / "eigenvalues.tsv", tmp_path / run / "eigenmodes.npy"
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            geometry.compute_eigenmodes(out_eigenvalues=values, out_eigenmodes=modes, surface="fsLR32k", hemi="L",
                                        n_modes=SPHERE_MODES, surface_file=surface)
        files = [values, modes, values.with_suffix(".json"), modes.with_suffix(".json")]
        digests.append([digest(f) for f in files])
        assert str(tmp_path) not in modes.with_suffix(".json").read_text()  # no absolute paths
    assert digests[0] == digests[1]
    meta = json.loads((tmp_path / "a" / "eigenmodes.json").read_text())
    assert meta["MedialWallRemoved"] is False and meta["Sources"] == {"sphere.gii": digest(surface)}


# --------------------------------------------------------------------------- bad meshes


def test_surface_with_a_hole_is_rejected(sphere):
    with pytest.raises(BHInputError, match="hole"):
        geometry.check_closed_surface(vertices=sphere[0], triangles=sphere[1][1:], path="holey.gii")


def test_non_manifold_edge_is_rejected(sphere):
    vertices, triangles = sphere
    a, b, _ = triangles[0]
    fin = len(vertices)  # a third triangle on edge (a, b), pointing away from the surface
    vertices = np.vstack([vertices, vertices[a] * 1.2])
    triangles = np.vstack([triangles, [a, fin, b]])
    with pytest.raises(BHInputError, match="non-manifold edges"):
        geometry.check_closed_surface(vertices=vertices, triangles=triangles, path="fin.gii")


def test_one_flipped_triangle_is_rejected(sphere):
    triangles = sphere[1].copy()
    triangles[5] = triangles[5, ::-1]
    with pytest.raises(BHInputError, match="inconsistent triangle winding"):
        geometry.check_closed_surface(vertices=sphere[0], triangles=triangles, path="flip.gii")


def test_inward_winding_is_repaired_and_changes_nothing(sphere, sphere_modes):
    fixed, repairs = geometry.check_closed_surface(vertices=sphere[0], triangles=sphere[1][:, ::-1], path="inv.gii")
    assert repairs and "reversed" in repairs[0]
    np.testing.assert_array_equal(fixed, sphere[1])
    again = geometry.solve_eigenmodes(vertices=sphere[0], triangles=fixed, n_modes=SPHERE_MODES)
    np.testing.assert_array_equal(again.modes, sphere_modes.modes)


def test_two_pieces_and_zero_area_triangles_are_rejected(sphere):
    vertices, triangles = sphere
    two = (np.vstack([vertices, vertices + 50.0]), np.vstack([triangles, triangles + len(vertices)]))
    with pytest.raises(BHInputError, match="2 separate pieces"):
        geometry.check_closed_surface(vertices=two[0], triangles=two[1], path="two.gii")
    squashed = vertices.copy()
    a, b, c = triangles[0]
    squashed[c] = (squashed[a] + squashed[b]) / 2  # collinear corners: zero area
    with pytest.raises(BHInputError, match="zero-area"):
        geometry.check_closed_surface(vertices=squashed, triangles=triangles, path="flat.gii")


def test_bad_surface_file_error_names_the_file(tmp_path, sphere):
    surface = write_gifti(tmp_path / "holey.gii", sphere[0], sphere[1][1:])
    with pytest.raises(BHInputError, match="holey.gii.*hole"):
        geometry.compute_eigenmodes(out_eigenvalues=tmp_path / "v.tsv", out_eigenmodes=tmp_path / "m.npy",
                                    n_modes=5, surface_file=surface)
    assert not (tmp_path / "m.npy").exists()


def test_unknown_surface_and_hemisphere_are_config_errors(tmp_path):
    with pytest.raises(BHConfigError, match="geometry.surface"):
        geometry.load_hemisphere(surface="fsaverage", hemi="L")
    with pytest.raises(BHConfigError, match="geometry.hemi"):
        geometry.load_hemisphere(surface="fsLR32k", hemi="left")


# --------------------------------------------------------------------------- fsLR-32k


def test_fslr_medial_wall_cut_leaves_one_disk():
    mesh = geometry.load_hemisphere(surface="fsLR32k", hemi="L")
    assert mesh.medial_wall_removed and mesh.cortex.sum() == 29271
    vertices, triangles = geometry.remove_medial_wall(vertices=mesh.vertices, triangles=mesh.triangles,
                                                      cortex=mesh.cortex, path="mask")
    cut = lapy.TriaMesh(vertices, triangles)
    assert cut.connected_components()[0] == 1 and len(cut.boundary_loops()) == 1 and cut.euler() == 1


def test_fslr_modes_files(fslr):
    labels, cortex = geometry.fslr32k_schaefer_labels()
    for offset, hemi in ((0, "L"), (geometry.FSLR32K_VERTICES, "R")):
        modes = np.load(fslr[f"modes_{hemi}"])
        assert modes.shape == (geometry.FSLR32K_VERTICES, N_FSLR_MODES) and modes.dtype == np.float64
        on_cortex = cortex[offset:offset + geometry.FSLR32K_VERTICES]
        assert np.all(modes[~on_cortex] == 0)  # zeros on the medial wall
        first = modes[on_cortex, 0]
        assert first.min() > 0 and np.ptp(first) < 1e-8 * first.mean()
        mesh = geometry.load_hemisphere(surface="fsLR32k", hemi=hemi)
        cut = geometry.remove_medial_wall(vertices=mesh.vertices, triangles=mesh.triangles, cortex=mesh.cortex,
                                          path="mask")
        gram = modes[on_cortex].T @ (mass_matrix(*cut) @ modes[on_cortex])
        np.testing.assert_allclose(gram, np.eye(N_FSLR_MODES), atol=1e-6)
        values = pd.read_csv(fslr[f"values_{hemi}"], sep="\t")
        assert list(values.columns) == ["mode", "eigenvalue"] and values["mode"].tolist() == list(range(1, 21))
        assert abs(values["eigenvalue"].iloc[0]) < 1e-8 and values["eigenvalue"].is_monotonic_increasing
        meta = json.loads(fslr[f"modes_{hemi}"].with_suffix(".json").read_text())
        assert meta["Hemisphere"] == hemi and meta["MedialWallRemoved"] and meta["Repairs"] == []


def test_homologous_low_modes_share_their_sign_across_hemispheres(fslr):
    """fsLR vertex i is homologous between hemispheres, and so is the probe field that fixes the signs."""
    left, right = np.load(fslr["modes_L"]), np.load(fslr["modes_R"])
    both = np.all(left != 0, axis=1) & np.all(right != 0, axis=1)
    correlations = [np.corrcoef(left[both, k], right[both, k])[0, 1] for k in range(1, 7)]  # modes 2..7
    assert min(correlations) > 0.9, correlations


def test_fslr_step_is_byte_identical(fslr, tmp_path):
    values, modes = tmp_path / "values.tsv", tmp_path / "modes.npy"
    geometry.compute_eigenmodes(out_eigenvalues=values, out_eigenmodes=modes, surface="fsLR32k", hemi="L",
                                n_modes=N_FSLR_MODES)
    assert digest(modes) == digest(fslr["modes_L"])
    assert digest(values) == digest(fslr["values_L"])
    assert digest(modes.with_suffix(".json")) == digest(fslr["modes_L"].with_suffix(".json"))


def test_embedding_is_ordered_like_the_atlas_and_mode_1_is_constant_per_hemisphere(fslr):
    for networks in (7, 17):
        names, matrix = geometry.read_embedding(path=fslr[f"matrix_{networks}"])
        assert names == atlas_labels(networks)["name"].tolist()
        assert matrix.shape == (400, N_FSLR_MODES)
        header = pd.read_csv(fslr[f"matrix_{networks}"], sep="\t", nrows=0).columns.tolist()
        assert header == ["name"] + [f"mode_{i:03d}" for i in range(1, N_FSLR_MODES + 1)]
        left, right = matrix[:200, 0], matrix[200:, 0]
        assert np.ptp(left) < 1e-6 * left.mean() and np.ptp(right) < 1e-6 * right.mean()
        assert all(n.split("_")[1] == "LH" for n in names[:200]) and all(n.split("_")[1] == "RH" for n in names[200:])


def test_17_network_embedding_is_the_7_network_one_reordered(fslr):
    _, matrix7 = geometry.read_embedding(path=fslr["matrix_7"])
    _, matrix17 = geometry.read_embedding(path=fslr["matrix_17"])
    mapping = schaefer_7_to_17()
    np.testing.assert_array_equal(matrix17[mapping - 1], matrix7)


def test_embedding_outputs_are_byte_identical(fslr, tmp_path):
    matrix, figure = tmp_path / "m.tsv", tmp_path / "m.png"
    geometry.project_eigenmodes(eigenmodes_lh=fslr["modes_L"], eigenmodes_rh=fslr["modes_R"], out_matrix=matrix,
                                out_figure=figure, networks=17)
    assert digest(matrix) == digest(fslr["matrix_17"]) and digest(figure) == digest(fslr["figure_17"])
    assert json.loads(matrix.with_suffix(".json").read_text())["Networks"] == 17


def test_swapped_hemispheres_are_rejected(fslr, tmp_path):
    with pytest.raises(BHInputError, match="hemisphere"):
        geometry.project_eigenmodes(eigenmodes_lh=fslr["modes_R"], eigenmodes_rh=fslr["modes_L"],
                                    out_matrix=tmp_path / "m.tsv", out_figure=tmp_path / "m.png")


# --------------------------------------------------------------------------- atlas orderings


def test_7_to_17_mapping_is_a_hemisphere_preserving_bijection():
    mapping = schaefer_7_to_17()
    assert sorted(mapping.tolist()) == list(range(1, 401))
    assert np.all((mapping <= 200) == (np.arange(1, 401) <= 200))


def test_fslr_vertex_labels_are_in_the_7_network_order():
    """fsLR vertices fall into the same-numbered parcel of the 7-network volume far more often than the 17."""
    from scipy import ndimage

    labels, _ = geometry.fslr32k_schaefer_labels()
    vertices = np.vstack([geometry.load_hemisphere(surface="fsLR32k", hemi=h).vertices for h in geometry.HEMIS])
    agreement = {}
    for networks in (7, 17):
        image = nib.load(atlas_source_file(networks, 2))
        volume = np.asarray(image.dataobj, dtype=np.int64)
        _, nearest = ndimage.distance_transform_edt(volume == 0, return_indices=True)
        filled = volume[tuple(nearest)]  # every voxel takes its nearest parcel's label
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(image.affine), vertices)).astype(int)
        sampled = filled[tuple(ijk.T)]
        agreement[networks] = float(np.mean(sampled[labels > 0] == labels[labels > 0]))
    assert agreement[7] > 0.6 and agreement[17] < 0.1, agreement


# --------------------------------------------------------------------------- fsaverage5


def test_fsaverage5_modes_without_medial_wall_and_no_projection(tmp_path):
    values, modes = tmp_path / "v.tsv", tmp_path / "m.npy"
    out = geometry.compute_eigenmodes(out_eigenvalues=values, out_eigenmodes=modes, surface="fsaverage5",
                                      hemi="L", n_modes=5)
    assert out["n_vertices"] == out["n_cortex_vertices"] == 10242
    meta = json.loads(modes.with_suffix(".json").read_text())
    assert meta["MedialWallRemoved"] is False and "no medial-wall mask" in meta["MedialWallNote"]
    assert set(meta["Sources"]) == {"white_left.gii.gz", "pial_left.gii.gz"}
    right = tmp_path / "r.npy"
    geometry.compute_eigenmodes(out_eigenvalues=tmp_path / "rv.tsv", out_eigenmodes=right, surface="fsaverage5",
                                hemi="R", n_modes=5)
    with pytest.raises(BHConfigError, match="only for fsLR-32k"):
        geometry.project_eigenmodes(eigenmodes_lh=modes, eigenmodes_rh=right, out_matrix=tmp_path / "x.tsv",
                                    out_figure=tmp_path / "x.png")


# --------------------------------------------------------------------------- QC figures


def test_surface_figure_is_byte_identical(tmp_path, sphere, sphere_modes):
    meshes = {"L": sphere, "R": sphere}
    values = {"L": sphere_modes.modes[:, 1:3], "R": sphere_modes.modes[:, 1:3]}
    from bh_models.geometry.qc import plot_modes_on_surface

    first = plot_modes_on_surface(meshes=meshes, values=values, mode_numbers=[2, 3], out_png=tmp_path / "a.png")
    second = plot_modes_on_surface(meshes=meshes, values=values, mode_numbers=[2, 3], out_png=tmp_path / "b.png")
    assert first.stat().st_size > 10_000 and digest(first) == digest(second)
    assert first.read_bytes().startswith(b"\x89PNG")


def test_plot_eigenmodes_step(fslr, tmp_path):
    out = geometry.plot_eigenmodes(eigenmodes_lh=fslr["modes_L"], eigenmodes_rh=fslr["modes_R"],
                                   out_figure=tmp_path / "modes.png", modes=[2])
    assert out == {"modes": [2]} and (tmp_path / "modes.png").stat().st_size > 10_000
    with pytest.raises(BHConfigError, match="qc_modes"):
        geometry.plot_eigenmodes(eigenmodes_lh=fslr["modes_L"], eigenmodes_rh=fslr["modes_R"],
                                 out_figure=tmp_path / "bad.png", modes=[N_FSLR_MODES + 1])
