"""Packed latent tokens: the frozen encoders' tokens of every sample, computed once for fine-tuning.

Written by :func:`bh_models.models.embeddings.extract_latents` (rule
``extract_latents``); the fine-tuning option trains
:class:`bh_models.models.nn.hub_classifier.HubClassifier` on them.

Packed row layout, ``(N_S + N_F, D + 1)`` with ``D = max(D_S, D_F)``: the
harmonix-S tokens, then the harmonix-F tokens (ROI-major, padded to the most
patches of any sample), each zero-padded to ``D`` channels; the last channel is
the token mask (1 = real). A subject without T1 (or fMRI) has that block's mask at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bh_models.core.errors import BHInputError

__desc__ = (
    "For fine-tuning, the frozen harmonix-S and harmonix-F tokens of every sample were "
    "computed once and packed."
)

LATENTS_FORMAT = "bh-latents-1"


def pack_latents(z_s: Tensor, s_mask: Tensor, z_f: Tensor, f_mask: Tensor, *, width: int) -> Tensor:
    """``(B, N_S, D_S)``, ``(B, N_S)``, ``(B, N_F, D_F)``, ``(B, N_F)`` -> ``(B, N_S + N_F, width + 1)``."""
    def block(tokens: Tensor, mask: Tensor) -> Tensor:
        padded = torch.nn.functional.pad(tokens.float(), (0, width - tokens.shape[-1]))  # (B, N, width)
        return torch.cat([padded * mask[..., None], mask[..., None].float()], dim=-1)  # (B, N, width + 1)
    return torch.cat([block(z_s, s_mask), block(z_f, f_mask)], dim=1)


def unpack_latents(x: Tensor, *, n_s: int, dim_s: int, dim_f: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_latents`: ``z_s, s_mask, z_f, f_mask``."""
    s, f = x[:, :n_s], x[:, n_s:]  # (B, N_S, D + 1), (B, N_F, D + 1)
    return s[..., :dim_s], s[..., -1] > 0.5, f[..., :dim_f], f[..., -1] > 0.5


def pad_patches(row: Tensor, *, n_s: int, n_rois: int, patches: int) -> Tensor:
    """One packed row with its ROI-major F block ``(R * P_b, C)`` padded per ROI to ``(R * patches, C)``.

    Padding the block's end instead would shift every ROI after the first onto
    another ROI's positions (token ``r * P + p``).
    """
    s_block, f_block = row[:n_s], row[n_s:]  # (N_S, C), (R * P_b, C)
    f_block = f_block.reshape(n_rois, -1, row.shape[-1])  # (R, P_b, C)
    f_block = torch.nn.functional.pad(f_block, (0, 0, 0, patches - f_block.shape[1]))  # (R, patches, C), mask 0
    return torch.cat([s_block, f_block.reshape(n_rois * patches, -1)])


def read_latents(*, path: Path, dataset: str | None = None) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Datasets, subject labels and packed rows of a latents file, optionally one dataset's."""
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "latent tokens for fine-tuning not found", "run the extract_latents rule")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != LATENTS_FORMAT:
        raise BHInputError(path, "is not a latents file of this version", "rerun extract_latents")
    datasets, subjects = np.asarray(payload["dataset"], dtype=str), np.asarray(payload["subject"], dtype=str)
    keep = np.ones(len(datasets), dtype=bool) if dataset is None else datasets == dataset
    return datasets[keep], subjects[keep], payload["x"][torch.from_numpy(keep)]


def read_latents_files(*, paths: Sequence[Path], dataset: str | None = None) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """:func:`read_latents` of several files (one per dataset), rows concatenated with the
    harmonix-F block padded per ROI to the most patches of any file."""
    parts = [read_latents(path=Path(p), dataset=dataset) for p in paths]
    if len(parts) == 1:
        return parts[0]
    payload = torch.load(Path(paths[0]), map_location="cpu", weights_only=True)
    n_s, n_rois = int(payload.get("n_s", 0)), int(payload.get("n_rois", 0))
    if not n_s or not n_rois:
        raise BHInputError(paths[0], "has no token layout (n_s, n_rois)", "rerun extract_latents")
    patches = max((x.shape[1] - n_s) // n_rois for _, _, x in parts)
    rows = [torch.stack([pad_patches(row, n_s=n_s, n_rois=n_rois, patches=patches) for row in x])
            if len(x) else x.new_zeros((0, n_s + n_rois * patches, x.shape[-1])) for _, _, x in parts]
    return (np.concatenate([d for d, _, _ in parts]), np.concatenate([s for _, s, _ in parts]), torch.cat(rows))
