"""Benchmark: compact T1 storage, bf16 against uint8 + per-volume scale/offset, against the float32 tensor.

For every T1 encoder tensor given (default: the demo run's, z-scored within the
brain mask on the 2 mm grid), each candidate is written and read back and
compared with the float32 tensor:

* **bf16** (the upper 16 bits of float32, rounded to nearest even): 2 bytes/voxel;
* **uint8** with a per-volume offset (minimum) and scale ((max - min) / 255),
  rounded to nearest: 1 byte/voxel.

Reported per candidate, pooled over volumes: RMS and maximum absolute error in
the tensor's units (within-brain SD = 1) over brain voxels (non-zero) and over
all voxels, the error of harmonix-S's MAE target (voxels of each 16^3 patch
normalised to zero mean and unit variance: what the loss compares), and whether
the encoder's input under bf16 autocast (float32 rounded to bf16 by the first
convolution) is bit-identical to the stored volume's. Bytes per 1 mm volume
(160 x 192 x 160) are given beside.

    python benchmarks/bench_t1_format.py [TENSOR.npy ...]
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import torch

from bh_models.core.storeformat import bf16_bits, bf16_to_float32

DEFAULT_GLOB = "/tmp/results_premove/derivatives/bh-preproc/*/sub-*/anat/*_desc-encoder_T1w.npy"
VOXELS_1MM = 160 * 192 * 160


def uint8_round_trip(volume: np.ndarray) -> np.ndarray:
    low, high = float(volume.min()), float(volume.max())
    scale = (high - low) / 255 or 1.0
    codes = np.clip(np.rint((volume - low) / scale), 0, 255).astype(np.uint8)
    return codes.astype(np.float32) * np.float32(scale) + np.float32(low)


def bf16_round_trip(volume: np.ndarray) -> np.ndarray:
    return bf16_to_float32(bf16_bits(volume))


def patch_targets(volume: np.ndarray, patch: int = 16) -> np.ndarray:
    """Per-patch normalised voxels of the volume cropped to whole patches: (n_patches, patch^3)."""
    shape = [side // patch * patch for side in volume.shape]
    v = volume[: shape[0], : shape[1], : shape[2]].astype(np.float64)
    gx, gy, gz = (side // patch for side in shape)
    x = v.reshape(gx, patch, gy, patch, gz, patch).transpose(0, 2, 4, 1, 3, 5).reshape(gx * gy * gz, -1)
    return (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, ddof=1, keepdims=True) + 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tensors", nargs="*", type=Path)
    args = parser.parse_args()
    paths = args.tensors or sorted(map(Path, glob.glob(DEFAULT_GLOB)))
    if not paths:
        raise SystemExit(f"no tensors given and none at {DEFAULT_GLOB}")
    candidates = {"bf16": (bf16_round_trip, 2), "uint8 + scale/offset": (uint8_round_trip, 1)}
    errors = {name: {"brain": [], "all": [], "max": [], "target": [], "target_max": []} for name in candidates}
    autocast_identical = True
    for path in paths:
        volume = np.load(path).astype(np.float32)
        brain = volume != 0
        target = patch_targets(volume)
        for name, (round_trip, _) in candidates.items():
            restored = round_trip(volume)
            diff = (restored - volume).astype(np.float64)
            errors[name]["brain"].append(diff[brain] ** 2)
            errors[name]["all"].append(diff.reshape(-1) ** 2)
            errors[name]["max"].append(np.abs(diff).max())
            target_diff = patch_targets(restored) - target
            errors[name]["target"].append(target_diff.reshape(-1) ** 2)
            errors[name]["target_max"].append(np.abs(target_diff).max())
        autocast = torch.from_numpy(volume).to(torch.bfloat16).float().numpy()
        autocast_identical &= bool(np.array_equal(autocast, bf16_round_trip(volume)))
    print(f"{len(paths)} volumes of shape {np.load(paths[0]).shape}; errors in within-brain SD units")
    print(f"{'format':22s} {'MB / 1 mm volume':>16s} {'RMS brain':>10s} {'RMS all':>10s} {'max':>9s} "
          f"{'RMS MAE target':>15s} {'max target':>11s}")
    rms = {}
    for name, (_, width) in candidates.items():
        e = errors[name]
        rms[name] = float(np.sqrt(np.concatenate(e["brain"]).mean()))
        print(f"{name:22s} {VOXELS_1MM * width / 1e6:16.1f} {rms[name]:10.5f} "
              f"{np.sqrt(np.concatenate(e['all']).mean()):10.5f} {max(e['max']):9.5f} "
              f"{np.sqrt(np.concatenate(e['target']).mean()):15.5f} {max(e['target_max']):11.5f}")
    print(f"float32 (reference)    {VOXELS_1MM * 4 / 1e6:16.1f}")
    print(f"RMS error ratio uint8 / bf16 (brain voxels): {rms['uint8 + scale/offset'] / rms['bf16']:.1f}x")
    print(f"bf16 storage equals the encoder input under bf16 autocast, bit for bit: {autocast_identical}")


if __name__ == "__main__":
    main()
