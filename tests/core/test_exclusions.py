"""Tests of bh_models.core.exclusions: per-unit failure records and the exclusion tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bh_models.core.exclusions import (
    EXCLUSION_COLUMNS,
    clear_exclusions,
    exclusion_table,
    read_exclusion,
    write_exclusion,
    write_exclusion_table,
)


def _fail(results: Path, dataset: str, subject: str, rule: str, file: str, reason: str = "bad") -> Path:
    unit = Path(file).name.split("_bold")[0].split("_T1w")[0]  # one record per unit and rule
    return write_exclusion(results_dir=results, dataset=dataset, subject=subject, rule=rule, reason=reason, file=file,
                           unit=unit)


def test_table_is_sorted_and_byte_stable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    failures = [
        ("siteB", "01", "func", "raw/siteB/sub-01/func/sub-01_task-rest_bold.nii.gz", "no RepetitionTime. Fix: add it"),
        ("siteA", "10", "anat", "raw/siteA/sub-10/anat/sub-10_T1w.nii.gz", "empty image. Fix: re-export"),
        ("siteA", "02", "func", "raw/siteA/sub-02/func/sub-02_task-rest_run-2_bold.nii.gz", "4 volumes"),
        ("siteA", "02", "func", "raw/siteA/sub-02/func/sub-02_task-rest_run-1_bold.nii.gz", "3 volumes"),
    ]
    for dataset, subject, rule, file, reason in failures:
        _fail(results, dataset, subject, rule, str(tmp_path / file), reason)
    out = tmp_path / "results" / "qc" / "exclusions.tsv"
    table = exclusion_table(results_dir=results, out_tsv=out)
    assert list(table.columns) == EXCLUSION_COLUMNS
    assert table[["dataset", "subject", "rule"]].values.tolist() == [
        ["siteA", "02", "func"], ["siteA", "02", "func"], ["siteA", "10", "anat"], ["siteB", "01", "func"],
    ]
    assert table.loc[0, "file"] == "raw/siteA/sub-02/func/sub-02_task-rest_run-1_bold.nii.gz"  # relative to cwd
    assert pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False).equals(table)
    first = out.read_bytes()
    # Written again in another order: same bytes.
    for path in (results / "exclusions").rglob("*.json"):
        path.unlink()
    for dataset, subject, rule, file, reason in reversed(failures):
        _fail(results, dataset, subject, rule, str(tmp_path / file), reason)
    exclusion_table(results_dir=results, out_tsv=out)
    assert out.read_bytes() == first


def test_same_failure_twice_is_one_row(tmp_path):
    for _ in range(2):
        _fail(tmp_path, "siteA", "sub-01", "anat", "/data/sub-01_T1w.nii.gz")
    table = exclusion_table(results_dir=tmp_path)
    assert len(table) == 1 and table.loc[0, "subject"] == "01"  # "sub-" prefix dropped


def test_labels_cannot_escape_the_exclusions_folder(tmp_path):
    path = _fail(tmp_path / "results", "../../etc", "../01", "a/b", "/x")
    assert (tmp_path / "results" / "exclusions") in path.parents
    assert exclusion_table(results_dir=tmp_path / "results").loc[0, "dataset"] == "../../etc"


def test_clear_removes_one_rule_of_one_subject(tmp_path):
    _fail(tmp_path, "siteA", "01", "anat", "/a")
    _fail(tmp_path, "siteA", "01", "func", "/b")
    _fail(tmp_path, "siteA", "02", "anat", "/c")
    assert clear_exclusions(results_dir=tmp_path, dataset="siteA", subject="01", rule="anat") == 1
    left = exclusion_table(results_dir=tmp_path)[["subject", "rule"]].values.tolist()
    assert left == [["01", "func"], ["02", "anat"]]


def test_no_exclusions_gives_header_only(tmp_path):
    out = tmp_path / "exclusions.tsv"
    assert exclusion_table(results_dir=tmp_path, out_tsv=out).empty
    assert out.read_text() == "\t".join(EXCLUSION_COLUMNS) + "\n"


def test_clear_matches_rule_names_exactly(tmp_path):
    _fail(tmp_path, "siteA", "01", "an_at", "/a")
    _fail(tmp_path, "siteA", "01", "anat", "/a")
    assert clear_exclusions(results_dir=tmp_path, dataset="siteA", subject="01", rule="anat") == 1
    assert exclusion_table(results_dir=tmp_path)["rule"].tolist() == ["an_at"]


def test_records_are_per_unit_with_their_signature(tmp_path):
    for run in ("1", "2"):
        write_exclusion(results_dir=tmp_path, dataset="ds", subject="01", rule="func", reason="short", file="/x",
                        unit=f"sub-01_task-rest_run-{run}", run=f"sub-01_task-rest_run-{run}", inputs_sha256="a" * 64)
    record = read_exclusion(results_dir=tmp_path, dataset="ds", subject="01", rule="func", unit="sub-01_task-rest_run-2")
    assert record["run"] == "sub-01_task-rest_run-2" and record["inputs_sha256"] == "a" * 64
    assert len(exclusion_table(results_dir=tmp_path)) == 2
    assert clear_exclusions(results_dir=tmp_path, dataset="ds", subject="01", rule="func",
                            unit="sub-01_task-rest_run-1") == 1
    assert exclusion_table(results_dir=tmp_path)["run"].tolist() == ["sub-01_task-rest_run-2"]


def test_cohort_table_comes_from_the_manifests_and_the_index_problems(tmp_path):
    """Not from the records: a record of a subject no longer configured never shows up."""
    manifest = tmp_path / "batch-0001_desc-func_manifest.tsv"
    manifest.write_text(
        "unit\tdataset\tsubject\tsession\trun\trule\tstatus\treason\tfile\tout_timeseries\n"
        "sub-01_task-rest_run-1\tds\t01\t\tsub-01_task-rest_run-1\tfunc_preprocess\tdone\t\t\tx.tsv\n"
        "sub-01_task-rest_run-2\tds\t01\t\tsub-01_task-rest_run-2\tfunc_preprocess\texcluded\t"
        "12 volumes. Fix: exclude the run\traw/sub-01_task-rest_run-2_bold.nii.gz\t\n")
    problems = tmp_path / "ds_problems.tsv"
    problems.write_text("dataset\tsubject\tsession\trun\tpath\tkind\treason\tfix\n"
                        "ds\t02\t\t\traw/sub-02\tproblem\tbroken symlink\tdatalad get it\n"
                        "ds\t03\t\t\traw/sub-03\tnote\tchose run-1\t\n")
    write_exclusion(results_dir=tmp_path, dataset="gone", subject="09", rule="anat", reason="old", file="/y", unit="u")
    out = tmp_path / "exclusions.tsv"
    summary = write_exclusion_table(manifests=[manifest], problems=[problems], out_tsv=out)
    table = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    assert list(table.columns) == EXCLUSION_COLUMNS and summary == {"n_rows": 2, "n_subjects": 2}
    assert table[["subject", "run", "rule"]].values.tolist() == [["01", "sub-01_task-rest_run-2", "func_preprocess"],
                                                                 ["02", "", "index"]]
    assert table.loc[1, "reason"] == "broken symlink. Fix: datalad get it"
