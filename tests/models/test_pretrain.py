"""Step functions: tiny pretraining of all three models lowers each loss; embeddings; resume.

The packed store is replaced by a stand-in module with the same four names
(``FmriShardDataset``, ``T1ShardDataset``, ``collate_fmri``, ``paired_samples``)
serving synthetic, structured data (embeddings read the same subjects written as
derivatives, through the real readers): ROI time series driven by three shared
oscillations with ROI-specific loadings, and T1 volumes made of a smooth
template plus subject-specific variation.
"""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from bh_models.models import embeddings, pretrain, train as train_module
from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import read_json, sidecar_path
from bh_models.models.train import load_checkpoint, resume_path

N_ROIS, MAX_PATCHES, VOLUME = 32, 3, (30, 32, 34)  # volumes padded to 32 x 32 x 48 = 12 patches
STEPS = 40
HARMONIZER_STEPS = 80  # both reconstructions (S and F) must fall by 30 %, not only their sum
SUBJECTS = {  # subject -> (split, has fMRI, has T1)
    **{f"{i:02d}": ("train", True, True) for i in range(6)},
    "06": ("train", True, False),
    "07": ("train", False, True),
    "08": ("val", True, True),
    "09": ("val", False, True),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- stand-in store


def synthetic_fmri(subject: int, tr: float, k: int, n_patches: int) -> torch.Tensor:
    rng = np.random.default_rng(1000 + subject)
    loadings = np.random.default_rng(0).normal(size=(N_ROIS, 3))  # shared network structure
    times = np.arange(n_patches * k) * tr
    freqs = np.array([0.02, 0.05, 0.09])
    sources = np.cos(2 * np.pi * freqs[:, None] * times[None] + rng.uniform(0, 2 * np.pi, size=(3, 1)))
    signal = loadings @ sources + 0.1 * rng.normal(size=(N_ROIS, times.size))  # (R, T)
    x = torch.zeros(N_ROIS, MAX_PATCHES * k)
    x[:, : times.size] = torch.tensor(signal / 1.7, dtype=torch.float32)
    return x


def synthetic_t1(subject: int) -> torch.Tensor:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in VOLUME], indexing="ij"))  # (3, X, Y, Z)
    template = np.exp(-4 * (grid**2).sum(0)) + 0.3 * np.sin(3 * grid[0]) * np.cos(2 * grid[1])
    rng = np.random.default_rng(subject)
    volume = template * (1 + 0.05 * rng.normal()) + 0.02 * rng.normal(size=VOLUME)
    return torch.tensor(volume, dtype=torch.float32)[None]  # (1, X, Y, Z)


def build_store(root: Path) -> dict:
    """The stand-in store: one items file, and the dataset folders and scaling file the steps are given."""
    fmri, t1 = [], []
    for label, (split, has_fmri, has_t1) in SUBJECTS.items():
        number = int(label)
        if has_fmri:
            for tr, k in ((0.735, 48), (1.47, 24)):
                n_patches = 2 + (number + k) % 2
                fmri.append({"x": synthetic_fmri(number, tr, k, n_patches),
                             "patch_mask": torch.arange(MAX_PATCHES) < n_patches, "tr": tr, "k": k,
                             "n_patches": n_patches, "sample_id": f"synth_sub-{label}_tr-{k}",
                             "subject": label, "dataset": "synth", "split": split})
        if has_t1:
            t1.append({"t1": synthetic_t1(number), "subject": label, "dataset": "synth",
                       "sample_id": f"synth_sub-{label}_T1w", "split": split})
    for modality in ("fmri", "t1"):
        (root / modality / "synth").mkdir(parents=True, exist_ok=True)
    torch.save({"fmri": fmri, "t1": t1}, root / "fake_store.pt")
    (root / "scaling.json").write_text("{}")
    return {"fmri": [root / "fmri" / "synth"], "t1": [root / "t1" / "synth"], "scaling": root / "scaling.json"}


class _Items(Dataset):
    def __init__(self, folders: list[Path], split: str, modality: str, **_scaling) -> None:
        items = torch.load(Path(folders[0]).parents[1] / "fake_store.pt", weights_only=False)[modality]
        self.items = [{k: v for k, v in item.items() if k != "split"} for item in items if item["split"] == split]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def fake_collate_fmri(batch: list[dict]) -> dict:
    length = max(item["x"].shape[1] for item in batch)
    out = {"x": torch.stack([F.pad(item["x"], (0, length - item["x"].shape[1])) for item in batch]),
           "patch_mask": torch.stack([item["patch_mask"] for item in batch]),
           "tr": torch.tensor([item["tr"] for item in batch], dtype=torch.float32)}
    for key in ("k", "n_patches"):
        out[key] = torch.tensor([item[key] for item in batch], dtype=torch.int64)
    for key in ("sample_id", "subject", "dataset"):
        out[key] = [item[key] for item in batch]
    return out


def fake_paired_samples(*, fmri: list[Path], t1: list[Path], split: str) -> pd.DataFrame:
    fmri, t1 = _Items(fmri, split, "fmri").items, {
        item["subject"]: item["sample_id"] for item in _Items(t1, split, "t1").items}
    rows = [(item["subject"], "synth", item["sample_id"], t1.get(item["subject"], pd.NA)) for item in fmri]
    with_fmri = {item["subject"] for item in fmri}
    rows += [(subject, "synth", pd.NA, sample) for subject, sample in t1.items() if subject not in with_fmri]
    return pd.DataFrame(rows, columns=["subject", "dataset", "fmri_sample_id", "t1_sample_id"], dtype="string")


@pytest.fixture(scope="module")
def fake_store_module():
    import bh_models.models.data as real

    module = types.ModuleType("bh_models.models.data")
    # Training reads the stand-in store; embeddings read derivatives through the real readers.
    for name in ("FmriTableDataset", "T1TensorDataset", "pair_samples"):
        setattr(module, name, getattr(real, name))
    module.FmriShardDataset = functools.partial(_Items, modality="fmri")
    module.T1ShardDataset = functools.partial(_Items, modality="t1")
    module.collate_fmri = fake_collate_fmri
    module.collate_t1 = default_collate
    module.paired_samples = fake_paired_samples
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "bh_models.models.data", module)
        yield module


def write_geometry(path: Path, modes: int = 5, seed: int = 0) -> Path:
    values = 0.01 * np.random.default_rng(seed).normal(size=(N_ROIS, modes))
    table = pd.DataFrame(values, columns=[f"mode_{i + 1:03d}" for i in range(modes)])
    table.insert(0, "name", [f"roi{i}" for i in range(N_ROIS)])
    table.to_csv(path, sep="\t", index=False)
    return path


def write_gradients(path: Path, components: int = 4, seed: int = 0) -> Path:
    values = 0.1 * np.random.default_rng(100 + seed).normal(size=(N_ROIS, components))
    table = pd.DataFrame(values, columns=[f"gradient_{i + 1:02d}" for i in range(components)])
    table.insert(0, "name", [f"roi{i}" for i in range(N_ROIS)])
    table.to_csv(path, sep="\t", index=False)
    return path


TRAIN = dict(model_size="tiny", steps=STEPS, batch_size=4, lr=2e-3, seed=0, checkpoint_every=10, threads=1)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, fake_store_module) -> dict:
    """Run the three pretraining steps once for the module."""
    root = tmp_path_factory.mktemp("pretrain")
    store = build_store(root / "store")
    geometry = write_geometry(root / "geometry.tsv")
    gradients = write_gradients(root / "gradients.tsv")
    tables = {"geometry": geometry, "gradients": gradients}
    out = {"root": root, "store": store, **tables}
    for name in ("fmri", "t1", "harmonizer"):
        out[name] = {kind: root / name / f"{name}_{suffix}" for kind, suffix in
                     (("out_checkpoint", "model.pt"), ("out_metrics", "metrics.tsv"), ("out_curve", "loss.png"))}
    fmri, t1 = {"fmri": store["fmri"], "scaling": store["scaling"]}, {"t1": store["t1"]}
    out["fmri_summary"] = pretrain.pretrain_fmri(**fmri, **tables, **out["fmri"], **TRAIN)
    # The MAE decoder's 4,096-voxel head needs a larger step to move within 40 steps.
    out["t1_summary"] = pretrain.pretrain_t1(**t1, **out["t1"], **{**TRAIN, "lr": 1e-2})
    encoders = {"fmri_checkpoint": out["fmri"]["out_checkpoint"], "t1_checkpoint": out["t1"]["out_checkpoint"]}
    out["latents"] = root / "latents" / "synth"
    out["cache_summary"] = embeddings.cache_latents(**encoders, **tables, **store, out_latents=out["latents"],
                                                    dataset="synth", batch_size=4, threads=1)
    out["harmonizer_summary"] = pretrain.pretrain_harmonizer(
        latents=[out["latents"]], **encoders, **out["harmonizer"],
        **{**TRAIN, "lr": 3e-3, "steps": HARMONIZER_STEPS},
    )
    return out


def loss_drop(metrics_path: Path, column: str = "loss") -> tuple[float, float]:
    losses = pd.read_csv(metrics_path, sep="\t")[column]
    first, last = float(losses.iloc[:3].mean()), float(losses.iloc[-3:].mean())
    assert pretrain.loss_drop(losses) == pytest.approx(1 - last / first)
    return first, last


ROI_NAMES = [f"roi{i}" for i in range(N_ROIS)]
TS_SUFFIX = "space-MNI152NLin2009cAsym_atlas-Schaefer2018_seg-7n_scale-400_timeseries.tsv"
SETTINGS = {"atlas.name": "Schaefer2018", "atlas.parcels": 400, "atlas.networks": 7, "augment.tau": 35.28,
            "augment.max_patches": MAX_PATCHES, "template.name": "MNI152NLin2009cAsym", "template.resolution": 2,
            "anat.tensor_grid": list(VOLUME), "func.detrend": True, "func.high_pass": 0.01, "func.low_pass": None,
            "func.standardize": "psc"}


def write_derivatives(root: Path) -> dict:
    """The synthetic subjects as one dataset's derivatives: parcel TSVs with sidecars, the samples
    table (TR 0.735 s, factors 1 and 2) and T1 encoder tensors."""
    from bh_models.store.augment import make_samples

    root.mkdir(parents=True, exist_ok=True)
    timeseries, tensors = [], []
    for label, (_, has_fmri, has_t1) in SUBJECTS.items():
        number = int(label)
        if has_fmri:
            n_frames = (2 + number % 2) * 48
            x = synthetic_fmri(number, 0.735, 48, 3)[:, :n_frames]  # (R, T)
            path = root / f"sub-{label}_task-rest_{TS_SUFFIX}"
            pd.DataFrame(x.T.numpy(), columns=ROI_NAMES).to_csv(path, sep="\t", index=False, float_format="%.6g")
            sidecar_path(path).write_text(f'{{"RepetitionTime": 0.735, "NumberOfVolumes": {n_frames}}}')
            timeseries.append(path)
        if has_t1:
            path = root / f"sub-{label}_space-MNI152NLin2009cAsym_res-2_desc-encoder_T1w.npy"
            np.save(path, synthetic_t1(number)[0].numpy())
            tensors.append(path)
    samples = root / "synth_samples.tsv"
    make_samples(timeseries=timeseries, dataset="synth", out_samples=samples, tr_factors=[1, 2],
                 max_patches=MAX_PATCHES, seed=0)
    return {"samples": samples, "timeseries": timeseries, "t1_tensors": tensors, "dataset": "synth"}


def write_bundle(pipeline: dict, root: Path, derivatives: dict) -> Path:
    """The pipeline's checkpoints as a model bundle (identity scaling), through make_bundle."""
    import shutil

    from bh_models.models.bundle import CHECKPOINTS, make_bundle

    for kind, name in zip(CHECKPOINTS, ("fmri", "t1", "harmonizer")):
        target = root / CHECKPOINTS[kind]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pipeline[name]["out_checkpoint"], target)
        shutil.copy(sidecar_path(pipeline[name]["out_checkpoint"]), sidecar_path(target))
    work = root.parent / f"{root.name}_inputs"
    work.mkdir()
    (work / "scaling.json").write_text(pd.Series({"rois": ROI_NAMES, "median": [0.0] * N_ROIS,
                                                   "iqr": [1.0] * N_ROIS, "n_subjects": 6}).to_json())
    (work / "scaling.tsv").write_text("roi\tmedian\tiqr\n")
    splits = work / "splits.tsv"
    pd.DataFrame([(("synth", s, split)) for s, (split, _, _) in SUBJECTS.items()],
                 columns=["dataset", "subject", "split"]).to_csv(splits, sep="\t", index=False)
    make_bundle(fmri_checkpoint=root / CHECKPOINTS["harmonix_f"], t1_checkpoint=root / CHECKPOINTS["harmonix_s"],
                harmonizer_checkpoint=root / CHECKPOINTS["harmonizer"], scaling=work / "scaling.json",
                scaling_table=work / "scaling.tsv", geometry=pipeline["geometry"], gradients=pipeline["gradients"],
                splits=[splits], samples=[derivatives["samples"]], out_bundle=root / "bundle.json",
                out_scaling=root / "scaling.json", out_scaling_table=root / "scaling.tsv",
                out_geometry=root / "geometry_embedding.tsv", out_gradients=root / "gradient_embedding.tsv",
                out_card=root / "MODEL_CARD.md", out_manifest=root / "SHA256SUMS", settings=SETTINGS, seed=0)
    return root


@pytest.fixture(scope="module")
def bundle(pipeline: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bundle")
    derivatives = write_derivatives(root / "derivatives")
    return {"bundle": write_bundle(pipeline, root / "models", derivatives) / "bundle.json", **derivatives}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["fmri", "t1", "harmonizer"])
def test_tiny_pretraining_lowers_the_loss_by_30_percent(pipeline: dict, name: str) -> None:
    first, last = loss_drop(pipeline[name]["out_metrics"])
    steps = HARMONIZER_STEPS if name == "harmonizer" else STEPS
    print(f"\n{name}: loss {first:.4f} -> {last:.4f} ({100 * (1 - last / first):.0f} % lower) in {steps} steps")
    assert last <= 0.7 * first
    summary = pipeline[f"{name}_summary"]
    assert summary["steps"] == steps and summary["resumed_from_step"] == 0
    assert pipeline[name]["out_curve"].stat().st_size > 0
    sidecar = read_json(sidecar_path(pipeline[name]["out_checkpoint"]))
    assert sidecar["Steps"] == steps and sidecar["FinalLoss"] == pytest.approx(summary["final_loss"])
    assert sidecar["LossDrop"] == pytest.approx(1 - last / first, abs=1e-4)  # the TSV rounds losses


def test_harmonizer_reconstructs_both_modalities(pipeline: dict) -> None:
    """The release's loss weighs modalities by token count (here 96 fMRI vs 12 T1 tokens per row): the fMRI
    reconstruction falls by 30 %, the T1 one falls too, more slowly."""
    first_f, last_f = loss_drop(pipeline["harmonizer"]["out_metrics"], "loss_f")
    first_s, last_s = loss_drop(pipeline["harmonizer"]["out_metrics"], "loss_s")
    print(f"\nloss_f {first_f:.3f} -> {last_f:.3f}; loss_s {first_s:.3f} -> {last_s:.3f}")
    assert last_f <= 0.7 * first_f and last_s < 0.97 * first_s
    config = load_checkpoint(pipeline["harmonizer"]["out_checkpoint"])["config"]["model"]
    assert config["s_grid"] == (2, 2, 3) and config["n_rois"] == N_ROIS and config["n_patches"] == MAX_PATCHES
    assert not config["include_unpaired"] and config["loss_on_padded"] and config["norm_pix_loss"]


def test_the_latent_cache_holds_every_training_row_once(pipeline: dict) -> None:
    """Stage 0: every training row (paired and one-modality) encoded once, in bf16, fMRI tokens first."""
    from bh_models.models.latents import LatentStore

    store = LatentStore(pipeline["latents"])
    train = [s for s, (split, _, _) in SUBJECTS.items() if split == "train"]
    assert sorted(set(store.subjects)) == train
    paired = LatentStore(pipeline["latents"], paired_only=True)
    assert set(paired.subjects) == {s for s in train if SUBJECTS[s][1] and SUBJECTS[s][2]}
    assert pipeline["cache_summary"]["paired_rows"] == len(paired)
    n_f = N_ROIS * MAX_PATCHES
    item = paired[0]
    assert item["tokens"].shape == (n_f + 12, 64) and item["mask"][n_f:].all()
    # fMRI tokens equal a fresh encoding of the same sample (to bf16 precision).
    fmri_model = pretrain.load_pretrained(checkpoint=pipeline["fmri"]["out_checkpoint"], kind="harmonix_f")
    sample_id = store.index.loc[store.index["subject"] == item["subject"], "fmri_sample_id"].iloc[0]
    items = torch.load(pipeline["store"]["fmri"][0].parents[1] / "fake_store.pt", weights_only=False)["fmri"]
    sample = next(i for i in items if i["sample_id"] == sample_id)
    tokens, mask = fmri_model.encode(fake_collate_fmri([sample]), full_grid=True)
    first = int(np.flatnonzero((store.index["fmri_sample_id"] == sample_id).to_numpy())[0])
    cached = store[first]
    assert torch.equal(cached["mask"][:n_f], mask[0])
    assert torch.allclose(cached["tokens"][:n_f], tokens[0], atol=0.02 * float(tokens.abs().max()))
    t1_only = store.index["subject"] == "07"
    assert not store.index.loc[t1_only, "has_fmri"].astype(bool).any()


def test_t1_grid_follows_the_store(pipeline: dict) -> None:
    config = load_checkpoint(pipeline["t1"]["out_checkpoint"])["config"]["model"]
    assert config["img_size"] == (32, 32, 48)  # 30 x 32 x 34 rounded up to multiples of 16


def test_extract_embeddings_writes_subject_tables(bundle: dict, tmp_path: Path) -> None:
    outputs = {key: tmp_path / f"{key}.tsv" for key in ("out_embeddings", "out_fmri_embeddings", "out_t1_embeddings")}
    summary = embeddings.extract_embeddings(**bundle, **outputs, settings=SETTINGS, threads=1)
    hub = pd.read_csv(outputs["out_embeddings"], sep="\t", dtype={"subject": str})
    fmri = pd.read_csv(outputs["out_fmri_embeddings"], sep="\t", dtype={"subject": str})
    t1 = pd.read_csv(outputs["out_t1_embeddings"], sep="\t", dtype={"subject": str})
    assert list(hub.columns[:3]) == ["dataset", "subject", "hub_000"] and hub.shape == (10, 2 + 64)
    assert hub["subject"].tolist() == sorted(SUBJECTS)
    assert fmri["subject"].tolist() == [s for s, (_, f, _) in SUBJECTS.items() if f]
    assert t1["subject"].tolist() == [s for s, (_, _, t) in SUBJECTS.items() if t]
    assert np.isfinite(hub.iloc[:, 2:].to_numpy()).all()
    assert summary["hub_subjects"] == 10 and summary["hub_width"] == 64
    assert read_json(sidecar_path(outputs["out_embeddings"]))["Bundle"]["pretraining_datasets"] == ["synth"]
    # Subjects differ; a rerun writes the same bytes.
    assert hub.iloc[:, 2:].std(axis=0).max() > 0
    again = {key: tmp_path / "again" / path.name for key, path in outputs.items()}
    embeddings.extract_embeddings(**bundle, **again, settings=SETTINGS, threads=1)
    for key in outputs:
        assert outputs[key].read_bytes() == again[key].read_bytes()


def test_embeddings_refuse_a_bundle_trained_on_other_inputs(bundle: dict, tmp_path: Path) -> None:
    """A config that disagrees with the bundle's settings is refused, naming the key and both values."""
    from bh_models.core.errors import BHConfigError

    outputs = {key: tmp_path / f"{key}.tsv" for key in ("out_embeddings", "out_fmri_embeddings", "out_t1_embeddings")}
    for key, value in (("atlas.networks", 17), ("augment.tau", 30.0), ("atlas.parcels", 200)):
        with pytest.raises(BHConfigError, match=rf"{key}.*is {value!r} in this config.*trained with "
                                                rf"{SETTINGS[key]!r}"):
            embeddings.extract_embeddings(**bundle, **outputs, settings={**SETTINGS, key: value}, threads=1)
    assert not outputs["out_embeddings"].exists()


def test_rerun_after_a_kill_resumes_to_identical_weights(pipeline: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = {kind: tmp_path / f"fmri_{suffix}" for kind, suffix in
               (("out_checkpoint", "model.pt"), ("out_metrics", "metrics.tsv"), ("out_curve", "loss.png"))}
    kwargs = dict(fmri=pipeline["store"]["fmri"], scaling=pipeline["store"]["scaling"], geometry=pipeline["geometry"],
                  gradients=pipeline["gradients"], **outputs, **TRAIN)
    # First attempt dies after step 25 (last checkpoint: step 20) without writing outputs.
    monkeypatch.setattr(pretrain, "train", functools.partial(train_module.train, stop_after=25))
    pretrain.pretrain_fmri(**kwargs)
    assert resume_path(outputs["out_checkpoint"]).exists() and not outputs["out_checkpoint"].exists()
    monkeypatch.setattr(pretrain, "train", train_module.train)
    summary = pretrain.pretrain_fmri(**kwargs)
    assert summary["resumed_from_step"] == 20
    resumed = load_checkpoint(outputs["out_checkpoint"])["model"]
    reference = load_checkpoint(pipeline["fmri"]["out_checkpoint"])["model"]
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)


def test_the_latent_cache_refuses_other_positional_tables(pipeline: dict, tmp_path: Path) -> None:
    encoders = {"fmri_checkpoint": pipeline["fmri"]["out_checkpoint"], "t1_checkpoint": pipeline["t1"]["out_checkpoint"]}
    for key, other in (("geometry", write_geometry(tmp_path / "other.tsv", seed=1)),
                       ("gradients", write_gradients(tmp_path / "other_g.tsv", seed=1))):
        tables = {"geometry": pipeline["geometry"], "gradients": pipeline["gradients"], key: other}
        with pytest.raises(BHInputError, match="eigenmodes" if key == "geometry" else "gradients"):
            embeddings.cache_latents(**encoders, **tables, **pipeline["store"], out_latents=tmp_path / "l",
                                     dataset="synth")


def test_the_harmonizer_refuses_latents_of_other_encoders(pipeline: dict, tmp_path: Path) -> None:
    with pytest.raises(BHInputError, match="another harmonix_s checkpoint"):
        pretrain.pretrain_harmonizer(
            latents=[pipeline["latents"]], fmri_checkpoint=pipeline["fmri"]["out_checkpoint"],
            t1_checkpoint=pipeline["fmri"]["out_checkpoint"], out_checkpoint=tmp_path / "h.pt",
            out_metrics=tmp_path / "h.tsv", out_curve=tmp_path / "h.png", steps=1, batch_size=2, lr=1e-3, seed=0,
            checkpoint_every=1,
        )


def test_geometry_rows_must_match_the_store(fake_store_module, tmp_path: Path) -> None:
    store = build_store(tmp_path / "store")
    geometry = tmp_path / "geometry.tsv"
    write_geometry(geometry)
    table = pd.read_csv(geometry, sep="\t").iloc[:-1]
    table.to_csv(geometry, sep="\t", index=False)
    with pytest.raises(BHInputError, match="ROI rows"):
        pretrain.pretrain_fmri(fmri=store["fmri"], scaling=store["scaling"], geometry=geometry,
                               gradients=write_gradients(tmp_path / "g.tsv"), out_checkpoint=tmp_path / "f.pt",
                               out_metrics=tmp_path / "f.tsv", out_curve=tmp_path / "f.png",
                               steps=1, batch_size=2, lr=1e-3, seed=0, checkpoint_every=1)


def test_data_identity_changes_with_the_packed_data(tmp_path):
    """A resume file is only reused for the same data: its identity follows the store."""
    from bh_models.models.pretrain import data_identity

    store = tmp_path / "store"
    folders = [store / "fmri" / "siteA"]
    folders[0].mkdir(parents=True)
    (folders[0] / "index.tsv").write_text("sample_id\n a\n")
    (store / "scaling.json").write_text("{}")
    first = data_identity(folders=folders, scaling=store / "scaling.json")
    assert data_identity(folders=folders, scaling=store / "scaling.json") == first
    (store / "t1" / "siteA").mkdir(parents=True)  # another modality being packed does not count
    (store / "t1" / "siteA" / "index.tsv").write_text("partial")
    assert data_identity(folders=folders, scaling=store / "scaling.json") == first
    (store / "fmri" / "siteB").mkdir()  # nor a dataset the model is not given
    (store / "fmri" / "siteB" / "index.tsv").write_text("sample_id\n c\n")
    assert data_identity(folders=folders, scaling=store / "scaling.json") == first
    (folders[0] / "index.tsv").write_text("sample_id\n b\n")
    assert data_identity(folders=folders, scaling=store / "scaling.json") != first


def test_finetuning_the_harmonizer_on_packed_latents(pipeline: dict, bundle: dict, tmp_path: Path) -> None:
    """extract_latents writes a latent store (the cache's format); the fine-tuned model joins the evaluation."""
    from bh_models.evaluation.evaluate import evaluate_dataset, write_finetune_folds
    from bh_models.models.finetune import finetune_harmonizer, model_layers
    from bh_models.models.latents import LatentStore, read_latents, unpack_rows
    from bh_models.models.nn.hub_classifier import HubClassifier

    common = dict(**bundle, settings=SETTINGS, threads=1)
    summary = embeddings.extract_latents(out_latents=tmp_path / "a", **common)
    embeddings.extract_latents(out_latents=tmp_path / "again" / "a", **common)
    for name in ("tokens.npy", "mask.npy", "index.tsv", "latents.json"):  # reruns are byte-identical
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "again" / "a" / name).read_bytes(), name
    datasets, subjects, x = read_latents(path=tmp_path / "a")
    assert set(subjects) == set(SUBJECTS) and len(subjects) == summary["n_rows"] == len(LatentStore(tmp_path / "a"))
    harmonizer = pretrain.load_pretrained(checkpoint=pipeline["harmonizer"]["out_checkpoint"], kind="harmonizer")
    tokens, mask = unpack_rows(x)
    assert tokens.shape[1:] == (harmonizer.n_tokens, 64)
    n_f = harmonizer.n_f_tokens
    t1_only = torch.from_numpy(subjects == "07")
    assert not mask[t1_only, :n_f].any() and mask[t1_only, n_f:].all()
    model = HubClassifier(harmonizer, 2)
    assert len(model_layers(model)) == harmonizer.config.depth + 2
    with torch.no_grad():  # the release's fine-tuning input: hub outputs before the final norm
        features = harmonizer.forward_features(tokens, mask, final_norm=False)[:, 1:]
        logits = model(x)
        expected = model.head(model.fc_norm(features.mean(dim=1)))
    assert torch.allclose(logits, expected, atol=1e-5)

    # The cached rows give the hub embeddings of the batch-wise extraction.
    tables = tmp_path / "emb"
    embeddings.extract_embeddings(out_embeddings=tables / "hub.tsv", out_fmri_embeddings=tables / "f.tsv",
                                  out_t1_embeddings=tables / "s.tsv", **common)
    hub = pd.read_csv(tables / "hub.tsv", sep="\t", dtype={"subject": str}).set_index("subject")
    with torch.no_grad():
        rows = harmonizer.hub_embedding(tokens, mask).numpy()  # (n_rows, D)
    means = pd.DataFrame(rows).groupby(subjects).mean()
    assert np.allclose(means.to_numpy(), hub.loc[means.index].iloc[:, 1:].to_numpy(), atol=0.05)

    labels = sorted(SUBJECTS)
    participants = tmp_path / "participants.tsv"
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in labels],
                  "diagnosis": ["patient" if i % 2 else "control" for i in range(len(labels))]}).to_csv(
        participants, sep="\t", index=False)
    outputs = {name: tmp_path / "eval" / f"{name}.out" for name in
               ("out_results", "out_predictions", "out_figure_metrics", "out_figure_roc", "out_figure_scatter")}
    inputs = dict(fused=tables / "hub.tsv", fmri_only=tables / "hub.tsv", t1_only=tables / "hub.tsv", timeseries=[],
                  participants=participants, dataset="synth", n_folds=3, n_repeats=1,
                  tasks={"diagnosis": {"column": "diagnosis", "type": "classification", "positive": "patient"}})
    # The evaluation stage writes the probes' folds; the models-stage job fine-tunes on them; the
    # evaluation reads its scores back.
    write_finetune_folds(out_folds=tmp_path / "eval" / "folds.tsv", **inputs)
    finetune_harmonizer(latents=[tmp_path / "a"], harmonizer_checkpoint=pipeline["harmonizer"]["out_checkpoint"],
                        folds=tmp_path / "eval" / "folds.tsv", out_predictions=tmp_path / "ft" / "scores.tsv",
                        epochs=2, warmup_epochs=0, batch_size=4)
    evaluate_dataset(n_permutations=3, finetuned=tmp_path / "ft" / "scores.tsv", finetune={"enabled": True},
                     **inputs, **outputs)
    results = pd.read_csv(outputs["out_results"], sep="\t").set_index("model")
    row = results.loc["fused_finetuned"]
    assert row["n_trainable_params"] == sum(p.numel() for p in HubClassifier(harmonizer, 2).parameters())
    assert 0 <= row["auroc_mean"] <= 1 and np.isnan(row["permutation_p"]) and row["n_permutations"] == 0
    assert row["selected_penalty"] == "recipe: lr=0.0005 layer decay=0.65 epochs=2"
    assert row["n_subjects"] == results.loc["fused", "n_subjects"]


def test_the_bundle_holds_everything_to_encode_and_verifies(bundle: dict) -> None:
    from bh_models.models.bundle import CHECKPOINTS, read_bundle, verify_bundle

    root = bundle["bundle"].parent
    assert verify_bundle(root) == []
    meta = read_bundle(root)
    assert meta["settings"] == SETTINGS and meta["pretraining"]["datasets"] == ["synth"]
    assert set(meta["model_configs"]) == set(CHECKPOINTS)
    card = (root / "MODEL_CARD.md").read_text()
    for needle in ("## Pretraining data", "| synth |", "harmonix-f/checkpoint.pt", "loss drop", "Normalisation contract",
                   "augment.tau", "commit"):
        assert needle in card, needle
    steps = read_json(sidecar_path(root / CHECKPOINTS["harmonizer"]))["Steps"]
    assert f"| harmonizer | {CHECKPOINTS['harmonizer']} | {steps} |" in card
