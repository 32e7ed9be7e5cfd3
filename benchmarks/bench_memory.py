"""Benchmark: peak training memory per sample of each base model, measured on CPU; writes the memory table.

For each base (paper-size) model, one training step (forward, backward, gradient
clipping, AdamW step) under bf16 autocast runs on CPU with
:class:`bh_models.models.memory.TensorMemoryTracker` counting every live tensor
byte, as ``torch.cuda.max_memory_allocated`` does on a GPU. Full token counts
(400 ROIs x 18 patches; the 160 x 192 x 160 T1 grid: 1,200 patches; the
Harmonizer's 1,200 + 128 + 7,200 tokens), full widths, but shallow stacks, so it
runs on a laptop: each of the model's two Transformer stacks at depth 1 and 2,
batch 1 and 2. The peak is linear in each depth and in the batch
(``peak = fixed + B * per_sample``, both linear in the depths), so the six runs at
(1,1), (2,1), (1,2) solve it and the run at (2,2) checks it; the solution is
extrapolated to the full depths. Repeated with activation checkpointing.

Printed: per model, the fixed bytes (weights, gradients, AdamW states, bf16
weight copies), bytes per sample with and without checkpointing, the (2,2) check,
and the largest per-GPU batch that fits an 80 GB H100 with the margins of
:mod:`bh_models.models.memory`. ``--write`` stores the figures in
``bh_models/models/memory_table.json``, which ``bh check-config`` reads.

The CPU supports bf16 (``avx512_bf16``), so the measurement is under bf16 autocast
directly; ``--fp32`` measures without autocast for the ratio.

    python benchmarks/bench_memory.py --threads 2 --write
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from bh_models.core.jsonio import write_json
from bh_models.models.memory import (
    GIB,
    MEMORY_TABLE,
    MemoryModel,
    TensorMemoryTracker,
    model_tokens,
    usable_bytes,
)
from synthetic_models import MODELS, build, stack_depths

FIT_POINTS = ((1, 1), (2, 1), (1, 2))
CHECK_POINT = (2, 2)


def measure_step(name: str, *, depths: tuple[int, int], batch_size: int, checkpointing: bool,
                 autocast: bool) -> int:
    """Peak live tensor bytes of one training step of ``name`` at the given stack depths."""
    first, second = stack_depths(name)
    synthetic = build(name, size="base", overrides={first: depths[0], second: depths[1],
                                                    "grad_checkpointing": checkpointing})
    model = synthetic.model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95))
    for parameter in trainable:  # AdamW states exist before the measured step, as from step 2 on
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batch = synthetic.make_batch(batch_size, 0)
    tracker = TensorMemoryTracker()
    tracker.register(model, optimizer, batch)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = synthetic.loss(model, batch, torch.Generator().manual_seed(0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tracker.peak


def solve(points: dict[tuple[int, int, int], int]) -> np.ndarray:
    """Least-squares ``[a, b1, b2, c, e1, e2]`` of ``peak = a + b1 L1 + b2 L2 + B (c + e1 L1 + e2 L2)``."""
    rows, values = [], []
    for (l1, l2, batch), peak in points.items():
        rows.append([1, l1, l2, batch, batch * l1, batch * l2])
        values.append(peak)
    return np.linalg.lstsq(np.asarray(rows, float), np.asarray(values, float), rcond=None)[0]


def predict(coef: np.ndarray, l1: int, l2: int, batch: int) -> float:
    return float(coef @ np.array([1, l1, l2, batch, batch * l1, batch * l2], float))


def measure_model(name: str, *, autocast: bool) -> dict:
    full = build(name, size="base")
    first, second = stack_depths(name)
    full_depths = (getattr(full.config, first), getattr(full.config, second))
    del full
    result = {"full_depths": list(full_depths), "stacks": [first, second]}
    for checkpointing in (False, True):
        points = {}
        for depths in (*FIT_POINTS, CHECK_POINT):
            for batch_size in (1, 2):
                started = time.perf_counter()
                points[(*depths, batch_size)] = measure_step(name, depths=depths, batch_size=batch_size,
                                                             checkpointing=checkpointing, autocast=autocast)
                print(f"  {name} checkpointing={checkpointing} depths={depths} batch={batch_size}: "
                      f"{points[(*depths, batch_size)] / GIB:.3f} GiB ({time.perf_counter() - started:.0f} s)",
                      flush=True)
        coef = solve({key: value for key, value in points.items() if key[:2] != CHECK_POINT})
        check = {batch: (predict(coef, *CHECK_POINT, batch), points[(*CHECK_POINT, batch)]) for batch in (1, 2)}
        key = "checkpointing_on" if checkpointing else "checkpointing_off"
        result[key] = {
            "fixed_bytes": predict(coef, *full_depths, 0),
            "per_sample_bytes": predict(coef, *full_depths, 1) - predict(coef, *full_depths, 0),
            "per_block_per_sample_bytes": [float(coef[4]), float(coef[5])],
            "check_depths": list(CHECK_POINT),
            "check_relative_error": max(abs(p - m) / m for p, m in check.values()),
            "raw_peaks": {f"{l1},{l2},{b}": v for (l1, l2, b), v in points.items()},
        }
    return result


def rounded(obj):
    """Byte counts as integers, small floats to 6 decimals: a readable, stable table."""
    if isinstance(obj, float):
        return round(obj) if abs(obj) > 1000 else round(obj, 6)
    if isinstance(obj, dict):
        return {key: rounded(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [rounded(value) for value in obj]
    return obj


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--fp32", action="store_true", help="measure without autocast (fp32)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--write", action="store_true", help=f"write {MEMORY_TABLE.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    autocast = not args.fp32
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{'bf16 autocast' if autocast else 'fp32'}; usable on a {args.gpu_memory_gb:g} GB GPU: "
          f"{usable_bytes(args.gpu_memory_gb) / GIB:.1f} GiB")
    table = {}
    for name in args.models:
        started = time.perf_counter()
        entry = measure_model(name, autocast=autocast)
        entry["tokens"] = model_tokens(model=name, n_rois=400, max_patches=18, t1_grid=(160, 192, 160))
        table[name] = entry
        print(f"{name} ({time.perf_counter() - started:.0f} s, {entry['tokens']} tokens per sample, "
              f"depths {entry['full_depths']}):")
        for key in ("checkpointing_off", "checkpointing_on"):
            part = entry[key]
            memory = MemoryModel(model=name, fixed_bytes=part["fixed_bytes"],
                                 per_sample_bytes={key == "checkpointing_on": part["per_sample_bytes"]},
                                 tokens=entry["tokens"])
            print(f"  {key}: fixed {part['fixed_bytes'] / GIB:.2f} GiB, {part['per_sample_bytes'] / GIB:.3f} GiB "
                  f"per sample ({part['per_sample_bytes'] / entry['tokens'] / sum(entry['full_depths']) / 1024:.1f}"
                  f" KiB per token per block), check at depths {part['check_depths']}: "
                  f"{100 * part['check_relative_error']:.1f} % off; largest batch on {args.gpu_memory_gb:g} GB: "
                  f"{memory.max_batch(gpu_memory_gb=args.gpu_memory_gb, checkpointing=key == 'checkpointing_on')}")
    if args.write:
        write_json(MEMORY_TABLE, rounded({
            "Description": "Peak training-step memory of each base model (bf16 autocast, AdamW), measured on CPU "
                           "by benchmarks/bench_memory.py with TensorMemoryTracker and extrapolated to the full "
                           "depths; bh check-config predicts fixed_bytes + batch * per_sample_bytes",
            "MeasuredWith": {"torch": torch.__version__, "machine": platform.machine(),
                             "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "precision": "bf16 autocast" if autocast else "fp32", "commit": git_commit()},
            "models": {name: {"tokens": entry["tokens"], "full_depths": entry["full_depths"],
                              "stacks": entry["stacks"],
                              "fixed_bytes": entry["checkpointing_off"]["fixed_bytes"],
                              "per_sample_bytes": {key: entry[key]["per_sample_bytes"]
                                                   for key in ("checkpointing_off", "checkpointing_on")},
                              "detail": {key: {k: v for k, v in entry[key].items() if k != "per_sample_bytes"}
                                         for key in ("checkpointing_off", "checkpointing_on")}}
                       for name, entry in table.items()},
        }))
        print(f"wrote {MEMORY_TABLE}")


if __name__ == "__main__":
    main()
