"""The cohort plan (bh_models.bids.cohort) on the unusual but valid datasets of issue 17:
run entities, multi-echo, sessions, run numbers, broken files, exclusions, tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bh_models.bids.cohort import plan_dataset
from bh_models.core.errors import BHConfigError
from tests.conftest import write_bids


def _touch(path: Path, sidecar: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))
    return path


def _entry(root: Path, **extra) -> dict:
    return {"bids_root": str(root), "filters": {"task": "rest"}, "tr_override": None, "exclude_subjects": [],
            **extra}


def _rows(plan, kind: str):
    return plan.problems[plan.problems["kind"] == kind]


def test_dir_runs_are_distinct_units_named_with_every_entity(tmp_path):
    root = write_bids(tmp_path / "hcp", {"01": {"runs": ["task-rest_acq-mb_dir-LR_run-1", "task-rest_acq-mb_dir-RL_run-1"]}})
    plan = plan_dataset("hcp", _entry(root))
    assert sorted(plan.func) == ["sub-01_task-rest_acq-mb_dir-LR_run-1", "sub-01_task-rest_acq-mb_dir-RL_run-1"]
    assert _rows(plan, "problem").empty


def test_multi_echo_runs_are_one_unit_with_their_echo_times(tmp_path):
    root = write_bids(tmp_path / "me", {"01": {"runs": []}}, top_tr=2.0)
    for echo, te in ((1, 0.012), (2, 0.028), (3, 0.044)):
        _touch(root / "sub-01" / "func" / f"sub-01_task-rest_echo-{echo}_bold.nii.gz", {"EchoTime": te})
    plan = plan_dataset("me", _entry(root))
    assert list(plan.func) == ["sub-01_task-rest"]
    unit = plan.func["sub-01_task-rest"]
    assert [Path(p).name for p in unit["inputs"]["bold"]] == [f"sub-01_task-rest_echo-{e}_bold.nii.gz" for e in (1, 2, 3)]
    assert unit["params"]["echo_times"] == [0.012, 0.028, 0.044]
    assert "optimal combination" in _rows(plan, "note")["reason"].iloc[0]
    chosen = plan_dataset("me", _entry(root, filters={"task": "rest", "echo": "2"}))
    assert Path(chosen.func["sub-01_task-rest"]["inputs"]["bold"]).name == "sub-01_task-rest_echo-2_bold.nii.gz"
    assert "echo_times" not in chosen.func["sub-01_task-rest"]["params"]
    assert "echo 2" in _rows(chosen, "note")["reason"].iloc[0]


def test_multi_echo_without_echo_times_is_a_problem_with_the_fix(tmp_path):
    root = write_bids(tmp_path / "me", {"01": {"runs": []}})
    for echo in (1, 2):
        _touch(root / "sub-01" / "func" / f"sub-01_task-rest_echo-{echo}_bold.nii.gz")
    plan = plan_dataset("me", _entry(root))
    assert not plan.func
    row = _rows(plan, "problem").iloc[0]
    assert "EchoTime" in row["reason"] and "filters.echo" in row["fix"]


def test_each_session_uses_its_own_t1w_else_the_nearest_and_says_so(tmp_path):
    root = write_bids(tmp_path / "long", {})
    for ses in ("1", "2", "3"):
        _touch(root / "sub-01" / f"ses-{ses}" / "func" / f"sub-01_ses-{ses}_task-rest_bold.nii.gz")
    for ses in ("1", "3"):
        _touch(root / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_T1w.nii.gz")
    (root / "sub-10" / "ses-2" / "func").mkdir(parents=True)
    plan = plan_dataset("long", _entry(root))
    assert sorted(plan.anat) == ["sub-01_ses-1", "sub-01_ses-3"]
    assert plan.anat["sub-01_ses-3"]["folder"] == "sub-01/ses-3"
    needs = {key: unit["needs"] for key, unit in plan.func.items()}
    assert needs == {"sub-01_ses-1_task-rest": "sub-01_ses-1", "sub-01_ses-2_task-rest": "sub-01_ses-1",
                     "sub-01_ses-3_task-rest": "sub-01_ses-3"}
    note = _rows(plan, "note")
    assert len(note) == 1 and "session 1 (nearest session)" in note["reason"].iloc[0]


def test_the_lowest_run_number_by_value_wins_and_the_choice_is_a_note(tmp_path):
    root = write_bids(tmp_path / "runs", {"01": {"t1w": False}})
    for run in ("2", "10"):
        _touch(root / "sub-01" / "anat" / f"sub-01_run-{run}_T1w.nii.gz")
    plan = plan_dataset("runs", _entry(root))
    assert Path(plan.anat["sub-01"]["inputs"]["t1w"]).name == "sub-01_run-2_T1w.nii.gz"
    note = _rows(plan, "note").iloc[0]
    assert "sub-01_run-2_T1w.nii.gz" in note["reason"] and "sub-01_run-10_T1w.nii.gz" in note["reason"]


def test_broken_symlinks_and_bad_sidecars_are_problems_of_their_own_runs(tmp_path):
    root = write_bids(tmp_path / "annex", {"01": {}, "02": {}, "03": {}, "04": {}})
    bold = root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz"
    bold.unlink()
    os.symlink(".git/annex/objects/XX/missing", bold)
    t1w = root / "sub-04" / "anat" / "sub-04_T1w.nii.gz"
    t1w.unlink()
    os.symlink("../../.git/annex/objects/YY/missing", t1w)
    (root / "sub-02" / "func" / "sub-02_task-rest_bold.json").write_text("{not json")
    (root / "sub-03" / "func" / "sub-03_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2000}))
    plan = plan_dataset("annex", _entry(root))
    problems = _rows(plan, "problem").drop_duplicates("subject").set_index("subject")
    assert "broken symlink" in problems.loc["01", "reason"] and "datalad get" in problems.loc["01", "fix"]
    assert "broken symlink" in problems.loc["04", "reason"]  # (and its BOLD has no T1w: a second row)
    assert problems.loc["02", "path"].endswith("sub-02_task-rest_bold.json")
    assert "not valid JSON" in problems.loc["02", "reason"] or "unreadable JSON" in problems.loc["02", "reason"]
    assert "milliseconds" in problems.loc["03", "reason"] and "2 " not in problems.loc["03", "fix"]
    assert "(2)" in problems.loc["03", "fix"] and problems.loc["03", "path"].endswith("sub-03_task-rest_bold.json")
    assert sorted(plan.func) == []  # every run had one problem; the T1w of 01-03 are still planned
    assert sorted(plan.anat) == ["sub-01", "sub-02", "sub-03"]


def test_exclude_runs_leaves_only_that_run_out(tmp_path):
    root = write_bids(tmp_path / "two", {"01": {"runs": ["task-rest_run-1", "task-rest_run-2"]}})
    plan = plan_dataset("two", _entry(root, exclude_runs=["sub-01_task-rest_run-2"]))
    assert list(plan.func) == ["sub-01_task-rest_run-1"] and list(plan.anat) == ["sub-01"]
    assert "exclude_runs" in _rows(plan, "problem")["reason"].iloc[0]
    by_name = plan_dataset("two", _entry(root, exclude_runs=["sub-01_task-rest_run-1_bold.nii.gz"]))
    assert list(by_name.func) == ["sub-01_task-rest_run-2"]


def test_tasks_without_participants_or_their_column_are_left_out_before_any_job(tmp_path):
    root = write_bids(tmp_path / "down", {"01": {}, "02": {}})
    targets = {"diagnosis": {"column": "diagnosis", "type": "classification", "positive": "patient"},
               "age": {"column": "age", "type": "regression", "covariates": []}}
    plan = plan_dataset("down", _entry(root, targets=targets))
    assert list(plan.tasks) == ["diagnosis"]
    assert "column(s) age" in _rows(plan, "problem")["reason"].iloc[0]
    (root / "participants.tsv").unlink()
    plan = plan_dataset("down", _entry(root, targets=targets))
    assert plan.tasks == {} and len(plan.func) == 2  # preprocessing still planned
    assert all("participants.tsv is missing" in r for r in _rows(plan, "problem")["reason"])


def test_a_stratify_column_that_does_not_exist_is_a_config_error(tmp_path):
    root = write_bids(tmp_path / "ds", {"01": {}})
    with pytest.raises(BHConfigError, match="datasets.ds.stratify.*'site' is not in"):
        plan_dataset("ds", _entry(root, stratify="site"))
