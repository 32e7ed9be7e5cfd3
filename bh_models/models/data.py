"""Training and encoding data: the packed store of the pretraining datasets, and a downstream dataset
read straight from its derivatives, as torch datasets with one item layout.

The store stage writes the files (:mod:`bh_models.store`); these readers only
read them, through the formats of :mod:`bh_models.core.storeformat`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import read_json
from bh_models.core.storeformat import (
    STORE_META_FILE,
    T1_DTYPE,
    RobustScaling,
    bf16_bits,
    load_scaling,
    read_index,
    read_roi_names,
    read_samples_table,
    read_timeseries,
    t1_samples_table,
    t1_shape,
)


class _ShardCache:
    """Memory maps opened lazily, per process: DataLoader workers open their own.

    ``mode`` ``"c"`` (copy-on-write) gives writable arrays without copying, so a
    tensor can wrap a slice of the map directly (nothing ever writes to it).
    """

    def __init__(self, mode: str = "r") -> None:
        self._maps: dict[str, np.ndarray] = {}
        self._pid = os.getpid()
        self._mode = mode

    def get(self, path: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if path not in self._maps:
            self._maps[path] = np.load(path, mmap_mode=self._mode)
        return self._maps[path]

    def __getstate__(self) -> dict:
        return {"_maps": {}, "_pid": None, "_mode": self._mode}


class FmriShardDataset(Dataset):
    """fMRI samples of one split from the given packed datasets.

    Parameters
    ----------
    folders : sequence of Path
        Packed fMRI dataset folders (``<store>/fmri/<dataset>``).
    split : str
        ``"train"``, ``"val"``, ``"test"``.
    scaling : Path, optional
        Robust-scaling JSON (``<store>/scaling.json``); required unless ``scale`` is False.
    scale : bool
        False returns the packed values unscaled (round-trip checks).

    Items are dicts: ``x`` float32 (n_rois, max_patches * k), scaled, zero after
    ``n_frames``; ``patch_mask`` bool (max_patches,), True = real patch; ``tr``,
    ``k``, ``n_patches``, ``n_frames``, ``sample_id``, ``subject``, ``dataset``.
    """

    def __init__(self, folders: Sequence[Path], split: str, *, scaling: Path | None = None,
                 scale: bool = True) -> None:
        folders = sorted(map(Path, folders))
        self.split = split
        if not folders:
            raise BHInputError("fmri", "no packed fMRI dataset given", "run pack_fmri first")
        index = read_index(folders=folders, split=split)
        metas = [read_json(folder / STORE_META_FILE) for folder in folders]
        self.rois = metas[0]["rois"]
        patches = {m["max_patches"] for m in metas if m["max_patches"] is not None}
        if any(m["rois"] != self.rois for m in metas) or len(patches) > 1:
            raise BHConfigError("augment.max_patches", "datasets in the store differ in ROIs or max_patches",
                                "repack every dataset with the same atlas and max_patches")
        self.max_patches = patches.pop() if patches else 0
        self.scaling: RobustScaling | None = None
        if scale:
            if scaling is None:
                raise BHInputError(folders[0], "no robust-scaling statistics given",
                                   "pass the store's scaling.json, or scale=False to read raw values")
            self.scaling = load_scaling(Path(scaling))
            if list(self.scaling.rois) != self.rois:
                raise BHInputError(scaling, "ROI names differ from the store's", "rerun compute_scaling on this store")
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


def t1_tensor(volume: np.ndarray) -> torch.Tensor:
    """A T1 volume as the models receive it: ``(1, X, Y, Z)`` bfloat16.

    bf16 is how the store keeps T1 volumes (:data:`bh_models.core.storeformat.T1_DTYPE`), so
    volumes read from derivatives are rounded the same way and a subject gets the same
    input whichever way it arrives. uint16 arrays are taken as bf16 bits (no copy);
    float arrays are rounded to nearest even.
    """
    bits = volume if volume.dtype == T1_DTYPE else bf16_bits(volume)
    return torch.from_numpy(bits).view(torch.bfloat16)[None]


class _ShardFiles:
    """Open file descriptors of ``.npy`` shards, per process (DataLoader workers open their own)."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, int, np.dtype, tuple[int, ...]]] = {}
        self._pid = os.getpid()

    def get(self, path: str) -> tuple[int, int, np.dtype, tuple[int, ...]]:
        """``(fd, data offset, dtype, shape)`` of a shard."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            header = np.load(path, mmap_mode="r")  # reads the header only
            self._files[path] = (os.open(path, os.O_RDONLY), int(header.offset), header.dtype, header.shape)
        return self._files[path]

    def __getstate__(self) -> dict:
        return {"_files": {}, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd, *_ in self._files.values():
                os.close(fd)


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch tensor.

    In a DataLoader worker it is shared memory, so it reaches the training process
    without another copy (as ``default_collate`` does). In the training process on a
    GPU node it is page-locked memory from torch's caching host allocator: reused
    blocks, so no fresh pages to fault in and zero (measured here: writing into fresh
    pages runs at 1.2 GB/s, into reused ones at 6 GB/s), the loader's pinning step
    has nothing left to copy, and the copy to the GPU is asynchronous.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


class NpyRows:
    """Rows of ``.npy`` arrays read with ``preadv`` straight into one batch buffer.

    A row is ``(path, index)`` of a C-order array; the file's header gives the row
    shape, and file descriptors are opened lazily, per process (DataLoader workers
    open their own). One system call per row, no page faults through a memory map
    and no stacking copy: ``benchmarks/bench_loader.py`` measures it against
    memory-mapped items. Used for the T1 store, the latent stores and fine-tuning.
    """

    def __init__(self) -> None:
        self._files = _ShardFiles()

    def header(self, path: str | Path) -> tuple[np.dtype, tuple[int, ...]]:
        """dtype and full shape of the array in ``path``."""
        _, _, dtype, shape = self._files.get(str(path))
        return dtype, shape

    def read(self, rows: Sequence[tuple[str | Path, int]], *, dtype: torch.dtype) -> torch.Tensor:
        """``(B, *row_shape)`` tensor of the given rows, reinterpreted as ``dtype`` (same item size)."""
        files = [self._files.get(str(path)) for path, _ in rows]
        shape = files[0][3][1:]
        if any(f[3][1:] != shape for f in files):
            raise BHInputError(rows[0][0], "rows of several shapes in one batch",
                               "write every array of one modality on the same grid")
        row_bytes = int(np.prod(shape)) * files[0][2].itemsize
        batch = _batch_buffer((len(rows), *shape), torch.uint8 if files[0][2].itemsize == 1 else torch.uint16)
        if files[0][2].itemsize not in (1, 2):
            raise ValueError("NpyRows reads 1- and 2-byte arrays (uint8, bf16 bits)")
        for b, ((path, index), (fd, offset, _, _)) in enumerate(zip(rows, files)):
            target = memoryview(batch[b].numpy()).cast("B")
            if os.preadv(fd, [target], offset + int(index) * row_bytes) != row_bytes:
                raise BHInputError(path, "is shorter than its header says", "rewrite this array (rerun its rule)")
        return batch.view(dtype)


def stack_batch(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of the tensors, or, when they are the consecutive rows of one buffer (read by
    :class:`NpyRows`), that buffer itself: no copy."""
    first = tensors[0]
    step = first.numel()
    storage = first.untyped_storage()
    whole = (first.storage_offset() == 0 and storage.nbytes() == len(tensors) * step * first.element_size()
             and all(t.untyped_storage().data_ptr() == storage.data_ptr() and t.is_contiguous()
                     and t.storage_offset() == b * step and t.dtype == first.dtype for b, t in enumerate(tensors)))
    if whole:
        return torch.empty(0, dtype=first.dtype).set_(storage, 0, (len(tensors), *first.shape))
    return torch.stack(list(tensors))


class T1ShardDataset(Dataset):
    """T1 tensors of one split from the given packed datasets (``<store>/t1/<dataset>`` folders).

    Items are dicts: ``t1`` bfloat16 (1, X, Y, Z); ``subject``, ``dataset``,
    ``sample_id``, ``session``. :func:`bh_models.models.train.move_to_device` widens
    the volumes to float32 on the training device. Shards of stores packed in
    float32 (before bf16 storage) are rounded to bf16 when read.

    Reading: one item wraps the shard's memory map (no copy). A batch
    (``__getitems__``, which the DataLoader calls with a batch's indices) is read
    with ``preadv`` straight into one buffer, shared memory in a worker, and its
    items are views of it: :func:`collate_t1` then returns that buffer without a
    copy. Measured in ``benchmarks/bench_loader.py``: one copy from the page cache
    instead of page faults through the map plus a stacking copy, about twice
    the volumes per second.
    """

    def __init__(self, folders: Sequence[Path], split: str) -> None:
        self.split = split
        self.index = read_index(folders=folders, split=split).reset_index(drop=True)
        self._paths = self.index["shard_path"].to_numpy()
        self._row = self.index["row"].to_numpy() if len(self.index) else np.zeros(0, dtype=np.int64)
        self._ids = self.index[["sample_id", "subject", "dataset", "session"]].to_numpy()
        self._cache = _ShardCache(mode="c")
        self._rows = NpyRows()

    def __len__(self) -> int:
        return len(self.index)

    def _item(self, i: int, volume: torch.Tensor) -> dict:
        sid, subject, dataset, session = self._ids[i]
        return {"t1": volume, "subject": subject, "dataset": dataset, "sample_id": sid, "session": session}

    def __getitem__(self, i: int) -> dict:
        volume = self._cache.get(self._paths[i])[int(self._row[i])]  # (X, Y, Z) view of the map
        return self._item(i, t1_tensor(volume))

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        if not indices or any(self._rows.header(self._paths[i])[0] != T1_DTYPE for i in indices):
            return [self[i] for i in indices]  # float32 shards of an older store: rounded item by item
        batch = self._rows.read([(self._paths[i], self._row[i]) for i in indices], dtype=torch.bfloat16)
        return [self._item(i, batch[b][None]) for b, i in enumerate(indices)]  # (1, X, Y, Z) views


def collate_t1(items: Sequence[dict]) -> dict:
    """Batch T1 items: ``t1`` (B, 1, X, Y, Z) bfloat16 and the id lists.

    Items read together by :meth:`T1ShardDataset.__getitems__` are consecutive views
    of one buffer, which is returned as it is (:func:`stack_batch`); other items are stacked.
    """
    out = {"t1": stack_batch([item["t1"] for item in items])}
    for key in ("subject", "dataset", "sample_id", "session"):
        out[key] = [item[key] for item in items]
    return out


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
        shapes = {t1_shape(p) for p in self._paths.values()}
        if len(shapes) > 1:
            raise BHInputError(next(iter(self._paths.values())), f"T1 tensors of several shapes {sorted(shapes)}",
                               "write every T1 tensor on the same encoder grid")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[i]
        volume = np.load(self._paths[row["source_file"]])  # (X, Y, Z) float32
        return {"t1": t1_tensor(volume), "subject": row["subject"], "dataset": row["dataset"],
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


def paired_samples(*, fmri: Sequence[Path], t1: Sequence[Path], split: str) -> pd.DataFrame:
    """fMRI and T1 samples of one split of the given packed dataset folders, paired by subject.

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
    return pair_samples(fmri=read_index(folders=fmri, split=split), t1=read_index(folders=t1, split=split))


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
