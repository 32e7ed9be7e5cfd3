"""The packed training store: a few large shards per dataset plus an index.

Layout (``store_dir``)::

    splits/<dataset>.tsv                    subject -> split (bh_models.store.splits)
    fmri/<dataset>/shard-<split>-00000.npy  float32 (frames, n_rois): samples back to back
    fmri/<dataset>/index.tsv                one row per sample: plan, split, shard, row_start
    fmri/<dataset>/index.json               ROI names, max_patches, shard list
    fmri/<dataset>/temporal_means.npy       float64 (n_samples, n_rois), for the scaling fit
    fmri/<dataset>/temporal_sds.npy         float64 (n_samples, n_rois), likewise
    t1/<dataset>/shard-<split>-00000.npy    float32 (n, X, Y, Z)
    t1/<dataset>/index.tsv, index.json
    scaling.json, scaling.tsv               robust-scaling statistics (bh_models.store.scaling)

Why raw ``.npy`` shards read through ``numpy.memmap``: measured in
``benchmarks/bench_store.py`` against HDF5 and one file per sample, a memmap
slice costs microseconds with no per-read library overhead, it shares the page
cache across DataLoader workers, and the header is fixed so a rerun writes the
same bytes. Only real frames are stored; padding is added when reading.

Each dataset lives in its own folder and is written by its own call, so adding
a dataset never rewrites another dataset's shards. Samples are ordered by
split, so a split's shards are contiguous and can be copied alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from bh_models.store.augment import parse_entities, read_samples_table, write_samples_table
from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import read_json, write_json
from bh_models.store.scaling import STORE_META_FILE, TEMPORAL_MEANS_FILE, TEMPORAL_SDS_FILE, RobustScaling, load_scaling
from bh_models.store.splits import read_splits, split_of

__desc__ = (
    "Samples were packed into float32 shards of at most {shard_size_mb} MB per "
    "dataset and split, with an index table, and T1 tensors were packed the same "
    "way and paired with fMRI samples by subject."
)

FMRI_DIR, T1_DIR = "fmri", "t1"
INDEX_FILE = "index.tsv"
SCALING_FILE = "scaling.json"
STORE_FORMAT = "bh-store-1"
_DTYPE = np.dtype("<f4")


# --------------------------------------------------------------------------- packing helpers

def plan_shards(*, splits: Sequence[str], sizes: Sequence[int], shard_size: int) -> tuple[list[str], list[int]]:
    """Assign consecutive items to shards.

    Parameters
    ----------
    splits : sequence of str
        Split of each item; items must be grouped by split (a shard holds one split).
    sizes : sequence of int
        Rows of each item.
    shard_size : int
        Rows per shard at most (a larger item gets a shard of its own).

    Returns
    -------
    shards : list of str
        Shard file name of each item (``shard-<split>-00000.npy``).
    starts : list of int
        First row of each item inside its shard.
    """
    shards, starts = [], []
    current, used, number = None, 0, -1
    for split, size in zip(splits, sizes):
        if split != current:
            current, used, number = split, 0, 0
        elif used + size > shard_size and used > 0:
            used, number = 0, number + 1
        shards.append(f"shard-{split}-{number:05d}.npy")
        starts.append(used)
        used += size
    return shards, starts


def _open_shards(out_dir: Path, shards: Sequence[str], rows: Sequence[int], item_shape: tuple[int, ...]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".shard-*.npy.tmp"):  # from a killed run
        leftover.unlink()
    totals = pd.Series(np.asarray(rows, dtype=np.int64)).groupby(np.asarray(shards, dtype=object)).sum()
    # open_memmap writes the fixed .npy v1.0 header: same shape, same bytes.
    return {name: np.lib.format.open_memmap(out_dir / f".{name}.tmp", mode="w+", dtype=_DTYPE,
                                            shape=(int(total), *item_shape))
            for name, total in totals.items()}


def _commit_shards(out_dir: Path, maps: dict) -> list[str]:
    names = sorted(maps)
    for name in names:
        maps.pop(name).flush()
        os.replace(out_dir / f".{name}.tmp", out_dir / name)
    for stale in out_dir.glob("shard-*.npy"):
        if stale.name not in names:
            stale.unlink()
    return names


def _discard_shards(out_dir: Path, maps: dict) -> None:
    # A failed pack leaves no half-written shard behind.
    for name in list(maps):
        del maps[name]
        (out_dir / f".{name}.tmp").unlink(missing_ok=True)


def _order_by_split(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(["split", "sample_id"], kind="stable").reset_index(drop=True)


def _shard_rows(shard_size_mb: float, row_bytes: int) -> int:
    if not shard_size_mb > 0:
        raise BHConfigError("store.shard_size_mb", f"{shard_size_mb} is not positive", "set e.g. 1024")
    return max(1, int(shard_size_mb * 2**20 // row_bytes))


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


# --------------------------------------------------------------------------- step functions

def pack_fmri(
    *,
    samples: Path,
    timeseries: Sequence[Path],
    splits: Path,
    out_dir: Path,
    shard_size_mb: float = 1024,
    threads: int = 1,
) -> dict:
    """Step function: pack one dataset's fMRI samples into shards.

    Parameters
    ----------
    samples : Path
        Samples table of the dataset (:func:`bh_models.store.augment.make_samples`).
    timeseries : list of Path
        The parcel time-series TSVs it was made from (matched by file name).
    splits : Path
        Split table of the dataset (:func:`bh_models.store.splits.make_splits`).
    out_dir : Path
        ``<store>/fmri/<dataset>``; receives the shards, ``index.tsv``,
        ``index.json``, ``temporal_means.npy`` and ``temporal_sds.npy``. Other
        datasets are not touched.
    shard_size_mb : float
        Shard size in MiB at most (config ``store.shard_size_mb``).
    threads : int
        Threads parsing TSVs.

    Returns
    -------
    dict
        ``n_samples``, ``n_shards``, ``n_bytes``.
    """
    out_dir = Path(out_dir)
    table = read_samples_table(Path(samples))
    datasets = sorted(set(table["dataset"]))
    if len(datasets) != 1:
        raise BHInputError(samples, f"holds {len(datasets)} datasets", "pack one dataset's samples table per call")
    dataset = datasets[0]
    table["split"] = split_of(splits=read_splits([Path(splits)]), dataset=dataset,
                              subjects=table["subject"], source=Path(splits))
    table = _order_by_split(table)
    sources = {Path(p).name: Path(p) for p in timeseries}
    missing = sorted(set(table["source_file"]) - set(sources))
    if missing:
        raise BHInputError(samples, f"source {missing[0]} is not among the time series passed",
                           "pass every time series the samples table was made from")
    rois = read_roi_names(sources[table["source_file"].iloc[0]]) if len(table) else []
    table["shard"], table["row_start"] = plan_shards(
        splits=table["split"], sizes=table["n_frames"], shard_size=_shard_rows(shard_size_mb, 4 * max(1, len(rois))))
    maps = _open_shards(out_dir, table["shard"], table["n_frames"], (len(rois),))
    # On disk, not in memory: 160,000 UK Biobank samples x 400 ROIs is 0.5 GB.
    stats_tmp = {name: out_dir / f".{name}.tmp" for name in (TEMPORAL_MEANS_FILE, TEMPORAL_SDS_FILE)}
    means, sds = (np.lib.format.open_memmap(tmp, mode="w+", dtype="<f8", shape=(len(table), len(rois)))
                  for tmp in stats_tmp.values())

    def pack_source(item: tuple[str, pd.DataFrame]) -> None:
        source_file, rows = item
        names, values = read_timeseries(sources[source_file])
        if names != rois:
            raise BHInputError(sources[source_file], "ROI columns differ from the dataset's other runs",
                               "extract every run with the same atlas")
        if len(values) != rows["source_frames"].iloc[0]:
            raise BHInputError(sources[source_file], f"{len(values)} rows but the sidecar says "
                               f"{rows['source_frames'].iloc[0]}", "rerun the functional stage for this run")
        for i, row in rows.iterrows():
            variant = values[row["offset"]::row["factor"]][: row["n_frames"]]  # (n_frames, n_rois)
            maps[row["shard"]][row["row_start"]: row["row_start"] + row["n_frames"]] = variant
            means[i] = variant.mean(axis=0, dtype=np.float64)
            sds[i] = variant.std(axis=0, dtype=np.float64)

    groups = list(table.groupby("source_file", sort=True))
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for _ in tqdm(pool.map(pack_source, groups), total=len(groups), desc=f"pack fMRI {dataset}",
                          unit="run", disable=None):
                pass
    except BaseException:
        _discard_shards(out_dir, maps)
        del means, sds
        for tmp in stats_tmp.values():
            tmp.unlink(missing_ok=True)
        raise
    shard_names = _commit_shards(out_dir, maps)
    means.flush()
    sds.flush()
    del means, sds
    for name, tmp in stats_tmp.items():
        os.replace(tmp, out_dir / name)
    write_samples_table(table, out_dir / INDEX_FILE)
    shard_rows = table.groupby("shard")["n_frames"].sum()
    write_json(out_dir / STORE_META_FILE, {
        "format": STORE_FORMAT, "modality": "fmri", "dataset": dataset, "dtype": _DTYPE.str,
        "rois": rois, "n_rois": len(rois), "max_patches": int(table["max_patches"].iloc[0]) if len(table) else None,
        "shards": {name: [int(n), len(rois)] for name, n in shard_rows.items()},
        "layout": "each shard is (frames, n_rois); a sample is rows row_start:row_start+n_frames",
        "Description": __desc__.format(shard_size_mb=shard_size_mb),
    })
    return {"n_samples": int(len(table)), "n_shards": len(shard_names),
            "n_bytes": int(sum(os.path.getsize(out_dir / n) for n in shard_names))}


def pack_t1(
    *,
    t1_tensors: Sequence[Path],
    splits: Path,
    dataset: str,
    out_dir: Path,
    shard_size_mb: float = 1024,
    threads: int = 1,
) -> dict:
    """Step function: pack one dataset's T1 encoder tensors into shards.

    Parameters
    ----------
    t1_tensors : list of Path
        ``..._desc-encoder_T1w.npy`` float32 C-order tensors, one shape for all.
    splits : Path
        Split table of the dataset.
    dataset : str
        Dataset name.
    out_dir : Path
        ``<store>/t1/<dataset>``; receives the shards, ``index.tsv`` and ``index.json``.
    shard_size_mb : float
        Shard size in MiB at most.
    threads : int
        Threads reading tensors.

    Returns
    -------
    dict
        ``n_samples``, ``n_shards``, ``shape``.
    """
    out_dir = Path(out_dir)
    paths = {Path(p).name: Path(p) for p in t1_tensors}
    table = t1_samples_table(t1_tensors=t1_tensors, dataset=dataset)
    table["split"] = split_of(splits=read_splits([Path(splits)]), dataset=dataset,
                              subjects=table["subject"], source=Path(splits))
    table = _order_by_split(table)
    shape = _t1_shape(paths[table["source_file"].iloc[0]]) if len(table) else ()
    volume_bytes = 4 * int(np.prod(shape)) if shape else 4
    table["shard"], table["row"] = plan_shards(splits=table["split"], sizes=[1] * len(table),
                                               shard_size=_shard_rows(shard_size_mb, volume_bytes))
    maps = _open_shards(out_dir, table["shard"], [1] * len(table), shape)

    def pack_volume(i: int) -> None:
        path = paths[table.at[i, "source_file"]]
        if _t1_shape(path) != shape:
            raise BHInputError(path, f"shape {_t1_shape(path)} differs from {shape}",
                               "write every T1 tensor on the same encoder grid")
        maps[table.at[i, "shard"]][table.at[i, "row"]] = np.load(path)

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for _ in tqdm(pool.map(pack_volume, range(len(table))), total=len(table),
                          desc=f"pack T1 {dataset}", unit="volume", disable=None):
                pass
    except BaseException:
        _discard_shards(out_dir, maps)
        raise
    shard_names = _commit_shards(out_dir, maps)
    write_samples_table(table, out_dir / INDEX_FILE)
    write_json(out_dir / STORE_META_FILE, {
        "format": STORE_FORMAT, "modality": "t1", "dataset": dataset, "dtype": _DTYPE.str,
        "shape": list(shape), "shards": {n: int(c) for n, c in table["shard"].value_counts().sort_index().items()},
        "layout": "each shard is (n, X, Y, Z); a sample is entry `row`",
    })
    return {"n_samples": int(len(table)), "n_shards": len(shard_names), "shape": list(shape)}


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


def _t1_shape(path: Path) -> tuple[int, ...]:
    try:
        header = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise BHInputError(path, f"not a readable .npy file ({err})", "rerun the anatomical stage") from err
    if header.dtype != np.float32 or not header.flags.c_contiguous or header.ndim != 3:
        raise BHInputError(path, f"is {header.dtype} {header.shape}, not a float32 C-order 3D tensor",
                           "rerun the anatomical stage (it writes float32 C-order tensors)")
    return tuple(int(s) for s in header.shape)


# --------------------------------------------------------------------------- reading

def _discover(store_dir: Path, modality: str) -> list[Path]:
    return sorted((Path(store_dir) / modality).glob(f"*/{INDEX_FILE}"))


def read_index(*, store_dir: Path, modality: str, split: str | None = None) -> pd.DataFrame:
    """All datasets' index rows of one modality (``"fmri"`` or ``"t1"``), optionally one split.

    The datasets are discovered from ``store_dir/<modality>/*/index.tsv``.
    """
    tables = []
    for path in _discover(store_dir, modality):
        table = read_samples_table(path)
        table["shard_path"] = [str(path.parent / s) for s in table["shard"]]
        tables.append(table if split is None else table[table["split"] == split])
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["sample_id", "dataset", "subject", "session", "split", "shard", "shard_path"])


class _ShardCache:
    """Memory maps opened lazily, per process: DataLoader workers open their own."""

    def __init__(self) -> None:
        self._maps: dict[str, np.ndarray] = {}
        self._pid = os.getpid()

    def get(self, path: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if path not in self._maps:
            self._maps[path] = np.load(path, mmap_mode="r")
        return self._maps[path]

    def __getstate__(self) -> dict:
        return {"_maps": {}, "_pid": None}


class FmriShardDataset(Dataset):
    """fMRI samples of one split from every dataset in the store.

    Parameters
    ----------
    store_dir : Path
        Store root.
    split : str
        ``"train"``, ``"val"``, ``"test"``.
    scaling : Path, optional
        Robust-scaling JSON; default ``store_dir/scaling.json``.
    scale : bool
        False returns the packed values unscaled (round-trip checks).

    Items are dicts: ``x`` float32 (n_rois, max_patches * k), scaled, zero after
    ``n_frames``; ``patch_mask`` bool (max_patches,), True = real patch; ``tr``,
    ``k``, ``n_patches``, ``n_frames``, ``sample_id``, ``subject``, ``dataset``.
    """

    def __init__(self, store_dir: Path, split: str, *, scaling: Path | None = None, scale: bool = True) -> None:
        self.store_dir = Path(store_dir)
        self.split = split
        index = read_index(store_dir=self.store_dir, modality=FMRI_DIR, split=split)
        metas = [read_json(p.parent / STORE_META_FILE) for p in _discover(self.store_dir, FMRI_DIR)]
        if not metas:
            raise BHInputError(self.store_dir / FMRI_DIR, "no packed fMRI dataset", "run pack_fmri first")
        self.rois = metas[0]["rois"]
        patches = {m["max_patches"] for m in metas if m["max_patches"] is not None}
        if any(m["rois"] != self.rois for m in metas) or len(patches) > 1:
            raise BHConfigError("augment.max_patches", "datasets in the store differ in ROIs or max_patches",
                                "repack every dataset with the same atlas and max_patches")
        self.max_patches = patches.pop() if patches else 0
        self.scaling: RobustScaling | None = None
        if scale:
            self.scaling = load_scaling(Path(scaling) if scaling else self.store_dir / SCALING_FILE)
            if list(self.scaling.rois) != self.rois:
                raise BHInputError(scaling or self.store_dir / SCALING_FILE, "ROI names differ from the store's",
                                   "rerun compute_scaling on this store")
        self.index = index.reset_index(drop=True)
        # Plain arrays: per-item pandas access would cost more than the read itself.
        self._paths = self.index["shard_path"].to_numpy()
        self._start = self.index["row_start"].to_numpy()
        self._frames = self.index["n_frames"].to_numpy()
        self._k = self.index["k"].to_numpy()
        self._patches = self.index["n_patches"].to_numpy()
        self._tr = self.index["tr"].to_numpy()
        self._ids = self.index[["sample_id", "subject", "dataset"]].to_numpy()
        self._cache = _ShardCache()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        start, n, k = int(self._start[i]), int(self._frames[i]), int(self._k[i])
        frames = self._cache.get(self._paths[i])[start:start + n]  # (n_frames, n_rois)
        x, mask = _padded_item(frames=frames, n_rois=len(self.rois), k=k, n_patches=int(self._patches[i]),
                               max_patches=self.max_patches, scaling=self.scaling)
        sid, subject, dataset = self._ids[i]
        return {"x": torch.from_numpy(x), "patch_mask": torch.from_numpy(mask), "tr": float(self._tr[i]),
                "k": k, "n_patches": int(self._patches[i]), "n_frames": n,
                "sample_id": sid, "subject": subject, "dataset": dataset}


class T1ShardDataset(Dataset):
    """T1 tensors of one split from every dataset in the store.

    Items are dicts: ``t1`` float32 (1, X, Y, Z); ``subject``, ``dataset``, ``sample_id``, ``session``.
    """

    def __init__(self, store_dir: Path, split: str) -> None:
        self.store_dir = Path(store_dir)
        self.split = split
        self.index = read_index(store_dir=self.store_dir, modality=T1_DIR, split=split).reset_index(drop=True)
        self._paths = self.index["shard_path"].to_numpy()
        self._row = self.index["row"].to_numpy() if len(self.index) else np.zeros(0, dtype=np.int64)
        self._ids = self.index[["sample_id", "subject", "dataset", "session"]].to_numpy()
        self._cache = _ShardCache()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        volume = np.array(self._cache.get(self._paths[i])[int(self._row[i])])  # (X, Y, Z), copied out of the map
        sid, subject, dataset, session = self._ids[i]
        return {"t1": torch.from_numpy(volume)[None], "subject": subject, "dataset": dataset,
                "sample_id": sid, "session": session}


def _padded_item(*, frames: np.ndarray, n_rois: int, k: int, n_patches: int, max_patches: int,
                 scaling: RobustScaling | None) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (n_rois, max_patches * k), zero after the real frames, and the patch mask (max_patches,)."""
    x = np.zeros((n_rois, max_patches * k), dtype=np.float32)  # (n_rois, padded)
    real = x[:, : len(frames)].T  # (n_frames, n_rois) view: scaled in place, no temporaries
    if scaling is None:
        real[...] = frames
    else:
        scaling.apply_frames(frames, out=real)
    mask = np.zeros(max_patches, dtype=bool)
    mask[:n_patches] = True
    return x, mask


class FmriTableDataset(Dataset):
    """One dataset's fMRI samples read straight from its parcel time-series TSVs, never packed.

    Downstream datasets are encoded this way: they never enter the training
    store. The samples table (:func:`bh_models.store.augment.make_samples`) says which
    frames make each sample; the *pretraining* robust-scaling statistics scale
    them; items are padded exactly as :class:`FmriShardDataset` pads packed
    samples (tested equal), so a subject is encoded the same whichever way its
    data arrive.

    Parameters
    ----------
    samples : Path
        The dataset's samples table.
    timeseries : sequence of Path
        The parcel time-series TSVs it was made from (matched by file name).
    scaling : Path, optional
        Robust-scaling JSON (a bundle's ``scaling.json``); None = unscaled.
    """

    def __init__(self, *, samples: Path, timeseries: Sequence[Path], scaling: Path | None) -> None:
        self.index = read_samples_table(Path(samples)).reset_index(drop=True)
        self._sources = {Path(p).name: Path(p) for p in timeseries}
        missing = sorted(set(self.index["source_file"]) - set(self._sources))
        if missing:
            raise BHInputError(samples, f"source {missing[0]} is not among the time series passed",
                               "pass every time series the samples table was made from")
        patches = set(self.index["max_patches"])
        if len(patches) > 1:
            raise BHInputError(samples, f"samples padded to different patch counts {sorted(patches)}",
                               "rerun the augment step of this dataset")
        self.max_patches = int(patches.pop()) if patches else 0
        first = self._sources[self.index["source_file"].iloc[0]] if len(self.index) else None
        self.rois = read_roi_names(first) if first is not None else []
        self.scaling = load_scaling(Path(scaling)) if scaling is not None else None
        if self.scaling is not None and self.rois and list(self.scaling.rois) != self.rois:
            raise BHInputError(first, f"ROI columns ({self.rois[0]} ...) differ from the scaling statistics' "
                               f"({self.scaling.rois[0]} ...)",
                               "extract the time series with the atlas and network order the models were trained on")
        self._cached: tuple[str, np.ndarray] | None = None

    def _values(self, source_file: str) -> np.ndarray:
        # Samples of one run are adjacent in the table: keep the last run read.
        if self._cached is None or self._cached[0] != source_file:
            names, values = read_timeseries(self._sources[source_file])
            if names != self.rois:
                raise BHInputError(self._sources[source_file], "ROI columns differ from the dataset's other runs",
                                   "extract every run with the same atlas")
            self._cached = (source_file, values)
        return self._cached[1]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[i]
        values = self._values(row["source_file"])
        if len(values) != row["source_frames"]:
            raise BHInputError(self._sources[row["source_file"]], f"{len(values)} rows but the samples table says "
                               f"{row['source_frames']}", "rerun the functional stage and the augment step")
        frames = values[row["offset"]::row["factor"]][: row["n_frames"]]  # (n_frames, n_rois)
        x, mask = _padded_item(frames=frames, n_rois=len(self.rois), k=int(row["k"]),
                               n_patches=int(row["n_patches"]), max_patches=self.max_patches, scaling=self.scaling)
        return {"x": torch.from_numpy(x), "patch_mask": torch.from_numpy(mask), "tr": float(row["tr"]),
                "k": int(row["k"]), "n_patches": int(row["n_patches"]), "n_frames": int(row["n_frames"]),
                "sample_id": row["sample_id"], "subject": row["subject"], "dataset": row["dataset"]}


class T1TensorDataset(Dataset):
    """One dataset's T1 encoder tensors read from the anatomical derivatives, never packed.

    Items are those of :class:`T1ShardDataset`.
    """

    def __init__(self, *, t1_tensors: Sequence[Path], dataset: str) -> None:
        self._paths = {Path(p).name: Path(p) for p in t1_tensors}
        self.index = t1_samples_table(t1_tensors=t1_tensors, dataset=dataset)
        shapes = {_t1_shape(p) for p in self._paths.values()}
        if len(shapes) > 1:
            raise BHInputError(next(iter(self._paths.values())), f"T1 tensors of several shapes {sorted(shapes)}",
                               "write every T1 tensor on the same encoder grid")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[i]
        volume = np.load(self._paths[row["source_file"]])  # (X, Y, Z) float32
        return {"t1": torch.from_numpy(volume)[None], "subject": row["subject"], "dataset": row["dataset"],
                "sample_id": row["sample_id"], "session": row["session"]}


def collate_fmri(batch: Sequence[dict]) -> dict:
    """Batch fMRI items: ``x`` zero-padded along time to the longest, others stacked.

    Returns
    -------
    dict
        ``x`` (B, n_rois, T_max) float32, ``patch_mask`` (B, max_patches) bool,
        ``tr`` (B,) float32, ``k``, ``n_patches``, ``n_frames`` (B,) int64, and
        ``sample_id``, ``subject``, ``dataset`` as lists of str.
    """
    widths = [item["x"].shape[1] for item in batch]
    # numpy copies the strided rows ~4x faster than torch's indexed assignment (bench_store.py).
    x = np.empty((len(batch), batch[0]["x"].shape[0], max(widths)), dtype=np.float32)  # (B, n_rois, T_max)
    for b, (item, width) in enumerate(zip(batch, widths)):
        x[b, :, :width] = item["x"].numpy()
        x[b, :, width:] = 0
    x = torch.from_numpy(x)
    out = {"x": x, "patch_mask": torch.stack([item["patch_mask"] for item in batch]),
           "tr": torch.tensor([item["tr"] for item in batch], dtype=torch.float32)}
    for key in ("k", "n_patches", "n_frames"):
        if key in batch[0]:
            out[key] = torch.tensor([item[key] for item in batch], dtype=torch.int64)
    for key in ("sample_id", "subject", "dataset"):
        out[key] = [item[key] for item in batch]
    return out


def paired_samples(store_dir: Path, split: str) -> pd.DataFrame:
    """fMRI and T1 samples of one split, paired by subject.

    Each fMRI sample is paired with the subject's T1 of the same session, else
    the subject's first T1 (by sample id). Subjects with only one modality keep
    one row per sample with the other id missing (``pd.NA``), so training can
    draw paired and unpaired samples.

    Returns
    -------
    DataFrame
        Columns ``subject``, ``dataset``, ``fmri_sample_id``, ``t1_sample_id``
        (string dtype), sorted by dataset, subject, fMRI id, T1 id.
    """
    return pair_samples(fmri=read_index(store_dir=store_dir, modality=FMRI_DIR, split=split),
                        t1=read_index(store_dir=store_dir, modality=T1_DIR, split=split))


def pair_samples(*, fmri: pd.DataFrame, t1: pd.DataFrame) -> pd.DataFrame:
    """fMRI and T1 sample tables (``sample_id``, ``dataset``, ``subject``, ``session``) paired by
    subject, as :func:`paired_samples` describes."""
    t1 = t1.sort_values("sample_id")
    by_session = dict(zip(zip(t1["dataset"], t1["subject"], t1["session"]), t1["sample_id"]))
    first = t1.drop_duplicates(["dataset", "subject"])
    by_subject = dict(zip(zip(first["dataset"], first["subject"]), first["sample_id"]))
    rows = [(d, s, f, by_session.get((d, s, ses), by_subject.get((d, s))))
            for d, s, ses, f in zip(fmri["dataset"], fmri["subject"], fmri["session"], fmri["sample_id"])]
    with_fmri = set(zip(fmri["dataset"], fmri["subject"]))
    rows += [(d, s, None, t) for d, s, t in zip(t1["dataset"], t1["subject"], t1["sample_id"])
             if (d, s) not in with_fmri]
    out = pd.DataFrame(rows, columns=["dataset", "subject", "fmri_sample_id", "t1_sample_id"], dtype="string")
    out = out.sort_values(["dataset", "subject", "fmri_sample_id", "t1_sample_id"], na_position="last")
    return out[["subject", "dataset", "fmri_sample_id", "t1_sample_id"]].reset_index(drop=True)
