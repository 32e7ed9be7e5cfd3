"""The subject batches through the real workflow, as a user runs it (snakemake in a subprocess).

Fast tests use zero-byte layouts: every T1w is refused by the real anatomical step
(an empty file is bad input), so batch jobs, manifests, exclusions, the cohort
tables and the audit run for real in seconds. The slow test preprocesses two
demo subjects in one batch, one of which fails for a reason that is not bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import write_bids
from workflow_utils import REPO, manifest, snakemake

TARGETS = ("results/qc/ds_desc-anat_qc.tsv", "results/qc/ds_desc-func_qc.tsv", "results/qc/exclusions.tsv")


def _workdir(tmp_path: Path, raw: Path, **dataset) -> Path:
    workdir = tmp_path / "run"
    workdir.mkdir(exist_ok=True)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"] = {"ds": {"bids_root": str(raw), "tr_factors": [1], **dataset}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def _jobs(plan: str) -> dict[str, int]:
    if "Job stats:" not in plan:
        return {}
    table = plan.split("Job stats:")[1].split("total")[0]
    return {p[0]: int(p[1]) for line in table.splitlines() if len(p := line.split()) == 2 and p[1].isdigit()}


def _zero_byte_run(tmp_path: Path) -> dict:
    raw = write_bids(tmp_path / "raw", {"01": {}, "02": {"runs": ["task-rest_run-1", "task-rest_run-2"]}, "03": {}})
    raw_before = manifest(raw)
    workdir = _workdir(tmp_path, raw)
    done = snakemake(workdir, "--cores", "2", *TARGETS)
    return {"raw": raw, "raw_before": raw_before, "workdir": workdir, "output": done.stdout + done.stderr}


@pytest.fixture(scope="module")
def zero_byte_run(tmp_path_factory):
    """One run shared by the tests that only read it."""
    return _zero_byte_run(tmp_path_factory.mktemp("zero_byte"))


def test_bad_units_are_excluded_and_the_cohort_finishes_in_one_invocation(zero_byte_run):
    results = zero_byte_run["workdir"] / "results"
    table = pd.read_csv(results / "qc" / "exclusions.tsv", sep="\t", dtype=str, keep_default_na=False)
    anat = table[table["rule"] == "anat_preprocess"]
    func = table[table["rule"] == "func_preprocess"]
    assert sorted(anat["subject"]) == ["01", "02", "03"]
    assert all("0 bytes" in r and "Fix:" in r for r in anat["reason"])
    assert all(f.endswith("_T1w.nii.gz") for f in anat["file"])
    assert sorted(func["run"]) == ["sub-01_task-rest", "sub-02_task-rest_run-1", "sub-02_task-rest_run-2",
                                   "sub-03_task-rest"]
    assert all("needs sub-" in r and "0 bytes" in r for r in func["reason"])
    assert pd.read_csv(results / "qc" / "ds_desc-func_qc.tsv", sep="\t").empty
    pages = sorted((results / "qc" / "batches" / "ds").glob("*_qc.html"))
    assert pages and all("excluded" in p.read_text() for p in pages)
    assert manifest(zero_byte_run["raw"]) == zero_byte_run["raw_before"]
    # The same command again: nothing to do (an excluded unit is not retried while its data are unchanged).
    again = snakemake(zero_byte_run["workdir"], "-n", "--cores", "2", *TARGETS)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_adding_a_subject_adds_only_its_batches(tmp_path):
    run = _zero_byte_run(tmp_path)
    workdir, raw = run["workdir"], run["raw"]
    batches = workdir / "results" / "batches" / "ds"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in batches.glob("*.tsv")}
    write_bids(raw, {"04": {}})  # a fourth subject (participants.tsv rewritten with it)
    (raw / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-0{i}\n" for i in range(1, 5)))
    jobs = _jobs(snakemake(workdir, "-n", "--cores", "2", *TARGETS).stdout)
    assert jobs["anat_preprocess"] == 1 and jobs["func_preprocess"] == 1, jobs
    assert set(jobs) <= {"anat_preprocess", "func_preprocess", "anat_qc_table", "func_qc_table", "exclusion_table",
                         "index_dataset"}, jobs
    snakemake(workdir, "--cores", "2", *TARGETS)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in batches.glob("*.tsv")}
    assert {name: after[name] for name in before} == before  # the other batches were not touched
    assert len(after) == len(before) + 2


def test_every_file_of_a_batched_run_is_audited(zero_byte_run):
    workdir = zero_byte_run["workdir"]
    done = subprocess.run([str(Path(sys.executable).parent / "bh"), "audit", "results"], cwd=workdir,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pd.read_csv(workdir / "results" / "logs" / "audit" / "audit.tsv", sep="\t")
    assert set(table["status"]) == {"ok"}
    covered = set(table["path"])
    for kind in ("anat", "func"):
        assert any(p.startswith("batches/ds/") and p.endswith(f"_desc-{kind}_manifest.tsv") for p in covered)
        assert any(p.startswith("qc/batches/ds/") and p.endswith(f"_desc-{kind}_qc.html") for p in covered)


@pytest.mark.slow
def test_a_failed_unit_is_retried_alone_and_the_others_stay_done(tmp_path, demo_root):
    """Two demo subjects in one batch; sub-02's output path is blocked (a folder where its image goes),
    an error that is not bad input: the batch job fails, sub-01 is recorded; once unblocked, the same
    command redoes sub-02 only."""
    raw = demo_root / "siteA"
    others = [p.name[4:] for p in raw.glob("sub-*") if p.name not in ("sub-01", "sub-02")]
    workdir = _workdir(tmp_path, raw, exclude_subjects=others)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["batches"] = {"buckets": 1}  # both subjects in one batch
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    anat = workdir / "results" / "derivatives" / "bh-preproc" / "ds"
    blocker = anat / "sub-02" / "anat" / "sub-02_desc-preproc_T1w.nii.gz"
    blocker.mkdir(parents=True)
    target = "results/qc/ds_desc-anat_qc.tsv"

    first = snakemake(workdir, "--cores", "2", target, check=False)
    assert first.returncode != 0
    assert "1 of 2 units failed" in first.stdout + first.stderr
    record = workdir / "results" / "provenance" / "anat_preprocess" / "dataset-ds_subject-01.json"
    assert record.is_file()
    kept = {p: p.stat().st_mtime_ns for p in [record, *sorted((anat / "sub-01").rglob("*.*"))]}

    blocker.rmdir()
    snakemake(workdir, "--cores", "2", target)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # sub-01 was not redone
    log = (workdir / "results" / "logs" / "anat_preprocess" / "ds_batch-0000.log").read_text()
    assert "2 units, 1 already done, 0 still excluded, 1 to run" in log
    qc = pd.read_csv(workdir / target, sep="\t", dtype=str)
    assert sorted(qc["subject"]) == ["01", "02"]
