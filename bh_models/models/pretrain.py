"""Step functions of the pretraining stage: harmonix-F, harmonix-S, the Harmonizer, embeddings.

Snakemake calls each through the generic runner (``func(**inputs, **outputs,
**params, threads=...)``); under ``torchrun`` every process runs the same
function and only rank 0 writes files. A re-run after a crash or ``scancel``
resumes from ``<checkpoint stem>.resume.pt`` when the configuration matches.

Training data come from the packed store of the pretraining datasets only,
through :mod:`bh_models.models.data`: ``FmriShardDataset``, ``T1ShardDataset``,
``collate_fmri``, ``collate_t1`` and ``paired_samples``. The Harmonizer trains from latent stores
(:mod:`bh_models.models.latents`): the frozen encoders' tokens of every training
sample, computed once by :func:`bh_models.models.embeddings.cache_latents`, as the
release's stage 0. Embeddings of a (downstream) dataset are computed from its
derivatives by the frozen models of a model bundle (:mod:`bh_models.models.bundle`),
with the bundle's pretraining scaling statistics.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, default_collate

from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import sidecar_path, write_json
from bh_models.models.nn.configs import config_from_dict, config_to_dict, model_config
from bh_models.models.latents import LatentStore, check_same_layout, collate_latents
from bh_models.models.nn.harmonix_f import HarmonixF, read_geometry, read_gradients
from bh_models.models.nn.harmonix_s import HarmonixS, grid_for_volume
from bh_models.models.nn.harmonizer import Harmonizer
from bh_models.models.train import (
    TrainConfig,
    distributed_context,
    load_checkpoint,
    seed_everything,
    train,
)

__desc__ = (
    "harmonix-F and harmonix-S were pretrained separately on the training split; the Harmonizer "
    "was then trained on their frozen latent tokens, computed once, of the subjects with both "
    "modalities. Subject embeddings were the mean of the output hub tokens, averaged over each "
    "subject's runs and TR variants."
)

_MODEL_CLASSES: dict[str, type[nn.Module]] = {"harmonix_f": HarmonixF, "harmonix_s": HarmonixS, "harmonizer": Harmonizer}


def _data() -> ModuleType:
    # Imported at call time: the readers are their own module, and tests swap it for a fake.
    return importlib.import_module("bh_models.models.data")


def _model_forward(model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    return model(batch, generator)


def _train_config(**kwargs: Any) -> TrainConfig:
    return TrainConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()})


def loss_drop(losses: Sequence[float], window: int = 3) -> float:
    """Relative loss drop: 1 - mean(last ``window`` losses) / mean(first ``window``).

    Means of a few steps, so that one noisy batch neither makes nor breaks it;
    the issue's ">= 30 % lower" quality bar reads this number.
    """
    values = np.asarray(losses, dtype=np.float64)
    if len(values) < 2 * window:
        return float("nan")
    return float(1.0 - values[-window:].mean() / values[:window].mean())


def _summary(result: Any, model: nn.Module, name: str) -> dict[str, Any]:
    metrics = result.metrics
    return {
        "model": name,
        "steps": int(result.end_step),
        "resumed_from_step": int(result.start_step),
        "initial_loss": float(metrics["loss"].iloc[0]) if len(metrics) else float("nan"),
        "final_loss": float(metrics["loss"].iloc[-1]) if len(metrics) else float("nan"),
        "loss_drop": loss_drop(metrics["loss"]) if len(metrics) else float("nan"),
        "parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
    }


def _write_training_sidecars(
    *, out_checkpoint: Path, out_metrics: Path, summary: dict[str, Any], config: Any, train_config: TrainConfig,
    description: str,
) -> None:
    """JSON sidecars of the checkpoint and the metrics table (no timings: byte-stable)."""
    if sidecar_path(out_checkpoint) == sidecar_path(out_metrics):
        raise BHInputError(out_metrics, f"shares its JSON sidecar with {out_checkpoint.name}",
                           "give the checkpoint and the metrics table different file stems")
    write_json(sidecar_path(out_checkpoint), {
        "Description": description,
        "ModelConfig": config_to_dict(config),
        "TrainConfig": dataclasses.asdict(train_config),
        "Steps": summary["steps"],
        "InitialLoss": summary["initial_loss"],
        "FinalLoss": summary["final_loss"],
        "LossDrop": summary["loss_drop"],
        "LossDropDefinition": "1 - mean(last 3 step losses) / mean(first 3 step losses)",
        "TrainableParameters": summary["parameters"],
    })
    write_json(sidecar_path(out_metrics), {
        "step": "optimiser step (1-based)",
        "loss": "training loss of the step, mean over micro-batches and processes",
        "lr": "learning rate used by the step",
        "samples_per_s": "training throughput over all processes (wall clock; not reproducible)",
        "grad_norm": "gradient norm before clipping",
        "other columns": "model-specific metrics, mean over micro-batches",
    })


def data_identity(*, folders: Sequence[Path], scaling: Path | None = None, extra: Sequence[Path] = ()) -> str:
    """Cheap identity of the training data, so a resume file never outlives a re-packed store.

    Small files are hashed (store indexes, temporal means, scaling statistics,
    geometry, encoder checkpoints); shards by name and size only (hashing TBs of
    T1 shards at every start would cost more than a training step, and a time
    stamp would make the checkpoint, which stores this identity, differ between
    two identical runs). Only the dataset ``folders`` the model reads count:
    another modality's folders may be being re-packed by a concurrent job.
    Names are ``<modality>/<dataset>/<file>``, so the identity does not depend on
    where the store is mounted.
    """
    import hashlib

    def name(path: Path) -> str:
        return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"

    digest = hashlib.sha256()
    folders = sorted(map(Path, folders), key=lambda f: (f.parent.name, f.name))
    small = [p for folder in folders for p in sorted(folder.glob("index.*"))]
    small += [p for folder in folders for p in sorted(folder.glob("temporal_*.npy"))]
    for path in small:
        digest.update(name(path).encode())
        digest.update(path.read_bytes())
    for path in ([Path(scaling)] if scaling is not None else []) + [Path(p) for p in extra]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    shards = [p for folder in folders for p in sorted(folder.glob("*.npy")) if not p.name.startswith("temporal_")]
    for shard in shards:
        digest.update(f"{name(shard)}:{shard.stat().st_size}".encode())
    return digest.hexdigest()


def _check_geometry(*, geometry: Path, n_rois: int, kind: str = "eigenmodes") -> Tensor:
    table = (read_geometry if kind == "eigenmodes" else read_gradients)(path=geometry)
    if table.shape[0] != n_rois:
        raise BHInputError(
            geometry, f"{table.shape[0]} ROI rows but the packed store has {n_rois} ROIs",
            f"build the {kind} table and the store with the same atlas",
        )
    return table


def pretrain_fmri(
    *,
    fmri: Sequence[Path],
    scaling: Path,
    geometry: Path,
    gradients: Path,
    out_checkpoint: Path,
    out_metrics: Path,
    out_curve: Path,
    model_size: str = "tiny",
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_every: int = 100,
    grad_accum: int = 1,
    warmup_steps: int | None = None,
    min_lr: float = 1e-5,
    weight_decay: float = 0.05,
    grad_clip: float = 1.0,
    lr_scaling: str = "none",
    activation_checkpointing: bool = False,
    compile: bool = False,
    num_workers: int = 0,
    pin_memory: bool = True,
    prefetch_factor: int = 2,
    model_overrides: dict[str, Any] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Pretrain harmonix-F with JEPA on the training fMRI samples of the packed pretraining datasets.

    Parameters
    ----------
    fmri : sequence of Path
        Packed fMRI dataset folders (``<store>/fmri/<dataset>``), read by
        :class:`bh_models.models.data.FmriShardDataset` (split ``train``).
    scaling : Path
        The store's robust-scaling statistics (``<store>/scaling.json``).
    geometry : Path
        ROI x mode geometric embedding TSV (``name``, ``mode_001`` ..), rows in atlas order.
    gradients : Path
        ROI x gradient functional-gradient TSV (``name``, ``gradient_01`` ..), rows in atlas order.
    out_checkpoint : Path
        Final checkpoint (``.pt``) + JSON sidecar; ``<stem>.resume.pt`` beside it while running.
    out_metrics : Path
        Per-step metrics TSV (+ sidecar describing the columns).
    out_curve : Path
        Loss-curve PNG.
    model_size : str
        ``tiny`` (CPU demo) or ``base`` (paper, ViT-B).
    steps, batch_size, lr, seed, checkpoint_every, grad_accum, warmup_steps, min_lr, weight_decay, grad_clip
        Optimisation (see :class:`bh_models.models.train.TrainConfig`); ``batch_size`` is per process.
    lr_scaling : str
        ``linear``: the peak learning rate is ``lr x batch_size x grad_accum x processes / 256``;
        ``none``: ``lr`` is the peak.
    activation_checkpointing, compile : bool
        Recompute block activations in the backward pass; ``torch.compile`` the model.
    num_workers, pin_memory, prefetch_factor
        Data loading: worker processes, page-locked batches (CUDA), batches loaded ahead per worker.
    model_overrides : dict, optional
        Fields of :class:`~bh_models.models.nn.configs.HarmonixFConfig` to override.
    threads : int
        CPU threads for torch.

    Returns
    -------
    dict
        ``model``, ``steps``, ``resumed_from_step``, ``initial_loss``, ``final_loss``, ``parameters``.
    """
    torch.set_num_threads(max(1, threads))
    context = distributed_context()
    store_module = _data()
    dataset = store_module.FmriShardDataset(fmri, "train", scaling=Path(scaling))
    if len(dataset) == 0:
        raise BHInputError(fmri[0], "no training fMRI samples in the store", "check the splits and the packed store")
    n_rois = int(dataset[0]["x"].shape[0])
    geometry_table = _check_geometry(geometry=Path(geometry), n_rois=n_rois)
    gradient_table = _check_geometry(geometry=Path(gradients), n_rois=n_rois, kind="gradients")
    config = model_config(model="harmonix_f", size=model_size, overrides={
        "n_rois": n_rois, "geometry_dim": int(geometry_table.shape[1]),
        "gradient_dim": int(gradient_table.shape[1]), **(model_overrides or {}),
    })
    train_config = _train_config(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
        grad_accum=grad_accum, warmup_steps=warmup_steps, min_lr=min_lr, weight_decay=weight_decay,
        grad_clip=grad_clip, lr_scaling=lr_scaling, activation_checkpointing=activation_checkpointing,
        compile=compile, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
    )
    seed_everything(seed)
    model = HarmonixF(config, geometry_table, gradient_table)
    result = train(
        model=model, loss_fn=_model_forward, dataset=dataset, collate_fn=store_module.collate_fmri,
        config=train_config, model_config=config_to_dict(config), out_checkpoint=Path(out_checkpoint),
        out_metrics=Path(out_metrics), out_curve=Path(out_curve), title="harmonix-F (JEPA)", context=context,
        data_id=data_identity(folders=fmri, scaling=Path(scaling), extra=[Path(geometry), Path(gradients)]),
    )
    summary = _summary(result, model, "harmonix_f")
    if context.is_main:
        _write_training_sidecars(
            out_checkpoint=Path(out_checkpoint), out_metrics=Path(out_metrics), summary=summary, config=config,
            train_config=train_config, description="harmonix-F fMRI encoder pretrained with JEPA",
        )
    return summary


def pretrain_t1(
    *,
    t1: Sequence[Path],
    out_checkpoint: Path,
    out_metrics: Path,
    out_curve: Path,
    model_size: str = "tiny",
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1.5e-3,
    seed: int = 0,
    checkpoint_every: int = 100,
    grad_accum: int = 1,
    warmup_steps: int | None = None,
    min_lr: float = 1e-5,
    weight_decay: float = 0.05,
    grad_clip: float = 1.0,
    lr_scaling: str = "none",
    activation_checkpointing: bool = False,
    compile: bool = False,
    num_workers: int = 0,
    pin_memory: bool = True,
    prefetch_factor: int = 2,
    model_overrides: dict[str, Any] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Pretrain harmonix-S (3-D MAE) on the store's training T1 volumes.

    Parameters
    ----------
    t1 : sequence of Path
        Packed T1 dataset folders (``<store>/t1/<dataset>``), read by
        :class:`bh_models.models.data.T1ShardDataset` (split ``train``).
    out_checkpoint, out_metrics, out_curve : Path
        As for :func:`pretrain_fmri`.
    model_size, steps, batch_size, lr, seed, checkpoint_every, grad_accum, warmup_steps, min_lr, weight_decay, grad_clip
        As for :func:`pretrain_fmri`.
    lr_scaling, activation_checkpointing, compile, num_workers, pin_memory, prefetch_factor, threads
        As for :func:`pretrain_fmri`.
    model_overrides : dict, optional
        Fields of :class:`~bh_models.models.nn.configs.HarmonixSConfig`; ``img_size`` defaults to
        the store's volume shape rounded up to a multiple of the patch size.

    Returns
    -------
    dict
        As for :func:`pretrain_fmri`.
    """
    torch.set_num_threads(max(1, threads))
    context = distributed_context()
    store_module = _data()
    dataset = store_module.T1ShardDataset(t1, "train")
    if len(dataset) == 0:
        raise BHInputError(t1[0], "no training T1 volumes in the store", "check the splits and the packed store")
    overrides = dict(model_overrides or {})
    patch_size = int(overrides.get("patch_size", 16))
    volume_shape = tuple(int(s) for s in dataset[0]["t1"].shape[-3:])
    overrides.setdefault("img_size", grid_for_volume(shape=volume_shape, patch_size=patch_size))
    config = model_config(model="harmonix_s", size=model_size, overrides=overrides)
    train_config = _train_config(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
        grad_accum=grad_accum, warmup_steps=warmup_steps, min_lr=min_lr, weight_decay=weight_decay,
        grad_clip=grad_clip, lr_scaling=lr_scaling, activation_checkpointing=activation_checkpointing,
        compile=compile, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
    )
    seed_everything(seed)
    model = HarmonixS(config)
    result = train(
        model=model, loss_fn=_model_forward, dataset=dataset, collate_fn=store_module.collate_t1,
        config=train_config, model_config=config_to_dict(config), out_checkpoint=Path(out_checkpoint),
        out_metrics=Path(out_metrics), out_curve=Path(out_curve), title="harmonix-S (3-D MAE)", context=context,
        data_id=data_identity(folders=t1),
    )
    summary = _summary(result, model, "harmonix_s")
    if context.is_main:
        _write_training_sidecars(
            out_checkpoint=Path(out_checkpoint), out_metrics=Path(out_metrics), summary=summary, config=config,
            train_config=train_config, description="harmonix-S T1 encoder pretrained as a 3-D masked autoencoder",
        )
    return summary


# ---------------------------------------------------------------------------------------------
# Paired data for the Harmonizer


def load_pretrained(*, checkpoint: Path, kind: str) -> nn.Module:
    """Rebuild a model from its checkpoint, frozen and in eval mode, on the CPU.

    Parameters
    ----------
    checkpoint : Path
        Written by one of the pretraining steps.
    kind : str
        ``harmonix_f``, ``harmonix_s`` or ``harmonizer`` (checked against the checkpoint).

    Returns
    -------
    nn.Module
    """
    payload = load_checkpoint(Path(checkpoint))
    config = config_from_dict(payload["config"]["model"])
    found = payload["config"]["model"]["kind"]
    if found != kind:
        raise BHInputError(checkpoint, f"holds a {found} model, not {kind}", f"pass the {kind} checkpoint")
    model = _MODEL_CLASSES[kind](config)
    model.load_state_dict(payload["model"])
    model.eval()
    model.requires_grad_(False)
    return model


def _index_by_sample_id(dataset: Dataset) -> dict[str, int]:
    """Position of each sample id in a store dataset."""
    # The store's datasets expose their index table; any other dataset is read item by item.
    index = getattr(dataset, "index", None)
    if isinstance(index, pd.DataFrame) and "sample_id" in index:
        ids = index["sample_id"].tolist()
    else:
        ids = [dataset[i]["sample_id"] for i in range(len(dataset))]  # type: ignore[arg-type]
    return {str(sample_id): i for i, sample_id in enumerate(ids)}


def _present(value: Any) -> bool:
    return isinstance(value, str) and value != "" and value.lower() not in ("nan", "n/a")


class PairedSamples(Dataset):
    """One item per row of ``paired_samples``: the subject's fMRI sample and/or T1 volume.

    Items are ``{"fmri": store item or None, "t1": store item or None, "subject", "dataset"}``.
    """

    def __init__(self, *, table: pd.DataFrame, fmri: Dataset, t1: Dataset, include_unpaired: bool) -> None:
        fmri_index, t1_index = _index_by_sample_id(fmri), _index_by_sample_id(t1)
        self.fmri, self.t1 = fmri, t1
        self.rows: list[tuple[int | None, int | None, str, str]] = []
        for row in table.itertuples(index=False):
            fmri_id = row.fmri_sample_id if _present(row.fmri_sample_id) else None
            t1_id = row.t1_sample_id if _present(row.t1_sample_id) else None
            if fmri_id is None and t1_id is None:
                continue
            if not include_unpaired and (fmri_id is None or t1_id is None):
                continue
            self.rows.append((fmri_index[fmri_id] if fmri_id else None, t1_index[t1_id] if t1_id else None,
                              str(row.subject), str(row.dataset)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        fmri_row, t1_row, subject, dataset = self.rows[index]
        return {
            "fmri": None if fmri_row is None else self.fmri[fmri_row],
            "t1": None if t1_row is None else self.t1[t1_row],
            "subject": subject,
            "dataset": dataset,
        }


def collate_paired(items: list[dict[str, Any]], *, collate_fmri: Callable[[list], dict]) -> dict[str, Any]:
    """Collate paired items: each modality collated over the items that have it.

    Returns
    -------
    dict
        ``size``; ``fmri`` (collated by the store, or None) with ``fmri_rows`` (their
        positions in the batch); ``t1`` ``(b, 1, X, Y, Z)`` or None with ``t1_rows``;
        ``subject``, ``dataset``, ``fmri_sample_id`` and ``t1_sample_id`` lists (None = missing).
    """
    fmri_rows = [i for i, item in enumerate(items) if item["fmri"] is not None]
    t1_rows = [i for i, item in enumerate(items) if item["t1"] is not None]
    return {
        "size": len(items),
        "fmri": collate_fmri([items[i]["fmri"] for i in fmri_rows]) if fmri_rows else None,
        "fmri_rows": torch.tensor(fmri_rows, dtype=torch.long),
        "t1": torch.stack([torch.as_tensor(items[i]["t1"]["t1"]) for i in t1_rows]) if t1_rows else None,
        "t1_rows": torch.tensor(t1_rows, dtype=torch.long),
        "subject": [item["subject"] for item in items],
        "dataset": [item["dataset"] for item in items],
        "fmri_sample_id": [None if item["fmri"] is None else str(item["fmri"].get("sample_id", ""))
                           for item in items],
        "t1_sample_id": [None if item["t1"] is None else str(item["t1"].get("sample_id", "")) for item in items],
    }


def encode_latents(
    batch: dict[str, Any], *, fmri_model: HarmonixF, t1_model: HarmonixS, n_patches: int
) -> tuple[Tensor, Tensor]:
    """Frozen-encoder tokens of a paired batch as the Harmonizer reads them (the release's stage 0).

    Parameters
    ----------
    batch : dict
        From :func:`collate_paired`.
    n_patches : int
        Patches per ROI on the fixed fMRI grid (``augment.max_patches``); the fMRI items
        must be padded to exactly this many.

    Returns
    -------
    tokens : Tensor
        ``(B, N_F + N_S, D)``: harmonix-F tokens of the full grid (ROI-major, padded
        patches encoded as the release does), then harmonix-S tokens; zeros for a
        missing modality.
    mask : Tensor
        ``(B, N_F + N_S)`` bool: False on padded patches and on a missing modality.
    """
    size = batch["size"]
    n_rois, width = fmri_model.config.n_rois, fmri_model.config.embed_dim
    if t1_model.config.embed_dim != width:
        raise BHInputError("harmonix_s", f"token width {t1_model.config.embed_dim} != harmonix-F's {width}",
                           "pretrain both encoders at the same model size")
    n_f, n_s = n_rois * n_patches, int(np.prod(t1_model.config.grid))
    device = batch["fmri_rows"].device
    tokens = torch.zeros(size, n_f + n_s, width, device=device)
    mask = torch.zeros(size, n_f + n_s, dtype=torch.bool, device=device)
    with torch.no_grad():
        if batch["fmri"] is not None:
            grid = batch["fmri"]["patch_mask"].shape[1]
            if grid != n_patches:
                raise BHInputError("augment.max_patches", f"fMRI samples are padded to {grid} patches, the latent "
                                   f"grid has {n_patches}", "pack and encode with the same augment.max_patches")
            f_tokens, f_mask = fmri_model.encode(batch["fmri"], full_grid=True)  # (b_f, N_F, D)
            tokens[batch["fmri_rows"], :n_f] = f_tokens.float()
            mask[batch["fmri_rows"], :n_f] = f_mask
        if batch["t1"] is not None:
            tokens[batch["t1_rows"], n_f:] = t1_model.encode(batch["t1"]).float()  # (b_s, N_S, D)
            mask[batch["t1_rows"], n_f:] = True
    return tokens, mask


def _check_tables(*, fmri_model: HarmonixF, geometry: Path, gradients: Path) -> None:
    """The positional tables a harmonix-F checkpoint holds must equal the given ones."""
    positions = fmri_model.encoder.pos_embed
    for path, kind, trained_with in ((geometry, "eigenmodes", positions.eigenmodes),
                                     (gradients, "gradients", positions.gradients)):
        table = (read_geometry if kind == "eigenmodes" else read_gradients)(path=Path(path))
        if table.shape != trained_with.shape or not torch.allclose(table, trained_with, rtol=1e-5, atol=1e-8):
            raise BHInputError(path, f"differs from the {kind} table harmonix-F was pretrained with",
                               "re-run pretrain_fmri with this table, or use the bundle's own tables")


def _load_encoders(
    *, fmri_checkpoint: Path, t1_checkpoint: Path, geometry: Path, gradients: Path, device: torch.device
) -> tuple[HarmonixF, HarmonixS]:
    fmri_model = load_pretrained(checkpoint=fmri_checkpoint, kind="harmonix_f")
    t1_model = load_pretrained(checkpoint=t1_checkpoint, kind="harmonix_s")
    _check_tables(fmri_model=fmri_model, geometry=Path(geometry), gradients=Path(gradients))
    return fmri_model.to(device), t1_model.to(device)


def _latent_stores(*, latents: Sequence[Path], fmri_checkpoint: Path, t1_checkpoint: Path,
                   paired_only: bool) -> tuple[list[LatentStore], dict[str, Any]]:
    """The training latent stores, checked to come from these encoders and to share one layout."""
    from bh_models.core.hashing import sha256_file

    stores = [LatentStore(Path(folder), paired_only=paired_only) for folder in latents]
    if not stores:
        raise BHInputError("latents", "no latent store given", "run the cache_latents rule")
    expected = {"harmonix_f": sha256_file(path=Path(fmri_checkpoint)), "harmonix_s": sha256_file(path=Path(t1_checkpoint))}
    for store in stores:
        made_by = store.meta.get("encoders", {})
        for kind, digest in expected.items():
            if made_by.get(kind) != digest:
                raise BHInputError(store.folder, f"was encoded by another {kind} checkpoint",
                                   "rerun cache_latents with the current encoders")
    return stores, check_same_layout(stores)


def pretrain_harmonizer(
    *,
    latents: Sequence[Path],
    fmri_checkpoint: Path,
    t1_checkpoint: Path,
    out_checkpoint: Path,
    out_metrics: Path,
    out_curve: Path,
    model_size: str = "tiny",
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_every: int = 100,
    grad_accum: int = 1,
    warmup_steps: int | None = None,
    min_lr: float = 1e-5,
    weight_decay: float = 0.05,
    grad_clip: float = 1.0,
    lr_scaling: str = "none",
    activation_checkpointing: bool = False,
    compile: bool = False,
    num_workers: int = 0,
    pin_memory: bool = True,
    prefetch_factor: int = 2,
    include_unpaired: bool = False,
    loss_on_padded: bool = True,
    model_overrides: dict[str, Any] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Train the Harmonizer's hub tokens on the cached frozen-encoder tokens.

    Parameters
    ----------
    latents : sequence of Path
        Latent stores of the pretraining datasets' training samples
        (:func:`bh_models.models.embeddings.cache_latents`), one token layout.
    fmri_checkpoint, t1_checkpoint : Path
        The encoders that made the stores (checked by sha256).
    out_checkpoint, out_metrics, out_curve : Path
        As for :func:`pretrain_fmri`.
    include_unpaired : bool
        Also train on rows with one modality (the other masked out of attention and of
        the loss); False, the release's choice, trains on paired rows only.
    loss_on_padded : bool
        True (the release): the loss averages over every token of the present
        modalities, padded fMRI patches included; False: over real tokens only.
    model_size, steps, batch_size, lr, seed, checkpoint_every, grad_accum, warmup_steps, min_lr, weight_decay, grad_clip
        As for :func:`pretrain_fmri`.
    lr_scaling, activation_checkpointing, compile, num_workers, pin_memory, prefetch_factor, threads
        As for :func:`pretrain_fmri`.
    model_overrides : dict, optional
        Fields of :class:`~bh_models.models.nn.configs.HarmonizerConfig`.

    Returns
    -------
    dict
        As for :func:`pretrain_fmri`.
    """
    torch.set_num_threads(max(1, threads))
    context = distributed_context()
    stores, layout = _latent_stores(latents=latents, fmri_checkpoint=Path(fmri_checkpoint),
                                    t1_checkpoint=Path(t1_checkpoint), paired_only=not include_unpaired)
    dataset = ConcatDataset(stores)
    if len(dataset) == 0:
        raise BHInputError(latents[0], "no training rows for the Harmonizer (paired subjects only by default)",
                           "check the store's pairing, or set pretrain.harmonizer_subjects: all")
    config = model_config(model="harmonizer", size=model_size, overrides={
        "dim_s": layout["dim"], "dim_f": layout["dim"], "s_grid": tuple(layout["s_grid"]),
        "n_rois": layout["n_rois"], "n_patches": layout["n_patches"], "include_unpaired": include_unpaired,
        "loss_on_padded": loss_on_padded, **(model_overrides or {}),
    })
    train_config = _train_config(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
        grad_accum=grad_accum, warmup_steps=warmup_steps, min_lr=min_lr, weight_decay=weight_decay,
        grad_clip=grad_clip, lr_scaling=lr_scaling, activation_checkpointing=activation_checkpointing,
        compile=compile, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
    )

    def loss_fn(model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return model(batch["tokens"], batch["mask"])

    seed_everything(seed)
    model = Harmonizer(config)
    result = train(
        model=model, loss_fn=loss_fn, dataset=dataset, collate_fn=collate_latents, config=train_config,
        model_config=config_to_dict(config), out_checkpoint=Path(out_checkpoint), out_metrics=Path(out_metrics),
        out_curve=Path(out_curve), title="Harmonizer (hub tokens)", context=context,
        data_id=data_identity(folders=[], extra=[Path(f) / name for f in latents for name in
                                                 ("index.tsv", "latents.json")]),
    )
    summary = _summary(result, model, "harmonizer")
    if context.is_main:
        _write_training_sidecars(
            out_checkpoint=Path(out_checkpoint), out_metrics=Path(out_metrics), summary=summary, config=config,
            train_config=train_config,
            description="Harmonizer with brain hub tokens, trained on cached frozen harmonix-F/S tokens",
        )
    return summary


def load_frozen_models(
    *, harmonizer_checkpoint: Path, fmri_checkpoint: Path, t1_checkpoint: Path, geometry: Path, gradients: Path,
    device: torch.device,
) -> tuple[HarmonixF, HarmonixS, Harmonizer]:
    """The two pretrained encoders and the Harmonizer trained on them, checked to fit together."""
    fmri_model, t1_model = _load_encoders(fmri_checkpoint=fmri_checkpoint, t1_checkpoint=t1_checkpoint,
                                          geometry=geometry, gradients=gradients, device=device)
    harmonizer = load_pretrained(checkpoint=harmonizer_checkpoint, kind="harmonizer").to(device)
    config = harmonizer.config
    if (config.dim_s, config.dim_f, config.n_rois, tuple(config.s_grid)) != (
            t1_model.config.embed_dim, fmri_model.config.embed_dim, fmri_model.config.n_rois, t1_model.config.grid):
        raise BHInputError(harmonizer_checkpoint, "was trained on encoders of other widths or token grids",
                           "pass the harmonix-F/S checkpoints the Harmonizer was trained with")
    return fmri_model, t1_model, harmonizer
