"""TR-downsampling variants and the TAPE patch plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.storeformat import parse_entities, read_samples_table
from bh_models.store.augment import make_samples, patch_size, plan_patches, plan_samples

TS_SUFFIX = "space-MNI152NLin2009cAsym_atlas-Schaefer2018_seg-7n_scale-400_timeseries.tsv"


def write_sidecar(folder: Path, stem: str, tr: float, n_volumes: int) -> Path:
    """A time-series path with its sidecar (make_samples reads only the sidecar)."""
    path = folder / f"{stem}_{TS_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("unused\n")
    path.with_name(path.name.replace(".tsv", ".json")).write_text(
        json.dumps({"RepetitionTime": tr, "NumberOfVolumes": n_volumes}))
    return path


@pytest.mark.parametrize(
    ("tr", "expected"),
    [(0.72, 49), (0.735, 48), (0.8, 44), (1.47, 24), (2.0, 18), (2.205, 16), (2.94, 12), (3.0, 12)],
)
def test_patch_size_is_round_tau_over_tr(tr: float, expected: int) -> None:
    assert patch_size(tr=tr, tau=35.28) == expected == round(35.28 / tr)


def test_patch_size_of_downsampled_ukb_matches_paper() -> None:
    # 0.735 s downsampled by 1..4 gives the paper's 48, 24, 16 and 12 frames per patch.
    assert [patch_size(tr=f * 0.735) for f in (1, 2, 3, 4)] == [48, 24, 16, 12]


def test_plan_patches_pads_cuts_and_drops() -> None:
    assert plan_patches(n_frames=100, k=24, max_patches=18) == (100, 5, False)  # ceil(100 / 24)
    assert plan_patches(n_frames=96, k=24, max_patches=18) == (96, 4, False)
    assert plan_patches(n_frames=1000, k=48, max_patches=18) == (864, 18, True)
    assert plan_patches(n_frames=23, k=24, max_patches=18)[1] == 0


def test_parse_entities() -> None:
    ent = parse_entities(f"sub-A01_ses-2_task-rest_run-3_{TS_SUFFIX}")
    assert ent == {"subject": "A01", "session": "2", "task": "rest", "run": "3", "acq": "",
                   "ce": "", "rec": "", "dir": "", "echo": "", "part": "", "chunk": ""}
    assert parse_entities("sub-7_T1w.npy")["session"] == ""
    assert parse_entities(f"sub-1_task-rest_dir-LR_run-2_{TS_SUFFIX}")["dir"] == "LR"


def test_sample_ids_keep_every_entity_that_tells_runs_apart() -> None:
    """dir-LR / dir-RL (HCP phase-encoding pairs) are two samples, named in BIDS entity order."""
    from bh_models.store.augment import sample_id

    ids = {sample_id(dataset="hcp", source_file=f"sub-1_ses-a_task-rest_acq-mb_dir-{d}_run-2_{TS_SUFFIX}", factor=1)
           for d in ("LR", "RL")}
    assert ids == {"hcp_sub-1_ses-a_task-rest_acq-mb_dir-LR_run-2_factor-1",
                   "hcp_sub-1_ses-a_task-rest_acq-mb_dir-RL_run-2_factor-1"}
    runs = [(f"sub-1_task-rest_dir-{d}_{TS_SUFFIX}", 0.735, 490) for d in ("LR", "RL")]
    samples, _ = plan_samples(runs=runs, dataset="hcp", tr_factors=[1], seed=0)
    assert len(samples) == 2 and samples["sample_id"].is_unique


def test_plan_samples_variants_follow_factor_and_offset() -> None:
    runs = [(f"sub-01_task-rest_{TS_SUFFIX}", 0.735, 490), (f"sub-02_task-rest_{TS_SUFFIX}", 0.735, 300)]
    samples, dropped = plan_samples(runs=runs, dataset="ukb", tr_factors=[1, 2, 3, 4], seed=3)
    assert len(samples) == 8 and dropped.empty
    for row in samples.itertuples():
        assert 0 <= row.offset < row.factor
        assert row.tr == pytest.approx(row.factor * 0.735)
        assert row.k == round(35.28 / row.tr)
        frames = len(range(row.offset, row.source_frames, row.factor))
        assert row.n_frames == min(frames, 18 * row.k)
        assert row.cut == (frames > 18 * row.k)
        assert row.n_patches == math.ceil(row.n_frames / row.k)
        assert row.padded_length == 18 * row.k
    assert samples.loc[samples["factor"] == 1, "offset"].eq(0).all()


def test_offsets_are_seeded_and_independent_of_run_order() -> None:
    runs = [(f"sub-{i:02d}_task-rest_{TS_SUFFIX}", 2.0, 200) for i in range(12)]
    first, _ = plan_samples(runs=runs, dataset="d", tr_factors=[3, 4], seed=0)
    again, _ = plan_samples(runs=runs[::-1], dataset="d", tr_factors=[4, 3], seed=0)
    other, _ = plan_samples(runs=runs, dataset="d", tr_factors=[3, 4], seed=1)
    assert first.equals(again)
    assert not first["offset"].equals(other["offset"])
    assert first.loc[first["factor"] == 4, "offset"].nunique() > 1


def test_short_variants_are_dropped_and_long_ones_cut() -> None:
    runs = [(f"sub-01_task-rest_{TS_SUFFIX}", 2.0, 17), (f"sub-02_task-rest_{TS_SUFFIX}", 2.0, 18),
            (f"sub-03_task-rest_{TS_SUFFIX}", 0.735, 2000)]
    samples, dropped = plan_samples(runs=runs, dataset="d", tr_factors=[1], seed=0)
    assert list(dropped["sample_id"]) == ["d_sub-01_task-rest_factor-1"]  # 17 frames < k = 18
    assert dropped.loc[0, "n_frames"] == 17 and dropped.loc[0, "k"] == 18
    kept = samples.set_index("subject")
    assert kept.loc["02", "n_patches"] == 1 and not kept.loc["02", "cut"]
    assert kept.loc["03", "cut"] and kept.loc["03", "n_frames"] == 18 * 48 and kept.loc["03", "n_patches"] == 18


def test_make_samples_writes_byte_identical_table(tmp_path: Path) -> None:
    func = tmp_path / "ds" / "sub-01" / "func"
    paths = [write_sidecar(func, "sub-01_task-rest_run-1", 0.8, 400),
             write_sidecar(func, "sub-01_task-rest_run-2", 0.8, 30),
             write_sidecar(tmp_path / "ds" / "sub-02" / "ses-1" / "func", "sub-02_ses-1_task-rest", 0.8, 300)]
    out = tmp_path / "a" / "samples.tsv"
    summary = make_samples(timeseries=paths, dataset="hcp", out_samples=out, tr_factors=[1, 2], seed=5)
    # run-2 at TR 1.6 s: 15 frames < k = 22 -> dropped; at 0.8 s: 30 frames < 44 -> dropped.
    assert summary == {"n_runs": 3, "n_samples": 4, "n_dropped": 2, "n_cut": 0}
    table = read_samples_table(out)
    assert table["subject"].tolist() == ["01", "01", "02", "02"]
    assert table["session"].tolist() == ["", "", "1", "1"]
    assert table["source_file"].str.startswith("sub-").all()  # names, never absolute paths
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert len(sidecar["Dropped"]) == 2 and sidecar["Seed"] == 5
    again = tmp_path / "b" / "samples.tsv"
    make_samples(timeseries=paths[::-1], dataset="hcp", out_samples=again, tr_factors=[1, 2], seed=5)
    assert out.read_bytes() == again.read_bytes()
    assert out.with_suffix(".json").read_bytes() == again.with_suffix(".json").read_bytes()


def test_a_censored_run_is_planned_from_its_rows(tmp_path: Path) -> None:
    """A scrubbed run's TSV has NumberOfRows (kept frames) < NumberOfVolumes: the plan must use the rows."""
    path = write_sidecar(tmp_path, "sub-01_task-rest", 0.8, 100)
    path.with_name(path.name.replace(".tsv", ".json")).write_text(
        json.dumps({"RepetitionTime": 0.8, "NumberOfVolumes": 100, "NumberOfRows": 88}))
    make_samples(timeseries=[path], dataset="d", out_samples=tmp_path / "s.tsv", tr_factors=[1], seed=0)
    assert read_samples_table(tmp_path / "s.tsv")["source_frames"].tolist() == [88]


def test_make_samples_rejects_bad_sidecar_and_factors(tmp_path: Path) -> None:
    path = write_sidecar(tmp_path, "sub-01_task-rest", 0.0, 100)
    with pytest.raises(BHInputError, match="RepetitionTime"):
        make_samples(timeseries=[path], dataset="d", out_samples=tmp_path / "s.tsv", tr_factors=[1], seed=0)
    path.with_name(path.name.replace(".tsv", ".json")).unlink()
    with pytest.raises(BHInputError, match="sidecar"):
        make_samples(timeseries=[path], dataset="d", out_samples=tmp_path / "s.tsv", tr_factors=[1], seed=0)
    with pytest.raises(BHConfigError, match="tr_factors"):
        plan_samples(runs=[], dataset="d", tr_factors=[0, 2], seed=0)
    with pytest.raises(BHConfigError):
        plan_samples(runs=[], dataset="d", tr_factors=[], seed=0)
    assert np.isfinite(patch_size(tr=0.735))
