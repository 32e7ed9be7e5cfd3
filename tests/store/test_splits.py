"""Subject-level, seeded, stratified splits."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bh_models.core.storeformat import write_samples_table
from bh_models.store.augment import plan_samples
from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.store.splits import deal_subjects, make_splits, read_splits, stratum_labels

TS_SUFFIX = "space-MNI152NLin2009cAsym_atlas-Schaefer2018_seg-7n_scale-400_timeseries.tsv"


def write_samples(path: Path, dataset: str, subjects: list[str], runs_per_subject: int = 2) -> Path:
    runs = [(f"sub-{s}_task-rest_run-{r}_{TS_SUFFIX}", 2.0, 120) for s in subjects
            for r in range(1, runs_per_subject + 1)]
    samples, _ = plan_samples(runs=runs, dataset=dataset, tr_factors=[1, 2], seed=0)
    write_samples_table(samples, path)
    return path


def t1_paths(root: Path, subjects: list[str]) -> list[Path]:
    return [root / f"sub-{s}" / "anat" / f"sub-{s}_space-MNI152NLin2009cAsym_res-2_desc-encoder_T1w.npy"
            for s in subjects]


def test_deal_subjects_keeps_every_prefix_in_proportion() -> None:
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    dealt = deal_subjects(n_subjects=40, fractions=fractions)
    assert pd.Series(dealt).value_counts().to_dict() == {"train": 32, "val": 4, "test": 4}
    for n in range(1, 41):
        counts = pd.Series(dealt[:n]).value_counts()
        for name, share in fractions.items():
            assert abs(counts.get(name, 0) - share * n) < 1.0 + 1e-9


def test_stratum_labels_bins_numeric_and_keeps_categories() -> None:
    ages = pd.Series([10, 20, 30, 40, 50, 60, 70, 80, None])
    labels = stratum_labels(values=ages, name="age", n_bins=4)
    assert labels.tolist() == ["age:q0", "age:q0", "age:q1", "age:q1", "age:q2", "age:q2",
                               "age:q3", "age:q3", "age:n/a"]
    assert stratum_labels(values=pd.Series(["F", "M", "n/a"]), name="sex").tolist() == ["sex:F", "sex:M", "sex:n/a"]


def test_no_subject_in_two_splits_and_fractions_hold(tmp_path: Path) -> None:
    subjects = [f"{i:02d}" for i in range(30)]
    samples = write_samples(tmp_path / "samples.tsv", "dsA", subjects[:25])
    # Subjects 20-29 have a T1; 25-29 have no fMRI at all and must still get a split.
    counts = make_splits(dataset="dsA", samples=samples, t1_tensors=t1_paths(tmp_path, subjects[20:]),
                         out_splits=tmp_path / "splits" / "dsA.tsv", seed=1)
    assert counts == {"train": 24, "val": 3, "test": 3}
    table = read_splits([tmp_path / "splits" / "dsA.tsv"])
    assert sorted(table["subject"]) == subjects
    assert not table.duplicated(["dataset", "subject"]).any()
    by_subject = table.set_index("subject")
    assert by_subject.loc["27", "n_fmri_samples"] == "0" and by_subject.loc["27", "n_t1"] == "1"
    assert by_subject.loc["03", "n_fmri_samples"] == "4"  # 2 runs x 2 factors


def test_splits_are_seeded_and_byte_identical(tmp_path: Path) -> None:
    subjects = [f"{i:03d}" for i in range(50)]
    samples = write_samples(tmp_path / "samples.tsv", "dsA", subjects, runs_per_subject=1)
    t1 = t1_paths(tmp_path, subjects)
    make_splits(dataset="dsA", samples=samples, t1_tensors=t1, out_splits=tmp_path / "a.tsv", seed=7)
    make_splits(dataset="dsA", samples=samples, t1_tensors=t1[::-1], out_splits=tmp_path / "b.tsv", seed=7)
    make_splits(dataset="dsA", samples=samples, t1_tensors=t1, out_splits=tmp_path / "c.tsv", seed=8)
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.tsv").read_bytes() != (tmp_path / "c.tsv").read_bytes()


def test_stratified_split_balances_each_stratum(tmp_path: Path) -> None:
    subjects = [f"{i:02d}" for i in range(40)]
    participants = tmp_path / "participants.tsv"
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects],
                  "sex": ["F" if i % 4 == 0 else "M" for i in range(40)]}).to_csv(participants, sep="\t", index=False)
    samples = write_samples(tmp_path / "samples.tsv", "dsB", subjects, runs_per_subject=1)
    make_splits(dataset="dsB", samples=samples, participants=participants, stratify="sex",
                fractions={"train": 0.6, "val": 0.2, "test": 0.2}, out_splits=tmp_path / "s.tsv", seed=0)
    table = read_splits([tmp_path / "s.tsv"])
    counts = table.groupby(["stratum", "split"]).size().unstack(fill_value=0)
    assert counts.loc["sex:F"].to_dict() == {"test": 2, "train": 6, "val": 2}
    assert counts.loc["sex:M"].to_dict() == {"test": 6, "train": 18, "val": 6}
    assert json.loads((tmp_path / "s.json").read_text())["Stratify"] == "sex"


def test_bad_configuration_is_named(tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "samples.tsv", "dsA", ["01", "02"])
    with pytest.raises(BHConfigError, match="splits.fractions"):
        make_splits(dataset="dsA", samples=samples, out_splits=tmp_path / "s.tsv",
                    fractions={"train": 0.5, "test": 0.1}, seed=0)
    with pytest.raises(BHConfigError, match="stratify"):
        make_splits(dataset="dsA", samples=samples, out_splits=tmp_path / "s.tsv", stratify="age", seed=0)
    with pytest.raises(BHInputError, match="expected dsB"):
        make_splits(dataset="dsB", samples=samples, out_splits=tmp_path / "s.tsv", seed=0)
    dup = pd.DataFrame({"dataset": ["dsA", "dsA"], "subject": ["01", "01"], "split": ["train", "test"]})
    dup.to_csv(tmp_path / "dup.tsv", sep="\t", index=False)
    with pytest.raises(BHInputError, match="listed twice"):
        read_splits([tmp_path / "dup.tsv"])
