"""Cost of provenance records and of the audit, with and without the hash cache.

Part 1 (per job): several jobs consume the same raw T1w and BOLD files (the
usual fan-out: anat, func coregistration, QC, packing...). Each job's record
hashes its inputs and outputs. Without the cache every consumer re-reads the
inputs; with it, only the first does.

Part 2 (audit): a synthetic results tree of N subjects (default 10,000), each
with a raw T1w, an ``anat`` job (4 outputs) and a ``tensor`` job (1 output),
all small files, recorded with :func:`bh_models.core.provenance.record_job`. Times
the audit with a cold cache (``--rehash``: every file read) and a warm one.

Run:  python benchmarks/bench_provenance.py [--subjects 10000] [--mb-t1 8] [--mb-bold 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bh_models.records.audit import audit, summarize
from bh_models.core.hashing import HashCache, hash_cache_dir
from bh_models.core.provenance import code_version, package_versions, record_job

HOUR_NS = 3600 * 10**9


def _age(path: Path) -> None:
    # Files written long before they are hashed, as in a real run (avoids racy cache entries).
    past = time.time_ns() - HOUR_NS
    os.utime(path, ns=(past, past))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    _age(path)
    return path


def _record(workdir: Path, rule: str, wildcards: dict, inputs: dict, outputs: dict, cache: HashCache | None) -> None:
    record_job(
        results_dir=workdir / "results",
        rule=rule,
        wildcards=wildcards,
        inputs=inputs,
        outputs=outputs,
        params={"resolution": 2.0},
        config={"seed": 0},
        seed=0,
        started="2025-01-01T00:00:00+00:00",
        finished="2025-01-01T00:01:00+00:00",
        log=None,
        bids_roots={"ds1": Path("raw/ds1")},
        workdir=workdir,
        hash_cache=cache,
    )


def bench_record_job(root: Path, *, mb_t1: int, mb_bold: int, consumers: int) -> None:
    rng = np.random.default_rng(0)
    t1 = _write(root / "raw/ds1/sub-01/anat/sub-01_T1w.nii.gz", rng.bytes(mb_t1 << 20))
    bold = _write(root / "raw/ds1/sub-01/func/sub-01_task-rest_bold.nii.gz", rng.bytes(mb_bold << 20))
    outs = [
        _write(root / f"results/derivatives/bh-preproc/ds1/sub-01/out{i}.tsv", rng.bytes(200_000))
        for i in range(consumers)
    ]

    t0 = time.perf_counter()
    code_version.cache_clear()
    package_versions.cache_clear()
    code_version()
    package_versions()
    once = time.perf_counter() - t0

    timings = {}
    for label, make_cache in (
        ("no cache", lambda: HashCache(cache_dir=None)),
        ("hash cache", lambda: HashCache(cache_dir=hash_cache_dir(results_dir=root / "results"))),
    ):
        shutil.rmtree(root / "results" / ".cache", ignore_errors=True)
        per_job = []
        for job in range(consumers):
            cache = make_cache()  # one per job, as separate job processes would have
            t0 = time.perf_counter()
            _record(root, f"consumer{job}", {"subject": "01"}, {"t1w": [str(t1)], "bold": [str(bold)]},
                    {"out": [str(outs[job])]}, cache)
            per_job.append(time.perf_counter() - t0)
        timings[label] = per_job

    read_mb = mb_t1 + mb_bold
    print(f"== record_job: {consumers} jobs each reading the same {mb_t1} MB T1w + {mb_bold} MB BOLD")
    print(f"   once per process (git commit/dirty + package versions): {once * 1e3:8.1f} ms")
    for label, per_job in timings.items():
        print(f"   {label:10s}: first job {per_job[0] * 1e3:8.1f} ms, later jobs median "
              f"{np.median(per_job[1:]) * 1e3:8.1f} ms, total {sum(per_job) * 1e3:8.1f} ms")
    no, yes = sum(timings["no cache"]), sum(timings["hash cache"])
    print(f"   total ratio no-cache / cache: {no / yes:.1f}x "
          f"(inputs read {consumers * read_mb} MB vs {read_mb} MB)")
    print(f"   later-job ratio: {np.median(timings['no cache'][1:]) / np.median(timings['hash cache'][1:]):.0f}x")


def build_tree(root: Path, *, subjects: int) -> float:
    """Write the synthetic run; returns the mean record_job time (s) for the anat/tensor jobs."""
    deriv = "results/derivatives/bh-preproc/ds1"
    cache = HashCache(cache_dir=hash_cache_dir(results_dir=root / "results"))
    rng = np.random.default_rng(1)
    spent = 0.0
    jobs = 0
    from tqdm import tqdm

    for s in tqdm(range(subjects), desc="building tree", unit="subject", disable=None):
        sub = f"{s:05d}"
        raw = f"raw/ds1/sub-{sub}/anat/sub-{sub}_T1w.nii.gz"
        _write(root / raw, rng.bytes(2048))
        anat = f"{deriv}/sub-{sub}/anat/sub-{sub}"
        outs = [f"{anat}_desc-preproc_T1w.nii.gz", f"{anat}_desc-brain_mask.nii.gz",
                f"{anat}_desc-preproc_T1w.json", f"{anat}_desc-anatqc_T1w.json"]
        for out in outs:
            _write(root / out, rng.bytes(1024))
        t0 = time.perf_counter()
        _record(root, "anat", {"dataset": "ds1", "subject": sub}, {"t1w": [raw]}, {"out": outs}, cache)
        spent += time.perf_counter() - t0
        tensor = f"{anat}_space-MNI152NLin2009cAsym_res-2_desc-encoder_T1w.npy"
        _write(root / tensor, rng.bytes(4096))
        t0 = time.perf_counter()
        _record(root, "tensor", {"dataset": "ds1", "subject": sub}, {"brain": [outs[0]]}, {"out": [tensor]}, cache)
        spent += time.perf_counter() - t0
        jobs += 2
    return spent / jobs


def bench_audit(root: Path, *, subjects: int) -> None:
    t0 = time.perf_counter()
    mean_record = build_tree(root, subjects=subjects)
    build = time.perf_counter() - t0
    n_files = sum(len(f) for _, _, f in os.walk(root / "results" / "derivatives"))
    print(f"== audit: {subjects} subjects, {2 * subjects} records, {n_files} derivative files, "
          f"{subjects} raw inputs (tree built in {build:.0f} s; record_job mean {mean_record * 1e3:.2f} ms)")
    results = root / "results"
    t0, c0 = time.perf_counter(), time.process_time()
    cold = audit(results, rehash=True)
    t_cold, c_cold = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    warm = audit(results)
    t_warm, c_warm = time.perf_counter() - t0, time.process_time() - c0
    assert set(cold["status"]) == {"ok"} and set(warm["status"]) == {"ok"}, summarize(table=warm)
    # One modification is found among all of them.
    victim = next((results / "derivatives").rglob("*_desc-preproc_T1w.nii.gz"))
    victim.write_bytes(b"tampered")
    t0 = time.perf_counter()
    after = audit(results)
    t_after = time.perf_counter() - t0
    counts = after["status"].value_counts().to_dict()
    # CPU seconds too: on a shared machine wall time mostly measures the neighbours.
    print(f"   --rehash (reads every file): {t_cold:7.1f} s wall, {c_cold:6.1f} s CPU "
          f"({len(cold) / t_cold:6.0f} outputs/s)")
    print(f"   warm hash cache            : {t_warm:7.1f} s wall, {c_warm:6.1f} s CPU "
          f"({len(warm) / t_warm:6.0f} outputs/s)")
    print(f"   load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"   ratio rehash / cached      : {t_cold / t_warm:.2f}x")
    print(f"   after tampering one file   : {t_after:7.1f} s, statuses {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--mb-t1", type=int, default=8)
    parser.add_argument("--mb-bold", type=int, default=64)
    parser.add_argument("--consumers", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_provenance_") as tmp:
        bench_record_job(Path(tmp) / "jobs", mb_t1=args.mb_t1, mb_bold=args.mb_bold, consumers=args.consumers)
        bench_audit(Path(tmp) / "audit", subjects=args.subjects)


if __name__ == "__main__":
    main()
