"""Benchmark: does the data loader keep up with an H100? Loader throughput of each pretraining job.

A synthetic store at the paper's scale is packed with the store stage's own
functions: UK Biobank-like fMRI runs (400 ROIs x 490 frames at TR 0.735 s,
TR factors 1-4, up to 18 patches), 1 mm T1 volumes (160 x 192 x 160, packed in
bf16), and a latent store of Harmonizer rows (8,400 tokens x 768 in bf16 + token
mask: ``bh_models.models.latents``, written with its ``LatentWriter``). Each job's
data then flows through the training loop's own iterator
(``bh_models.models.train._batches``: the resumable sampler, the collate
function, worker processes, prefetching) with 0, 2 and 4 workers:

* fMRI samples (harmonix-F): ``FmriShardDataset`` + ``collate_fmri``;
* T1 volumes (harmonix-S): ``T1ShardDataset`` + ``collate_t1`` (one ``preadv``
  per volume into one batch buffer);
* paired samples (``cache_latents``, the one-off encoding of every training
  sample by both frozen encoders, forward only): ``PairedSamples`` + ``collate_paired``;
* cached latents (the Harmonizer's training): ``LatentStore`` + ``collate_latents``
  as ``pretrain_harmonizer`` reads them, and the same rows read in ``preadv``
  batches (``bh_models.models.finetune.LatentRows``, the fine-tuning reader).

Beside each rate: the samples/s one H100 consumes at 40 % MFU of its bf16 dense
peak, from the FLOPs per sample of ``bh_models.models.flops`` at the base sizes,
and the ratio. The target is >= 2x that rate per GPU; 0 workers is the training
process's own core. Rates are with the page cache warm (the files were just
written), so they measure the loader, not the disk; the bytes per sample give
the disk bandwidth a cold read would need.

    python benchmarks/bench_loader.py --workdir /tmp/bh_bench_loader
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_store import build_sources  # noqa: E402

from bh_models.models.data import FmriShardDataset, T1ShardDataset, collate_fmri, collate_t1, paired_samples  # noqa
from bh_models.models.finetune import LatentRows  # noqa: E402
from bh_models.models.latents import LatentStore, LatentWriter, collate_latents  # noqa: E402
from bh_models.models.flops import (  # noqa: E402
    H100_BF16_DENSE_PEAK,
    sample_cost,
    samples_per_s_at_mfu,
    transformer_forward_flops,
)
from bh_models.models.nn.configs import model_config  # noqa: E402
from bh_models.models.pretrain import PairedSamples, collate_paired  # noqa: E402
from bh_models.models.train import DistContext, TrainConfig, _batches  # noqa: E402
from bh_models.store.augment import make_samples  # noqa: E402
from bh_models.store.scaling import compute_scaling  # noqa: E402
from bh_models.store.shards import pack_fmri, pack_t1  # noqa: E402
from bh_models.store.splits import make_splits  # noqa: E402

T1_SHAPE = (160, 192, 160)
N_LATENT_TOKENS, LATENT_WIDTH = 8400, 768


class PreadLatents(Dataset):
    """Latent-store rows read in ``preadv`` batches (:class:`bh_models.models.finetune.LatentRows`)."""

    def __init__(self, folder: Path) -> None:
        self.rows = LatentRows([folder])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> dict:
        tokens, mask = self.rows.batch(indices)
        return {"tokens": tokens, "mask": mask}

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])


def first(batch):
    """Collate of :class:`PreadLatents`: the batch is read whole."""
    return batch


def build_store(work: Path, *, n_runs: int, n_t1: int, n_latents: int, seed: int) -> dict:
    """Pack the synthetic fMRI and T1 stores of ``n_runs`` subjects and write the latent store."""
    sources = build_sources(work, n_runs, min(n_runs, 16), seed)
    store = work / "store"
    samples = work / "samples.tsv"
    rng = np.random.default_rng(seed)
    tensors = []
    for i in range(n_t1):  # z-scored brain in a zero background, as the anatomical stage writes
        path = work / "t1" / f"sub-{i:05d}_space-MNI152NLin2009cAsym_res-1_desc-encoder_T1w.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        volume = np.zeros(T1_SHAPE, dtype=np.float32)
        volume[20:140, 20:172, 20:140] = rng.standard_normal((120, 152, 120), dtype=np.float32)
        np.save(path, volume)
        tensors.append(path)
    make_samples(timeseries=sources, dataset="bench", out_samples=samples, tr_factors=[1, 2, 3, 4], seed=seed)
    splits = store / "splits" / "bench.tsv"
    make_splits(dataset="bench", samples=samples, t1_tensors=tensors, out_splits=splits, seed=seed,
                fractions={"train": 1.0})
    pack_fmri(samples=samples, timeseries=sources, splits=splits, out_dir=store / "fmri" / "bench", threads=2)
    compute_scaling(fmri=[store / "fmri" / "bench"], out_scaling=store / "scaling.json")
    pack_t1(t1_tensors=tensors, splits=splits, dataset="bench", out_dir=store / "t1" / "bench", threads=2)
    shutil.rmtree(work / "t1")  # float32 sources: only the bf16 shards are read
    latents = store / "latents" / "bench"
    writer = LatentWriter(latents, n_rows=n_latents, n_tokens=N_LATENT_TOKENS, dim=LATENT_WIDTH,
                          meta={"n_rois": 400, "n_patches": 18, "s_grid": [10, 12, 10]})
    for i in range(n_latents):
        tokens = torch.from_numpy(rng.standard_normal((1, N_LATENT_TOKENS, LATENT_WIDTH), dtype=np.float32))
        writer.add(tokens, torch.ones(1, N_LATENT_TOKENS, dtype=torch.bool),
                   [{"dataset": "bench", "subject": f"{i:05d}", "fmri_sample_id": "f", "t1_sample_id": "t",
                     "has_fmri": 1, "has_t1": 1}])
    writer.close()
    return {"fmri": store / "fmri" / "bench", "t1": store / "t1" / "bench", "scaling": store / "scaling.json",
            "latents": latents}


def jobs(paths: dict) -> dict:
    """Per job: dataset, collate function, bytes per sample, FLOPs per sample, batch size."""
    fmri = FmriShardDataset([paths["fmri"]], "train", scaling=paths["scaling"])
    t1 = T1ShardDataset([paths["t1"]], "train")
    table = paired_samples(fmri=[paths["fmri"]], t1=[paths["t1"]], split="train")
    paired = PairedSamples(table=table, fmri=fmri, t1=t1, include_unpaired=False)
    f_config = model_config(model="harmonix_f", size="base")
    s_config = model_config(model="harmonix_s", size="base")
    h_config = model_config(model="harmonizer", size="base")
    f_cost = sample_cost(model="harmonix_f", config=f_config, n_patches=18)
    s_cost = sample_cost(model="harmonix_s", config=s_config, n_patches=18)
    h_cost = sample_cost(model="harmonizer", config=h_config, n_patches=18)
    # cache_latents: one forward pass of each frozen encoder over all its tokens.
    encode = f_cost.detail["target_encoder"] + s_cost.detail["patch_embed"] / 2 + transformer_forward_flops(
        tokens=1 + 1200, width=s_config.embed_dim, depth=s_config.depth, mlp_ratio=s_config.mlp_ratio)
    fmri_bytes = 400 * 18 * 48 * 4  # the padded item the model receives (float32)
    t1_bytes = int(np.prod(T1_SHAPE)) * 2
    latent_bytes = N_LATENT_TOKENS * (LATENT_WIDTH * 2 + 1)
    return {
        "fMRI samples (harmonix-F)": (fmri, collate_fmri, fmri_bytes, f_cost.flops, 32),
        "T1 volumes (harmonix-S)": (t1, collate_t1, t1_bytes, s_cost.flops, 16),
        "paired samples (cache_latents, forward)": (
            paired, functools.partial(collate_paired, collate_fmri=collate_fmri), fmri_bytes + t1_bytes, encode, 8),
        "cached latents (Harmonizer, LatentStore)": (LatentStore(paths["latents"]), collate_latents, latent_bytes,
                                                     h_cost.flops, 8),
        "cached latents (preadv batches)": (PreadLatents(paths["latents"]), first, latent_bytes, h_cost.flops, 8),
    }


def loader_rate(dataset: Dataset, collate, *, batch_size: int, workers: int, samples: int) -> float:
    """Samples/s of the training loop's iterator, after the workers' first batches."""
    config = TrainConfig(steps=10**6, batch_size=batch_size, lr=1e-3, seed=0, checkpoint_every=10**6,
                         num_workers=workers, prefetch_factor=2, pin_memory=False)
    context = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = _batches(dataset, collate, config=config, context=context, start_step=0)
    for _ in range(max(2, workers * 2)):  # workers started, prefetch queues full
        next(batches)
    n_batches = max(1, samples // batch_size)
    started = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    rate = n_batches * batch_size / (time.perf_counter() - started)
    del batches
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bh_bench_loader"))
    parser.add_argument("--runs", type=int, default=48, help="fMRI runs (x4 TR factors = samples)")
    parser.add_argument("--t1", type=int, default=48, help="T1 volumes (9.8 MB each in bf16)")
    parser.add_argument("--latents", type=int, default=32, help="latent rows (12.9 MB each in bf16)")
    parser.add_argument("--samples", type=int, default=256, help="samples timed per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--keep", action="store_true", help="keep the synthetic store")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    started = time.perf_counter()
    paths = build_store(args.workdir, n_runs=args.runs, n_t1=args.t1, n_latents=args.latents, seed=0)
    print(f"synthetic store packed in {time.perf_counter() - started:.0f} s under {args.workdir}")
    print(f"H100 at 40 % MFU of {H100_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s (bf16 dense); rates in samples/s, "
          f"page cache warm, {torch.get_num_threads()} torch thread(s) per process")
    header = " ".join(f"{w} workers".rjust(10) for w in args.workers)
    print(f"{'job':48s} {'MB/sample':>9s} {'TFLOP/s.':>8s} {'H100 needs':>10s} {header}  best/needed")
    for name, (dataset, collate, nbytes, flops, batch_size) in jobs(paths).items():
        needed = samples_per_s_at_mfu(flops_per_sample=flops)
        rates = [loader_rate(dataset, collate, batch_size=batch_size, workers=w,
                             samples=min(args.samples, 8 * batch_size * max(1, w))) for w in args.workers]
        cells = " ".join(f"{r:10.0f}" for r in rates)
        print(f"{name:48s} {nbytes / 1e6:9.1f} {flops / 1e12:8.2f} {needed:10.0f} {cells}  {max(rates) / needed:8.2f}x"
              f"   (0 workers: {rates[0] * nbytes / 1e9:.2f} GB/s)", flush=True)
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
