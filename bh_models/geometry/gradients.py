"""Functional gradients of the pretraining cohort: the second half of harmonix-F's ROI positions.

The authors' positional embedding mixes the geometric eigenmodes with 30
*functional gradients* per ROI (``gradient_mapping_400.csv`` of the release).
Here they are computed from the pretraining cohort itself, from its training split
only (validation and test subjects never shape the model's inputs):

1. per run, the Pearson correlation matrix of the cleaned Schaefer-400 series;
   Fisher z, averaged over a subject's runs, then over the training subjects, and
   back-transformed (``tanh``): the cohort's mean functional connectivity;
2. diffusion-map embedding with BrainSpace's ``GradientMaps`` (Vos de Wael et al.
   2020) with the settings of Margulies et al. 2016: each row keeps its 10 %
   strongest connections (sparsity 0.9), normalised-angle affinity, diffusion maps
   (alpha 0.5), ``n_components`` gradients;
3. Procrustes alignment (BrainSpace, one fixed reference) to the **reference
   gradients** shipped in ``bh_models/data/fslr32k/schaefer_400_reference_gradients.tsv``:
   the same embedding of the HCP group-average connectivity shipped beside it
   (``schaefer_400_mean_connectivity_matrix.csv``, 7-network order), each gradient
   signed so that its largest-magnitude entry is positive. The alignment is an
   orthogonal rotation onto the reference, so a gradient's sign and rank are the
   same in every run and every cohort; the reference rows are reordered to the
   configured network order first.

The table is written in the configured network order (``atlas.networks``), one row
per ROI: ``name``, ``gradient_01`` .. ``gradient_<n>`` (raw values, as the release
uses its table), with a JSON sidecar, and the first three gradients are drawn on
the fsLR-32k surface (QC).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import atomic_write_text, sidecar_path, write_json
from bh_models.core.storeformat import read_timeseries
from bh_models.core.templates import atlas_labels, data_dir, parcel_order

__desc__ = (
    "Functional gradients were computed from the mean functional connectivity of the pretraining "
    "cohort's training subjects (Fisher-z average of the runs' Pearson correlations) by diffusion-map "
    "embedding with BrainSpace (Vos de Wael et al. 2020; normalised-angle affinity of the 10 % "
    "strongest connections per region, Margulies et al. 2016), {n_components} components, aligned "
    "by Procrustes rotation to reference gradients of the HCP group-average connectivity."
)

REFERENCE_FILE = "schaefer_400_reference_gradients.tsv"
HCP_CONNECTIVITY_FILE = "schaefer_400_mean_connectivity_matrix.csv"
KERNELS = ("normalized_angle", "cosine", "pearson", "spearman", "gaussian")
#: Seed of the eigensolver's start vector (a file-format convention, like the eigenmodes' probes).
SOLVER_SEED = 0


def gradient_columns(n_components: int) -> list[str]:
    """``gradient_01`` .. (1-based, zero-padded)."""
    width = max(2, len(str(n_components)))
    return [f"gradient_{i:0{width}d}" for i in range(1, n_components + 1)]


def fix_signs(gradients: np.ndarray) -> np.ndarray:
    """Each column signed so that its largest-magnitude entry is positive."""
    peak = gradients[np.abs(gradients).argmax(axis=0), np.arange(gradients.shape[1])]
    return gradients * np.where(peak < 0, -1.0, 1.0)[None, :]


def diffusion_gradients(*, connectivity: np.ndarray, n_components: int, kernel: str = "normalized_angle",
                        sparsity: float = 0.9, reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BrainSpace diffusion-map gradients of a connectivity matrix, optionally Procrustes-aligned.

    Returns
    -------
    gradients : ndarray, (n_rois, n_components)
        Aligned to ``reference`` when given, else as the embedding returns them.
    lambdas : ndarray, (n_components,)
        Eigenvalues of the diffusion operator.
    """
    from brainspace.gradient import GradientMaps

    if kernel not in KERNELS:
        raise BHConfigError("geometry.gradients.kernel", f"unknown kernel {kernel!r}", f"use one of {KERNELS}")
    maps = GradientMaps(n_components=n_components, approach="dm", kernel=kernel,
                        alignment=None if reference is None else "procrustes", random_state=SOLVER_SEED)
    maps.fit(connectivity, sparsity=sparsity, reference=reference)
    gradients = np.asarray(maps.gradients_ if reference is None else maps.aligned_, dtype=np.float64)
    lambdas = np.asarray(maps.lambdas_, dtype=np.float64)
    if gradients.ndim == 3:  # a list of one aligned matrix (BrainSpace returns lists for list inputs)
        gradients, lambdas = gradients[0], lambdas.reshape(-1, n_components)[0]
    return gradients, lambdas


def hcp_reference_gradients(*, n_components: int = 30) -> np.ndarray:
    """The reference: HCP group connectivity (shipped) -> gradients with :func:`fix_signs`, 7-network order.

    This computes what ``schaefer_400_reference_gradients.tsv`` holds; the workflow reads
    the file, so the reference does not move with BrainSpace or ARPACK versions.
    """
    connectivity = pd.read_csv(data_dir() / "fslr32k" / HCP_CONNECTIVITY_FILE, header=None).to_numpy(np.float64)
    gradients, _ = diffusion_gradients(connectivity=connectivity, n_components=n_components)
    return fix_signs(gradients)


def write_reference_table(path: Path, *, n_components: int = 30) -> Path:
    """Write the shipped reference table (maintainers only; see :func:`hcp_reference_gradients`)."""
    table = pd.DataFrame(hcp_reference_gradients(n_components=n_components), columns=gradient_columns(n_components))
    table.insert(0, "name", atlas_labels(7)["name"].to_numpy())
    atomic_write_text(Path(path), table.to_csv(sep="\t", index=False, float_format="%.10g", lineterminator="\n"))
    return Path(path)


def reference_gradients(*, networks: int, n_components: int) -> np.ndarray:
    """The shipped reference gradients in the ``networks`` order: ``(400, n_components)``."""
    path = data_dir() / "fslr32k" / REFERENCE_FILE
    table = pd.read_csv(path, sep="\t")
    if n_components > table.shape[1] - 1:
        raise BHConfigError("geometry.gradients.n_components", f"{n_components} > the {table.shape[1] - 1} "
                            "reference gradients shipped", f"use at most {table.shape[1] - 1}")
    values = table.iloc[:, 1: 1 + n_components].to_numpy(np.float64)  # (400, n), 7-network order
    return values[parcel_order(source=7, target=networks)]


def _run_identity(path: Path) -> tuple[str, str]:
    """(dataset, subject) of a derivative run ``<...>/<dataset>/sub-<label>/func/<file>``."""
    path = Path(path)
    subject = path.name.split("_")[0]
    if not subject.startswith("sub-") or len(path.parts) < 4:
        raise BHInputError(path, "is not a <dataset>/sub-<label>/func/ derivative of the functional stage",
                           "pass the func_preprocess time series")
    return path.parts[-4], subject.removeprefix("sub-")


def training_subjects(splits: Sequence[Path]) -> set[tuple[str, str]]:
    """(dataset, subject) pairs of the ``train`` split of the given split tables."""
    frames = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in splits]
    table = pd.concat(frames, ignore_index=True)
    if not {"dataset", "subject", "split"} <= set(table.columns):
        raise BHInputError(splits[0], "is not a split table (dataset, subject, split)", "rerun make_splits")
    train = table[table["split"] == "train"]
    return set(zip(train["dataset"], train["subject"]))


def mean_connectivity(*, timeseries: Sequence[Path], keep: set[tuple[str, str]], names: list[str]
                      ) -> tuple[np.ndarray, dict]:
    """Fisher-z mean of the runs' correlations, per subject then over subjects, back-transformed.

    Returns
    -------
    connectivity : ndarray, (n_rois, n_rois)
        Unit diagonal; a parcel constant in some run contributes 0 to that run's pairs.
    summary : dict
        ``subjects``, ``runs``, ``constant_parcel_runs``.
    """
    per_subject: dict[tuple[str, str], list[np.ndarray]] = {}
    constant = 0
    for path in sorted(map(Path, timeseries)):
        key = _run_identity(path)
        if key not in keep:
            continue
        columns, values = read_timeseries(path)
        if columns != names:
            raise BHInputError(path, "ROI columns are not the configured Schaefer-400 order",
                               "extract every run with the configured atlas.networks")
        values = values.astype(np.float64)
        flat = values.std(axis=0) == 0
        constant += int(flat.any())
        with np.errstate(invalid="ignore", divide="ignore"):
            correlation = np.corrcoef(values, rowvar=False)  # (R, R)
        correlation[flat, :] = 0.0
        correlation[:, flat] = 0.0
        np.fill_diagonal(correlation, 0.0)
        per_subject.setdefault(key, []).append(np.arctanh(np.clip(correlation, -0.999999, 0.999999)))
    if not per_subject:
        raise BHInputError(timeseries[0] if timeseries else "timeseries", "no run of a training subject",
                           "check the pretraining datasets' splits and functional outputs")
    z = np.mean([np.mean(runs, axis=0) for _, runs in sorted(per_subject.items())], axis=0)
    connectivity = np.tanh(z)
    np.fill_diagonal(connectivity, 1.0)
    return connectivity, {"subjects": len(per_subject), "runs": sum(map(len, per_subject.values())),
                          "constant_parcel_runs": constant}


def vertex_values(*, table: np.ndarray, networks: int) -> dict[str, np.ndarray]:
    """Parcel values (configured order) painted on the fsLR-32k vertices: ``{"L": (32492, n), "R": ...}``."""
    from bh_models.geometry.eigenmodes import FSLR32K_VERTICES, fslr32k_schaefer_labels

    labels, cortex = fslr32k_schaefer_labels()  # 7-network labels, left then right
    seven = table[parcel_order(source=networks, target=7)]  # (400, n), 7-network order
    values = np.zeros((len(labels), table.shape[1]))
    inside = (labels > 0) & cortex
    values[inside] = seven[labels[inside] - 1]
    return {"L": values[:FSLR32K_VERTICES], "R": values[FSLR32K_VERTICES:]}


def compute_gradients(
    *,
    splits: Sequence[Path],
    timeseries: Sequence[Path],
    out_gradients: Path,
    out_figure: Path,
    networks: int = 17,
    n_components: int = 30,
    kernel: str = "normalized_angle",
    sparsity: float = 0.9,
    threads: int = 1,
) -> dict:
    """Step function: the pretraining cohort's functional gradients from its training split.

    Parameters
    ----------
    splits : sequence of Path
        Split tables of the pretraining datasets (``dataset``, ``subject``, ``split``).
    timeseries : sequence of Path
        Their cleaned parcel series (``<dataset>/sub-<label>/func/`` derivatives); only
        runs of ``train`` subjects are read.
    out_gradients : Path
        TSV, 400 rows in the ``networks`` order: ``name``, ``gradient_01`` ..; + JSON sidecar.
    out_figure : Path
        PNG: the first three gradients on the fsLR-32k surface.
    networks : {7, 17}
        Schaefer-400 order of the series and of the table (config ``atlas.networks``).
    n_components : int
        Gradients kept (config ``geometry.gradients.n_components``; the release: 30).
    kernel : str
        Affinity of the embedding (Margulies et al.: normalised angle).
    sparsity : float
        Share of each row's weakest connections set to zero before the affinity.
    threads : int
        Accepted for the runner.

    Returns
    -------
    dict
        ``subjects``, ``runs``, the aligned gradients' correlation with the reference (first three).
    """
    from threadpoolctl import threadpool_limits

    from bh_models.geometry.eigenmodes import load_hemisphere
    from bh_models.geometry.qc import plot_modes_on_surface

    del threads
    names = atlas_labels(networks)["name"].tolist()
    connectivity, summary = mean_connectivity(timeseries=timeseries, keep=training_subjects(splits), names=names)
    reference = reference_gradients(networks=networks, n_components=n_components)
    with threadpool_limits(limits=1):  # one BLAS thread: byte-identical gradients
        gradients, lambdas = diffusion_gradients(connectivity=connectivity, n_components=n_components,
                                                 kernel=kernel, sparsity=sparsity, reference=reference)
    match = [float(np.corrcoef(gradients[:, i], reference[:, i])[0, 1]) for i in range(n_components)]
    table = pd.DataFrame(gradients, columns=gradient_columns(n_components))
    table.insert(0, "name", names)
    out_gradients = Path(out_gradients)
    atomic_write_text(out_gradients, table.to_csv(sep="\t", index=False, float_format="%.8g", lineterminator="\n"))
    write_json(sidecar_path(out_gradients), {
        "Description": "functional gradients of the pretraining cohort's training split (harmonix-F positions)",
        "Atlas": "Schaefer2018", "Parcels": len(names), "Networks": networks,
        "Rows": f"ROIs in the order of the Schaefer-400 {networks}-network label table",
        "Columns": "name, then gradient_01..: diffusion-map gradients, Procrustes-aligned to the reference",
        "Connectivity": "Pearson correlation per run; Fisher z averaged over each subject's runs, then over "
                        "subjects; tanh",
        "Subjects": summary["subjects"], "Runs": summary["runs"],
        "RunsWithConstantParcels": summary["constant_parcel_runs"],
        "Embedding": {"software": "BrainSpace GradientMaps", "approach": "dm", "kernel": kernel,
                      "sparsity": sparsity, "n_components": n_components, "random_state": SOLVER_SEED},
        "Lambdas": lambdas.tolist(),
        "Alignment": {"method": "Procrustes rotation onto a fixed reference (BrainSpace)",
                      "reference": f"bh_models/data/fslr32k/{REFERENCE_FILE} (HCP group connectivity, "
                                   "same embedding, largest-magnitude entry positive), rows reordered to "
                                   f"the {networks}-network order",
                      "correlation_with_reference": match},
    })
    meshes = {}
    for hemi in ("L", "R"):
        mesh = load_hemisphere(surface="fsLR32k", hemi=hemi)
        meshes[hemi] = (mesh.vertices, mesh.triangles)
    shown = min(3, n_components)
    values = vertex_values(table=gradients[:, :shown], networks=networks)
    plot_modes_on_surface(meshes=meshes, values=values, mode_numbers=list(range(1, shown + 1)),
                          out_png=Path(out_figure), row_label="gradient",
                          title="Functional gradients of the pretraining cohort (red > 0 > blue; medial wall 0)")
    return {"subjects": summary["subjects"], "runs": summary["runs"], "reference_correlation": match[:3]}
