"""The fine-tuning job (bh_models.models.finetune): recipe, streaming reader, folds in and scores out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bh_models.core.finetuneformat import read_predictions, write_folds
from bh_models.core.jsonio import read_json, sidecar_path
from bh_models.models import finetune as ft
from bh_models.models.latents import LatentStore, LatentWriter
from bh_models.models.nn.configs import config_to_dict, model_config
from bh_models.models.nn.harmonizer import Harmonizer
from bh_models.models.nn.hub_classifier import HubClassifier
from bh_models.models.train import CHECKPOINT_FORMAT, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ROIS, PATCHES, S_GRID, DIM = 10, 2, (2, 2, 2), 32
N_TOKENS = N_ROIS * PATCHES + 8


def harmonizer_config():
    return model_config(model="harmonizer", size="tiny", overrides={
        "dim_s": DIM, "dim_f": DIM, "s_grid": S_GRID, "n_rois": N_ROIS, "n_patches": PATCHES, "embed_dim": DIM,
        "n_hub": 4, "depth": 2, "num_heads": 4})


def write_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    config = harmonizer_config()
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model": Harmonizer(config).state_dict(),
                           "config": {"model": config_to_dict(config), "train": {}}, "step": 0})
    return path


def write_store(folder: Path, *, dataset: str, subjects: list[str], labels: dict[str, int], rows_per_subject: int = 2,
                seed: int = 0, signal: float = 1.5) -> Path:
    """A latent store whose class-1 subjects carry a shifted mean on a few channels (a learnable signal)."""
    rng = np.random.default_rng(seed)
    writer = LatentWriter(folder, n_rows=len(subjects) * rows_per_subject, n_tokens=N_TOKENS, dim=DIM,
                          meta={"n_rois": N_ROIS, "n_patches": PATCHES, "s_grid": list(S_GRID)})
    for subject in subjects:
        tokens = rng.standard_normal((rows_per_subject, N_TOKENS, DIM)).astype(np.float32)
        tokens[:, :, :4] += signal * labels[subject]
        mask = np.ones((rows_per_subject, N_TOKENS), dtype=bool)
        mask[:, N_ROIS:N_ROIS * PATCHES] = False  # the second patch of every ROI is padding
        writer.add(torch.from_numpy(tokens), torch.from_numpy(mask),
                   [{"dataset": dataset, "subject": subject, "fmri_sample_id": f"{subject}-{r}", "t1_sample_id": "t",
                     "has_fmri": 1, "has_t1": 1} for r in range(rows_per_subject)])
    return writer.close()


def folds_frame(subjects: list[str], labels: dict[str, int], *, dataset: str, n_folds: int = 3,
                n_repeats: int = 1) -> pd.DataFrame:
    rows = []
    for repeat in range(n_repeats):
        order = np.random.default_rng(repeat).permutation(len(subjects))
        for position, index in enumerate(order):
            subject = subjects[index]
            rows.append({"task": "dx", "task_type": "classification", "repeat": repeat, "fold": position % n_folds,
                         "dataset": dataset, "subject": subject, "label": float(labels[subject])})
    return pd.DataFrame(rows)


@pytest.fixture()
def setup(tmp_path: Path) -> dict:
    subjects = [f"{i:02d}" for i in range(18)]
    labels = {s: i % 2 for i, s in enumerate(subjects)}
    store = write_store(tmp_path / "latents", dataset="ds", subjects=subjects, labels=labels)
    folds = tmp_path / "folds.tsv"
    write_folds(folds_frame(subjects, labels, dataset="ds", n_repeats=2), folds)
    return {"store": store, "folds": folds, "checkpoint": write_checkpoint(tmp_path / "h.pt"),
            "subjects": subjects, "labels": labels}


FAST = dict(epochs=6, lr=3e-3, warmup_epochs=1, batch_size=8, eval_batch_size=5, drop_path=0.1)


def test_layer_decay_groups_follow_the_release():
    torch.manual_seed(0)
    model = HubClassifier(Harmonizer(harmonizer_config()), 2)
    groups = ft.layer_decay_param_groups(model, layer_decay=0.65, weight_decay=0.05)
    n_layers = len(model.layer_groups())
    assert n_layers == harmonizer_config().depth + 2
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        assert group["lr_scale"] == pytest.approx(0.65 ** (n_layers - 1 - group["layer"]))
        for parameter in group["params"]:
            exempt = parameter.ndim < 2 or names[id(parameter)].endswith("cls_token")
            assert group["weight_decay"] == (0.0 if exempt else 0.05), names[id(parameter)]
    listed = sorted(id(p) for g in groups for p in g["params"])
    assert listed == sorted(id(p) for p in model.parameters())
    head = next(g for g in groups if any(p is model.head.weight for p in g["params"]))
    assert head["lr_scale"] == 1.0


def test_streaming_reader_gives_the_store_rows(setup: dict):
    rows = ft.LatentRows([setup["store"]])
    store = LatentStore(setup["store"])
    positions = np.array([5, 0, 33, 12])
    tokens, mask = rows.batch(positions)
    expected_tokens, expected_mask = store.rows(positions)
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (4, N_TOKENS, DIM)
    assert torch.equal(tokens.float(), expected_tokens) and torch.equal(mask, expected_mask)
    assert list(rows.subject[positions]) == list(store.subjects[positions])


def test_recipe_learns_a_separable_task(setup: dict):
    rows = ft.LatentRows([setup["store"]])
    harmonizer = Harmonizer(harmonizer_config())
    labels = np.array([setup["labels"][s] for s in rows.subject])
    train, test = np.arange(0, 24), np.arange(24, 36)
    recipe = ft.FinetuneRecipe(**FAST)
    scores, info = ft.train_and_predict(
        factory=lambda n, rate: HubClassifier(harmonizer, n, drop_path=rate), rows=rows, train_positions=train,
        train_labels=labels[train], test_positions=test, task_type="classification", recipe=recipe, seed=1,
        device=torch.device("cpu"))
    from sklearn.metrics import roc_auc_score

    assert info["final_loss"] < info["first_loss"] and info["steps"] == 6 * 3
    assert roc_auc_score(labels[test], scores) > 0.9


def test_job_scores_every_held_out_subject_on_its_folds_reproducibly(setup: dict, tmp_path: Path, monkeypatch):
    seen = []
    original = ft.train_and_predict

    def recording(**kwargs):
        seen.append((set(kwargs["train_positions"].tolist()), set(kwargs["test_positions"].tolist())))
        return original(**kwargs)

    monkeypatch.setattr(ft, "train_and_predict", recording)
    common = dict(latents=[setup["store"]], harmonizer_checkpoint=setup["checkpoint"], folds=setup["folds"], seed=3,
                  **FAST)
    summary = ft.finetune_harmonizer(out_predictions=tmp_path / "a" / "p.tsv", **common)
    assert summary["n_trainings"] == 2 * 3 and summary["n_rows"] == 36 and summary["device"] == "cpu"
    assert all(not (train & test) for train, test in seen)  # a held-out subject's rows never train
    predictions = read_predictions(tmp_path / "a" / "p.tsv")
    folds = pd.read_csv(setup["folds"], sep="\t", dtype={"subject": str})
    merged = predictions.merge(folds, on=["task", "repeat", "dataset", "subject"], suffixes=("", "_folds"))
    assert len(merged) == len(folds) == len(predictions) and (merged["fold"] == merged["fold_folds"]).all()
    assert predictions["score"].between(0, 1).all()
    sidecar = read_json(sidecar_path(tmp_path / "a" / "p.tsv"))
    assert sidecar["Recipe"]["epochs"] == 6 and len(sidecar["Trainings"]) == 6
    assert sidecar["TrainableParameters"] == sum(p.numel() for p in HubClassifier(
        Harmonizer(harmonizer_config()), 2).parameters())
    ft.finetune_harmonizer(out_predictions=tmp_path / "b" / "p.tsv", **common)
    assert (tmp_path / "a" / "p.tsv").read_bytes() == (tmp_path / "b" / "p.tsv").read_bytes()


def test_a_subject_without_latent_rows_is_named(setup: dict, tmp_path: Path):
    folds = pd.read_csv(setup["folds"], sep="\t", dtype={"subject": str})
    folds.loc[0, "subject"] = "99"
    write_folds(folds, tmp_path / "folds.tsv")
    from bh_models.core.errors import BHInputError

    with pytest.raises(BHInputError, match="ds/sub-99.*extract_latents"):
        ft.finetune_harmonizer(latents=[setup["store"]], harmonizer_checkpoint=setup["checkpoint"],
                               folds=tmp_path / "folds.tsv", out_predictions=tmp_path / "p.tsv", **FAST)


def test_resources_follow_the_model_and_batch_not_the_rows(setup: dict, tmp_path: Path):
    subjects = [f"{i:03d}" for i in range(180)]
    big = write_store(tmp_path / "big", dataset="ds", subjects=subjects, labels={s: 0 for s in subjects})
    small = ft.finetune_resources(latents=[setup["store"]], harmonizer_checkpoint=setup["checkpoint"], batch_size=8)
    large = ft.finetune_resources(latents=[big], harmonizer_checkpoint=setup["checkpoint"], batch_size=8)
    assert small["mem_mb"] == large["mem_mb"]  # streaming: memory does not grow with rows
    assert ft.finetune_resources(latents=[big], batch_size=64)["mem_mb"] > large["mem_mb"]
    assert ft.finetune_resources(latents=[big], gpu=False)["runtime"] >= ft.finetune_resources(
        latents=[big], gpu=True)["runtime"] >= 30


def test_latent_store_batches_are_read_together_and_collated_without_a_copy(setup: dict):
    from bh_models.models.latents import collate_latents
    from bh_models.models.train import DistContext, TrainConfig, _batches, move_to_device

    store = LatentStore(setup["store"])
    indices = [7, 2, 30]
    items = store.__getitems__(indices)
    batch = collate_latents(items)
    assert batch["tokens"].dtype == torch.bfloat16 and batch["tokens"].shape == (3, N_TOKENS, DIM)
    assert batch["tokens"].untyped_storage().data_ptr() == items[0]["tokens"].untyped_storage().data_ptr()
    expected = collate_latents([store[i] for i in indices])  # the float32 item path
    widened = move_to_device(batch, torch.device("cpu"))
    assert torch.equal(widened["tokens"], expected["tokens"]) and torch.equal(batch["mask"], expected["mask"])
    assert batch["subject"] == expected["subject"]
    # The Harmonizer's training iterator gives the same batches with and without workers.
    streams = []
    for workers in (0, 2):
        config = TrainConfig(steps=10, batch_size=4, lr=1e-3, seed=1, checkpoint_every=10, num_workers=workers)
        context = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        stream = _batches(store, collate_latents, config=config, context=context, start_step=0)
        streams.append([next(stream) for _ in range(3)])
    for a, b in zip(*streams):
        assert torch.equal(a["tokens"], b["tokens"]) and a["subject"] == b["subject"]
