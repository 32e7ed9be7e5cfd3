"""Tests of bh_models.core.provenance: per-job records and dataset_description.json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bh_models.core import provenance
from bh_models.core.hashing import HashCache, canonical_json_sha256
from bh_models.core.provenance import (
    TRACKED_PACKAGES,
    code_version,
    job_key,
    portable_path,
    record_job,
    resolve_recorded_path,
    workdir_of,
    write_dataset_description,
)

T1W = "sub-01/anat/sub-01_T1w.nii.gz"
PREPROC = "results/derivatives/bh-preproc/ds1/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
MASK = "results/derivatives/bh-preproc/ds1/sub-01/anat/sub-01_desc-brain_mask.nii.gz"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def run_tree(tmp_path):
    """A working directory with one raw BIDS dataset and one job's outputs."""
    (tmp_path / "raw" / "ds1" / "sub-01" / "anat").mkdir(parents=True)
    (tmp_path / "raw" / "ds1" / T1W).write_bytes(b"raw T1w")
    for rel, data in ((PREPROC, b"preproc"), (MASK, b"mask")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "results" / "logs").mkdir()
    (tmp_path / "results" / "logs" / "anat.log").write_text("ok\n")
    return tmp_path


def _record(workdir: Path, **overrides) -> Path:
    args = dict(
        results_dir=workdir / "results",
        rule="anat",
        wildcards={"dataset": "ds1", "subject": "01"},
        inputs={"t1w": [str(workdir / "raw" / "ds1" / T1W)]},
        outputs={"out_brain": [PREPROC], "out_mask": [MASK]},
        params={"resolution": 2.0},
        config={"seed": 42, "template": {"resolution": 2}},
        seed=42,
        started="2025-01-01T00:00:00+00:00",
        finished="2025-01-01T00:01:00+00:00",
        log="results/logs/anat.log",
        bids_roots={"ds1": Path("raw/ds1")},
        workdir=workdir,
    )
    args.update(overrides)
    return record_job(**args)


def test_record_holds_everything_an_auditor_needs(run_tree, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    path = _record(run_tree)
    assert path == run_tree / "results" / "provenance" / "anat" / "dataset-ds1_subject-01.json"
    rec = json.loads(path.read_text())
    assert rec["rule"] == "anat" and rec["wildcards"] == {"dataset": "ds1", "subject": "01"}
    assert rec["inputs"] == {"t1w": [{"path": f"bids:ds1:{T1W}", "sha256": _sha(b"raw T1w")}]}
    assert rec["outputs"] == {
        "out_brain": [{"path": PREPROC, "sha256": _sha(b"preproc")}],
        "out_mask": [{"path": MASK, "sha256": _sha(b"mask")}],
    }
    assert rec["params"] == {"resolution": 2.0} and rec["seed"] == 42
    assert rec["config_sha256"] == canonical_json_sha256(obj={"template": {"resolution": 2}, "seed": 42})
    assert set(rec["software"]) == set(TRACKED_PACKAGES)
    assert rec["software"]["numpy"] == __import__("numpy").__version__
    assert rec["code"]["name"] == "bh_models" and "commit" in rec["code"] and "dirty" in rec["code"]
    assert rec["host"] and rec["slurm_job_id"] == "4242"
    assert (rec["started"], rec["finished"]) == ("2025-01-01T00:00:00+00:00", "2025-01-01T00:01:00+00:00")
    assert rec["log"] == "results/logs/anat.log"
    assert rec["results_dir"] == "results" and rec["bids_roots"] == {"ds1": "raw/ds1"}


def test_record_without_slurm_and_single_path_strings(run_tree, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.chdir(run_tree)  # default workdir: the current one
    rec = json.loads(
        record_job(
            results_dir=Path("results"),
            rule="anat",
            wildcards={},
            inputs={"t1w": f"raw/ds1/{T1W}"},
            outputs={"out_brain": PREPROC},
            params={},
            config={},
            seed=None,
            started="a",
            finished="b",
            log=None,
        ).read_text()
    )
    assert rec["jobkey"] == "all" and rec["slurm_job_id"] is None and rec["log"] is None
    assert rec["inputs"]["t1w"][0]["path"] == f"raw/ds1/{T1W}"  # no BIDS root configured


def test_records_are_identical_when_inputs_are(run_tree):
    first = _record(run_tree).read_bytes()
    second = _record(run_tree).read_bytes()
    assert first == second  # same host and times given: byte-identical


def test_each_input_is_read_once_across_consumers(run_tree):
    raw = run_tree / "raw" / "ds1" / T1W
    past = raw.stat().st_mtime_ns - 3600 * 10**9
    os.utime(raw, ns=(past, past))
    cache = HashCache(cache_dir=run_tree / "results" / ".cache" / "sha256")
    for rule in ("anat", "func_coreg", "qc"):
        _record(run_tree, rule=rule, outputs={}, hash_cache=cache)
    assert (cache.misses, cache.hits) == (1, 2)


def test_missing_files_are_recorded_with_null_hash(run_tree):
    rec = json.loads(_record(run_tree, outputs={"out_extra": ["results/never_written.txt"]}).read_text())
    assert rec["outputs"]["out_extra"] == [{"path": "results/never_written.txt", "sha256": None}]


def test_paths_round_trip(tmp_path):
    roots = {"ds1": Path("raw/ds1"), "ext": tmp_path.parent / "elsewhere"}
    cases = {
        tmp_path / "raw" / "ds1" / T1W: f"bids:ds1:{T1W}",
        tmp_path / "results" / "x.tsv": "results/x.tsv",
        tmp_path.parent / "elsewhere" / "sub-02" / "a.nii": "bids:ext:sub-02/a.nii",
        Path("/opt/other/file.txt"): "/opt/other/file.txt",
    }
    for path, recorded in cases.items():
        assert portable_path(path=path, workdir=tmp_path, bids_roots=roots) == recorded
        assert resolve_recorded_path(recorded=recorded, workdir=tmp_path, bids_roots=roots) == path
    with pytest.raises(KeyError):
        resolve_recorded_path(recorded="bids:unknown:x", workdir=tmp_path, bids_roots=roots)


def test_workdir_is_found_from_a_moved_results_dir(tmp_path):
    assert workdir_of(results_dir=tmp_path / "w" / "results", record={"results_dir": "results"}) == tmp_path / "w"
    assert workdir_of(results_dir=tmp_path / "a" / "b", record={"results_dir": "a/b"}) == tmp_path
    assert workdir_of(results_dir=tmp_path, record={"results_dir": "."}) == tmp_path


def test_job_keys_are_safe_and_distinct():
    assert job_key(wildcards={"subject": "01", "dataset": "ds1"}) == "dataset-ds1_subject-01"
    tricky = [job_key(wildcards={"subject": s}) for s in ("a/b", "ab", "a_b", "../ab")]
    assert len(set(tricky)) == 4
    assert all("/" not in k and not k.startswith(".") for k in tricky)
    assert len(job_key(wildcards={"batch": "x" * 500})) < 200


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_code_version_reports_commit_and_dirty_flag(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    code_version.cache_clear()
    assert code_version(repo=repo) == {"commit": head, "dirty": False}
    (repo / "code.py").write_text("x = 2\n")
    code_version.cache_clear()
    assert code_version(repo=repo) == {"commit": head, "dirty": True}
    # Without git (compute nodes): the commit is still read from .git, dirtiness is unknown.
    monkeypatch.setattr(provenance, "_git", lambda repo, *args: None)
    code_version.cache_clear()
    assert code_version(repo=repo) == {"commit": head, "dirty": None}
    code_version.cache_clear()


def test_code_version_outside_a_repository(tmp_path):
    assert provenance.find_code_repository(start=tmp_path) in (None, *tmp_path.parents)
    assert code_version(repo=None)["commit"]  # never raises, "unknown" at worst


def test_dataset_description_is_bids_derivative(tmp_path):
    path = write_dataset_description(
        path=tmp_path / "bh-preproc" / "dataset_description.json",
        name="bh-preproc",
        source_datasets=["bids:siteA", "doi:10.18112/openneuro.ds000001.v1.0.0", "https://example.org/siteB"],
        pipeline_version="0.1.0",
        code_url="https://github.com/example/bh",
        description="T1w and BOLD preprocessing",
        dataset_links={"siteA": "file://demo_data/siteA"},
    )
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "derivative" and desc["Name"] == "bh-preproc"
    assert desc["BIDSVersion"]
    (gen,) = desc["GeneratedBy"]
    assert gen["Name"] == "bh_models" and gen["Version"] == "0.1.0"
    assert gen["CodeURL"] == "https://github.com/example/bh" and gen["Description"]
    assert gen["Commit"] == code_version()["commit"] and "Dirty" in gen
    assert desc["SourceDatasets"] == [
        {"URL": "bids:siteA"},
        {"DOI": "doi:10.18112/openneuro.ds000001.v1.0.0"},
        {"URL": "https://example.org/siteB"},
    ]
    assert desc["DatasetLinks"] == {"siteA": "file://demo_data/siteA"}
    again = write_dataset_description(
        path=tmp_path / "again.json",
        name="bh-preproc",
        source_datasets=["bids:siteA", "doi:10.18112/openneuro.ds000001.v1.0.0", "https://example.org/siteB"],
        pipeline_version="0.1.0",
        code_url="https://github.com/example/bh",
        description="T1w and BOLD preprocessing",
        dataset_links={"siteA": "file://demo_data/siteA"},
    )
    assert again.read_bytes() == path.read_bytes()


def test_rule_names_with_underscores_keep_their_folder(run_tree):
    path = _record(run_tree, rule="anat_qc")
    assert path.parent.name == "anat_qc"
    assert _record(run_tree, rule="../evil").parent.parent == run_tree / "results" / "provenance"
