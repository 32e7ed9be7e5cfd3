"""Encoding datasets with a model bundle: per-subject embeddings, and packed latent tokens for fine-tuning.

A (downstream) dataset is encoded straight from its derivatives by the frozen
models of a verified model bundle (:mod:`bh_models.models.bundle`), with the
bundle's pretraining scaling statistics (the normalisation contract), one job
per dataset: :func:`extract_embeddings` writes the probe's inputs,
:func:`extract_latents` the frozen-encoder tokens the fine-tuning option trains on.
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
from bh_models.models.latents import LATENTS_FORMAT, pack_latents, pad_patches
from bh_models.models.nn.blocks import masked_token_mean
from bh_models.models.nn.harmonix_f import HarmonixF
from bh_models.models.nn.harmonix_s import HarmonixS
from bh_models.models.nn.harmonizer import Harmonizer
from bh_models.models.pretrain import PairedSamples, _data, collate_paired, encode_latents, load_frozen_models
from bh_models.models.train import distributed_context, move_to_device, save_checkpoint

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
        t1_checkpoint=root / checkpoints["harmonix_s"], geometry=root / meta["geometry"], device=device)
    return (*models, {**meta, "root": str(root)})


def derivative_batches(*, samples: Path, timeseries: Sequence[Path], t1_tensors: Sequence[Path], dataset: str,
                       scaling: Path, batch_size: int, device: torch.device):
    """One dataset's samples straight from its derivatives, as collated paired batches on ``device``.

    One row per fMRI sample (runs x TR variants) with its subject's T1, plus
    T1-only subjects; fMRI scaled with ``scaling`` (the bundle's pretraining
    statistics, never this dataset's own).
    """
    store_module = _data()
    fmri = store_module.FmriTableDataset(samples=Path(samples), timeseries=[Path(p) for p in timeseries],
                                         scaling=Path(scaling))
    t1 = store_module.T1TensorDataset(t1_tensors=[Path(p) for p in t1_tensors], dataset=dataset)
    table = store_module.pair_samples(fmri=fmri.index, t1=t1.index)
    paired = PairedSamples(table=table, fmri=fmri, t1=t1, include_unpaired=True)
    collate = functools.partial(collate_paired, collate_fmri=store_module.collate_fmri)
    for batch in DataLoader(paired, batch_size=batch_size, shuffle=False, collate_fn=collate):
        yield move_to_device(batch, device)


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
    for batch in derivative_batches(samples=Path(samples), timeseries=timeseries, t1_tensors=t1_tensors,
                                    dataset=dataset, scaling=root / meta["scaling"], batch_size=batch_size,
                                    device=device):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z_s, s_mask, z_f, f_mask = encode_latents(batch, fmri_model=fmri_model, t1_model=t1_model)
            hub_vectors = harmonizer.hub_embedding(z_s, s_mask, z_f, f_mask).float().cpu().numpy()  # (B, D)
        fmri_vectors = masked_token_mean(z_f.float(), f_mask).cpu().numpy()  # (B, D_F)
        t1_vectors = z_s.float().mean(dim=1).cpu().numpy()  # (B, D_S)
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
    """Step function: packed frozen-encoder tokens of one dataset's samples, for fine-tuning.

    Encoded from the dataset's derivatives with the bundle's models and scaling
    statistics (as :func:`extract_embeddings`). Writes
    ``out_latents`` (``torch.save``): ``format``, ``dataset`` and ``subject``
    (one per row), ``x`` float32 ``(n_rows, N_S + N_F, D + 1)`` (see module doc),
    ``harmonizer_checkpoint`` (its path in the bundle). A subject's rows are its
    fMRI samples (runs and TR variants) paired with its T1, or its single
    T1-only row.
    """
    torch.set_num_threads(max(1, threads))
    device = torch.device("cpu")
    fmri_model, t1_model, harmonizer, meta = load_bundle_models(bundle=Path(bundle), settings=settings,
                                                                device=device)
    width = max(harmonizer.config.dim_s, harmonizer.config.dim_f)
    rows, datasets, subjects = [], [], []
    for batch in derivative_batches(samples=Path(samples), timeseries=timeseries, t1_tensors=t1_tensors,
                                    dataset=dataset, scaling=Path(meta["root"]) / meta["scaling"],
                                    batch_size=batch_size, device=device):
        z_s, s_mask, z_f, f_mask = encode_latents(batch, fmri_model=fmri_model, t1_model=t1_model)
        rows += list(pack_latents(z_s, s_mask, z_f, f_mask, width=width))  # each (N_S + N_F_batch, D + 1)
        datasets += batch["dataset"]
        subjects += batch["subject"]
    if not rows:
        raise BHInputError(samples, f"dataset {dataset} has no sample to encode",
                           "check its preprocessing outputs and exclusions")
    n_s, n_rois = harmonizer.n_s_tokens, harmonizer.config.n_rois
    patches = max((len(row) - n_s) // n_rois for row in rows)  # batches crop to their own longest sample
    x = torch.stack([pad_patches(row, n_s=n_s, n_rois=n_rois, patches=patches) for row in rows])
    order = sorted(range(len(rows)), key=lambda i: (datasets[i], subjects[i], i))
    save_checkpoint(Path(out_latents), {  # atomic, canonical bytes: reruns are byte-identical
        "format": LATENTS_FORMAT, "dataset": [str(datasets[i]) for i in order],
        "subject": [str(subjects[i]) for i in order], "x": x[order].contiguous(), "n_s": n_s, "n_rois": n_rois,
        "harmonizer_checkpoint": meta["checkpoints"]["harmonizer"]})
    return {"n_rows": len(rows), "shape": list(x.shape[1:])}
