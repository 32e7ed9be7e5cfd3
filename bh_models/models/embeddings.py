"""Encoding datasets with the frozen encoders: latent stores, per-subject embeddings.

:func:`cache_latents` (stage 0 of the release) encodes every training sample of a
pretraining dataset once with the frozen harmonix-F and harmonix-S into a latent
store (:mod:`bh_models.models.latents`), which the Harmonizer trains from.

A (downstream) dataset is encoded straight from its derivatives by the frozen
models of a verified model bundle (:mod:`bh_models.models.bundle`), with the
bundle's pretraining scaling statistics (the normalisation contract), one job
per dataset: :func:`extract_embeddings` writes the probe's inputs,
:func:`extract_latents` a latent store of the same format, which the fine-tuning
option trains on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from bh_models.core.errors import BHInputError
from bh_models.core.hashing import sha256_file
from bh_models.core.jsonio import sidecar_path, write_json
from bh_models.models.latents import LatentWriter
from bh_models.models.nn.blocks import masked_token_mean
from bh_models.models.nn.harmonix_f import HarmonixF
from bh_models.models.nn.harmonix_s import HarmonixS
from bh_models.models.nn.harmonizer import Harmonizer
from bh_models.models.pretrain import (
    PairedSamples,
    _data,
    _load_encoders,
    collate_paired,
    encode_latents,
    load_frozen_models,
)
from bh_models.models.train import distributed_context, move_to_device

__desc__ = (
    "Each downstream dataset was encoded by the frozen pretrained models, with the robust-scaling "
    "statistics of the pretraining cohort; subject embeddings were the mean of the output hub "
    "tokens, averaged over each subject's runs and TR variants."
)


class _SubjectMeans:
    """Running per-subject sums of embedding vectors (float64, order-independent within a run)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str], np.ndarray] = {}
        self.counts: dict[tuple[str, str], int] = {}

    def add(self, key: tuple[str, str], vector: np.ndarray) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + vector.astype(np.float64)
        self.counts[key] = self.counts.get(key, 0) + 1

    def table(self, prefix: str) -> pd.DataFrame:
        keys = sorted(self.sums)
        width = len(next(iter(self.sums.values()))) if keys else 0
        values = np.stack([self.sums[key] / self.counts[key] for key in keys]) if keys else np.zeros((0, width))
        frame = pd.DataFrame(values, columns=[f"{prefix}_{i:03d}" for i in range(width)])
        frame.insert(0, "subject", [key[1] for key in keys])
        frame.insert(0, "dataset", [key[0] for key in keys])
        return frame


def _write_tsv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    tmp.replace(path)


def load_bundle_models(*, bundle: Path, settings: dict[str, Any] | None, device: torch.device
                       ) -> tuple[HarmonixF, HarmonixS, Harmonizer, dict[str, Any]]:
    """The frozen models of a verified model bundle, after checking its settings against ``settings``.

    Parameters
    ----------
    bundle : Path
        The bundle's ``bundle.json`` (or its folder).
    settings : dict, optional
        :func:`bh_models.models.bundle.settings_from_config` of the run's config; None skips the check.

    Returns
    -------
    harmonix-F, harmonix-S, Harmonizer, and the bundle's ``bundle.json`` with its folder as ``root``.
    """
    from bh_models.models.bundle import check_settings, require_valid_bundle

    root = Path(bundle).parent if Path(bundle).suffix == ".json" else Path(bundle)
    meta = require_valid_bundle(root)
    if settings is not None:
        check_settings(bundle=meta, expected=settings, bundle_path=root)
    checkpoints = meta["checkpoints"]
    models = load_frozen_models(
        harmonizer_checkpoint=root / checkpoints["harmonizer"], fmri_checkpoint=root / checkpoints["harmonix_f"],
        t1_checkpoint=root / checkpoints["harmonix_s"], geometry=root / meta["geometry"],
        gradients=root / meta["gradients"], device=device)
    return (*models, {**meta, "root": str(root)})


def derivative_pairs(*, samples: Path, timeseries: Sequence[Path], t1_tensors: Sequence[Path], dataset: str,
                     scaling: Path) -> tuple[PairedSamples, int]:
    """One dataset's samples straight from its derivatives, paired, and their patch grid.

    One row per fMRI sample (runs x TR variants) with its subject's T1, plus
    T1-only subjects; fMRI scaled with ``scaling`` (the bundle's pretraining
    statistics, never this dataset's own).

    Returns
    -------
    PairedSamples, and the patches per ROI every fMRI sample is padded to.
    """
    store_module = _data()
    fmri = store_module.FmriTableDataset(samples=Path(samples), timeseries=[Path(p) for p in timeseries],
                                         scaling=Path(scaling))
    t1 = store_module.T1TensorDataset(t1_tensors=[Path(p) for p in t1_tensors], dataset=dataset)
    table = store_module.pair_samples(fmri=fmri.index, t1=t1.index)
    return PairedSamples(table=table, fmri=fmri, t1=t1, include_unpaired=True), int(fmri.max_patches)


def paired_batches(paired: PairedSamples, *, batch_size: int, device: torch.device):
    """Collated batches of ``paired`` in order, on ``device``."""
    collate = functools.partial(collate_paired, collate_fmri=_data().collate_fmri)
    for batch in DataLoader(paired, batch_size=batch_size, shuffle=False, collate_fn=collate):
        yield move_to_device(batch, device)


def _autocast(device: torch.device):
    # The release's stage 0 encodes under bf16 autocast; on CPU we stay in float32.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def write_latents(*, paired: PairedSamples, n_patches: int, fmri_model: HarmonixF, t1_model: HarmonixS,
                  out_latents: Path, batch_size: int, device: torch.device, meta: dict[str, Any]) -> Path:
    """Encode every row of ``paired`` once and write them as a latent store (:mod:`bh_models.models.latents`)."""
    n_s = int(np.prod(t1_model.config.grid))
    n_f = fmri_model.config.n_rois * n_patches
    writer = LatentWriter(Path(out_latents), n_rows=len(paired), n_tokens=n_f + n_s, dim=fmri_model.config.embed_dim,
                          meta={"n_rois": fmri_model.config.n_rois, "n_patches": n_patches,
                                "n_f_tokens": n_f, "n_s_tokens": n_s, "s_grid": list(t1_model.config.grid),
                                "layout": "per row: harmonix-F tokens (ROI-major r * n_patches + p, padded patches "
                                          "included), then harmonix-S tokens (C order of s_grid)", **meta})
    for batch in paired_batches(paired, batch_size=batch_size, device=device):
        with _autocast(device):
            tokens, mask = encode_latents(batch, fmri_model=fmri_model, t1_model=t1_model, n_patches=n_patches)
        has_f, has_s = mask[:, :n_f].any(dim=1).tolist(), mask[:, n_f:].any(dim=1).tolist()
        rows = [{"dataset": d, "subject": s, "fmri_sample_id": f or "", "t1_sample_id": t or "",
                 "has_fmri": int(hf), "has_t1": int(hs)}
                for d, s, f, t, hf, hs in zip(batch["dataset"], batch["subject"], batch["fmri_sample_id"],
                                              batch["t1_sample_id"], has_f, has_s)]
        writer.add(tokens, mask, rows)
    return writer.close()


def cache_latents(
    *,
    fmri_checkpoint: Path,
    t1_checkpoint: Path,
    geometry: Path,
    gradients: Path,
    fmri: Sequence[Path],
    t1: Sequence[Path],
    scaling: Path,
    out_latents: Path,
    dataset: str,
    split: str = "train",
    batch_size: int = 8,
    threads: int = 1,
) -> dict[str, Any]:
    """Step function (stage 0): a pretraining dataset's training samples, encoded once, as a latent store.

    Parameters
    ----------
    fmri_checkpoint, t1_checkpoint : Path
        The pretrained harmonix-F and harmonix-S (frozen).
    geometry, gradients : Path
        The positional tables harmonix-F was trained with (checked).
    fmri, t1 : sequence of Path
        The dataset's packed fMRI and T1 folders.
    scaling : Path
        The store's robust-scaling statistics.
    out_latents : Path
        The latent store folder (:mod:`bh_models.models.latents`).
    dataset : str
        Dataset name (config key).
    split : str
        Split to encode (the Harmonizer trains on ``train``).
    batch_size : int
        Samples per forward pass.
    threads : int
        CPU threads for torch.

    Returns
    -------
    dict
        ``n_rows``, ``paired_rows``, ``n_tokens``.
    """
    from bh_models.core.hashing import sha256_file

    torch.set_num_threads(max(1, threads))
    fmri, t1 = ([folders] if isinstance(folders, (str, Path)) else list(folders) for folders in (fmri, t1))
    device = distributed_context().device
    fmri_model, t1_model = _load_encoders(fmri_checkpoint=Path(fmri_checkpoint), t1_checkpoint=Path(t1_checkpoint),
                                          geometry=Path(geometry), gradients=Path(gradients), device=device)
    store_module = _data()
    fmri_data = store_module.FmriShardDataset(fmri, split, scaling=Path(scaling))
    t1_data = store_module.T1ShardDataset(t1, split)
    table = store_module.paired_samples(fmri=fmri, t1=t1, split=split)
    paired = PairedSamples(table=table, fmri=fmri_data, t1=t1_data, include_unpaired=True)
    if len(paired) == 0:
        raise BHInputError(fmri[0] if fmri else t1[0], f"no {split} samples of dataset {dataset} to encode",
                           "check the splits and the packed store")
    n_patches = int(getattr(fmri_data, "max_patches", 0)) or int(fmri_data[0]["patch_mask"].shape[0])
    folder = write_latents(
        paired=paired, n_patches=n_patches, fmri_model=fmri_model, t1_model=t1_model, out_latents=Path(out_latents),
        batch_size=batch_size, device=device,
        meta={"dataset": dataset, "split": split,
              "encoders": {"harmonix_f": sha256_file(path=Path(fmri_checkpoint)),
                           "harmonix_s": sha256_file(path=Path(t1_checkpoint))}})
    index = pd.read_csv(folder / "index.tsv", sep="\t")
    return {"n_rows": len(index), "paired_rows": int((index["has_fmri"] & index["has_t1"]).sum()),
            "n_tokens": fmri_model.config.n_rois * n_patches + int(np.prod(t1_model.config.grid))}


def extract_embeddings(
    *,
    bundle: Path,
    samples: Path,
    timeseries: Sequence[Path],
    t1_tensors: Sequence[Path],
    out_embeddings: Path,
    out_fmri_embeddings: Path,
    out_t1_embeddings: Path,
    dataset: str,
    settings: dict[str, Any] | None = None,
    batch_size: int = 8,
    threads: int = 1,
) -> dict[str, Any]:
    """Per-subject embeddings of one dataset: hub tokens (Brain Harmony) and the unimodal baselines.

    The dataset is encoded straight from its derivatives by the frozen models
    of a model bundle, with the bundle's (pretraining) scaling statistics, so a
    new dataset costs one job and never touches the others' embeddings. Every
    row of :func:`bh_models.models.data.pair_samples` (one per fMRI sample, plus
    T1-only subjects) is encoded; a subject's embedding is the mean over its
    rows, i.e. over its runs and TR variants.

    Parameters
    ----------
    bundle : Path
        ``bundle.json`` of the model bundle (verified against its manifest).
    samples : Path
        The dataset's samples table (TAPE plan of every run and TR variant).
    timeseries : sequence of Path
        Its parcel time-series TSVs.
    t1_tensors : sequence of Path
        Its T1 encoder tensors.
    out_embeddings : Path
        TSV: ``dataset``, ``subject``, ``hub_000`` .. ``hub_{D-1}`` (mean of the output
        hub tokens), one row per subject with any modality.
    out_fmri_embeddings : Path
        TSV: ``dataset``, ``subject``, ``fmri_000`` .. (mean harmonix-F token over real
        tokens), subjects with fMRI.
    out_t1_embeddings : Path
        TSV: ``dataset``, ``subject``, ``t1_000`` .. (mean harmonix-S patch token), subjects with T1.
    dataset : str
        Dataset name (config key).
    settings : dict, optional
        The config's bundle settings (:func:`bh_models.models.bundle.settings_from_config`); a
        bundle that disagrees is refused.
    batch_size : int
        Rows per forward pass.
    threads : int
        CPU threads for torch.

    Returns
    -------
    dict
        Subjects per table and embedding widths.
    """
    from bh_models.models.bundle import MANIFEST_FILE

    torch.set_num_threads(max(1, threads))
    context = distributed_context()
    device = context.device
    fmri_model, t1_model, harmonizer, meta = load_bundle_models(bundle=Path(bundle), settings=settings,
                                                                device=device)
    root = Path(meta["root"])
    hub, fmri_means, t1_means = _SubjectMeans(), _SubjectMeans(), _SubjectMeans()
    paired, n_patches = derivative_pairs(samples=Path(samples), timeseries=timeseries, t1_tensors=t1_tensors,
                                         dataset=dataset, scaling=root / meta["scaling"])
    n_f = harmonizer.n_f_tokens
    _check_grid(harmonizer=harmonizer, n_patches=n_patches, samples=Path(samples))
    for batch in paired_batches(paired, batch_size=batch_size, device=device):
        with _autocast(device):
            tokens, mask = encode_latents(batch, fmri_model=fmri_model, t1_model=t1_model, n_patches=n_patches)
            hub_vectors = harmonizer.hub_embedding(tokens, mask).float().cpu().numpy()  # (B, D)
        f_mask, s_mask = mask[:, :n_f], mask[:, n_f:]
        fmri_vectors = masked_token_mean(tokens[:, :n_f].float(), f_mask).cpu().numpy()  # (B, D_F)
        t1_vectors = tokens[:, n_f:].float().mean(dim=1).cpu().numpy()  # (B, D_S)
        has_fmri, has_t1 = f_mask.any(dim=1).tolist(), s_mask.any(dim=1).tolist()
        for row, key in enumerate(zip(batch["dataset"], batch["subject"])):
            hub.add(key, hub_vectors[row])
            if has_fmri[row]:
                fmri_means.add(key, fmri_vectors[row])
            if has_t1[row]:
                t1_means.add(key, t1_vectors[row])
    if not hub.sums:
        raise BHInputError(samples, f"dataset {dataset} has no sample to encode",
                           "check its preprocessing outputs and exclusions")
    tables = {"hub": hub.table("hub"), "fmri": fmri_means.table("fmri"), "t1": t1_means.table("t1")}
    outputs = {"hub": Path(out_embeddings), "fmri": Path(out_fmri_embeddings), "t1": Path(out_t1_embeddings)}
    descriptions = {
        "hub": "Brain Harmony embedding: mean of the Harmonizer's output hub tokens, averaged over a subject's samples",
        "fmri": "fMRI-only baseline: mean harmonix-F (EMA encoder) token over real tokens, averaged over samples",
        "t1": "T1-only baseline: mean harmonix-S patch token",
    }
    if context.is_main:
        bundle_id = sha256_file(path=root / MANIFEST_FILE)
        for name, frame in tables.items():
            _write_tsv(frame, outputs[name])
            write_json(sidecar_path(outputs[name]), {
                "Description": descriptions[name],
                "Dataset": dataset,
                "NumberOfSubjects": len(frame),
                "EmbeddingWidth": frame.shape[1] - 2,
                "Bundle": {"manifest_sha256": bundle_id, "checkpoints": meta["checkpoints"],
                           "pretraining_datasets": meta.get("pretraining", {}).get("datasets", [])},
                "Normalisation": "robust scaling with the bundle's pretraining statistics (scaling.json)",
            })
    return {f"{name}_subjects": len(frame) for name, frame in tables.items()} | {
        f"{name}_width": frame.shape[1] - 2 for name, frame in tables.items()
    }


def _check_grid(*, harmonizer: Harmonizer, n_patches: int, samples: Path) -> None:
    if n_patches != harmonizer.config.n_patches:
        raise BHInputError(samples, f"samples are padded to {n_patches} patches, the bundle's Harmonizer reads "
                           f"{harmonizer.config.n_patches}", f"set augment.max_patches: {harmonizer.config.n_patches}")


def extract_latents(
    *,
    bundle: Path,
    samples: Path,
    timeseries: Sequence[Path],
    t1_tensors: Sequence[Path],
    out_latents: Path,
    dataset: str,
    settings: dict[str, Any] | None = None,
    batch_size: int = 8,
    threads: int = 1,
) -> dict[str, Any]:
    """Step function: a latent store of one downstream dataset's samples, for fine-tuning.

    Encoded from the dataset's derivatives with the bundle's models and scaling
    statistics (as :func:`extract_embeddings`), in the format of
    :mod:`bh_models.models.latents` (the pretraining cache's). A subject's rows are
    its fMRI samples (runs and TR variants) paired with its T1, or its single T1-only row.

    Returns
    -------
    dict
        ``n_rows`` and the token array's ``shape`` per row.
    """
    from bh_models.core.hashing import sha256_file

    torch.set_num_threads(max(1, threads))
    device = torch.device("cpu")
    fmri_model, t1_model, harmonizer, meta = load_bundle_models(bundle=Path(bundle), settings=settings,
                                                                device=device)
    root = Path(meta["root"])
    paired, n_patches = derivative_pairs(samples=Path(samples), timeseries=timeseries, t1_tensors=t1_tensors,
                                         dataset=dataset, scaling=root / meta["scaling"])
    if len(paired) == 0:
        raise BHInputError(samples, f"dataset {dataset} has no sample to encode",
                           "check its preprocessing outputs and exclusions")
    _check_grid(harmonizer=harmonizer, n_patches=n_patches, samples=Path(samples))
    checkpoints = meta["checkpoints"]
    folder = write_latents(
        paired=paired, n_patches=n_patches, fmri_model=fmri_model, t1_model=t1_model, out_latents=Path(out_latents),
        batch_size=batch_size, device=device,
        meta={"dataset": dataset, "split": "all",
              "encoders": {kind: sha256_file(path=root / checkpoints[kind]) for kind in ("harmonix_f", "harmonix_s")},
              "harmonizer_checkpoint": checkpoints["harmonizer"]})
    index = pd.read_csv(folder / "index.tsv", sep="\t")
    return {"n_rows": len(index), "shape": [harmonizer.n_tokens, fmri_model.config.embed_dim]}
