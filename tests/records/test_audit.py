"""Tests of bh_models.records.audit on a small synthetic run with provenance records.

The run: raw BIDS dataset ``ds1`` with two subjects;
``anat`` (raw T1w -> preproc T1w + mask) and ``tensor`` (preproc -> .npy)
per subject, then one ``pack`` job (both tensors -> shard).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bh_models.records.audit import audit, main, summarize, write_audit
from bh_models.core.hashing import hash_cache_dir
from bh_models.core.provenance import record_job

DERIV = "results/derivatives/bh-preproc/ds1"
SUBJECTS = ("01", "02")


def _raw(sub: str) -> str:
    return f"raw/ds1/sub-{sub}/anat/sub-{sub}_T1w.nii.gz"


def _preproc(sub: str) -> str:
    return f"{DERIV}/sub-{sub}/anat/sub-{sub}_desc-preproc_T1w.nii.gz"


def _mask(sub: str) -> str:
    return f"{DERIV}/sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz"


def _tensor(sub: str) -> str:
    return f"{DERIV}/sub-{sub}/anat/sub-{sub}_space-MNI152NLin2009cAsym_res-2_desc-encoder_T1w.npy"


SHARD = "results/store/t1-shard-000.bin"


def _write(workdir: Path, rel: str, data: bytes) -> None:
    path = workdir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _job(workdir: Path, rule: str, wildcards: dict, inputs: dict, outputs: dict) -> None:
    record_job(
        results_dir=workdir / "results",
        rule=rule,
        wildcards=wildcards,
        inputs=inputs,
        outputs=outputs,
        params={},
        config={"seed": 0},
        seed=0,
        started="2025-01-01T00:00:00+00:00",
        finished="2025-01-01T00:00:01+00:00",
        log=None,
        bids_roots={"ds1": Path("raw/ds1")},
        workdir=workdir,
    )


@pytest.fixture()
def run(tmp_path) -> Path:
    """Working directory of a finished, recorded run (its results dir is ``results``)."""
    for sub in SUBJECTS:
        _write(tmp_path, _raw(sub), f"raw T1w of {sub}".encode())
        _write(tmp_path, _preproc(sub), f"preproc {sub}".encode())
        _write(tmp_path, _mask(sub), f"mask {sub}".encode())
        _job(tmp_path, "anat", {"dataset": "ds1", "subject": sub},
             {"t1w": [_raw(sub)]}, {"out_brain": [_preproc(sub)], "out_mask": [_mask(sub)]})
        _write(tmp_path, _tensor(sub), f"tensor {sub}".encode())
        _job(tmp_path, "tensor", {"dataset": "ds1", "subject": sub},
             {"brain": [_preproc(sub)]}, {"out_tensor": [_tensor(sub)]})
    _write(tmp_path, SHARD, b"shard")
    _job(tmp_path, "pack", {}, {"tensors": [_tensor(s) for s in SUBJECTS]}, {"out_shard": [SHARD]})
    # Folders that are not derivatives: never orphans.
    _write(tmp_path, "results/logs/anat/sub-01.log", b"log")
    _write(tmp_path, "results/exclusions/ds1/sub-03/anat_x.json", b"{}")
    _write(tmp_path, "results/.snakemake/metadata/x", b"meta")
    return tmp_path


def _status(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table["path"], table["status"]))


def _rel(workdir_rel: str) -> str:
    return workdir_rel.removeprefix("results/")


def test_intact_run_is_all_ok_and_exits_zero(run, capsys):
    table = audit(run / "results")
    assert len(table) == 7 and set(table["status"]) == {"ok"}
    assert list(table.columns) == ["path", "status", "rule", "jobkey", "detail", "recorded_sha256", "current_sha256"]
    assert table["path"].tolist() == sorted(table["path"])
    assert main([str(run / "results")]) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "ok" in printed
    assert (run / "results" / "logs" / "audit" / "audit.tsv").is_file()


def test_flipped_byte_is_modified_and_descendants_stale(run):
    path = run / _preproc("01")
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    status = _status(audit(run / "results"))
    assert status[_rel(_preproc("01"))] == "modified"
    assert status[_rel(_tensor("01"))] == "stale"  # made from the old bytes
    assert status[_rel(SHARD)] == "stale"  # transitively
    assert status[_rel(_mask("01"))] == "ok"  # sibling output, own bytes intact
    assert {status[_rel(p(s))] for p in (_preproc, _mask, _tensor) for s in ("02",)} == {"ok"}
    assert main([str(run / "results")]) == 1


def test_changed_raw_input_makes_every_descendant_stale(run):
    raw = run / _raw("01")
    raw.write_bytes(raw.read_bytes() + b" re-acquired")
    table = audit(run / "results")
    status = _status(table)
    for rel in (_preproc("01"), _mask("01"), _tensor("01"), SHARD):
        assert status[_rel(rel)] == "stale", rel
    for rel in (_preproc("02"), _mask("02"), _tensor("02")):
        assert status[_rel(rel)] == "ok", rel
    detail = table.set_index("path").loc[_rel(_preproc("01")), "detail"]
    assert detail == "input changed: bids:ds1:sub-01/anat/sub-01_T1w.nii.gz"
    shard_detail = table.set_index("path").loc[_rel(SHARD), "detail"]
    assert shard_detail.startswith("upstream ") and shard_detail.endswith(f"cause: {detail}")
    assert main([str(run / "results")]) == 1


def test_touched_but_identical_raw_input_stays_ok(run):
    raw = run / _raw("02")
    raw.write_bytes(raw.read_bytes())  # new mtime, same bytes: the hash decides
    assert set(audit(run / "results")["status"]) == {"ok"}


def test_deleted_file_is_missing_and_its_consumers_stale(run):
    (run / _tensor("02")).unlink()
    table = audit(run / "results")
    status = _status(table)
    assert status[_rel(_tensor("02"))] == "missing"
    assert status[_rel(SHARD)] == "stale"
    assert "input missing" in table.set_index("path").loc[_rel(SHARD), "detail"]
    assert main([str(run / "results")]) == 1


def test_unrecorded_file_is_orphan_but_logs_and_hidden_files_are_not(run):
    _write(run, f"{DERIV}/sub-01/anat/sub-01_desc-extra_T1w.nii.gz", b"who made me?")
    _write(run, f"{DERIV}/sub-01/anat/.sub-01_x.nii.gz.tmp", b"temporary")
    table = audit(run / "results")
    orphans = table.loc[table["status"] == "orphan", "path"].tolist()
    assert orphans == ["derivatives/bh-preproc/ds1/sub-01/anat/sub-01_desc-extra_T1w.nii.gz"]
    assert main([str(run / "results")]) == 1


def test_reports_are_written_and_not_audited_themselves(run, tmp_path):
    out_tsv = run / "results" / "qc" / "audit.tsv"
    out_html = run / "results" / "qc" / "audit.html"
    (run / _mask("02")).unlink()
    table = audit(run / "results", out_tsv=out_tsv, out_html=out_html)
    assert "orphan" not in set(table["status"])  # its own outputs are not orphans
    again = pd.read_csv(out_tsv, sep="\t", dtype=str, keep_default_na=False)
    assert again.equals(table.astype(str))
    page = out_html.read_text()
    assert "<table" in page and "missing" in page and "sub-02_desc-brain_mask" in page
    assert "<script" not in page


def test_summary_counts_status_per_rule(run):
    (run / _tensor("02")).unlink()
    summary = summarize(table=audit(run / "results"))
    assert summary.loc["tensor", "missing"] == 1 and summary.loc["pack", "stale"] == 1
    assert summary.loc["total", "total"] == 7 and summary.loc["total", "ok"] == 5


def test_rehash_ignores_the_cache(run):
    audit(run / "results")
    # Age the file, then forge its cache entry as if an old hash were still valid.
    path = run / _preproc("02")
    past = path.stat().st_mtime_ns - 3600 * 10**9
    os.utime(path, ns=(past, past))
    audit(run / "results")  # renews the entry with the new stamp
    entries = list(hash_cache_dir(results_dir=run / "results").glob("*/*.json"))
    (entry,) = [e for e in entries if json.loads(e.read_text())["path"] == os.path.realpath(path)]
    stamp = entry.stat().st_mtime_ns
    entry.write_text(json.dumps(json.loads(entry.read_text()) | {"sha256": "f" * 64}))
    os.utime(entry, ns=(stamp, stamp))
    assert _status(audit(run / "results"))[_rel(_preproc("02"))] == "modified"  # trusted the cache
    assert _status(audit(run / "results", rehash=True))[_rel(_preproc("02"))] == "ok"
    assert main([str(run / "results"), "--rehash", "--threads", "2"]) == 0


def test_moved_tree_audits_clean_and_moved_raw_needs_its_root(run, tmp_path_factory):
    moved = tmp_path_factory.mktemp("moved") / "work"
    shutil.copytree(run, moved, symlinks=True)
    assert set(audit(moved / "results")["status"]) == {"ok"}
    shutil.move(moved / "raw" / "ds1", moved / "ds1_new")
    assert set(audit(moved / "results")["status"]) == {"stale"}  # raw not found where recorded
    table = audit(moved / "results", bids_roots={"ds1": moved / "ds1_new"})
    assert set(table["status"]) == {"ok"}
    assert main([str(moved / "results"), "--bids-root", f"ds1={moved / 'ds1_new'}"]) == 0


def test_usage_errors(tmp_path):
    assert main([str(tmp_path / "does-not-exist")]) == 2
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--bids-root", "no-equals-sign"])


def test_empty_results_dir_is_ok(tmp_path):
    (tmp_path / "results").mkdir()
    assert audit(tmp_path / "results").empty
    assert main([str(tmp_path / "results")]) == 0


def test_folder_outputs_are_hashed_as_trees(run):
    for i in range(2):
        _write(run, f"results/store/shards/part-{i}.bin", bytes([i]) * 10)
    _job(run, "pack_folder", {}, {"tensors": [_tensor("01")]}, {"out_dir": ["results/store/shards"]})
    status = _status(audit(run / "results"))
    assert status["store/shards"] == "ok" and "store/shards/part-0.bin" not in status  # not orphans
    _write(run, "results/store/shards/part-1.bin", b"changed")
    assert _status(audit(run / "results"))["store/shards"] == "modified"


def test_write_audit_step_counts_statuses(run):
    (run / _mask("01")).unlink()
    counts = write_audit(
        results_dir=run / "results", out_tsv=run / "audit" / "a.tsv", out_html=run / "audit" / "a.html", threads=1
    )
    assert counts == {"missing": 1, "modified": 0, "stale": 0, "orphan": 0, "ok": 6}
    assert (run / "audit" / "a.tsv").is_file() and (run / "audit" / "a.html").is_file()


def test_a_rerun_audit_does_not_report_its_own_earlier_outputs(run):
    """Snakemake removes the audit's outputs before rerunning it; the earlier audit job's record of them
    must not read as missing (it did when a downstream dataset was added to a finished run)."""
    outputs = {"out_tsv": ["results/qc/audit.tsv"], "out_html": ["results/qc/audit.html"]}
    for rel in ("results/qc/audit.tsv", "results/qc/audit.html"):
        _write(run, rel, b"earlier audit")
    _job(run, "audit", {}, {"dep_all": [SHARD]}, outputs)
    for rel in ("results/qc/audit.tsv", "results/qc/audit.html"):
        (run / rel).unlink()  # what Snakemake does before rerunning the job
    counts = write_audit(results_dir=run / "results", out_tsv=run / "results/qc/audit.tsv",
                         out_html=run / "results/qc/audit.html", threads=1)
    assert counts["missing"] == 0 and counts["ok"] == 7
