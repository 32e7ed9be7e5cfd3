"""Packing the training store: a few large shards per dataset plus an index (read by
:mod:`bh_models.models.data`; formats in :mod:`bh_models.core.storeformat`).

Layout (``store_dir``)::

    splits/<dataset>.tsv                    subject -> split (bh_models.store.splits)
    fmri/<dataset>/shard-<split>-00000.npy  float32 (frames, n_rois): samples back to back
    fmri/<dataset>/index.tsv                one row per sample: plan, split, shard, row_start
    fmri/<dataset>/index.json               ROI names, max_patches, shard list
    fmri/<dataset>/temporal_means.npy       float64 (n_samples, n_rois), for the scaling fit
    fmri/<dataset>/temporal_sds.npy         float64 (n_samples, n_rois), likewise
    t1/<dataset>/shard-<split>-00000.npy    bf16 as uint16 bits (n, X, Y, Z)
    t1/<dataset>/index.tsv, index.json
    scaling.json, scaling.tsv               robust-scaling statistics (bh_models.store.scaling)

Why raw ``.npy`` shards read through ``numpy.memmap``: measured in
``benchmarks/bench_store.py`` against HDF5 and one file per sample, a memmap
slice costs microseconds with no per-read library overhead, it shares the page
cache across DataLoader workers, and the header is fixed so a rerun writes the
same bytes. Only real frames are stored; padding is added when reading.

T1 volumes are stored in bf16 (2 bytes a voxel, 9.8 MB for a 1 mm volume instead of
19.7 MB): measured in ``benchmarks/bench_t1_format.py``, its RMS error on the demo's
z-scored volumes is 0.0016 SD against 0.0072 SD for uint8 with a per-volume scale
and offset, it keeps the background exactly zero, and it is bit for bit the input
bf16 autocast gives the encoder's first convolution anyway.

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
from tqdm import tqdm

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import write_json
from bh_models.core.storeformat import (
    DTYPE,
    INDEX_FILE,
    T1_DTYPE,
    T1_ENCODING,
    STORE_FORMAT,
    STORE_META_FILE,
    TEMPORAL_MEANS_FILE,
    TEMPORAL_SDS_FILE,
    read_roi_names,
    read_samples_table,
    read_timeseries,
    t1_samples_table,
    t1_shape,
    bf16_bits,
    write_samples_table,
)
from bh_models.store.splits import read_splits, split_of

__desc__ = (
    "Samples were packed into float32 shards of at most {shard_size_mb} MB per "
    "dataset and split, with an index table, and T1 tensors were packed the same "
    "way in bfloat16 and paired with fMRI samples by subject."
)

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


def _open_shards(out_dir: Path, shards: Sequence[str], rows: Sequence[int], item_shape: tuple[int, ...],
                 dtype: np.dtype = DTYPE) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".shard-*.npy.tmp"):  # from a killed run
        leftover.unlink()
    totals = pd.Series(np.asarray(rows, dtype=np.int64)).groupby(np.asarray(shards, dtype=object)).sum()
    # open_memmap writes the fixed .npy v1.0 header: same shape, same bytes.
    return {name: np.lib.format.open_memmap(out_dir / f".{name}.tmp", mode="w+", dtype=dtype,
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
        "format": STORE_FORMAT, "modality": "fmri", "dataset": dataset, "dtype": DTYPE.str,
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
    shape = t1_shape(paths[table["source_file"].iloc[0]]) if len(table) else ()
    volume_bytes = T1_DTYPE.itemsize * int(np.prod(shape)) if shape else T1_DTYPE.itemsize
    table["shard"], table["row"] = plan_shards(splits=table["split"], sizes=[1] * len(table),
                                               shard_size=_shard_rows(shard_size_mb, volume_bytes))
    maps = _open_shards(out_dir, table["shard"], [1] * len(table), shape, dtype=T1_DTYPE)

    def pack_volume(i: int) -> None:
        path = paths[table.at[i, "source_file"]]
        if t1_shape(path) != shape:
            raise BHInputError(path, f"shape {t1_shape(path)} differs from {shape}",
                               "write every T1 tensor on the same encoder grid")
        volume = np.load(path)
        if not np.isfinite(volume).all():
            raise BHInputError(path, "holds NaN or infinite values", "rerun the anatomical stage for this subject")
        maps[table.at[i, "shard"]][table.at[i, "row"]] = bf16_bits(volume)

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
        "format": STORE_FORMAT, "modality": "t1", "dataset": dataset, "dtype": T1_DTYPE.str,
        "encoding": T1_ENCODING, "shape": list(shape), "shards": {n: int(c) for n, c in table["shard"].value_counts().sort_index().items()},
        "layout": "each shard is (n, X, Y, Z); a sample is entry `row`",
    })
    return {"n_samples": int(len(table)), "n_shards": len(shard_names), "shape": list(shape)}
