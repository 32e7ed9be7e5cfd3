"""Benchmark: the packed store against one csv.gz per sample, and candidate shard formats.

Three figures, all from one run on the same synthetic samples:

1. Packing: time of the augment -> splits -> pack -> scaling chain for
   ``--runs`` x 4 samples (2,500 UK Biobank-like runs of 490 frames x 400 ROIs at
   TR 0.735 s, factors 1-4: 10,000 samples). The runs' TSVs are hard links to
   ``--distinct`` generated files, so parsing costs what it costs while disk use
   stays small.
2. Loader throughput (samples/s): ``FmriShardDataset`` + ``collate_fmri``
   against Datasets that read csv.gz files (ROI x time) - one per subject's run
   (the official code's format) or, stricter, one per sample - and do the same
   scaling, padding and masking, on the same ``--loader-samples`` samples in the
   same order; the items are checked equal.
3. Format choice: write time, size, random-read throughput and byte-stability of
   raw .npy shards read by memmap, HDF5 (contiguous; chunked + gzip) and one .npy
   per sample, on the same ``--format-samples`` samples.

    python benchmarks/bench_store.py --workdir /tmp/bh_bench_store --runs 2500 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from bh_models.core.storeformat import load_scaling
from bh_models.models.data import FmriShardDataset, collate_fmri
from bh_models.store.augment import make_samples
from bh_models.store.scaling import compute_scaling
from bh_models.store.shards import pack_fmri
from bh_models.store.splits import make_splits

TS_SUFFIX = "space-MNI152NLin2009cAsym_atlas-Schaefer2018_seg-7n_scale-400_timeseries.tsv"
N_ROIS, N_FRAMES, TR, FACTORS, MAX_PATCHES = 400, 490, 0.735, [1, 2, 3, 4], 18


def build_sources(root: Path, n_runs: int, n_distinct: int, seed: int) -> list[Path]:
    """``n_runs`` time series (one subject each) hard-linked to ``n_distinct`` generated TSVs."""
    rng = np.random.default_rng(seed)
    columns = [f"7Networks_roi{i:03d}" for i in range(N_ROIS)]
    distinct = []
    for i in range(n_distinct):
        path = root / "distinct" / f"ts-{i:03d}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        values = rng.normal(0, 2, N_ROIS) + rng.standard_normal((N_FRAMES, N_ROIS))
        pd.DataFrame(values, columns=columns).to_csv(path, sep="\t", index=False, float_format="%.6g")
        distinct.append(path)
    paths = []
    for i in range(n_runs):
        path = root / "bench" / f"sub-{i:05d}" / "func" / f"sub-{i:05d}_task-rest_{TS_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(distinct[i % n_distinct], path)
        path.with_name(path.name.replace(".tsv", ".json")).write_text(
            json.dumps({"RepetitionTime": TR, "NumberOfVolumes": N_FRAMES}))
        paths.append(path)
    return paths


def timed(label: str, func, **kwargs):
    start = time.perf_counter()
    out = func(**kwargs)
    elapsed = time.perf_counter() - start
    print(f"  {label:<34s} {elapsed:8.2f} s   {out}")
    return elapsed


def bench_packing(work: Path, sources: list[Path], threads: int, seed: int) -> Path:
    store = work / "store"
    samples = work / "bench_samples.tsv"
    print(f"\n[1] packing {len(sources)} runs x {len(FACTORS)} factors (threads={threads})")
    total = timed("make_samples (sidecars only)", make_samples, timeseries=sources, dataset="bench",
                  out_samples=samples, tr_factors=FACTORS, seed=seed)
    total += timed("make_splits", make_splits, dataset="bench", samples=samples,
                   out_splits=store / "splits" / "bench.tsv", seed=seed)
    total += timed("pack_fmri (parse TSVs, write shards)", pack_fmri, samples=samples, timeseries=sources,
                   splits=store / "splits" / "bench.tsv", out_dir=store / "fmri" / "bench", threads=threads)
    total += timed("compute_scaling", compute_scaling, fmri=[store / "fmri" / "bench"],
                   out_scaling=store / "scaling.json")
    n = len(pd.read_csv(samples, sep="\t"))
    print(f"  total: {total:.1f} s for {n} samples = {n / total:.0f} samples/s "
          f"({total / len(sources) * 1e3:.1f} ms per source run)")
    return store


class CsvGzDataset(Dataset):
    """The baseline: csv.gz files (ROI x time), scaled, padded and masked on read.

    ``per_subject=True`` is the official layout: one file per subject's run at its
    native TR, the variant taken on the fly (every ``factor``-th frame from
    ``offset``). ``per_subject=False`` is a stricter baseline: one file per
    sample, already downsampled, so no more values are parsed than are used.
    """

    def __init__(self, rows: pd.DataFrame, folder: Path, scaling_json: Path, per_subject: bool) -> None:
        self.rows = rows.reset_index(drop=True)
        self.folder = folder
        self.scaling = load_scaling(scaling_json)
        self.per_subject = per_subject

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows.iloc[i]
        name = row["subject"] if self.per_subject else row["sample_id"]
        raw = pd.read_csv(self.folder / f"{name}.csv.gz", header=None).to_numpy(np.float32)  # (rois, frames)
        if self.per_subject:
            raw = raw[:, row["offset"]::row["factor"]][:, : row["n_frames"]]
        x = np.zeros((N_ROIS, MAX_PATCHES * row["k"]), dtype=np.float32)
        x[:, : raw.shape[1]] = self.scaling.apply(raw)
        mask = np.arange(MAX_PATCHES) < row["n_patches"]
        return {"x": torch.from_numpy(x), "patch_mask": torch.from_numpy(mask), "tr": float(row["tr"]),
                "k": int(row["k"]), "n_patches": int(row["n_patches"]), "n_frames": int(raw.shape[1]),
                "sample_id": row["sample_id"], "subject": row["subject"], "dataset": row["dataset"]}


def write_csv_gz(values: np.ndarray, path: Path) -> None:
    # Level 1 to save generation time: gzip's level barely changes reading speed.
    pd.DataFrame(values).to_csv(path, header=False, index=False, float_format="%.6g",
                                compression={"method": "gzip", "compresslevel": 1, "mtime": 0})


def loader_rate(dataset: Dataset, order: np.ndarray, batch_size: int, repeats: int = 3) -> tuple[float, list]:
    """Median samples/s over ``repeats`` timed passes, after one untimed pass that
    warms the page cache (the baselines' files were just written, so are warm too)."""
    subset = torch.utils.data.Subset(dataset, order.tolist())
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fmri, num_workers=0)
    batches = list(loader)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _batch in loader:
            pass
        rates.append(len(order) / (time.perf_counter() - start))
    return float(np.median(rates)), batches


def bench_loader(work: Path, store: Path, sources: list[Path], n_samples: int, batch_size: int,
                 seed: int) -> None:
    print(f"\n[2] loader throughput on the same {n_samples} samples, same order, batch {batch_size}, 0 workers, "
          "median of 3 passes after a warm-up pass")
    packed = FmriShardDataset([store / "fmri" / "bench"], "train", scaling=store / "scaling.json")
    order = np.sort(np.random.default_rng(seed).choice(len(packed), size=n_samples, replace=False))
    order = np.random.default_rng(seed + 1).permutation(order)
    rows = packed.index.iloc[order]
    raw = FmriShardDataset([store / "fmri" / "bench"], "train", scale=False)
    by_name = {p.name: p for p in sources}
    for folder in ("per_subject", "per_sample"):
        (work / folder).mkdir(exist_ok=True)
    # The baseline files hold exactly the values that were packed (%.6g round-trips float32 of %.6g).
    for source_file, subject in set(zip(rows["source_file"], rows["subject"])):
        values = pd.read_csv(by_name[source_file], sep="\t").to_numpy(np.float32).T
        write_csv_gz(values, work / "per_subject" / f"{subject}.csv.gz")
    for i in order:
        item = raw[int(i)]
        write_csv_gz(item["x"][:, : item["n_frames"]].numpy(), work / "per_sample" / f"{item['sample_id']}.csv.gz")
    store_rate, store_batches = loader_rate(packed, order, batch_size)
    print(f"  packed store (memmap shards)            {store_rate:8.1f} samples/s")
    for folder, label in (("per_subject", "csv.gz per subject (official layout)"),
                          ("per_sample", "csv.gz per sample (stricter)")):
        baseline = CsvGzDataset(packed.index, work / folder, store / "scaling.json", folder == "per_subject")
        base_rate, base_batches = loader_rate(baseline, order, batch_size)
        for a, b in zip(base_batches, store_batches):
            assert a["sample_id"] == b["sample_id"] and torch.equal(a["x"], b["x"])
            assert torch.equal(a["patch_mask"], b["patch_mask"])
        print(f"  {label:<39s} {base_rate:8.1f} samples/s   store is {store_rate / base_rate:5.1f} x faster"
              f"   (items identical)")
    start = time.perf_counter()
    loader = DataLoader(packed, batch_size=batch_size, shuffle=True, collate_fn=collate_fmri, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    n = sum(len(batch["sample_id"]) for batch in loader)
    print(f"  packed store, one shuffled train epoch  {n / (time.perf_counter() - start):8.1f} samples/s "
          f"over {n} samples ({sum(os.path.getsize(p) for p in set(packed.index['shard_path'])) / 1e9:.1f} GB "
          "of shards, page cache as the packing left it)")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bench_formats(work: Path, store: Path, n_samples: int, seed: int) -> None:
    print(f"\n[3] shard formats on the same {n_samples} samples (random reads, warm page cache)")
    raw = FmriShardDataset([store / "fmri" / "bench"], "train", scale=False)
    picked = np.sort(np.random.default_rng(seed).choice(len(raw), size=min(n_samples, len(raw)), replace=False))
    arrays = [raw[int(i)]["x"][:, : raw[int(i)]["n_frames"]].numpy().T.copy() for i in picked]  # (frames, rois)
    starts = np.concatenate([[0], np.cumsum([len(a) for a in arrays])])
    order = np.random.default_rng(seed + 2).permutation(len(arrays))
    folder = work / "formats"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()

    def write_npy(path: Path) -> None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype="<f4", shape=(int(starts[-1]), N_ROIS))
        for a, s in zip(arrays, starts):
            out[s: s + len(a)] = a
        out.flush()

    def read_npy(path: Path) -> None:
        data = np.load(path, mmap_mode="r")
        for i in order:
            np.array(data[starts[i]: starts[i + 1]])

    def write_h5(path: Path, **options) -> None:
        with h5py.File(path, "w", libver="latest", track_order=False) as fh:
            dset = fh.create_dataset("x", shape=(int(starts[-1]), N_ROIS), dtype="<f4", track_times=False, **options)
            for a, s in zip(arrays, starts):
                dset[s: s + len(a)] = a

    def read_h5(path: Path) -> None:
        with h5py.File(path, "r") as fh:
            dset = fh["x"]
            for i in order:
                dset[starts[i]: starts[i + 1]]

    def write_files(path: Path) -> None:
        path.mkdir()
        for j, a in enumerate(arrays):
            np.save(path / f"{j:06d}.npy", a)

    def read_files(path: Path) -> None:
        for i in order:
            np.load(path / f"{i:06d}.npy")

    candidates = {
        "raw .npy shard + memmap (chosen)": (write_npy, read_npy, {}),
        "HDF5 contiguous": (write_h5, read_h5, {}),
        "HDF5 chunked 64 rows + gzip 1": (write_h5, read_h5, {"chunks": (64, N_ROIS), "compression": "gzip",
                                                               "compression_opts": 1}),
        "one .npy file per sample": (write_files, read_files, {}),
    }
    print(f"  {'format':<34s} {'write s':>8s} {'MB':>8s} {'read samples/s':>15s} {'byte-stable':>12s}")
    for j, (label, (write, read, options)) in enumerate(candidates.items()):
        paths = [folder / f"{j}-a", folder / f"{j}-b"]
        start = time.perf_counter()
        write(paths[0], **options)
        write_s = time.perf_counter() - start
        write(paths[1], **options)
        files = sorted(paths[0].rglob("*")) if paths[0].is_dir() else [paths[0]]
        size = sum(f.stat().st_size for f in files) / 1e6
        stable = all(_sha(f) == _sha(paths[1] / f.relative_to(paths[0]) if paths[0].is_dir() else paths[1])
                     for f in files)
        read(paths[0])  # warm the page cache for every format alike
        rates = []
        for _ in range(3):  # median of three: the machine is shared
            start = time.perf_counter()
            read(paths[0])
            rates.append(len(arrays) / (time.perf_counter() - start))
        print(f"  {label:<34s} {write_s:8.2f} {size:8.1f} {np.median(rates):15.0f} {str(stable):>12s}")
        for path in paths:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bh_bench_store"))
    parser.add_argument("--runs", type=int, default=2500, help="source runs; samples = 4 x runs")
    parser.add_argument("--distinct", type=int, default=50, help="distinct generated TSVs behind the runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loader-samples", type=int, default=256)
    parser.add_argument("--format-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (GBs) afterwards")
    args = parser.parse_args()
    # One intra-op thread, as in DataLoader workers; also keeps timings sane on a shared machine.
    torch.set_num_threads(1)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    try:
        start = time.perf_counter()
        sources = build_sources(args.workdir / "derivatives", args.runs, args.distinct, args.seed)
        print(f"generated {args.distinct} distinct TSVs behind {args.runs} runs in {time.perf_counter() - start:.1f} s")
        store = bench_packing(args.workdir, sources, args.threads, args.seed)
        bench_loader(args.workdir, store, sources, args.loader_samples, args.batch_size, args.seed)
        bench_formats(args.workdir, store, args.format_samples, args.seed)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
