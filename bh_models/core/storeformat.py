"""The files the store stage writes and the models stage reads: names, tables, parcel series, scaling.

One place for the on-disk formats both sides agree on, so neither imports the
other: the store's folder and file names, the samples/index tables
(``write_samples_table``/``read_samples_table``), BIDS entities of file names,
parcel time-series TSVs, T1 encoder tensors and their compact bf16 storage, and the robust-scaling statistics
(``scaling.json``) with their application.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import read_json

FMRI_DIR, T1_DIR = "fmri", "t1"
INDEX_FILE = "index.tsv"
SCALING_FILE = "scaling.json"
STORE_FORMAT = "bh-store-1"
DTYPE = np.dtype("<f4")  # fMRI shards, little-endian float32
#: T1 shards: bf16 stored as its 16 bits (numpy has no bfloat16): half the bytes of float32, and
#: exactly what bf16 autocast feeds the encoder (benchmarks/bench_t1_format.py measures the choice).
T1_DTYPE = np.dtype("<u2")
T1_ENCODING = "bfloat16-bits"
#: File names inside a dataset's fMRI store folder that scaling reads.
TEMPORAL_MEANS_FILE = "temporal_means.npy"
TEMPORAL_SDS_FILE = "temporal_sds.npy"
STORE_META_FILE = "index.json"

#: Columns of the samples table, in order.
SAMPLE_COLUMNS = (
    "sample_id", "dataset", "subject", "session", "task", "run", "source_file",
    "source_tr", "source_frames", "factor", "offset", "tr", "k", "n_frames",
    "n_patches", "max_patches", "padded_length", "cut",
)

#: BIDS entities that can tell two runs of a subject apart, in BIDS order (after ``sub``).
#: A derivative's own entities (space, atlas, seg, scale, desc, res) are not among them.
RUN_ENTITIES = ("ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part", "chunk")
_ENTITY = re.compile(r"(?:^|_)(sub|ses|task|acq|ce|rec|dir|run|echo|part|chunk)-([A-Za-z0-9]+)")


def parse_entities(name: str) -> dict[str, str]:
    """BIDS entities of a file name.

    Parameters
    ----------
    name : str
        A BIDS file name such as ``sub-01_ses-1_task-rest_dir-LR_run-2_..._timeseries.tsv``.

    Returns
    -------
    dict
        ``subject``, ``session``, ``task``, ``run``, ``acq`` and the other
        :data:`RUN_ENTITIES` by their BIDS keys (``ce``, ``rec``, ``dir``, ``echo``,
        ``part``, ``chunk``); empty string when absent.
    """
    found = dict(_ENTITY.findall(Path(name).name))
    out = {
        "subject": found.get("sub", ""),
        "session": found.get("ses", ""),
        "task": found.get("task", ""),
        "run": found.get("run", ""),
        "acq": found.get("acq", ""),
    }
    out.update({key: found.get(key, "") for key in ("ce", "rec", "dir", "echo", "part", "chunk")})
    return out


def run_label(name: str) -> str:
    """``ses-1_task-rest_dir-LR_run-2``: every entity of a file name that tells runs apart, in BIDS order."""
    ent = parse_entities(name)
    keys = {"ses": "session", "task": "task", "acq": "acq", "run": "run"}
    return "_".join(f"{key}-{ent[keys.get(key, key)]}" for key in RUN_ENTITIES if ent[keys.get(key, key)])


def write_samples_table(samples: pd.DataFrame, path: Path) -> None:
    """Write a samples/index table with fixed formatting (byte-stable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    samples.to_csv(tmp, sep="\t", index=False, float_format="%.10g", lineterminator="\n")
    tmp.replace(path)


def read_samples_table(path: Path) -> pd.DataFrame:
    """Read a table written by :func:`write_samples_table` with the right types.

    Identifiers stay strings (``sub-01`` keeps its leading zero); empty cells are
    empty strings, never NaN.
    """
    if not Path(path).is_file():
        raise BHInputError(path, "samples table is missing", "rerun the augment step of this dataset")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    for col in ("source_tr", "tr"):
        if col in table:
            table[col] = table[col].astype(float)
    for col in ("source_frames", "factor", "offset", "k", "n_frames", "n_patches", "max_patches",
                "padded_length", "row", "row_start"):
        if col in table:
            table[col] = table[col].astype(np.int64)
    if "cut" in table:
        table["cut"] = table["cut"].map({"True": True, "False": False}).astype(bool)
    return table


def read_roi_names(path: Path) -> list[str]:
    """ROI names (the header) of a parcel time-series TSV, without parsing the values."""
    return [str(c) for c in pd.read_csv(path, sep="\t", nrows=0).columns]


def read_timeseries(path: Path) -> tuple[list[str], np.ndarray]:
    """ROI names and float32 values (frames, n_rois) of a parcel time-series TSV."""
    table = pd.read_csv(path, sep="\t")
    values = table.to_numpy(dtype=np.float32)
    if not np.isfinite(values).all():
        raise BHInputError(path, "holds NaN or infinite values",
                           "rerun the functional stage; empty parcels must be written as 0")
    return [str(c) for c in table.columns], values


def t1_samples_table(*, t1_tensors: Sequence[Path], dataset: str) -> pd.DataFrame:
    """One row per T1 tensor: ``sample_id`` (``<dataset>_sub-<label>[_ses-..][_run-..]_T1w``),
    ``dataset``, ``subject``, ``session``, ``source_file``, sorted by file name."""
    paths = {Path(p).name: Path(p) for p in t1_tensors}
    rows = []
    for name in sorted(paths):
        ent = parse_entities(name)
        if not ent["subject"]:
            raise BHInputError(paths[name], "no sub-<label> in the file name", "use BIDS file names")
        parts = [f"sub-{ent['subject']}"] + ([f"ses-{ent['session']}"] if ent["session"] else [])
        parts += [f"run-{ent['run']}"] if ent["run"] else []
        rows.append({"sample_id": f"{dataset}_{'_'.join(parts)}_T1w", "dataset": dataset,
                     "subject": ent["subject"], "session": ent["session"], "source_file": name})
    table = pd.DataFrame(rows, columns=["sample_id", "dataset", "subject", "session", "source_file"])
    if table["sample_id"].duplicated().any():
        raise BHInputError(table.loc[table["sample_id"].duplicated(), "source_file"].iloc[0],
                           "two T1 tensors of one subject and session", "keep one tensor per subject and session")
    return table


def t1_shape(path: Path) -> tuple[int, ...]:
    try:
        header = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise BHInputError(path, f"not a readable .npy file ({err})", "rerun the anatomical stage") from err
    if header.dtype != np.float32 or not header.flags.c_contiguous or header.ndim != 3:
        raise BHInputError(path, f"is {header.dtype} {header.shape}, not a float32 C-order 3D tensor",
                           "rerun the anatomical stage (it writes float32 C-order tensors)")
    return tuple(int(s) for s in header.shape)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 as uint16 bits, rounded to nearest even (as ``torch.Tensor.to(torch.bfloat16)``).

    Parameters
    ----------
    values : numpy.ndarray
        Finite values (converted to float32 first).

    Returns
    -------
    numpy.ndarray
        uint16, same shape.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)  # ties to even
    return ((bits + rounding) >> 16).astype(np.uint16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits -> float32 (exact: bf16 is float32 with the low 16 mantissa bits zero)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_index(*, folders: Sequence[Path], split: str | None = None) -> pd.DataFrame:
    """Index rows of the given dataset folders of one modality (``<store>/fmri/<dataset>`` ...),
    optionally of one split. Only the folders named are read: a folder left by a dataset
    that no longer pretrains is never picked up.
    """
    tables = []
    for folder in sorted(map(Path, folders)):
        path = folder / INDEX_FILE
        if not path.is_file():
            raise BHInputError(folder, f"no {INDEX_FILE}: not a packed dataset folder", "rerun its packing step")
        table = read_samples_table(path)
        table["shard_path"] = [str(path.parent / s) for s in table["shard"]]
        tables.append(table if split is None else table[table["split"] == split])
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["sample_id", "dataset", "subject", "session", "split", "shard", "shard_path"])


@dataclass(frozen=True)
class RobustScaling:
    """Per-ROI statistics: ``rois`` (names), ``median`` and ``iqr`` (float32, one per ROI)."""

    rois: tuple[str, ...]
    median: np.ndarray
    iqr: np.ndarray

    def apply_frames(self, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scale ``frames`` of shape (n_frames, n_rois), in float32 (the loader's hot path).

        The store's row-major (frames, ROIs) layout keeps this a contiguous
        broadcast; float32 throughout is ~10x cheaper than a float64 round trip.
        ``out`` (float32, same shape, may be a strided view) receives the result
        without temporaries.
        """
        median = self.median.astype(np.float32, copy=False)
        iqr = self.iqr.astype(np.float32, copy=False)
        out = np.subtract(np.asarray(frames, dtype=np.float32), median, out=out)
        return np.divide(out, iqr, out=out)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scale ``x`` of shape (n_rois, n_frames); returns float32 (same values as :meth:`apply_frames`)."""
        return self.apply_frames(np.asarray(x).T).T


def load_scaling(path: Path) -> RobustScaling:
    """Read statistics written by :func:`compute_scaling` (or stored in a checkpoint)."""
    if not Path(path).is_file():
        raise BHInputError(path, "robust-scaling statistics are missing",
                           "run compute_scaling on the store, or pass scale=False to read raw values")
    obj = read_json(path)
    return RobustScaling(rois=tuple(obj["rois"]), median=np.asarray(obj["median"], dtype=np.float32),
                         iqr=np.asarray(obj["iqr"], dtype=np.float32))
