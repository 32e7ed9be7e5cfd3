"""Robust scaling: per-ROI median and IQR of training subjects' temporal means."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import write_json
from bh_models.core.storeformat import RobustScaling, load_scaling, write_samples_table
from bh_models.store.scaling import compute_scaling, fit_robust_scaling, subject_temporal_means

ROIS = ["roi_a", "roi_b", "roi_c"]


def write_store_dataset(store: Path, dataset: str, rows: list[dict], means: np.ndarray, rois=ROIS,
                        sds: np.ndarray | None = None) -> Path:
    """The files compute_scaling reads from a packed dataset (index, meta, temporal means and SDs)."""
    folder = store / "fmri" / dataset
    folder.mkdir(parents=True)
    write_samples_table(pd.DataFrame(rows).assign(dataset=dataset), folder / "index.tsv")
    write_json(folder / "index.json", {"rois": rois})
    np.save(folder / "temporal_means.npy", means)
    np.save(folder / "temporal_sds.npy", np.full_like(means, 1e-3) if sds is None else sds)
    return folder / "index.tsv"


def test_subject_means_are_frame_weighted() -> None:
    index = pd.DataFrame({"dataset": ["d", "d", "d"], "subject": ["01", "01", "02"], "n_frames": [100, 300, 50]})
    means = np.array([[1.0, 0.0], [5.0, 4.0], [2.0, 2.0]])
    out = subject_temporal_means(index=index, sample_means=means)
    assert np.allclose(out.to_numpy(), [[4.0, 3.0], [2.0, 2.0]])


def test_fit_matches_numpy_percentiles_and_floors_flat_rois() -> None:
    rng = np.random.default_rng(0)
    subject_means = np.column_stack([rng.normal(3, 2, 101), rng.normal(-1, 5, 101), np.full(101, 7.0)])
    median, iqr, floored = fit_robust_scaling(subject_means=subject_means)
    assert np.allclose(median, np.median(subject_means, axis=0))
    q75, q25 = np.percentile(subject_means[:, :2], [75, 25], axis=0)
    assert np.allclose(iqr[:2], q75 - q25)
    assert iqr[2] == 1.0 and floored.tolist() == [False, False, True]
    with pytest.raises(BHConfigError, match="no fMRI subject"):
        fit_robust_scaling(subject_means=np.zeros((0, 3)))


def test_demeaned_series_keep_their_units() -> None:
    # psc-cleaned runs: temporal means ~1e-3 apart, within-run SD ~1. Dividing by
    # that IQR would scale noise up ~1000-fold, so those ROIs are floored to 1;
    # a ROI whose means carry a real baseline (IQR >> 0.05 x SD) is scaled.
    rng = np.random.default_rng(0)
    subject_means = np.column_stack([rng.normal(0, 1e-3, 50), rng.normal(100, 20, 50)])
    _, iqr, floored = fit_robust_scaling(subject_means=subject_means, within_sd=np.array([1.0, 1.0]))
    assert floored.tolist() == [True, False] and iqr[0] == 1.0 and iqr[1] > 10
    _, _, floored = fit_robust_scaling(subject_means=subject_means, within_sd=np.array([1.0, 1.0]),
                                       relative_iqr_floor=0.0)
    assert floored.tolist() == [False, False]


def test_compute_scaling_uses_training_split_only(tmp_path: Path) -> None:
    rows_a = [{"subject": s, "split": split, "n_frames": 100}
              for s, split in [("01", "train"), ("02", "train"), ("03", "val"), ("04", "test")]]
    # Validation and test subjects carry absurd means: they must not move the statistics.
    means_a = np.array([[1.0, 10.0, 0.0], [3.0, 20.0, 0.0], [1e6, 1e6, 1e6], [-1e6, -1e6, -1e6]])
    rows_b = [{"subject": "01", "split": "train", "n_frames": 50}, {"subject": "02", "split": "train", "n_frames": 50}]
    means_b = np.array([[5.0, 30.0, 0.0], [7.0, 40.0, 0.0]])
    store = tmp_path / "store"
    indexes = [write_store_dataset(store, "dsA", rows_a, means_a), write_store_dataset(store, "dsB", rows_b, means_b)]
    summary = compute_scaling(fmri=[i.parent for i in indexes], out_scaling=store / "scaling.json",
                              out_scaling_table=store / "scaling.tsv")
    assert summary == {"n_subjects": 4, "n_floored": 1}  # dsA/01 and dsB/01 are different people
    stats = json.loads((store / "scaling.json").read_text())
    assert stats["median"] == [4.0, 25.0, 0.0]
    assert stats["iqr"] == pytest.approx([3.0, 15.0, 1.0])  # percentiles of [1,3,5,7] and [10,20,30,40]
    assert stats["floored_rois"] == ["roi_c"] and stats["datasets"] == ["dsA", "dsB"]
    table = pd.read_csv(store / "scaling.tsv", sep="\t")
    assert table["roi"].tolist() == ROIS and np.allclose(table["iqr"], stats["iqr"])
    scaling = load_scaling(store / "scaling.json")
    x = np.array([[4.0, 7.0], [25.0, 40.0], [2.0, 0.0]], dtype=np.float32)
    assert np.allclose(scaling.apply(x), [[0.0, 1.0], [0.0, 1.0], [2.0, 0.0]])


def test_compute_scaling_is_byte_identical_and_checks_atlas(tmp_path: Path) -> None:
    rows = [{"subject": f"{i:02d}", "split": "train", "n_frames": 10 + i} for i in range(5)]
    means = np.random.default_rng(1).normal(size=(5, 3))
    index = write_store_dataset(tmp_path / "s", "dsA", rows, means)
    compute_scaling(fmri=[index.parent], out_scaling=tmp_path / "a.json")
    compute_scaling(fmri=[index.parent], out_scaling=tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    other = write_store_dataset(tmp_path / "s", "dsB", rows, means, rois=["x", "y", "z"])
    with pytest.raises(BHInputError, match="ROI names differ"):
        compute_scaling(fmri=[index.parent, other.parent], out_scaling=tmp_path / "c.json")


def test_robust_scaling_apply_keeps_float32() -> None:
    scaling = RobustScaling(rois=("a",), median=np.array([1.0], np.float32), iqr=np.array([2.0], np.float32))
    assert scaling.apply(np.array([[3.0, 5.0]], np.float32)).dtype == np.float32
