"""Fine-tuning the Harmonizer on a downstream task (the ``evaluate.finetune`` option).

The frozen encoders' latent tokens of every sample are computed once
(:func:`extract_latents`, rule ``extract_latents``) and packed into one tensor;
:class:`HubClassifier` is the pretrained Harmonizer without its decoders plus a
linear head on the mean output hub token, trained end to end by
:func:`bh_models.evaluation.finetune.finetune_cross_validated` with layer-wise learning-rate
decay over ``layer_groups()``: input projections and hub tokens first, then each
transformer block, then the final norm with the head.

Packed row layout, ``(N_S + N_F, D + 1)`` with ``D = max(D_S, D_F)``: the
harmonix-S tokens, then the harmonix-F tokens (ROI-major, padded to the most
patches of any sample), each zero-padded to ``D`` channels; the last channel is
the token mask (1 = real). A subject without T1 (or fMRI) has that block's mask at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bh_models.core.errors import BHInputError
from bh_models.models.nn.harmonizer import Harmonizer

__desc__ = (
    "For fine-tuning, the frozen harmonix-S and harmonix-F tokens of every sample were "
    "computed once and the Harmonizer (without decoders) with a linear head on the mean hub "
    "token was trained end to end."
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


class HubClassifier(nn.Module):
    """Pretrained Harmonizer (decoders dropped) + linear head on the mean hub token.

    Parameters
    ----------
    harmonizer : Harmonizer
        Its weights are copied; the decoders are not kept.
    n_outputs : int
        2 logits for classification, 1 value for regression.
    """

    def __init__(self, harmonizer: Harmonizer, n_outputs: int) -> None:
        super().__init__()
        config = harmonizer.config
        self.config = config
        self.fusion = Harmonizer(config)
        self.fusion.load_state_dict(harmonizer.state_dict())
        del self.fusion.decoder_s, self.fusion.decoder_f
        self.head = nn.Linear(config.embed_dim, n_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Packed rows ``(B, N_S + N_F, D + 1)`` -> ``(B, n_outputs)``."""
        z_s, s_mask, z_f, f_mask = unpack_latents(x, n_s=self.fusion.n_s_tokens, dim_s=self.config.dim_s,
                                                  dim_f=self.config.dim_f)
        hub = self.fusion.fuse(z_s, s_mask, z_f, f_mask)  # (B, N_hub, D)
        return self.head(hub.mean(dim=1))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Input projections and tokens, each transformer block, final norm + head (input to output)."""
        fusion = self.fusion
        first = [*fusion.input_s.parameters(), *fusion.input_f.parameters(), fusion.modality_s,
                 fusion.modality_f, fusion.hub_tokens]
        blocks = [list(block.parameters()) for block in fusion.transformer.blocks]
        return [first, *blocks, [*fusion.transformer.norm.parameters(), *self.head.parameters()]]


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
    statistics (as :func:`bh_models.models.pretrain.extract_embeddings`). Writes
    ``out_latents`` (``torch.save``): ``format``, ``dataset`` and ``subject``
    (one per row), ``x`` float32 ``(n_rows, N_S + N_F, D + 1)`` (see module doc),
    ``harmonizer_checkpoint`` (its path in the bundle). A subject's rows are its
    fMRI samples (runs and TR variants) paired with its T1, or its single
    T1-only row.
    """
    from bh_models.models.pretrain import derivative_batches, encode_latents, load_bundle_models
    from bh_models.models.train import save_checkpoint

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
