"""Benchmark: Snakemake planning time and memory at cohort scale.

Writes a zero-byte BIDS layout of N subjects (T1w + rest BOLD each), a config
pointing at it, and times `snakemake -n` of the real workflow on it, reporting
wall time, peak RSS (of the snakemake process tree) and the number of jobs.
For comparison it also plans a plain 3-rule per-subject Snakefile on the same
layout in the same run (the "one job per subject and step" baseline).

    python benchmarks/bench_dag_scale.py --subjects 1000 10000 70000
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_bids_index import build_layout  # noqa: E402

PLAIN_SNAKEFILE = """
import glob, os
ROOT = config["root"]
SUBJECTS = sorted(os.path.basename(p)[4:] for p in glob.glob(ROOT + "/sub-*"))
rule all:
    input: expand("out/{s}.c", s=SUBJECTS)
rule a:
    input: ROOT + "/sub-{s}/anat/sub-{s}_T1w.nii.gz"
    output: "out/{s}.a"
    shell: "touch {output}"
rule b:
    input: rules.a.output
    output: "out/{s}.b"
    shell: "touch {output}"
rule c:
    input: rules.b.output
    output: "out/{s}.c"
    shell: "touch {output}"
"""


# Runs the command in a fresh interpreter and prints its peak RSS (KiB) last: the
# peak of *this* snakemake process tree only, not of every child this script ran.
_PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
         "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def run_dry(cmd: list[str], cwd: Path) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MB) of the planning process, number of jobs, tail of output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *cmd], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = proc.stdout + proc.stderr
    match = re.search(r"^total\s+(\d+)", out, re.MULTILINE)
    peak_kb = int(re.search(r"PEAK_KB (\d+)", out).group(1))
    return elapsed, peak_kb / 1024, int(match.group(1)) if match else -1, out[-400:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bh_bench_dag")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    for n in sorted(args.subjects):
        root = args.workdir / f"bids{n}"
        build_layout(root, n)
        work = args.workdir / f"work{n}"
        work.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load((REPO / "config.yaml").read_text())
        config["results_dir"] = str(work / "results")
        config["datasets"] = {"big": {"bids_root": str(root), "tr_factors": [1, 2]}}
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        cmd = [snakemake, "-n", "--quiet", "rules", "-s", str(REPO / "workflow" / "Snakefile"),
               "--configfile", str(work / "config.yaml"), "-d", str(work), "--cores", "2"]
        wall, rss, jobs, _ = run_dry(cmd, work)
        print(f"{n:>6} subjects: workflow dry-run {wall:6.1f} s, peak RSS {rss:7.0f} MB, {jobs} jobs")
        if not args.no_baseline:
            (work / "Plain.smk").write_text(PLAIN_SNAKEFILE)
            cmd = [snakemake, "-n", "--quiet", "rules", "-s", "Plain.smk", "--config", f"root={root}", "--cores", "1"]
            base_wall, base_rss, base_jobs, _ = run_dry(cmd, work)
            print(f"{n:>6} subjects: plain 3-rule Snakefile {base_wall:6.1f} s, peak RSS {base_rss:7.0f} MB, "
                  f"{base_jobs} jobs "
                  f"-> workflow/plain time ratio {wall / base_wall:.2f}")


if __name__ == "__main__":
    main()
