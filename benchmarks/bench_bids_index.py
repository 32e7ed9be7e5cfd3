"""Benchmark: fast BIDS discovery vs pybids on a large zero-byte layout.

Builds (once, reused afterwards) a layout of N subjects, each with one T1w and
one rest BOLD with a JSON sidecar (zero-byte images), plus a top-level
task-rest_bold.json, then times ``bh_models.bids.index.index_dataset`` on all of it
and pybids' ``BIDSLayout`` on a subset (pybids is ~100x slower; the full-size
pybids figure is extrapolated linearly unless --pybids-full is given).

    python benchmarks/bench_bids_index.py --subjects 70933 --root /tmp/bids70k
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def build_layout(root: Path, n_subjects: int) -> None:
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == str(n_subjects):
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 0.735, "TaskName": "rest"}))
    with open(root / "participants.tsv", "w") as fh:
        fh.write("participant_id\tage\n")
        for i in range(n_subjects):
            fh.write(f"sub-{i:06d}\t{20 + i % 50}\n")
    for i in range(n_subjects):
        sub = f"sub-{i:06d}"
        anat, func = root / sub / "anat", root / sub / "func"
        anat.mkdir(parents=True)
        func.mkdir()
        (anat / f"{sub}_T1w.nii.gz").touch()
        (func / f"{sub}_task-rest_bold.nii.gz").touch()
        (func / f"{sub}_task-rest_bold.json").write_text('{"RepetitionTime": 0.735}')
    marker.write_text(str(n_subjects))


def time_bh(root: Path) -> tuple[float, int, int]:
    from bh_models.bids.index import index_dataset

    start = time.perf_counter()
    index = index_dataset(root, dataset="bench")
    elapsed = time.perf_counter() - start
    return elapsed, len(index.subjects), int((index.runs["suffix"] == "bold").sum())


def time_pybids(root: Path) -> tuple[float, int]:
    from bids import BIDSLayout

    start = time.perf_counter()
    layout = BIDSLayout(root, validate=False)
    runs = layout.get(suffix="bold", task="rest", extension=[".nii.gz"])
    trs = [layout.get_metadata(r.path).get("RepetitionTime") for r in runs]
    assert all(tr == 0.735 for tr in trs)
    return time.perf_counter() - start, len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=70933)
    parser.add_argument("--pybids-subjects", type=int, default=2000)
    parser.add_argument("--pybids-full", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("/tmp/bh_bench_bids"))
    args = parser.parse_args()

    start = time.perf_counter()
    build_layout(args.root, args.subjects)
    print(f"layout: {args.subjects} subjects at {args.root} (built/checked in {time.perf_counter() - start:.1f} s)")
    os.sync()

    bh_s, n_sub, n_bold = time_bh(args.root)
    print(f"bh_models.bids.index.index_dataset: {n_sub} subjects, {n_bold} BOLD runs in {bh_s:.2f} s "
          f"({1000 * bh_s / n_sub:.3f} ms/subject)")

    n_py = args.subjects if args.pybids_full else args.pybids_subjects
    sub_root = args.root if args.pybids_full else args.root.with_name(args.root.name + f"_pybids{n_py}")
    if not args.pybids_full:
        build_layout(sub_root, n_py)
        bh_sub_s, _, _ = time_bh(sub_root)
    py_s, py_runs = time_pybids(sub_root)
    per_subject = py_s / n_py
    print(f"pybids BIDSLayout + metadata: {py_runs} BOLD runs for {n_py} subjects in {py_s:.2f} s "
          f"({1000 * per_subject:.3f} ms/subject)")
    if not args.pybids_full:
        print(f"bh on the same {n_py}-subject layout: {bh_sub_s:.3f} s -> ratio pybids/bh = {py_s / bh_sub_s:.0f}x")
    extrapolated = per_subject * args.subjects
    print(f"pybids at {args.subjects} subjects: {extrapolated:.0f} s "
          f"({'measured' if args.pybids_full else 'extrapolated linearly'}); ratio pybids/bh = {extrapolated / bh_s:.0f}x")


if __name__ == "__main__":
    main()
