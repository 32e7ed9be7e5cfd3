"""Latent stores: the frozen encoders' tokens of every sample, computed once (the release's stage 0).

The Harmonizer trains on these tokens, and fine-tuning reads them, so the two ViT
encoders run once per sample instead of at every step. Written by
:func:`bh_models.models.embeddings.cache_latents` (rule ``cache_latents``: the
pretraining datasets' training samples) and
:func:`bh_models.models.embeddings.extract_latents` (rule ``extract_latents``: a
downstream dataset, for fine-tuning), in one format.

Format (one folder per dataset, ``bh-latents-2``)
    ``tokens.npy``
        ``uint16`` ``(n_rows, N_F + N_S, D)``: the tokens in **bfloat16**, stored as their
        raw 16 bits (numpy has no bfloat16), memory-mapped on read. Per row, the
        harmonix-F tokens first (ROI-major ``r * P + p`` on the fixed grid of ``P =
        n_patches`` patches per ROI, padded patches included, as the release's stage 0
        writes them), then the harmonix-S tokens. A missing modality's tokens are zero.
    ``mask.npy``
        ``bool`` ``(n_rows, N_F + N_S)``: True = real token (False on padded fMRI patches
        and on a missing modality).
    ``index.tsv``
        One line per row: ``row``, ``dataset``, ``subject``, ``fmri_sample_id``,
        ``t1_sample_id`` (empty when missing), ``has_fmri``, ``has_t1``.
    ``latents.json``
        Format, shapes and token layout (``n_rois``, ``n_patches``, ``s_grid``, ``dim``), the
        Schaefer-400 network order of the fMRI rows (``atlas_networks``), the sha256 of the
        encoder checkpoints that made it, the split it covers.

Reader API (:class:`LatentStore`)
    ``LatentStore(folder)``; ``len(store)``; ``store[i]`` -> dict with ``tokens``
    (float32 tensor ``(N, D)``), ``mask`` (bool tensor ``(N,)``), ``subject``,
    ``dataset``, ``row``; ``store.rows(indices)`` -> ``(tokens (B, N, D), mask (B, N))``;
    ``store.subjects``, ``store.datasets`` (numpy str arrays), ``store.index``
    (DataFrame), ``store.meta`` (dict); ``LatentStore(folder, paired_only=True)`` keeps
    rows with both modalities. :func:`collate_latents` batches items.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import read_json, write_json
from bh_models.models.data import NpyRows, stack_batch

__desc__ = (
    "The frozen harmonix-F and harmonix-S tokens of every sample were computed once and stored in "
    "bfloat16 (the authors' stage 0), and the Harmonizer was trained from that store."
)

LATENTS_FORMAT = "bh-latents-2"
TOKENS_FILE, MASK_FILE, INDEX_FILE, META_FILE = "tokens.npy", "mask.npy", "index.tsv", "latents.json"
INDEX_COLUMNS = ["row", "dataset", "subject", "fmri_sample_id", "t1_sample_id", "has_fmri", "has_t1"]


def to_bf16_bits(values: Tensor) -> np.ndarray:
    """float tensor -> uint16 array of its bfloat16 bits (round to nearest even)."""
    return values.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack_rows(tokens: Tensor, mask: Tensor) -> Tensor:
    """``(B, N, D)`` tokens and ``(B, N)`` mask -> ``(B, N, D + 1)`` float32, the mask as the last channel."""
    return torch.cat([tokens.float(), mask[..., None].float()], dim=-1)


def unpack_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_rows`: ``tokens (B, N, D)``, ``mask (B, N)`` bool."""
    return x[..., :-1], x[..., -1] > 0.5


class LatentWriter:
    """Fill a latent store row by row into a temporary folder; :meth:`close` moves it into place.

    Parameters
    ----------
    folder : Path
        The store folder to write (replaced if it exists).
    n_rows, n_tokens, dim : int
        Shape of the token array.
    meta : dict
        Extra ``latents.json`` entries (token layout, sources, split).
    """

    def __init__(self, folder: Path, *, n_rows: int, n_tokens: int, dim: int, meta: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(f".{self.folder.name}.tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        shape = (n_rows, n_tokens, dim)
        self.tokens = np.lib.format.open_memmap(self.tmp / TOKENS_FILE, mode="w+", dtype=np.uint16, shape=shape)
        self.mask = np.lib.format.open_memmap(self.tmp / MASK_FILE, mode="w+", dtype=np.bool_, shape=shape[:2])
        self.rows: list[dict[str, Any]] = []
        self.meta = {"format": LATENTS_FORMAT, "n_rows": n_rows, "n_tokens": n_tokens, "dim": dim,
                     "dtype": "bfloat16 stored as uint16 bits", **meta}

    def add(self, tokens: Tensor, mask: Tensor, rows: Sequence[dict[str, Any]]) -> None:
        """Append a batch: ``tokens (B, N, D)``, ``mask (B, N)``, one index entry per row."""
        start = len(self.rows)
        stop = start + tokens.shape[0]
        if stop > self.tokens.shape[0]:
            raise ValueError(f"{self.folder}: more rows than the {self.tokens.shape[0]} announced")
        self.tokens[start:stop] = to_bf16_bits(tokens)
        self.mask[start:stop] = mask.cpu().numpy()
        for offset, row in enumerate(rows):
            self.rows.append({"row": start + offset, **row})

    def close(self) -> Path:
        """Flush, write the index and ``latents.json``, move the folder into place."""
        if len(self.rows) != self.tokens.shape[0]:
            raise ValueError(f"{self.folder}: {len(self.rows)} rows written, {self.tokens.shape[0]} announced")
        self.tokens.flush()
        self.mask.flush()
        del self.tokens, self.mask
        index = pd.DataFrame(self.rows, columns=INDEX_COLUMNS)
        index.to_csv(self.tmp / INDEX_FILE, sep="\t", index=False, lineterminator="\n")
        write_json(self.tmp / META_FILE, self.meta)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)
        return self.folder


def read_meta(folder: Path) -> dict[str, Any]:
    """``latents.json`` of a latent store, checked for format."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise BHInputError(folder, "is not a latent store (no latents.json)",
                           "run the cache_latents (pretraining) or extract_latents (downstream) rule")
    meta = read_json(path)
    if meta.get("format") != LATENTS_FORMAT:
        raise BHInputError(path, f"format {meta.get('format')!r} is not {LATENTS_FORMAT}",
                           "rerun the rule that wrote it with this version of the pipeline")
    return meta


class LatentStore(Dataset):
    """Read a latent store (see the module doc for the format and the API).

    Parameters
    ----------
    folder : Path
        The store folder.
    paired_only : bool
        Keep only rows with both modalities (the release's Harmonizer training).
    """

    def __init__(self, folder: Path, *, paired_only: bool = False) -> None:
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self._tokens = np.load(self.folder / TOKENS_FILE, mmap_mode="r")  # (n_rows, N, D) uint16
        self._mask = np.load(self.folder / MASK_FILE, mmap_mode="r")  # (n_rows, N) bool
        index = pd.read_csv(self.folder / INDEX_FILE, sep="\t", dtype={"subject": str, "dataset": str},
                            keep_default_na=False)
        if len(index) != self._tokens.shape[0] or self._tokens.shape[1:] != (self.meta["n_tokens"], self.meta["dim"]):
            raise BHInputError(self.folder, "index, token array and latents.json disagree on the shape",
                               "rerun the rule that wrote this store")
        if paired_only:
            index = index[index["has_fmri"].astype(bool) & index["has_t1"].astype(bool)]
        self.index = index.reset_index(drop=True)
        self._rows = self.index["row"].to_numpy()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the memory maps instead of receiving copies of the arrays.
        return {key: value for key, value in self.__dict__.items() if key not in ("_tokens", "_mask", "_npy_rows")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tokens = np.load(self.folder / TOKENS_FILE, mmap_mode="r")
        self._mask = np.load(self.folder / MASK_FILE, mmap_mode="r")

    @property
    def subjects(self) -> np.ndarray:
        return self.index["subject"].to_numpy(dtype=str)

    @property
    def datasets(self) -> np.ndarray:
        return self.index["dataset"].to_numpy(dtype=str)

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, indices: Sequence[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        """``tokens`` float32 ``(B, N, D)`` and ``mask`` bool ``(B, N)`` of positions ``indices``."""
        rows = self._rows[np.asarray(indices, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # memory-map reads in file order
        tokens = np.empty((len(rows), *self._tokens.shape[1:]), dtype=np.float32)
        tokens[order] = from_bf16_bits(self._tokens[rows[order]])
        mask = np.asarray(self._mask[rows])
        return torch.from_numpy(tokens), torch.from_numpy(mask.copy())

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Items of a batch, read together (the DataLoader calls this with a batch's indices):
        one ``preadv`` per row into one bf16 buffer (:class:`bh_models.models.data.NpyRows`),
        ``tokens`` are bf16 views of it, which :func:`collate_latents` returns without a copy
        (the training loop widens them to float32 on its device)."""
        if not hasattr(self, "_npy_rows"):
            self._npy_rows = NpyRows()
        rows = [int(self._rows[i]) for i in indices]
        tokens = self._npy_rows.read([(self.folder / TOKENS_FILE, row) for row in rows], dtype=torch.bfloat16)
        entries = self.index.iloc[list(indices)]
        return [{"tokens": tokens[b], "mask": torch.from_numpy(np.array(self._mask[row])),
                 "subject": subject, "dataset": dataset, "row": row}
                for b, (row, subject, dataset) in enumerate(zip(rows, entries["subject"], entries["dataset"]))]

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self._rows[i])
        tokens = torch.from_numpy(from_bf16_bits(self._tokens[row]))  # (N, D) float32
        mask = torch.from_numpy(np.array(self._mask[row]))  # (N,) bool
        entry = self.index.iloc[i]
        return {"tokens": tokens, "mask": mask, "subject": entry["subject"], "dataset": entry["dataset"],
                "row": row}


def collate_latents(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``tokens (B, N, D)``, ``mask (B, N)``, and ``subject``, ``dataset`` lists (tokens read together by
    :meth:`LatentStore.__getitems__` are their batch buffer already: no copy)."""
    return {"tokens": stack_batch([item["tokens"] for item in items]),
            "mask": torch.stack([item["mask"] for item in items]),
            "subject": [item["subject"] for item in items], "dataset": [item["dataset"] for item in items]}


LAYOUT_KEYS = ("n_tokens", "dim", "n_rois", "n_patches", "s_grid")


def check_same_layout(stores: Sequence[LatentStore]) -> dict[str, Any]:
    """The token layout shared by ``stores`` (one Harmonizer reads them all)."""
    layouts = {tuple((key, tuple(v) if isinstance(v := store.meta.get(key), list) else v) for key in LAYOUT_KEYS)
               for store in stores}
    if len(layouts) != 1:
        raise BHInputError(stores[0].folder, f"latent stores with different token layouts: {sorted(layouts)}",
                           "encode every dataset with the same encoders and augment.max_patches")
    return {key: stores[0].meta.get(key) for key in LAYOUT_KEYS}


def read_latents(*, path: Path, dataset: str | None = None) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Datasets, subject labels and packed rows (:func:`pack_rows`) of a latent store, optionally one dataset's."""
    store = LatentStore(Path(path))
    keep = np.ones(len(store), dtype=bool) if dataset is None else store.datasets == dataset
    tokens, mask = store.rows(np.flatnonzero(keep))
    return store.datasets[keep], store.subjects[keep], pack_rows(tokens, mask)


def read_latents_files(*, paths: Sequence[Path], dataset: str | None = None) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """:func:`read_latents` of several stores (one per dataset, one token layout), rows concatenated.

    Materialises every row in memory (``(n_rows, N, D + 1)`` float32); stream with
    :class:`LatentStore` where that is too large.
    """
    stores = [LatentStore(Path(p)) for p in paths]
    if not stores:
        raise BHInputError("latents", "no latent store given", "run the extract_latents rule")
    check_same_layout(stores)
    parts = [read_latents(path=store.folder, dataset=dataset) for store in stores]
    return (np.concatenate([d for d, _, _ in parts]), np.concatenate([s for _, s, _ in parts]),
            torch.cat([x for _, _, x in parts]))
