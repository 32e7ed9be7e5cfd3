"""Packed store: round trip, reproducibility, incremental packing, pairing, loaders."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from bh_models.core.errors import BHInputError
from bh_models.core.storeformat import load_scaling, read_index, read_samples_table
from bh_models.models.data import FmriShardDataset, T1ShardDataset, collate_fmri, paired_samples
from bh_models.store.augment import make_samples
from bh_models.store.scaling import compute_scaling
from bh_models.store.shards import pack_fmri, pack_t1, plan_shards
from bh_models.store.splits import make_splits

N_ROIS = 400
T1_SHAPE = (4, 5, 6)
TS_SUFFIX = "space-MNI152NLin2009cAsym_atlas-Schaefer2018_seg-7n_scale-400_timeseries.tsv"
T1_SUFFIX = "space-MNI152NLin2009cAsym_res-2_desc-encoder_T1w.npy"
ROIS = [f"7Networks_{'LH' if i < 200 else 'RH'}_roi{i:03d}" for i in range(N_ROIS)]
# dsA: UK Biobank-like TR and factors; dsB: TR 2 s, same subject labels (a different person).
DATASETS = {
    "dsA": {"tr": 0.735, "factors": [1, 2, 3, 4], "runs": {"01": [150, 150], "02": [150], "03": [150],
                                                          "04": [150], "05": [150], "06": [150]},
            "t1": ["01", "02", "03", "04", "07"]},
    "dsB": {"tr": 2.0, "factors": [1, 2], "runs": {"01": [60], "02": [60], "03": [60], "04": [60], "05": [400]},
            "t1": ["01", "02"]},
}
FRACTIONS = {"train": 0.5, "val": 0.25, "test": 0.25}


def write_inputs(root: Path, dataset: str) -> tuple[list[Path], list[Path]]:
    """Parcel time series (float_format %.6g, like the func stage) and T1 tensors of one dataset."""
    spec = DATASETS[dataset]
    rng = np.random.default_rng(sorted(DATASETS).index(dataset))
    timeseries = []
    for subject, lengths in spec["runs"].items():
        level = rng.normal(0, 2, N_ROIS)  # subject-specific ROI means, so the scaling has work to do
        for run, n_frames in enumerate(lengths, start=1):
            path = root / dataset / f"sub-{subject}" / "func" / f"sub-{subject}_task-rest_run-{run}_{TS_SUFFIX}"
            path.parent.mkdir(parents=True, exist_ok=True)
            values = level + rng.standard_normal((n_frames, N_ROIS))
            pd.DataFrame(values, columns=ROIS).to_csv(path, sep="\t", index=False, float_format="%.6g")
            path.with_name(path.name.replace(".tsv", ".json")).write_text(
                json.dumps({"RepetitionTime": spec["tr"], "NumberOfVolumes": n_frames}))
            timeseries.append(path)
    tensors = []
    for subject in spec["t1"]:
        path = root / dataset / f"sub-{subject}" / "anat" / f"sub-{subject}_{T1_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.standard_normal(T1_SHAPE).astype(np.float32))
        tensors.append(path)
    return timeseries, tensors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("derivatives")
    return {dataset: write_inputs(root, dataset) for dataset in DATASETS}


def pack_dataset(inputs: dict, store: Path, dataset: str, work: Path, seed: int = 11) -> None:
    timeseries, tensors = inputs[dataset]
    samples = work / f"{dataset}_samples.tsv"
    make_samples(timeseries=timeseries, dataset=dataset, out_samples=samples,
                 tr_factors=DATASETS[dataset]["factors"], seed=seed)
    splits = store / "splits" / f"{dataset}.tsv"
    make_splits(dataset=dataset, samples=samples, t1_tensors=tensors, out_splits=splits,
                fractions=FRACTIONS, seed=seed)
    # ~40 frames per shard: forces several shards per split.
    pack_fmri(samples=samples, timeseries=timeseries, splits=splits, out_dir=store / "fmri" / dataset,
              shard_size_mb=40 * N_ROIS * 4 / 2**20, threads=2)
    pack_t1(t1_tensors=tensors, splits=splits, dataset=dataset, out_dir=store / "t1" / dataset,
            shard_size_mb=2 * np.prod(T1_SHAPE) * 4 / 2**20)


def build_store(inputs: dict, root: Path) -> Path:
    store = root / "store"
    for dataset in DATASETS:
        pack_dataset(inputs, store, dataset, root)
    compute_scaling(fmri=sorted(store.glob("fmri/*")), out_scaling=store / "scaling.json",
                    out_scaling_table=store / "scaling.tsv")
    return store


def fmri_folders(store: Path) -> list[Path]:
    return sorted((store / "fmri").iterdir())


def t1_folders(store: Path) -> list[Path]:
    return sorted((store / "t1").iterdir())


@pytest.fixture(scope="module")
def store(inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(inputs, tmp_path_factory.mktemp("run1"))


@functools.cache
def load_source(path: Path) -> np.ndarray:
    # numpy's own parser, independent of the pandas reader the store uses.
    return np.loadtxt(path, skiprows=1, dtype=np.float64).astype(np.float32)


def expected_variant(inputs: dict, row: pd.Series) -> np.ndarray:
    """The variant straight from the source TSV: (n_rois, n_frames) float32."""
    source = next(p for p in inputs[row["dataset"]][0] if p.name == row["source_file"])
    return load_source(source)[row["offset"]::row["factor"]][: row["n_frames"]].T


def test_plan_shards_groups_by_split_and_size() -> None:
    shards, starts = plan_shards(splits=["test", "train", "train", "train", "val"], sizes=[5, 4, 4, 9], shard_size=8)
    assert shards == ["shard-test-00000.npy", "shard-train-00000.npy", "shard-train-00000.npy",
                      "shard-train-00001.npy"]
    assert starts == [0, 0, 4, 0]


def test_fmri_round_trip_is_exact_for_every_sample(inputs: dict, store: Path) -> None:
    seen = 0
    for split in FRACTIONS:
        data = FmriShardDataset(fmri_folders(store), split, scale=False)
        assert data.max_patches == 18
        for i in range(len(data)):
            item, row = data[i], data.index.iloc[i]
            expected = expected_variant(inputs, row)
            n, k = row["n_frames"], row["k"]
            assert item["x"].dtype == torch.float32 and item["x"].shape == (N_ROIS, 18 * k)
            assert np.array_equal(item["x"][:, :n].numpy(), expected)
            assert not item["x"][:, n:].any()
            assert item["patch_mask"].tolist() == [True] * row["n_patches"] + [False] * (18 - row["n_patches"])
            assert row["n_patches"] == -(-n // k)
            assert item["tr"] == pytest.approx(row["factor"] * DATASETS[row["dataset"]]["tr"])
            assert item["k"] == round(35.28 / item["tr"])
            assert (item["sample_id"], item["subject"], item["dataset"]) == (
                row["sample_id"], row["subject"], row["dataset"])
            seen += 1
    planned = sum(len(read_samples_table(p)) for p in store.glob("fmri/*/index.tsv"))
    assert seen == planned == 6 * 4 + 1 * 4 + 5 * 2  # dsA: 7 runs x 4 factors; dsB: 5 runs x 2


def test_reader_applies_robust_scaling(inputs: dict, store: Path) -> None:
    scaling = load_scaling(store / "scaling.json")
    raw, scaled = FmriShardDataset(fmri_folders(store), "val", scale=False), FmriShardDataset(fmri_folders(store), "val", scaling=store / "scaling.json")
    for i in range(len(raw)):
        n = raw.index.loc[i, "n_frames"]
        want = (raw[i]["x"][:, :n].numpy() - scaling.median[:, None]) / scaling.iqr[:, None]
        assert np.allclose(scaled[i]["x"][:, :n].numpy(), want, rtol=0, atol=1e-6)
        assert not scaled[i]["x"][:, n:].any()


def test_scaling_statistics_come_from_training_subjects(store: Path) -> None:
    obj = json.loads((store / "scaling.json").read_text())
    splits = pd.concat([pd.read_csv(p, sep="\t", dtype=str) for p in sorted(store.glob("splits/*.tsv"))])
    fmri_train = splits[(splits["split"] == "train") & (splits["n_fmri_samples"] != "0")]
    assert obj["n_subjects"] == len(fmri_train) and obj["split"] == "train"
    assert len(obj["median"]) == len(obj["iqr"]) == N_ROIS and min(obj["iqr"]) > 0


def test_rerun_with_same_seed_is_byte_identical(inputs: dict, store: Path, tmp_path: Path) -> None:
    again = build_store(inputs, tmp_path)
    files = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert any(f.name.startswith("shard-") for f in files)
    for name in files:
        assert (store / name).read_bytes() == (again / name).read_bytes(), name


def test_adding_a_dataset_leaves_other_shards_untouched(inputs: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    pack_dataset(inputs, store, "dsA", tmp_path)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in store.rglob("*") if p.is_file()}
    pack_dataset(inputs, store, "dsB", tmp_path)
    for path, (mtime, inode, content) in before.items():
        assert (path.stat().st_mtime_ns, path.stat().st_ino, path.read_bytes()) == (mtime, inode, content), path
    assert sorted(read_index(folders=fmri_folders(store))["dataset"].unique()) == ["dsA", "dsB"]


def test_no_subject_in_two_splits_across_variants_and_modalities(store: Path) -> None:
    rows = pd.concat([read_index(folders=sorted((store / m).iterdir())) for m in ("fmri", "t1")], ignore_index=True)
    assert rows.groupby(["dataset", "subject"])["split"].nunique().max() == 1
    keys = {s: set(zip(*[rows.loc[rows["split"] == s, c] for c in ("dataset", "subject")])) for s in FRACTIONS}
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])


def test_t1_round_trip_and_pairing(inputs: dict, store: Path) -> None:
    sources = {(dataset, p.name): p for dataset in DATASETS for p in inputs[dataset][1]}
    n_t1 = 0
    for split in FRACTIONS:
        data = T1ShardDataset(t1_folders(store), split)
        for i in range(len(data)):
            item = data[i]
            # Stored in bf16: the float32 source rounded to nearest even, as torch rounds it.
            assert item["t1"].shape == (1, *T1_SHAPE) and item["t1"].dtype == torch.bfloat16
            source = np.load(sources[data.index.loc[i, "dataset"], data.index.loc[i, "source_file"]])
            assert torch.equal(item["t1"][0], torch.from_numpy(source).to(torch.bfloat16))
            assert item["t1"].float().sub(torch.from_numpy(source)).abs().max() <= np.abs(source).max() * 2.0**-8
            n_t1 += 1
        pairs = paired_samples(fmri=fmri_folders(store), t1=t1_folders(store), split=split)
        assert list(pairs.columns) == ["subject", "dataset", "fmri_sample_id", "t1_sample_id"]
        fmri = read_index(folders=fmri_folders(store), split=split)
        t1 = read_index(folders=t1_folders(store), split=split)
        assert sorted(pairs["fmri_sample_id"].dropna()) == sorted(fmri["sample_id"])
        for row in pairs.dropna().itertuples():
            assert row.t1_sample_id == f"{row.dataset}_sub-{row.subject}_T1w"
            assert row.fmri_sample_id.startswith(f"{row.dataset}_sub-{row.subject}_")
        t1_only = pairs[pairs["fmri_sample_id"].isna()]
        assert set(t1_only["t1_sample_id"]) == set(t1["sample_id"]) - set(pairs["t1_sample_id"].dropna()[
            pairs["fmri_sample_id"].notna()])
    assert n_t1 == 7
    everything = pd.concat([paired_samples(fmri=fmri_folders(store), t1=t1_folders(store), split=s) for s in FRACTIONS])
    assert ("dsA", "07") in set(zip(everything["dataset"], everything["subject"]))  # T1-only subject
    assert everything[everything["subject"] == "05"]["t1_sample_id"].isna().all()  # fMRI-only subjects


def test_collate_and_dataloader_workers(store: Path) -> None:
    data = FmriShardDataset(fmri_folders(store), "train", scaling=store / "scaling.json")
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate_fmri, num_workers=1,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        widths = [18 * k for k in batch["k"].tolist()]
        assert batch["x"].shape == (len(widths), N_ROIS, max(widths))
        assert batch["patch_mask"].shape == (len(widths), 18) and batch["patch_mask"].dtype == torch.bool
        assert batch["patch_mask"].sum(1).tolist() == batch["n_patches"].tolist()
        for b, n in enumerate(batch["n_frames"].tolist()):
            assert not batch["x"][b, :, n:].any()
        seen += batch["sample_id"]
    assert sorted(seen) == sorted(data.index["sample_id"])


def test_bad_inputs_are_named(inputs: dict, tmp_path: Path) -> None:
    timeseries, tensors = inputs["dsB"]
    samples, splits = tmp_path / "s.tsv", tmp_path / "splits.tsv"
    make_samples(timeseries=timeseries, dataset="dsB", out_samples=samples, tr_factors=[1], seed=0)
    make_splits(dataset="dsB", samples=samples, t1_tensors=tensors, out_splits=splits, seed=0)
    with pytest.raises(BHInputError, match="not among the time series"):
        pack_fmri(samples=samples, timeseries=timeseries[1:], splits=splits, out_dir=tmp_path / "o")
    broken = tmp_path / "broken" / timeseries[0].name
    broken.parent.mkdir()
    table = pd.read_csv(timeseries[0], sep="\t")
    table.iloc[3, 7] = np.nan
    table.to_csv(broken, sep="\t", index=False)
    with pytest.raises(BHInputError, match="NaN"):
        pack_fmri(samples=samples, timeseries=[broken, *timeseries[1:]], splits=splits, out_dir=tmp_path / "o")
    assert not list((tmp_path / "o").glob("*.tmp")) and not list((tmp_path / "o").glob(".*"))
    table.iloc[:-1].fillna(0).to_csv(broken, sep="\t", index=False)
    with pytest.raises(BHInputError, match="sidecar says"):
        pack_fmri(samples=samples, timeseries=[broken, *timeseries[1:]], splits=splits, out_dir=tmp_path / "o")
    other = tmp_path / "other.tsv"
    pd.read_csv(splits, sep="\t", dtype=str).iloc[1:].to_csv(other, sep="\t", index=False)
    with pytest.raises(BHInputError, match="has no split"):
        pack_fmri(samples=samples, timeseries=timeseries, splits=other, out_dir=tmp_path / "o")
    with pytest.raises(BHInputError, match="no packed fMRI"):
        FmriShardDataset([], "train")
    with pytest.raises(BHInputError, match="not a packed dataset folder"):
        FmriShardDataset([tmp_path / "nothing"], "train", scale=False)
    with pytest.raises(BHInputError, match="scaling statistics are missing"):
        load_scaling(tmp_path / "scaling.json")


def test_derivative_readers_give_the_packed_items(inputs: dict, store: Path, tmp_path: Path) -> None:
    """A downstream dataset read straight from its derivatives (never packed) is encoded from the
    same items the packed store serves, scaled with the given statistics."""
    from bh_models.models.data import FmriTableDataset, T1TensorDataset, pair_samples

    timeseries, tensors = inputs["dsA"]
    samples = tmp_path / "dsA_samples.tsv"
    make_samples(timeseries=timeseries, dataset="dsA", out_samples=samples, tr_factors=DATASETS["dsA"]["factors"],
                 seed=11)
    direct = FmriTableDataset(samples=samples, timeseries=timeseries, scaling=store / "scaling.json")
    packed = {}
    for split in ("train", "val", "test"):
        dataset = FmriShardDataset(fmri_folders(store), split, scaling=store / "scaling.json")
        packed.update({dataset[i]["sample_id"]: dataset[i] for i in range(len(dataset))
                       if dataset[i]["dataset"] == "dsA"})
    assert len(direct) == len(packed) > 0
    for i in range(len(direct)):
        item = direct[i]
        other = packed[item["sample_id"]]
        assert torch.equal(item["x"], other["x"]) and torch.equal(item["patch_mask"], other["patch_mask"])
        assert {k: item[k] for k in ("tr", "k", "n_patches", "n_frames", "subject")} == \
               {k: other[k] for k in ("tr", "k", "n_patches", "n_frames", "subject")}
    t1 = T1TensorDataset(t1_tensors=tensors, dataset="dsA")
    packed_t1 = {}
    for split in ("train", "val", "test"):
        dataset = T1ShardDataset(t1_folders(store), split)
        packed_t1.update({dataset[i]["sample_id"]: dataset[i] for i in range(len(dataset))
                          if dataset[i]["dataset"] == "dsA"})
    assert sorted(t1.index["sample_id"]) == sorted(packed_t1)
    for i in range(len(t1)):
        assert torch.equal(t1[i]["t1"], packed_t1[t1[i]["sample_id"]]["t1"])
    pairs = pair_samples(fmri=direct.index, t1=t1.index)
    assert set(pairs["subject"]) == set(DATASETS["dsA"]["runs"]) | set(DATASETS["dsA"]["t1"])
    assert pairs.loc[pairs["subject"] == "07", "fmri_sample_id"].isna().all()  # T1 only


def test_derivative_reader_refuses_another_roi_order(inputs: dict, store: Path, tmp_path: Path) -> None:
    from bh_models.models.data import FmriTableDataset

    timeseries, _ = inputs["dsA"]
    samples = tmp_path / "s.tsv"
    make_samples(timeseries=timeseries, dataset="dsA", out_samples=samples, tr_factors=[1], seed=11)
    scaling = json.loads((store / "scaling.json").read_text())
    scaling["rois"] = list(reversed(scaling["rois"]))
    (tmp_path / "scaling.json").write_text(json.dumps(scaling))
    with pytest.raises(BHInputError, match="differ from the scaling statistics.*network order"):
        FmriTableDataset(samples=samples, timeseries=timeseries, scaling=tmp_path / "scaling.json")


def test_bf16_bits_round_like_torch_including_ties() -> None:
    from bh_models.core.storeformat import bf16_bits, bf16_to_float32

    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 10_000),
                             np.array([0.0, -0.0, 1.0, 65504.0, 1e-40], dtype=np.float32)])
    # Exact ties (low 16 bits = 0x8000) round to the even upper half in both directions.
    ties = (np.array([0x3F808000, 0x3F818000, 0xBF808000], dtype=np.uint32)).view(np.float32)
    values = np.concatenate([values, ties]).astype(np.float32)
    ours = bf16_bits(values)
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, reference)
    assert np.array_equal(bf16_to_float32(ours), torch.from_numpy(values).to(torch.bfloat16).float().numpy())
    assert bf16_bits(ties).tolist() == [0x3F80, 0x3F82, 0xBF80]


def test_t1_shards_are_bf16_and_load_through_workers(store: Path) -> None:
    folder = t1_folders(store)[0]
    meta = json.loads((folder / "index.json").read_text())
    assert (meta["dtype"], meta["encoding"]) == ("<u2", "bfloat16-bits")
    shard = np.load(sorted(folder.glob("shard-*.npy"))[0], mmap_mode="r")
    assert shard.dtype == np.uint16 and shard.shape[1:] == T1_SHAPE
    data = T1ShardDataset(t1_folders(store), "train")
    direct = torch.stack([data[i]["t1"] for i in range(len(data))])
    loader = DataLoader(data, batch_size=2, num_workers=2, collate_fn=lambda items: torch.stack(
        [item["t1"] for item in items]))
    assert torch.equal(torch.cat(list(loader)), direct)
    from bh_models.models.train import move_to_device

    widened = move_to_device({"t1": direct}, torch.device("cpu"))["t1"]
    assert widened.dtype == torch.float32 and torch.equal(widened, direct.float())


def test_pack_t1_refuses_non_finite_volumes(inputs: dict, tmp_path: Path) -> None:
    _, tensors = inputs["dsB"]
    broken = tmp_path / tensors[0].name
    volume = np.load(tensors[0])
    volume[1, 2, 3] = np.inf
    np.save(broken, volume)
    splits = tmp_path / "splits.tsv"
    pd.DataFrame({"dataset": "dsB", "subject": sorted({p.name.split("_")[0][4:] for p in tensors}), "split": "train",
                  "stratum": "", "n_fmri_samples": 0, "n_t1": 1}).to_csv(splits, sep="\t", index=False)
    with pytest.raises(BHInputError, match="NaN or infinite"):
        pack_t1(t1_tensors=[broken, *tensors[1:]], splits=splits, dataset="dsB", out_dir=tmp_path / "t1")
    assert not [p.name for p in (tmp_path / "t1").iterdir() if p.name.endswith((".npy", ".tmp"))]


def test_t1_batches_are_read_into_one_buffer_and_collated_without_a_copy(store: Path) -> None:
    from bh_models.models.data import collate_t1
    from bh_models.models.train import DistContext, TrainConfig, _batches

    data = T1ShardDataset(t1_folders(store), "train")
    indices = list(range(len(data)))[::-1]
    items = data.__getitems__(indices)
    batch = collate_t1(items)
    assert batch["t1"].shape == (len(indices), 1, *T1_SHAPE) and batch["t1"].dtype == torch.bfloat16
    assert batch["t1"].untyped_storage().data_ptr() == items[0]["t1"].untyped_storage().data_ptr()  # no copy
    assert torch.equal(batch["t1"], torch.stack([data[i]["t1"] for i in indices]))
    assert batch["sample_id"] == [data[i]["sample_id"] for i in indices]
    # Items from elsewhere are stacked.
    assert torch.equal(collate_t1([data[0], data[1]])["t1"], torch.stack([data[0]["t1"], data[1]["t1"]]))
    # The training loop's iterator, with and without workers, gives the same batches.
    streams = []
    for workers in (0, 2):
        config = TrainConfig(steps=10, batch_size=2, lr=1e-3, seed=3, checkpoint_every=10, num_workers=workers)
        context = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        stream = _batches(data, collate_t1, config=config, context=context, start_step=0)
        streams.append([next(stream) for _ in range(3)])
    for a, b in zip(*streams):
        assert torch.equal(a["t1"], b["t1"]) and a["sample_id"] == b["sample_id"]
