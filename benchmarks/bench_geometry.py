"""Benchmark: 200 Laplace-Beltrami eigenmodes of one fsLR-32k hemisphere.

Times the whole ``compute_eigenmodes`` step (surface I/O, mesh checks, medial-
wall cut, solve, canonical signs, writing the .npy/TSV/JSON), the parcel
projection (``project_eigenmodes``, both hemispheres, TSV + heatmap PNG), and,
in the same run, LaPy's bare solve of the same cut mesh
(``lapy.Solver(mesh).eigs(k=200)``) as the reference. Each measurement runs in
a fresh process, so the peak resident memory (``ru_maxrss``) is that job's own,
interpreter and imports included. Wall and CPU seconds are both printed: the
machine may be shared, and CPU seconds are the less load-sensitive figure.

Usage::

    python benchmarks/bench_geometry.py [--modes 200] [--repeats 1] [--workdir /tmp/bh_bench_geometry]

Target (issue 5): <= 15 s and <= 1 GB for one hemisphere including I/O and projection, on 2 cores.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

from fresh_process import run_in_fresh_process


def _measure(queue: mp.Queue, job: str, workdir: str, n_modes: int) -> None:
    """Run one job in this (fresh) process and report wall s, CPU s and peak RSS MB."""
    workdir_path = Path(workdir)
    if job in ("lapy", "lapy_1"):
        import lapy
        import numpy as np
        from threadpoolctl import threadpool_limits

        from bh_models.geometry.eigenmodes import load_hemisphere, remove_medial_wall

        mesh = load_hemisphere(surface="fsLR32k", hemi="L")
        vertices, triangles = remove_medial_wall(vertices=mesh.vertices, triangles=mesh.triangles,
                                                 cortex=mesh.cortex, path="mask")
        # "lapy": as a user would call it (OpenBLAS picks its threads); "lapy_1": BLAS on one
        # thread, as inside compute_eigenmodes, so the ratio compares the algorithms alone.
        with threadpool_limits(limits=1 if job == "lapy_1" else None, user_api="blas"):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            values, _ = lapy.Solver(lapy.TriaMesh(vertices, triangles)).eigs(k=n_modes, rng=0)
        extra = f"lambda_2 = {float(np.sort(values)[1]):.6g}"
    elif job in ("step_L", "step_R"):
        from bh_models.geometry.eigenmodes import compute_eigenmodes

        hemi = job[-1]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = compute_eigenmodes(out_eigenvalues=workdir_path / f"hemi-{hemi}_eigenvalues.tsv",
                                 out_eigenmodes=workdir_path / f"hemi-{hemi}_eigenmodes.npy",
                                 surface="fsLR32k", hemi=hemi, n_modes=n_modes, threads=2)
        extra = f"lambda_2 = {out['first_eigenvalues'][1]:.6g}"
    elif job == "project":
        from bh_models.geometry.eigenmodes import project_eigenmodes

        wall0, cpu0 = time.perf_counter(), time.process_time()
        project_eigenmodes(eigenmodes_lh=workdir_path / "hemi-L_eigenmodes.npy",
                           eigenmodes_rh=workdir_path / "hemi-R_eigenmodes.npy",
                           out_matrix=workdir_path / "seg-7n_embedding.tsv",
                           out_figure=workdir_path / "seg-7n_embedding.png", networks=7)
        extra = "400 x M TSV + PNG"
    else:  # pragma: no cover - programming error
        raise ValueError(job)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((wall, cpu, peak_mb, extra))


def run(job: str, workdir: Path, n_modes: int) -> tuple[float, float, float, str]:
    return run_in_fresh_process(_measure, job, str(workdir), n_modes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bh_bench_geometry"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{args.modes} modes, fsLR-32k, medial wall removed; {args.repeats} repeat(s); "
          "load average at start: " + " ".join(f"{x:.2f}" for x in __import__("os").getloadavg()))
    print(f"{'job':<34}{'wall s':>9}{'CPU s':>9}{'peak MB':>10}  note")
    best: dict[str, tuple[float, float, float]] = {}
    labels = {
        "lapy": "LaPy Solver.eigs, default BLAS",
        "lapy_1": "LaPy Solver.eigs, 1 BLAS thread",
        "step_L": "compute_eigenmodes (hemi L)",
        "step_R": "compute_eigenmodes (hemi R)",
        "project": "project_eigenmodes (L+R, 7n)",
    }
    for _ in range(args.repeats):
        # Interleaved so that a change in machine load hits both sides of the ratio alike.
        for job in ("lapy", "lapy_1", "step_L", "step_R", "project"):
            wall, cpu, peak, extra = run(job, args.workdir, args.modes)
            print(f"{labels[job]:<34}{wall:9.2f}{cpu:9.2f}{peak:10.0f}  {extra}", flush=True)
            old = best.get(job)
            best[job] = (min(wall, old[0]), min(cpu, old[1]), max(peak, old[2])) if old else (wall, cpu, peak)
    step_wall = best["step_L"][0] + best["project"][0]
    step_cpu = best["step_L"][1] + best["project"][1]
    step_peak = max(best["step_L"][2], best["project"][2])
    print()
    print(f"one hemisphere incl. I/O + projection (best of {args.repeats}): "
          f"{step_wall:.2f} s wall, {step_cpu:.2f} s CPU, peak {step_peak:.0f} MB "
          f"(target <= 15 s, <= 1024 MB)")
    for ref in ("lapy", "lapy_1"):
        print(f"ratio compute_eigenmodes / {labels[ref]}: wall {best['step_L'][0] / best[ref][0]:.2f}, "
              f"CPU {best['step_L'][1] / best[ref][1]:.2f}; whole step incl. projection: "
              f"wall {step_wall / best[ref][0]:.2f}")


if __name__ == "__main__":
    main()
