"""Benchmark: the anatomical chain (``preprocess_anat``) on Colin27, and both skull-strippers.

Jobs, each in a fresh process (``spawn``), so the peak resident memory
(``ru_maxrss``) is that job's own, interpreter and imports included:

- ``chain 2 mm``: the whole step at the demo settings (registration and MNI
  outputs at 2 mm, tensor 48 x 56 x 48), deepbet;
- ``chain 1 mm``: the paper settings (registration and MNI outputs at 1 mm,
  tensor 160 x 192 x 160 at 1 mm), deepbet;
- ``skullstrip <method>``: :func:`bh_models.anat.skullstrip.skullstrip` alone on
  ch2 and on ch2 under a random affine header (oblique, scaled), Dice against
  FSL BET's ``ch2bet > 0`` (same voxels: only the header moves).

Wall and CPU seconds are both printed: the machine may be shared, and CPU
seconds are the less load-sensitive figure. The chain runs ITK on one thread
(byte-reproducible registration); torch (deepbet) gets ``--threads``.

Usage::

    python benchmarks/bench_anat.py [--threads 2] [--workdir /tmp/bh_bench_anat] [--skip-1mm]

Targets: <= 30 s per subject at 2 mm, <= 150 s at 1 mm, on 2 cores.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

from fresh_process import run_in_fresh_process

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
CH2BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")

OUTPUTS = {
    "out_t1w": "desc-preproc_T1w.nii.gz",
    "out_mask": "desc-brain_mask.nii.gz",
    "out_mni_t1w": "space-MNI_desc-preproc_T1w.nii.gz",
    "out_mni_mask": "space-MNI_desc-brain_mask.nii.gz",
    "out_forward": "from-T1w_to-MNI_xfm.h5",
    "out_inverse": "from-MNI_to-T1w_xfm.h5",
    "out_tensor": "desc-encoder_T1w.npy",
    "out_qc_mask": "desc-brain_mask.png",
    "out_qc_registration": "space-MNI_T1w.png",
}


def _perturbed_ch2(path: Path) -> Path:
    """ch2 with a fixed random world affine in its header (rotation <= 15 deg, shift <= 20 mm, scale +-10 %)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(7)
    img = nib.load(CH2)
    centre = nib.affines.apply_affine(img.affine, (np.array(img.shape) - 1) / 2)
    ax, ay, az = np.deg2rad(rng.uniform(-15, 15, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    linear = rz @ ry @ rx @ np.diag(rng.uniform(0.9, 1.1, 3))
    move = np.eye(4)
    move[:3, :3] = linear
    move[:3, 3] = centre + rng.uniform(-20, 20, 3) - linear @ centre
    out = nib.Nifti1Image(np.asarray(img.dataobj), move @ img.affine)
    out.header.set_data_dtype(np.uint8)
    nib.save(out, path)
    return path


def _measure(queue: mp.Queue, job: str, workdir: str, threads: int) -> None:
    """Run one job in this (fresh) process and report wall s, CPU s, peak RSS MB and a note."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    work = Path(workdir)
    if job.startswith("chain"):
        from bh_models.anat.preprocess import preprocess_anat

        res = 2 if job == "chain_2mm" else 1
        grid = (48, 56, 48) if res == 2 else (160, 192, 160)
        folder = work / job
        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = preprocess_anat(t1w=CH2, **{k: folder / f"sub-ch2_{v}" for k, v in OUTPUTS.items()},
                              resolution=res, registration_resolution=res, tensor_grid=grid,
                              seed=0, threads=threads)
        import json

        timing = json.loads((folder / "sub-ch2_desc-preproc_T1w.json").read_text())["Timing"]
        parts = " ".join(f"{k} {v:.1f}" for k, v in timing.items() if k not in ("total", "load"))
        extra = f"Dice {out['dice']:.4f} NCC {out['ncc']:.3f} TIV {out['tiv_ml']:.0f} mL | {parts}"
    else:
        import nibabel as nib
        import numpy as np

        from bh_models.anat.skullstrip import dice, skullstrip, tiv_ml

        method, which = job.split("_")[1:]
        source = CH2 if which == "ch2" else _perturbed_ch2(work / "ch2_random_affine.nii.gz")
        img = nib.load(source)
        reference = np.asarray(nib.load(CH2BET).dataobj) > 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        mask = skullstrip(img, method=method, threads=threads)
        overlap = dice(np.asarray(mask.dataobj), reference)
        extra = f"Dice vs ch2bet {overlap:.4f}, mask {tiv_ml(mask):.0f} mL"
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((wall, cpu, peak_mb, extra))


def run(job: str, workdir: Path, threads: int) -> tuple[float, float, float, str]:
    return run_in_fresh_process(_measure, job, str(workdir), threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bh_bench_anat"))
    parser.add_argument("--skip-1mm", action="store_true")
    args = parser.parse_args()
    if not CH2.is_file():
        raise SystemExit(f"{CH2} is missing: install Debian's mricron-data")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"Colin27 (ch2, 181 x 217 x 181 at 1 mm); torch threads {args.threads}, ITK 1; "
          "load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    labels = {
        "chain_2mm": "preprocess_anat, 2 mm (demo)",
        "chain_1mm": "preprocess_anat, 1 mm (paper grid)",
        "ss_deepbet_ch2": "skullstrip deepbet, ch2",
        "ss_ants_ch2": "skullstrip ants, ch2",
        "ss_deepbet_moved": "skullstrip deepbet, ch2 moved",
        "ss_ants_moved": "skullstrip ants, ch2 moved",
    }
    jobs = [j for j in labels if not (args.skip_1mm and j == "chain_1mm")]
    print(f"{'job':<38}{'wall s':>9}{'CPU s':>9}{'peak MB':>10}  note")
    for job in jobs:
        wall, cpu, peak, extra = run(job, args.workdir, args.threads)
        print(f"{labels[job]:<38}{wall:9.2f}{cpu:9.2f}{peak:10.0f}  {extra}", flush=True)
    print("\ntargets: <= 30 s at 2 mm, <= 150 s at 1 mm (2 cores)")


if __name__ == "__main__":
    main()
