import json

import pytest

from bh_models.bids.index import Filters, bold_stem, index_dataset, parse_entities
from bh_models.core.errors import BHInputError


def test_parse_entities():
    ents, suffix, ext = parse_entities("sub-01_ses-2_task-rest_acq-mb_run-3_bold.nii.gz")
    assert ents == {"sub": "01", "ses": "2", "task": "rest", "acq": "mb", "run": "3"}
    assert (suffix, ext) == ("bold", ".nii.gz")
    assert bold_stem("/x/sub-01_task-rest_run-1_bold.nii.gz") == "sub-01_task-rest_run-1"


def test_finds_t1w_bold_and_participants(bids_factory):
    root = bids_factory(subjects={"01": {}, "02": {"t1w": False}, "03": {"runs": ["task-rest_run-1", "task-rest_run-2"]}})
    index = index_dataset(root, dataset="ds")
    runs = index.runs
    assert sorted(runs[runs.suffix == "T1w"].subject) == ["01", "03"]
    assert len(runs[runs.suffix == "bold"]) == 4
    subjects = index.subjects.set_index("subject")
    assert subjects.loc["02", "has_t1w"] == False  # noqa: E712 - numpy bool
    assert subjects.loc["02", "paired"] == False  # noqa: E712
    assert subjects.loc["03", "n_bold"] == 2
    assert subjects.loc["01", "diagnosis"] == "control"
    assert (runs.dataset == "ds").all()


def test_tr_inheritance_nearest_sidecar_wins(bids_factory):
    root = bids_factory(subjects={"01": {}, "02": {"run_tr": 0.8}}, top_tr=2.0)
    # a subject-level sidecar overrides the top level for that subject only
    (root / "sub-01" / "sub-01_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 1.5}))
    runs = index_dataset(root).runs.set_index("subject")
    bold = runs[runs.suffix == "bold"]
    assert bold.loc["01", "repetition_time"] == 1.5
    assert bold.loc["02", "repetition_time"] == 0.8
    assert bold.loc["02", "tr_source"].endswith("sub-02_task-rest_bold.json")


def test_tr_more_specific_sidecar_wins_at_same_level(bids_factory):
    root = bids_factory(subjects={"01": {"runs": ["task-rest_acq-fast"]}, "02": {}}, top_tr=2.0)
    (root / "task-rest_acq-fast_bold.json").write_text(json.dumps({"RepetitionTime": 0.72}))
    bold = index_dataset(root, filters=Filters(task="rest")).runs.query("suffix == 'bold'").set_index("subject")
    assert bold.loc["01", "repetition_time"] == 0.72
    assert bold.loc["02", "repetition_time"] == 2.0


def test_tr_override_wins(bids_factory):
    root = bids_factory(top_tr=2.0)
    bold = index_dataset(root, tr_override=0.735).runs.query("suffix == 'bold'")
    assert (bold.repetition_time == 0.735).all()
    assert (bold.tr_source == "config:tr_override").all()


def test_bold_without_tr_is_a_named_problem(bids_factory):
    root = bids_factory(subjects={"01": {}, "02": {}}, top_tr=None)
    (root / "sub-01" / "func" / "sub-01_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    index = index_dataset(root)
    assert list(index.runs.query("suffix == 'bold'").subject) == ["01"]
    problem = index.problems.iloc[0]
    assert problem.subject == "02" and problem.path.endswith("sub-02_task-rest_bold.nii.gz")
    assert "RepetitionTime" in problem.reason and "tr_override" in problem.fix


def test_forbidden_subject_label_is_excluded_with_reason(bids_factory):
    root = bids_factory(subjects={"01": {}, "02": {}})
    (root / "sub-0;rm -rf x" / "anat").mkdir(parents=True)
    (root / "sub-a_b" / "anat").mkdir(parents=True)
    index = index_dataset(root)
    assert sorted(index.subjects.subject) == ["01", "02"]
    reasons = dict(zip(index.problems.subject, index.problems.reason + ". " + index.problems.fix))
    assert "forbids" in reasons["0;rm -rf x"] and "rename" in reasons["a_b"]


def test_task_and_session_filters(bids_factory):
    root = bids_factory(subjects={"01": {"runs": ["task-rest", "task-nback"]}})
    bold = index_dataset(root).runs.query("suffix == 'bold'")
    assert list(bold.task) == ["rest"]
    everything = index_dataset(root, filters=Filters(task=None))
    # the nback run is found too, but task-rest_bold.json does not apply to it: no TR
    assert list(everything.runs.query("suffix == 'bold'").task) == ["rest"]
    assert everything.problems.path.iloc[0].endswith("task-nback_bold.nii.gz")


def test_sessions(tmp_path, bids_factory):
    root = bids_factory(subjects={})
    for ses in ("1", "2"):
        func = root / "sub-01" / f"ses-{ses}" / "func"
        func.mkdir(parents=True)
        (func / f"sub-01_ses-{ses}_task-rest_bold.nii.gz").touch()
    (root / "sub-01" / "ses-2" / "func" / "sub-01_ses-2_task-rest_bold.json").write_text('{"RepetitionTime": 3.0}')
    bold = index_dataset(root).runs.query("suffix == 'bold'").set_index("session")
    assert bold.loc["1", "repetition_time"] == 2.0 and bold.loc["2", "repetition_time"] == 3.0
    assert list(index_dataset(root, filters=Filters(session="2")).runs.session) == ["2"]


def test_missing_root_and_description(tmp_path):
    with pytest.raises(BHInputError, match="does not exist.*Fix: check datasets.siteX.bids_root"):
        index_dataset(tmp_path / "nope", dataset="siteX")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BHInputError, match="dataset_description.json.*Fix"):
        index_dataset(tmp_path / "empty")


def test_index_is_deterministic(bids_factory):
    root = bids_factory(subjects={f"{i:02d}": {} for i in range(30)})
    a, b = index_dataset(root, threads=1), index_dataset(root, threads=8)
    assert a.runs.equals(b.runs) and a.subjects.equals(b.subjects)
