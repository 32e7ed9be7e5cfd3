"""The workflow through a real one-node SLURM cluster: `snakemake --profile slurm`.

The cluster comes from tests/slurm/start_cluster.sh (Debian's slurm-wlm and
munge, installed by .ci/install). The test overlay tests/slurm/profile adds
what this cluster lacks (no accounting database: squeue and no account; no
GPU: the GPU rules ask for gpu: 0 and run on CPU with the tiny configs).

The run starts from a copy of the reference run with the models, the
evaluation and one downstream subject's preprocessing removed (a pretraining
subject's files are not needed again once the store is packed, so Snakemake
rightly leaves them alone), so per-subject group jobs,
cohort jobs and all GPU-rule jobs run under SLURM. The harmonix-F pretraining
job is scancelled after its first checkpoint; rerunning the same command
resumes it, and every file ends identical to the uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from workflow_utils import REPO, results_manifest, sha256_file, snakemake

# Runs the demo workflow (or SLURM): the slow tier.
pytestmark = pytest.mark.slow

DOWNSTREAM = "siteC"  # the demo's downstream site: its evaluation needs the removed subject again
SLURM_ARGS = ("--profile", "slurm", "--workflow-profile", str(REPO / "tests" / "slurm" / "profile"))


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root (CI runs .ci/run as root)")
    if shutil.which("sinfo") is None:
        pytest.fail("slurm-wlm is not installed: run .ci/install as root")
    done = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "start_cluster.sh")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("report.html"))
    results = dst / "results"
    for gone in ("models", "embeddings", "evaluation"):
        shutil.rmtree(results / gone)
    for path in (results / "qc").glob("audit.*"):
        path.unlink()
    subject = sorted((results / "derivatives" / "bh-preproc" / DOWNSTREAM).glob("sub-*"))[0]
    shutil.rmtree(subject)
    return dst


def _cancel_when_checkpointed(workdir: Path, rule: str, run: subprocess.Popen, timeout: float = 900) -> str:
    """scancel the SLURM job of `rule` once it has written a resumable checkpoint."""
    resume = workdir / "results" / "models" / "harmonix-f" / "checkpoint.resume.pt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run.poll() is not None:  # snakemake stopped first: say why now, not after the timeout
            raise AssertionError(f"snakemake exited ({run.returncode}) before {rule} checkpointed "
                                 f"(is the slurm profile linked? run .ci/install):\n{run.stdout.read()[-3000:]}")
        if resume.exists():
            queue = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True).stdout
            jobs = [line.split("|")[0] for line in queue.splitlines() if f"rule_{rule}" in line]
            if jobs:
                subprocess.run(["scancel", jobs[0]], check=True)
                return jobs[0]
        time.sleep(0.2)
    queue = subprocess.run(["squeue", "-o", "%i %k %T %r %C %m"], capture_output=True, text=True).stdout
    node = subprocess.run(["sinfo", "-N", "-o", "%N %c %m %t"], capture_output=True, text=True).stdout
    raise AssertionError(f"{rule} never wrote {resume} in {timeout:.0f} s\nsqueue:\n{queue}\nsinfo:\n{node}")


def test_slurm_run_survives_a_cancelled_pretraining_job(slurm_cluster, reference_run, tmp_path):
    workdir = _copy_run(reference_run, tmp_path / "run_slurm")
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [os.sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), *SLURM_ARGS]
    first = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    cancelled = _cancel_when_checkpointed(workdir, "pretrain_fmri", first)
    output, _ = first.communicate(timeout=1800)
    assert first.returncode != 0, "the cancelled job should fail the first invocation"
    assert (workdir / "results" / "models" / "harmonix-f" / "checkpoint.resume.pt").exists(), output[-3000:]

    snakemake(workdir, *SLURM_ARGS, timeout=1800)  # the same command again: resumes

    records = workdir / "results" / "provenance"
    fmri = [json.loads(p.read_text()) for p in (records / "pretrain_fmri").glob("*.json")]
    assert len(fmri) == 1 and fmri[0]["slurm_job_id"] not in (None, "", cancelled)
    grouped = [json.loads(p.read_text()) for p in (records / "anat_preprocess").glob(f"*{DOWNSTREAM}*.json")]
    assert any(r["slurm_job_id"] for r in grouped), "per-subject jobs did not run under SLURM"
    log = (workdir / "results" / "logs" / "pretrain_fmri" / "all.log").read_text()
    assert "resum" in log.lower(), log[-2000:]
    # Resumed after scancel, under SLURM: the same bytes as the uninterrupted local run.
    for model in ("harmonix-f", "harmonix-s", "harmonizer"):
        ours = workdir / "results" / "models" / model / "checkpoint.pt"
        assert sha256_file(ours) == sha256_file(reference_run / "results" / "models" / model / "checkpoint.pt")
    ours, theirs = results_manifest(workdir), results_manifest(reference_run)
    assert sorted(ours) == sorted(theirs)
    assert [p for p in ours if ours[p] != theirs[p]] == []
