"""Issue 17, case by case, through the real workflow on small datasets made in the test.

Fast tests use zero-byte images (planning, the index, exclusions and dry runs need no
pixels); the one test that must preprocess real images (distinct ``dir-`` and
multi-echo runs in the samples, a short run excluded alone, a deleted series remade)
is marked slow. Every test checks that the raw tree's sha256 manifest is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import write_bids
from workflow_utils import REPO, manifest, snakemake

BH = str(Path(sys.executable).parent / "bh")


def _config(workdir: Path, datasets: dict, **top) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"] = datasets
    config.update(top)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def _jobs(plan: str) -> dict[str, int]:
    if "Job stats:" not in plan:
        return {}
    table = plan.split("Job stats:")[1].split("total")[0]
    return {p[0]: int(p[1]) for line in table.splitlines() if len(p := line.split()) == 2 and p[1].isdigit()}


def _touch(path: Path, sidecar: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))


def _bh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BH, *args], cwd=cwd, capture_output=True, text=True)


# ---------------------------------------------------------------- 17.2 one bad file never stops the cohort


def test_broken_symlink_bad_sidecar_and_missing_participants_are_problems_of_their_own(tmp_path):
    raw = write_bids(tmp_path / "annex", {"01": {}, "02": {}, "03": {}})
    bold = raw / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz"
    bold.unlink()
    os.symlink(".git/annex/objects/XX/sub-01_task-rest_bold.nii.gz", bold)  # DataLad: content not fetched
    (raw / "sub-02" / "func" / "sub-02_task-rest_bold.json").write_text("{RepetitionTime: 2")  # not JSON
    (raw / "participants.tsv").unlink()
    before = manifest(raw)
    targets = {"dx": {"column": "diagnosis", "type": "classification", "positive": "patient"}}
    workdir = _config(tmp_path / "run", {"pre": {"bids_root": str(write_bids(tmp_path / "pre", {"a1": {}}))},
                                         "annex": {"bids_root": str(raw), "role": "downstream",
                                                   "targets": targets}})
    # bh index and bh check-config list each problem with its file and fix.
    index = _bh("index", str(raw), cwd=workdir)
    assert index.returncode == 0, index.stderr
    for text in ("sub-01_task-rest_bold.nii.gz", "broken symlink", "datalad get",
                 "sub-02_task-rest_bold.json", "JSON"):
        assert text in index.stdout + index.stderr, text
    check = _bh("check-config", "config.yaml", cwd=workdir)
    assert check.returncode == 0, check.stderr
    assert "participants.tsv is missing" in check.stdout and "task 'dx'" in check.stdout
    # The workflow plans everything else: no MissingInputException, no stop at start-up.
    plan = snakemake(workdir, "-n", "--cores", "2")
    jobs = _jobs(plan.stdout)
    assert jobs["anat_preprocess"] >= 2 and jobs["extract_embeddings"] == 1
    assert "evaluate_dataset" not in jobs  # the only task needs participants.tsv: left out, listed
    snakemake(workdir, "--cores", "2", "results/qc/exclusions.tsv")
    table = pd.read_csv(workdir / "results" / "qc" / "exclusions.tsv", sep="\t", dtype=str, keep_default_na=False)
    index_rows = table[table["rule"] == "index"]
    assert any("broken symlink" in r for r in index_rows["reason"])
    assert any(f.endswith("sub-02_task-rest_bold.json") for f in index_rows["file"])
    assert any("participants.tsv is missing" in r for r in index_rows["reason"])
    assert manifest(raw) == before


# ---------------------------------------------------------------- 17.4 sessions and run numbers


def test_each_session_registers_to_its_own_t1w_and_run_2_beats_run_10(tmp_path):
    raw = write_bids(tmp_path / "long", {"01": {"t1w": False, "runs": []}, "02": {"t1w": False}})
    for ses in ("1", "2"):
        _touch(raw / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_T1w.nii.gz")
        _touch(raw / "sub-01" / f"ses-{ses}" / "func" / f"sub-01_ses-{ses}_task-rest_bold.nii.gz")
    for run in ("2", "10"):
        _touch(raw / "sub-02" / "anat" / f"sub-02_run-{run}_T1w.nii.gz")
    before = manifest(raw)
    workdir = _config(tmp_path / "run", {"long": {"bids_root": str(raw)}})
    snakemake(workdir, "--cores", "2", "results/qc/exclusions.tsv", "results/index/long_problems.tsv")
    # The batches' manifests: one anatomical unit per session, the T1w each used (zero-byte: refused, named).
    anat = pd.concat([pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
                      for p in (workdir / "results" / "batches" / "long").glob("*_desc-anat_manifest.tsv")])
    used = dict(zip(anat["unit"], anat["file"].map(lambda f: Path(f).name)))
    assert used == {"sub-01_ses-1": "sub-01_ses-1_T1w.nii.gz", "sub-01_ses-2": "sub-01_ses-2_T1w.nii.gz",
                    "sub-02": "sub-02_run-2_T1w.nii.gz"}
    func = pd.concat([pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
                      for p in (workdir / "results" / "batches" / "long").glob("*_desc-func_manifest.tsv")])
    reasons = dict(zip(func["unit"], func["reason"]))
    assert "needs sub-01_ses-2 " in reasons["sub-01_ses-2_task-rest"]
    assert "needs sub-01_ses-1 " in reasons["sub-01_ses-1_task-rest"]
    problems = pd.read_csv(workdir / "results" / "index" / "long_problems.tsv", sep="\t", dtype=str,
                           keep_default_na=False)
    note = problems[problems["kind"] == "note"]
    assert len(note) == 1 and "sub-02_run-2_T1w.nii.gz" in note["reason"].iloc[0]
    assert "lowest run number by value" in note["reason"].iloc[0]
    assert manifest(raw) == before


# ---------------------------------------------------------------- 17.5 checks before the first job


def test_a_tr_in_milliseconds_and_a_missing_target_column_are_found_before_any_job(tmp_path):
    pre = write_bids(tmp_path / "pre", {"a1": {}})
    raw = write_bids(tmp_path / "ms", {"01": {}, "02": {"run_tr": 2000}})
    before = manifest(raw)
    targets = {"dx": {"column": "diagnosis", "type": "classification", "positive": "patient"},
               "age": {"column": "age", "type": "regression"}}
    workdir = _config(tmp_path / "run", {"pre": {"bids_root": str(pre)},
                                         "ms": {"bids_root": str(raw), "role": "downstream", "targets": targets}})
    index = _bh("index", str(raw), cwd=workdir)
    assert "milliseconds" in index.stdout + index.stderr and "(2)" in index.stdout + index.stderr
    check = _bh("check-config", "config.yaml", cwd=workdir)
    assert "milliseconds" in check.stdout and "column(s) age" in check.stdout
    plan = snakemake(workdir, "-n", "--cores", "2")
    assert "ms: 2 problem(s)" in plan.stderr  # said at DAG build, before any job
    assert "evaluate_dataset" in _jobs(plan.stdout)  # the diagnosis task still is evaluated
    # Only sub-01's run is planned: sub-02's never reaches a job.
    snakemake(workdir, "--cores", "2", "results/qc/exclusions.tsv")
    func = pd.concat([pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
                      for p in (workdir / "results" / "batches" / "ms").glob("*_desc-func_manifest.tsv")])
    assert list(func["unit"]) == ["sub-01_task-rest"]
    exclusions = pd.read_csv(workdir / "results" / "qc" / "exclusions.tsv", sep="\t", dtype=str,
                             keep_default_na=False)
    planning = exclusions[exclusions["rule"] == "index"]
    assert any("milliseconds" in r for r in planning["reason"]) and any("age" in r for r in planning["reason"])
    assert manifest(raw) == before


# ---------------------------------------------------------------- 17.6 leftovers


def test_leftover_records_and_config_errors_never_block_a_fixed_run(tmp_path):
    raw = write_bids(tmp_path / "ds", {"01": {}, "02": {}})
    before = manifest(raw)
    workdir = _config(tmp_path / "run", {"ds": {"bids_root": str(raw), "stratify": "site"}})
    # A missing stratify column is a config error at DAG build, named, before any job.
    done = snakemake(workdir, "-n", "--cores", "2", check=False)
    assert done.returncode != 0 and "datasets.ds.stratify" in done.stdout + done.stderr
    # A record with an empty subject, as an earlier version left after such an error.
    stale = workdir / "results" / "exclusions" / "ds" / "sub-" / "make_splits_000000000000.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"dataset": "ds", "subject": "", "rule": "make_splits", "file": "x",
                                 "reason": "config error"}))
    _config(tmp_path / "run", {"ds": {"bids_root": str(raw)}})  # the config fixed
    snakemake(workdir, "--cores", "2", "results/store/splits/ds_splits.tsv", "results/qc/exclusions.tsv")
    table = pd.read_csv(workdir / "results" / "qc" / "exclusions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert "" not in set(table["subject"]) and set(table["subject"]) == {"01", "02"}
    assert manifest(raw) == before


# ---------------------------------------------------------------- 17.7 --configfile


def test_a_cohort_config_file_replaces_the_demo_datasets(tmp_path):
    demo = {name: {"bids_root": str(write_bids(tmp_path / name, {"01": {}, "02": {}}))}
            for name in ("siteA", "siteB")}
    workdir = _config(tmp_path / "run", demo)  # config.yaml: the demo's datasets
    mine = write_bids(tmp_path / "mine", {"x1": {}})
    before = manifest(mine)
    (workdir / "cohort.yaml").write_text(yaml.safe_dump({"datasets": {"mine": {"bids_root": str(mine)}},
                                                         "batches": {"buckets": 10}}))
    jobs = _jobs(snakemake(workdir, "-n", "--cores", "2", "--configfile", "cohort.yaml").stdout)
    assert jobs["index_dataset"] == 1 and jobs["anat_preprocess"] == 1, jobs  # only "mine"
    assert _jobs(snakemake(workdir, "-n", "--cores", "2").stdout)["index_dataset"] == 2  # the demo alone
    # The README's instruction, literally: bh check-config and bh plan read the same files.
    check = _bh("check-config", "cohort.yaml", cwd=workdir)
    assert "mine (pretrain)" in check.stdout and "siteA" not in check.stdout
    assert manifest(mine) == before


# ---------------------------------------------------------------- 17.1 and 17.3 with real images


def _real_dataset(root: Path, demo_root: Path) -> Path:
    """One demo subject with: dir-LR and dir-RL runs, a three-echo run, and a run too short to use."""
    source = demo_root / "siteA" / "sub-02"
    shutil.copytree(demo_root / "siteA", root, ignore=shutil.ignore_patterns("sub-*"))
    (root / "sub-02" / "anat").mkdir(parents=True)
    shutil.copy(source / "anat" / "sub-02_T1w.nii.gz", root / "sub-02" / "anat")
    func = root / "sub-02" / "func"
    func.mkdir()
    bold = nib.load(source / "func" / "sub-02_task-rest_bold.nii.gz")
    data = np.asarray(bold.dataobj, dtype=np.float32)
    for direction in ("LR", "RL"):
        shutil.copy(source / "func" / "sub-02_task-rest_bold.nii.gz",
                    func / f"sub-02_task-rest_dir-{direction}_bold.nii.gz")
    for echo, te in ((1, 0.015), (2, 0.035), (3, 0.055)):  # echoes of a T2* of 40 ms
        scaled = nib.Nifti1Image(data * np.float32(np.exp(-(te - 0.035) / 0.04)), bold.affine, bold.header)
        nib.save(scaled, func / f"sub-02_task-rest_acq-me_echo-{echo}_bold.nii.gz")
        (func / f"sub-02_task-rest_acq-me_echo-{echo}_bold.json").write_text(json.dumps({"EchoTime": te}))
    short = nib.Nifti1Image(data[..., :10], bold.affine, bold.header)
    nib.save(short, func / "sub-02_task-rest_run-9_bold.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-02\tcontrol\n")
    return root


@pytest.mark.slow
def test_real_runs_dir_and_multi_echo_samples_a_short_run_alone_and_a_deleted_series(tmp_path, demo_root):
    raw = _real_dataset(tmp_path / "raw", demo_root)
    before = manifest(raw)
    workdir = _config(tmp_path / "run", {"ds": {"bids_root": str(raw), "tr_factors": [1]}})
    targets = ["results/store/samples/ds_samples.tsv", "results/qc/ds_desc-anat_qc.tsv",
               "results/qc/ds_desc-func_qc.tsv", "results/qc/exclusions.tsv"]
    snakemake(workdir, "--cores", "2", *targets)
    results = workdir / "results"
    samples = pd.read_csv(results / "store" / "samples" / "ds_samples.tsv", sep="\t", dtype=str)
    # 17.1: dir- runs and the combined multi-echo run are distinct samples; no echo in their ids.
    assert sorted(samples["sample_id"]) == ["ds_sub-02_task-rest_acq-me_factor-1",
                                            "ds_sub-02_task-rest_dir-LR_factor-1",
                                            "ds_sub-02_task-rest_dir-RL_factor-1"]
    sidecar = json.loads(next((results / "derivatives" / "bh-preproc" / "ds" / "sub-02" / "func")
                              .glob("sub-02_task-rest_acq-me_space-*_timeseries.json")).read_text())
    assert sidecar["MultiEcho"]["Method"].startswith("T2*-weighted optimal combination")
    assert sidecar["MultiEcho"]["EchoTimes"] == [0.015, 0.035, 0.055]
    # 17.3: the short run is excluded alone; the subject's good runs and T1w stay.
    exclusions = pd.read_csv(results / "qc" / "exclusions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert exclusions["run"].tolist() == ["sub-02_task-rest_run-9"]
    assert "fewer than the minimum" in exclusions["reason"].iloc[0] and "exclude the run" in exclusions["reason"].iloc[0]
    assert len(pd.read_csv(results / "qc" / "ds_desc-anat_qc.tsv", sep="\t")) == 1
    assert len(pd.read_csv(results / "qc" / "ds_desc-func_qc.tsv", sep="\t")) == 3
    again = snakemake(workdir, "-n", "--cores", "2", *targets)
    assert "Nothing to be done" in again.stdout + again.stderr  # the rerun keeps the subject
    # 17.6: a deleted series is remade by the next invocation (its batch reruns that run only).
    series = next((results / "derivatives" / "bh-preproc" / "ds" / "sub-02" / "func")
                  .glob("sub-02_task-rest_dir-LR_space-*_timeseries.tsv"))
    content = series.read_bytes()
    series.unlink()
    snakemake(workdir, "--cores", "2", "results/qc/ds_desc-func_qc.tsv")
    assert series.read_bytes() == content
    assert manifest(raw) == before
