"""Latent stores: bf16 bits in a memory-mapped array, a token mask, an index; the reader API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bh_models.core.errors import BHInputError
from bh_models.models.latents import (
    LatentStore,
    LatentWriter,
    check_same_layout,
    collate_latents,
    from_bf16_bits,
    pack_rows,
    read_latents_files,
    to_bf16_bits,
    unpack_rows,
)

N, D = 10, 8
LAYOUT = {"n_rois": 2, "n_patches": 3, "s_grid": [1, 2, 2]}


def write_store(folder, rows: int = 5, seed: int = 0, dataset: str = "siteA"):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(rows, N, D, generator=generator)
    mask = torch.rand(rows, N, generator=generator) > 0.3
    mask[0, 6:] = False  # row 0: no T1
    writer = LatentWriter(folder, n_rows=rows, n_tokens=N, dim=D, meta={**LAYOUT, "dataset": dataset})
    for start in range(0, rows, 2):  # batches of 2
        stop = min(rows, start + 2)
        writer.add(tokens[start:stop], mask[start:stop],
                   [{"dataset": dataset, "subject": f"{i:02d}", "fmri_sample_id": f"f{i}",
                     "t1_sample_id": "" if i == 0 else f"t{i}", "has_fmri": 1, "has_t1": int(i != 0)}
                    for i in range(start, stop)])
    return writer.close(), tokens, mask


def test_bf16_bits_round_trip_like_torch():
    values = torch.randn(1000) * 100
    bits = to_bf16_bits(values)
    assert bits.dtype == np.uint16
    assert torch.equal(torch.from_numpy(from_bf16_bits(bits)), values.to(torch.bfloat16).float())


def test_store_round_trip_and_reader_api(tmp_path):
    folder, tokens, mask = write_store(tmp_path / "siteA")
    assert sorted(p.name for p in folder.iterdir()) == ["index.tsv", "latents.json", "mask.npy", "tokens.npy"]
    raw = np.load(folder / "tokens.npy", mmap_mode="r")
    assert raw.dtype == np.uint16 and raw.shape == (5, N, D)
    store = LatentStore(folder)
    assert len(store) == 5 and store.subjects.tolist() == ["00", "01", "02", "03", "04"]
    item = store[3]
    assert item["tokens"].dtype == torch.float32 and item["mask"].dtype == torch.bool
    assert torch.equal(item["tokens"], tokens[3].to(torch.bfloat16).float()) and torch.equal(item["mask"], mask[3])
    batch_tokens, batch_mask = store.rows([4, 1])
    assert torch.equal(batch_tokens[0], tokens[4].to(torch.bfloat16).float()) and torch.equal(batch_mask[1], mask[1])
    batch = collate_latents([store[0], store[2]])
    assert batch["tokens"].shape == (2, N, D) and batch["subject"] == ["00", "02"]
    paired = LatentStore(folder, paired_only=True)
    assert paired.subjects.tolist() == ["01", "02", "03", "04"]
    assert torch.equal(paired[0]["tokens"], store[1]["tokens"])
    assert check_same_layout([store, paired])["n_patches"] == 3


def test_packed_rows_for_fine_tuning(tmp_path):
    a, tokens_a, mask_a = write_store(tmp_path / "a", dataset="a")
    b, _, _ = write_store(tmp_path / "b", rows=3, seed=1, dataset="b")
    datasets, subjects, x = read_latents_files(paths=[a, b])
    assert x.shape == (8, N, D + 1) and datasets.tolist() == ["a"] * 5 + ["b"] * 3
    tokens, mask = unpack_rows(x)
    assert torch.equal(mask[:5], mask_a) and torch.equal(tokens[:5], tokens_a.to(torch.bfloat16).float())
    assert torch.equal(pack_rows(tokens, mask), x)
    only_b = read_latents_files(paths=[a, b], dataset="b")
    assert only_b[2].shape[0] == 3


def test_rewriting_is_byte_identical_and_atomic(tmp_path):
    first, _, _ = write_store(tmp_path / "one")
    second, _, _ = write_store(tmp_path / "two")
    for name in ("tokens.npy", "mask.npy", "index.tsv"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    writer = LatentWriter(tmp_path / "one", n_rows=5, n_tokens=N, dim=D, meta=LAYOUT)
    writer.add(torch.zeros(2, N, D), torch.ones(2, N, dtype=torch.bool), [{}, {}])
    with pytest.raises(ValueError, match="2 rows written, 5 announced"):
        writer.close()
    assert LatentStore(tmp_path / "one")[0]["tokens"].abs().sum() > 0  # the old store is intact


def test_not_a_store_and_mixed_layouts_are_refused(tmp_path):
    with pytest.raises(BHInputError, match="not a latent store"):
        LatentStore(tmp_path)
    a, _, _ = write_store(tmp_path / "a")
    writer = LatentWriter(tmp_path / "b", n_rows=1, n_tokens=N, dim=D, meta={**LAYOUT, "n_patches": 4})
    writer.add(torch.zeros(1, N, D), torch.ones(1, N, dtype=torch.bool), [{"dataset": "b", "subject": "x"}])
    b = writer.close()
    with pytest.raises(BHInputError, match="different token layouts"):
        check_same_layout([LatentStore(a), LatentStore(b)])


def test_a_pickled_store_reopens_its_memory_maps(tmp_path):
    import pickle

    folder, _, _ = write_store(tmp_path / "a", rows=400)
    store = LatentStore(folder)
    blob = pickle.dumps(store)
    assert len(blob) < (folder / "tokens.npy").stat().st_size / 2  # no copy of the token array
    again = pickle.loads(blob)
    assert torch.equal(again[2]["tokens"], store[2]["tokens"])
