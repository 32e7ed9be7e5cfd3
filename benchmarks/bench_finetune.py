"""Benchmark: a fine-tuning job on 2,000 latent rows stays within the memory its rule requests.

A synthetic latent store of ``--rows`` rows (``bh_models.models.latents`` format,
bf16 on disk) is written with a learnable label, with a tiny Harmonizer
checkpoint and a folds table (one task, one repeat, ``--folds`` folds over
``--rows / 4`` subjects of 4 rows each). Then, each in a fresh process so that
its peak resident memory (``ru_maxrss``) is its own:

1. the fine-tuning step (:func:`bh_models.models.finetune.finetune_harmonizer`) on CPU,
   beside the ``mem_mb`` the ``finetune`` rule requests for it
   (:func:`bh_models.models.finetune.finetune_resources`);
2. for contrast, reading every row into memory as the in-process fine-tuning did
   before (:func:`bh_models.models.latents.read_latents_files`, float32).

The token layout (400 ROIs x 1 patch + 27 T1 tokens, 256 channels; the model maps
them to its 64-wide tiny encoder) keeps a CPU run to minutes while each row is
large enough (219 kB in bf16) that 2,000 of them in float32 (0.9 GB) would not fit
the request: memory must not grow with the rows.

    python benchmarks/bench_finetune.py --rows 2000 --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

N_ROIS, PATCHES, S_GRID, DIM = 400, 1, (3, 3, 3), 256
N_TOKENS = N_ROIS * PATCHES + int(np.prod(S_GRID))


def build(work: Path, *, rows: int, folds: int) -> dict:
    from bh_models.core.finetuneformat import write_folds
    from bh_models.core.jsonio import sidecar_path, write_json
    from bh_models.models.latents import LatentWriter
    from bh_models.models.nn.configs import config_to_dict, model_config
    from bh_models.models.nn.harmonizer import Harmonizer
    from bh_models.models.train import CHECKPOINT_FORMAT, save_checkpoint

    rng = np.random.default_rng(0)
    n_subjects = rows // 4
    subjects = [f"{i:05d}" for i in range(n_subjects)]
    labels = {s: i % 2 for i, s in enumerate(subjects)}
    writer = LatentWriter(work / "latents", n_rows=4 * n_subjects, n_tokens=N_TOKENS, dim=DIM,
                          meta={"n_rois": N_ROIS, "n_patches": PATCHES, "s_grid": list(S_GRID)})
    for subject in subjects:
        tokens = rng.standard_normal((4, N_TOKENS, DIM), dtype=np.float32)
        tokens[:, :, :8] += 0.5 * labels[subject]
        writer.add(torch.from_numpy(tokens), torch.ones(4, N_TOKENS, dtype=torch.bool),
                   [{"dataset": "synth", "subject": subject, "fmri_sample_id": f"{subject}-{r}", "t1_sample_id": "t",
                     "has_fmri": 1, "has_t1": 1} for r in range(4)])
    writer.close()
    config = model_config(model="harmonizer", size="tiny", overrides={
        "dim_s": DIM, "dim_f": DIM, "s_grid": S_GRID, "n_rois": N_ROIS, "n_patches": PATCHES})
    torch.manual_seed(0)
    checkpoint = work / "harmonizer" / "checkpoint.pt"
    save_checkpoint(checkpoint, {"format": CHECKPOINT_FORMAT, "model": Harmonizer(config).state_dict(),
                                 "config": {"model": config_to_dict(config), "train": {}}, "step": 0})
    write_json(sidecar_path(checkpoint), {"ModelConfig": config_to_dict(config)})
    order = rng.permutation(n_subjects)
    table = pd.DataFrame({"task": "dx", "task_type": "classification", "repeat": 0,
                          "fold": [int(np.where(order == i)[0][0]) % folds for i in range(n_subjects)],
                          "dataset": "synth", "subject": subjects, "label": [float(labels[s]) for s in subjects]})
    write_folds(table, work / "folds.tsv")
    return {"latents": work / "latents", "checkpoint": checkpoint, "folds": work / "folds.tsv"}


def _finetune(queue, paths: dict, out: str, recipe: dict, threads: int) -> None:
    from bh_models.models.finetune import finetune_harmonizer

    started = time.perf_counter()
    summary = finetune_harmonizer(latents=[paths["latents"]], harmonizer_checkpoint=paths["checkpoint"],
                                  folds=paths["folds"], out_predictions=Path(out), threads=threads, **recipe)
    queue.put((time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, summary))


def _materialise(queue, paths: dict, threads: int) -> None:
    from bh_models.models.latents import read_latents_files

    torch.set_num_threads(threads)
    started = time.perf_counter()
    _, _, x = read_latents_files(paths=[paths["latents"]])
    queue.put((time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               {"shape": list(x.shape)}))


def fresh(target, *args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bh_bench_finetune"))
    args = parser.parse_args()
    from bh_models.models.finetune import finetune_resources
    from bh_models.models.latents import LatentStore

    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    paths = build(args.workdir, rows=args.rows, folds=args.folds)
    n_rows = len(LatentStore(paths["latents"]))
    on_disk = (paths["latents"] / "tokens.npy").stat().st_size / 2**20
    recipe = {"epochs": args.epochs, "warmup_epochs": 0.0, "batch_size": 16, "eval_batch_size": 64}
    request = finetune_resources(latents=[paths["latents"]], harmonizer_checkpoint=paths["checkpoint"],
                                 batch_size=16, eval_batch_size=64, epochs=args.epochs, n_trainings=args.folds,
                                 gpu=False, threads=args.threads)
    print(f"{n_rows} rows x {N_TOKENS} tokens x {DIM} channels: {on_disk:.0f} MiB in bf16 on disk, "
          f"{n_rows * N_TOKENS * (DIM + 1) * 4 / 2**20:.0f} MiB as float32 rows in memory")
    print(f"rule request: mem_mb {request['mem_mb']}, runtime {request['runtime']} min "
          f"(CPU, batch 16, {args.folds} trainings of {args.epochs} epoch(s))")
    seconds, peak, summary = fresh(_finetune, paths, str(args.workdir / "scores.tsv"), recipe, args.threads)
    print(f"fine-tuning job: peak RSS {peak:.0f} MiB = {peak / request['mem_mb']:.2f} x the request "
          f"({'within' if peak <= request['mem_mb'] else 'OVER'}), {seconds:.0f} s, {summary}")
    seconds, peak_all, info = fresh(_materialise, paths, args.threads)
    print(f"reading every row into memory (read_latents_files, the former in-process path): peak RSS "
          f"{peak_all:.0f} MiB ({peak_all / peak:.1f} x the job's peak), {seconds:.0f} s, {info}")
    scores = pd.read_csv(args.workdir / "scores.tsv", sep="\t", dtype={"subject": str})
    labels = pd.read_csv(paths["folds"], sep="\t", dtype={"subject": str}).set_index("subject")["label"]
    from sklearn.metrics import roc_auc_score

    print(f"held-out AUROC of the synthetic label after {args.epochs} epoch(s): "
          f"{roc_auc_score(labels.loc[scores['subject']], scores['score']):.3f}")
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
