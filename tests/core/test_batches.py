"""Batch jobs (bh_models.core.batches): stable buckets, skipped done units, retries of failed units
alone, exclusions that let the batch succeed, added units, workers, manifests, listed inputs, audit.

The unit step is a toy (tests/core/toy_steps.py) that writes real files instantly and fails on
command, so every property is checked through the real runner, records and audit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from bh_models.core.batches import (
    MANIFEST_COLUMNS,
    JobContext,
    batch_label,
    bucket_of,
    listed_files,
    read_manifest,
    run_units,
    stale_manifests,
)
from bh_models.core.exclusions import exclusion_table, read_exclusion
from bh_models.core.step import run_job
from bh_models.records.audit import audit

STEP = "tests.core.toy_steps:toy_unit"
TEMPLATES = {"out_timeseries": "results/derivatives/ds/{folder}/{prefix}_timeseries.txt",
             "out_figure": "results/derivatives/ds/sub-{subject}/figures/{prefix}_figure.png"}
CONFIG = {"datasets": {"ds": {"bids_root": "raw/ds"}}, "seed": 1, "results_dir": "results"}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def raw_unit(label: str, command: str) -> dict:
    source = Path("raw/ds") / f"sub-{label}" / f"sub-{label}_source.txt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(command)
    return {"key": f"sub-{label}", "subject": label, "session": "", "run": "", "folder": f"sub-{label}",
            "prefix": f"sub-{label}", "inputs": {"source": str(source)}, "params": {}}


def run_batch(units: list[dict], *, batch: str = "0001", threads: int = 1, scale: float = 1.0, via_runner=False):
    manifest = Path(f"results/batches/ds/batch-{batch}_manifest.tsv")
    qc = Path(f"results/qc/batch-{batch}.html")
    params = {"batch_units": units, "batch_outputs": TEMPLATES, "batch_figures": ["out_figure"], "scale": scale}
    if via_runner:  # the step runner, as a Snakemake job runs it: the batch job's own record too
        run_job(step="bh_models.core.batches:run_units", rule="toy_rule",
                inputs={"dep_raw": [u["inputs"]["source"] for u in units]},
                outputs={"out_manifest": str(manifest), "out_qc": str(qc)},
                params={"unit_step": STEP, **params}, wildcards={"dataset": "ds", "batch": batch},
                config=CONFIG, threads=threads, log_file=f"results/logs/toy_rule/ds_batch-{batch}.log")
    else:
        context = JobContext(rule="toy_rule", wildcards={"dataset": "ds", "batch": batch}, config=CONFIG,
                             results_dir="results", log_file=None)
        run_units(out_manifest=manifest, out_qc=qc, unit_step=STEP, job_context=context, threads=threads, **params)
    return read_manifest(manifest)


def calls() -> list[str]:
    path = Path("calls.txt")
    return path.read_text().split() if path.is_file() else []


def test_bucket_of_depends_on_the_label_only_and_spreads_evenly():
    labels = [f"{i:06d}" for i in range(20_000)]
    buckets = [bucket_of(label, 100) for label in labels]
    assert buckets == [bucket_of(label, 100) for label in labels]  # stable
    counts = pd.Series(buckets).value_counts()
    assert len(counts) == 100 and counts.min() > 140 and counts.max() < 260  # ~200 each
    assert bucket_of("01", 1000) == bucket_of("01", 1000) != bucket_of("02", 1000)
    assert batch_label(7, 1000) == "0007" and batch_label(7, 100_000) == "00007"


def test_a_batch_runs_every_unit_and_lists_its_outputs(workdir):
    manifest = run_batch([raw_unit("01", "1"), raw_unit("02", "2")])
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "out_timeseries", "out_figure"]
    assert manifest["status"].tolist() == ["done", "done"]
    assert Path(manifest.loc[1, "out_timeseries"]).read_text() == "4.0\n"
    assert Path("results/derivatives/ds/sub-02/sub-02_timeseries.json").is_file()  # the step's sidecar
    page = Path("results/qc/batch-0001.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 and "sub-02: done" in page
    records = sorted(p.name for p in Path("results/provenance/toy_rule").glob("*.json"))
    assert records == ["dataset-ds_subject-01.json", "dataset-ds_subject-02.json"]


def test_every_unit_file_is_audited_ok(workdir):
    """The per-unit records and the batch job's record cover every file the batch wrote."""
    run_batch([raw_unit("01", "1"), raw_unit("02", "2"), raw_unit("03", "bad")], via_runner=True)
    table = audit(Path("results"))
    assert set(table["status"]) == {"ok"}, table[table["status"] != "ok"].to_string()
    covered = set(table["path"])
    written = {p.relative_to("results").as_posix() for p in Path("results").rglob("*") if p.is_file()
               and p.relative_to("results").parts[0] not in ("logs", "provenance", "exclusions")
               and not any(part.startswith(".") for part in p.parts)}
    assert written == covered
    assert {"derivatives/ds/sub-01/sub-01_timeseries.json", "batches/ds/batch-0001_manifest.tsv",
            "qc/batch-0001.html"} <= covered
    # A unit file changed after the run is found: modified, and the manifest is not blamed.
    Path("results/derivatives/ds/sub-02/sub-02_timeseries.txt").write_text("9\n")
    table = audit(Path("results")).set_index("path")
    assert table.loc["derivatives/ds/sub-02/sub-02_timeseries.txt", "status"] == "modified"


def test_a_failed_unit_fails_the_job_and_is_retried_alone(workdir):
    units = [raw_unit("01", "1"), raw_unit("02", "crash-once"), raw_unit("03", "3")]
    with pytest.raises(RuntimeError, match="1 of 3 units failed.*sub-02.*a bug"):
        run_batch(units)
    assert sorted(calls()) == ["sub-01_source.txt", "sub-02_source.txt", "sub-03_source.txt"]
    Path("calls.txt").unlink()
    manifest = run_batch(units)  # the retry: the others are recorded and skipped
    assert calls() == ["sub-02_source.txt"]
    assert manifest["status"].tolist() == ["done"] * 3


def test_bad_input_is_excluded_the_batch_succeeds_and_it_is_retried_when_the_data_change(workdir):
    units = [raw_unit("01", "1"), raw_unit("02", "bad")]
    manifest = run_batch(units).set_index("unit")
    assert manifest.loc["sub-02", "status"] == "excluded"
    assert "holds 'bad'" in manifest.loc["sub-02", "reason"] and manifest.loc["sub-02", "out_timeseries"] == ""
    assert manifest.loc["sub-02", "file"].endswith("sub-02_source.txt")
    assert read_exclusion(results_dir=Path("results"), dataset="ds", subject="02", rule="toy_rule", unit="sub-02")
    Path("calls.txt").unlink()
    assert run_batch(units).set_index("unit").loc["sub-02", "status"] == "excluded"
    assert calls() == []  # unchanged data: neither unit runs again
    Path(units[1]["inputs"]["source"]).write_text("5")  # the data are fixed
    assert run_batch(units).set_index("unit").loc["sub-02", "status"] == "done"
    assert calls() == ["sub-02_source.txt"]
    assert exclusion_table(results_dir=Path("results")).empty  # the record went with the success


def test_adding_a_unit_runs_only_that_unit(workdir):
    run_batch([raw_unit("01", "1"), raw_unit("02", "2")])
    Path("calls.txt").unlink()
    manifest = run_batch([raw_unit("01", "1"), raw_unit("02", "2"), raw_unit("04", "4")])
    assert calls() == ["sub-04_source.txt"] and len(manifest) == 3


def test_a_unit_is_redone_when_its_params_change_or_an_output_is_deleted(workdir):
    units = [raw_unit("01", "1"), raw_unit("02", "2")]
    run_batch(units)
    Path("calls.txt").unlink()
    run_batch(units, scale=3.0)
    assert sorted(calls()) == ["sub-01_source.txt", "sub-02_source.txt"]
    Path("calls.txt").unlink()
    Path("results/derivatives/ds/sub-01/sub-01_timeseries.txt").unlink()
    assert stale_manifests(manifests=[Path("results/batches/ds/batch-0001_manifest.tsv")]) == [
        "results/batches/ds/batch-0001_manifest.tsv"]
    run_batch(units, scale=3.0)
    assert calls() == ["sub-01_source.txt"]
    assert Path("results/derivatives/ds/sub-01/sub-01_timeseries.txt").read_text() == "6.0\n"
    assert stale_manifests(manifests=[Path("results/batches/ds/batch-0001_manifest.tsv")]) == []


def test_a_unit_whose_needed_unit_was_excluded_is_excluded_with_that_reason(workdir):
    run_batch([raw_unit("01", "1"), raw_unit("02", "bad")], batch="0001")
    runs = []
    for label in ("01", "02"):
        unit = raw_unit(f"{label}run", "7")
        runs.append({**unit, "key": f"sub-{label}_task-rest", "subject": label, "folder": f"sub-{label}",
                     "prefix": f"sub-{label}_task-rest", "run": f"sub-{label}_task-rest", "needs": f"sub-{label}"})
    context = JobContext(rule="toy_func", wildcards={"dataset": "ds", "batch": "0001"}, config=CONFIG,
                         results_dir="results", log_file=None)
    run_units(out_manifest=Path("results/batches/ds/batch-0001_func.tsv"), unit_step=STEP, batch_units=runs,
              batch_outputs=TEMPLATES, needs_manifest=Path("results/batches/ds/batch-0001_manifest.tsv"),
              job_context=context)
    manifest = read_manifest(Path("results/batches/ds/batch-0001_func.tsv")).set_index("unit")
    assert manifest.loc["sub-01_task-rest", "status"] == "done"
    assert manifest.loc["sub-02_task-rest", "status"] == "excluded"
    assert "needs sub-02" in manifest.loc["sub-02_task-rest", "reason"]
    assert "holds 'bad'" in manifest.loc["sub-02_task-rest", "reason"]


def test_worker_processes_give_the_same_files(workdir):
    units = [raw_unit(f"{i:02d}", str(i)) for i in range(1, 6)]
    one = run_batch(units, batch="0001", threads=1)
    files = {p: Path(p).read_bytes() for p in one["out_timeseries"].tolist() + one["out_figure"].tolist()}
    for p in files:
        os.unlink(p)
    for path in Path("results/provenance").rglob("*.json"):
        path.unlink()
    two = run_batch(units, batch="0001", threads=2)
    assert two.equals(one)
    assert {p: Path(p).read_bytes() for p in files} == files
    assert sorted(calls()) == sorted([f"sub-{i:02d}_source.txt" for i in range(1, 6)] * 2)


def test_listed_inputs_give_the_done_units_files_and_datasets(workdir):
    run_batch([raw_unit("01", "1"), raw_unit("02", "bad"), raw_unit("03", "3")])
    manifest = "results/batches/ds/batch-0001_manifest.tsv"
    assert [Path(p).name for p, _ in listed_files(manifests=[manifest], column="out_timeseries")] == [
        "sub-01_timeseries.txt", "sub-03_timeseries.txt"]
    run_job(step="tests.core.toy_steps:toy_consumer", rule="toy_consumer", inputs={"listed_timeseries": [manifest]},
            outputs={"out_table": "results/table.tsv"}, params={}, wildcards={}, config=CONFIG)
    assert Path("results/table.tsv").read_text().splitlines() == [
        "ds\tsub-01_timeseries.txt\t2.0", "ds\tsub-03_timeseries.txt\t6.0"]
    record = __import__("json").loads(Path("results/provenance/toy_consumer/all.json").read_text())
    assert [e["path"] for e in record["inputs"]["listed_timeseries"]] == [manifest]
    assert [Path(e["path"]).name for e in record["inputs"]["timeseries"]] == ["sub-01_timeseries.txt",
                                                                              "sub-03_timeseries.txt"]
    with pytest.raises(ValueError, match="no manifest column is known for 'data'"):
        run_job(step="tests.core.toy_steps:toy_consumer", rule="toy_consumer", inputs={"listed_data": [manifest]},
                outputs={"out_table": "results/table.tsv"}, params={}, wildcards={}, config=CONFIG)
