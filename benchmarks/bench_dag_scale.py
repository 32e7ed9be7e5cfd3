"""Benchmark: Snakemake planning time and memory at cohort scale, and SLURM submissions.

Writes a zero-byte BIDS layout of N subjects (one T1w and one rest BOLD with a
sidecar each; ``bench_bids_index.build_layout``), a config pointing at it, and
times ``snakemake -n`` of the real workflow on it: wall time, peak RSS of the
snakemake process, jobs. It then plans the same workflow with the SLURM profile
(``--profile workflow/profiles/slurm``, a dry run: nothing is submitted) and
counts the SLURM submissions Snakemake would make: one per group job (a batch's
anatomical and functional jobs share one, ``group-components``) plus one per
ungrouped job (local rules such as ``all`` are not submitted).

For comparison, in the same run, a plain 3-rule per-subject Snakefile (one job
per subject and step) is planned at the ``--baseline-at`` size(s).

    python benchmarks/bench_dag_scale.py                       # 1,000, 10,000, 70,933; baseline at 10,000
    python benchmarks/bench_dag_scale.py --subjects 1000 --baseline-at 1000
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
    """Wall seconds, peak RSS (MB) of the planning process, number of jobs, and the whole output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *cmd], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = proc.stdout + proc.stderr
    match = re.search(r"^total\s+(\d+)", out, re.MULTILINE)
    peak_kb = int(re.search(r"PEAK_KB (\d+)", out).group(1))
    return elapsed, peak_kb / 1024, int(match.group(1)) if match else -1, out


def slurm_submissions(plan: str) -> tuple[int, int]:
    """(submissions, group jobs) of a dry run's job listing: group jobs plus ungrouped non-local jobs."""
    groups = len(re.findall(r"Group job \S+ \(jobs", plan))
    ungrouped = len(re.findall(r"^rule \w+:", plan, re.MULTILINE))  # indented rules belong to a group
    return groups + ungrouped, groups


def workflow_config(root: Path, work: Path) -> Path:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["results_dir"] = str(work / "results")
    config["datasets"] = {"big": {"bids_root": str(root), "tr_factors": [1, 2]}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[1000, 10000, 70933])
    parser.add_argument("--baseline-at", type=int, nargs="*", default=[10000],
                        help="sizes at which the plain per-subject Snakefile is planned too")
    parser.add_argument("--no-slurm", action="store_true", help="skip the SLURM-profile dry run")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bh_bench_dag")
    args = parser.parse_args()
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    rows = []
    for n in sorted(args.subjects):
        root = args.workdir / f"bids{n}"
        build_layout(root, n)
        work = args.workdir / f"work{n}"
        work.mkdir(parents=True, exist_ok=True)
        config = workflow_config(root, work)
        base = [snakemake, "-n", "-s", str(REPO / "workflow" / "Snakefile"), "--configfile", str(config),
                "-d", str(work)]
        wall, rss, jobs, _ = run_dry([*base, "--quiet", "rules", "--cores", "2"], work)
        row = {"what": "workflow", "subjects": n, "seconds": wall, "peak_mb": rss, "jobs": jobs}
        if not args.no_slurm:
            slurm_wall, _, _, plan = run_dry([*base, "--profile", str(REPO / "workflow" / "profiles" / "slurm")],
                                             work)
            row["submissions"], row["group_jobs"] = slurm_submissions(plan)
            row["slurm_plan_seconds"] = slurm_wall
        rows.append(row)
        print(f"{n:>6} subjects: workflow dry-run {wall:6.1f} s, peak RSS {rss:6.0f} MB, {jobs:>6} jobs"
              + (f", {row['submissions']} SLURM submissions ({row['group_jobs']} preprocessing group jobs; "
                 f"SLURM-profile dry run {slurm_wall:.1f} s)" if not args.no_slurm else ""), flush=True)
        if n in args.baseline_at:
            (work / "Plain.smk").write_text(PLAIN_SNAKEFILE)
            cmd = [snakemake, "-n", "--quiet", "rules", "-s", "Plain.smk", "--config", f"root={root}", "--cores", "1"]
            base_wall, base_rss, base_jobs, _ = run_dry(cmd, work)
            rows.append({"what": "plain 3-rule Snakefile", "subjects": n, "seconds": base_wall, "peak_mb": base_rss,
                         "jobs": base_jobs})
            print(f"{n:>6} subjects: plain 3-rule Snakefile {base_wall:6.1f} s, peak RSS {base_rss:6.0f} MB, "
                  f"{base_jobs:>6} jobs -> workflow/plain time ratio {wall / base_wall:.2f}", flush=True)
    print("\n| subjects | planning | seconds | peak MB | jobs | SLURM submissions |\n| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['subjects']:,} | {row['what']} | {row['seconds']:.1f} | {row['peak_mb']:.0f} | {row['jobs']:,} | "
              f"{row.get('submissions', '')} |")


if __name__ == "__main__":
    main()
