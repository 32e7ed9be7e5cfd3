"""harmonix-F: the fMRI encoder, a ViT over ROIs x time patches pretrained with JEPA.

Tokens
    Every sample is embedded by TAPE with its own patch size k, so all samples
    share one token grid: ``n_rois`` ROIs x ``P`` time patches, flattened ROI-major
    (token ``r * P + p``). Padded patches (after a sample's ``n_patches``) are
    zeroed, masked out of attention as keys, and never used as a JEPA context or
    target, so their values cannot reach a real token or the loss. A batch is
    cropped to its longest sample's patches, which only drops padding.

Positions
    ``pos[r, p] = G[r] A + sincos(p)``: a learned linear map ``A`` of the ROI's
    geometric eigenmode vector ``G[r]`` (column-standardised 400 x M matrix from
    the geometry stage) plus a fixed sine-cosine embedding of the patch index.

JEPA (Assran et al. 2023; Brain-JEPA, Dong et al. 2024)
    A context encoder sees the real tokens outside a few target blocks
    (contiguous ROI range x contiguous run of patches); a narrow predictor,
    given the context tokens and the positions of the targets, predicts the
    layer-normalised outputs of an EMA target encoder at the target tokens;
    smooth-L1 loss, averaged over real target tokens per sample.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bh_models.core.errors import BHInputError
from bh_models.models.nn.blocks import Transformer, gather_tokens, init_weights, masked_token_mean, sincos_1d
from bh_models.models.nn.configs import HarmonixFConfig
from bh_models.models.nn.tape import TemporalAdaptivePatchEmbed

__desc__ = (
    "harmonix-F, a Vision Transformer ({embed_dim} wide, {depth} layers, {num_heads} heads) over "
    "{n_rois} ROIs x TAPE time patches, with positions given by a learned linear map of "
    "{geometry_dim} geometric eigenmodes per ROI plus a sine-cosine embedding of the patch index, "
    "was pretrained with a joint-embedding predictive objective (JEPA; EMA target encoder, "
    "momentum {ema_start} to {ema_end}; {target_blocks} ROI x time target blocks per sample), "
    "with padded patches masked out of attention and of the loss."
)


def read_geometry(*, path: Path) -> Tensor:
    """Read the ROI x mode geometric embedding and standardise each mode.

    Parameters
    ----------
    path : Path
        TSV with a ``name`` column (ROI names, atlas order) then ``mode_001`` .. ``mode_M``.

    Returns
    -------
    Tensor
        ``(n_rois, M)`` float32, each column with zero mean and unit variance
        (eigenmode amplitudes depend on the mesh scale; the positional map should not).
    """
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "geometry table not found", "run the geometry stage first")
    table = pd.read_csv(path, sep="\t")
    if table.columns[0] != "name" or table.shape[1] < 2:
        raise BHInputError(path, "expected a 'name' column followed by mode columns", "regenerate the geometry table")
    values = table.iloc[:, 1:].to_numpy(dtype=np.float64)  # (R, M)
    if not np.isfinite(values).all():
        raise BHInputError(path, "geometry table holds non-finite values", "regenerate the geometry table")
    scale = values.std(axis=0)
    scale[scale == 0] = 1.0
    return torch.from_numpy((values - values.mean(axis=0)) / scale).float()


def crop_to_real_patches(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's ``x``, ``k`` and patch mask cropped to its longest real sample.

    Padded patches are invisible, so dropping the all-padding tail only saves compute.

    Returns
    -------
    x : Tensor
        ``(B, R, T)`` float.
    k : Tensor
        ``(B,)`` int64 patch sizes.
    patch_mask : Tensor
        ``(B, P)`` bool, True = real patch, ``P`` = the batch's most real patches.
    """
    patch_mask = torch.as_tensor(batch["patch_mask"]).bool()
    n_patches = int(patch_mask.sum(dim=1).max())
    k = torch.as_tensor(batch["k"]).long().reshape(-1)
    return batch["x"], k, patch_mask[:, :n_patches]


class FmriEncoder(nn.Module):
    """TAPE tokens + geometric/temporal positions + Transformer."""

    def __init__(self, config: HarmonixFConfig, geometry: Tensor) -> None:
        super().__init__()
        if geometry.shape != (config.n_rois, config.geometry_dim):
            raise ValueError(f"geometry {tuple(geometry.shape)} != ({config.n_rois}, {config.geometry_dim})")
        self.config = config
        self.register_buffer("geometry", geometry.float().clone())  # (R, M), saved with the model
        self.tape = TemporalAdaptivePatchEmbed(base_patch=config.base_patch, embed_dim=config.embed_dim)
        self.geometry_proj = nn.Linear(config.geometry_dim, config.embed_dim)
        self.transformer = Transformer(
            dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, grad_checkpointing=config.grad_checkpointing,
        )

    def positions(self, n_patches: int) -> Tensor:
        """Positional embedding of the token grid: ``(R * P, D)``, ROI-major."""
        roi = self.geometry_proj(self.geometry)  # (R, D)
        time = sincos_1d(dim=self.config.embed_dim, positions=torch.arange(n_patches)).to(roi)  # (P, D)
        return (roi[:, None, :] + time[None, :, :]).reshape(-1, roi.shape[-1])  # (R, P, D) -> (R * P, D)

    def tokens(self, x: Tensor, k: Tensor, patch_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embedded tokens with positions, their mask and the positions.

        Returns
        -------
        tokens : Tensor
            ``(B, R * P, D)``, padded tokens zeroed.
        token_mask : Tensor
            ``(B, R * P)`` bool.
        positions : Tensor
            ``(R * P, D)``.
        """
        batch, n_rois, _ = x.shape
        n_patches = patch_mask.shape[1]
        embedded = self.tape.embed_mixed(x, patch=k, n_patches=n_patches)  # (B, R, P, D)
        embedded = embedded.reshape(batch, n_rois * n_patches, -1)  # (B, R * P, D)
        positions = self.positions(n_patches)
        token_mask = patch_mask[:, None, :].expand(batch, n_rois, n_patches).reshape(batch, -1)  # (B, R * P)
        tokens = (embedded + positions[None]).masked_fill(~token_mask[..., None], 0.0)
        return tokens, token_mask, positions

    def forward(
        self, x: Tensor, k: Tensor, patch_mask: Tensor,
        keep_index: Tensor | None = None, keep_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode all real tokens, or only those listed in ``keep_index``.

        Parameters
        ----------
        x, k, patch_mask
            As returned by :func:`crop_to_real_patches`.
        keep_index : Tensor, optional
            ``(B, L)`` flat token indices to encode (JEPA context).
        keep_valid : Tensor, optional
            ``(B, L)`` bool, False marks batch padding in ``keep_index``.

        Returns
        -------
        tokens : Tensor
            ``(B, L, D)`` (``L = R * P`` without ``keep_index``).
        mask : Tensor
            ``(B, L)`` bool, True = real token.
        """
        tokens, mask, _ = self.tokens(x, k, patch_mask)
        if keep_index is not None:
            tokens = gather_tokens(tokens, keep_index)  # (B, L, D)
            mask = keep_valid & torch.gather(mask, 1, keep_index)
            tokens = tokens.masked_fill(~mask[..., None], 0.0)
        return self.transformer(tokens, mask), mask


class JepaPredictor(nn.Module):
    """Narrow Transformer predicting target-token representations from context tokens."""

    def __init__(self, config: HarmonixFConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(config.embed_dim, config.predictor_dim)
        self.position_proj = nn.Linear(config.embed_dim, config.predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.predictor_dim))
        self.transformer = Transformer(
            dim=config.predictor_dim, depth=config.predictor_depth, num_heads=config.predictor_heads,
            mlp_ratio=config.mlp_ratio, grad_checkpointing=config.grad_checkpointing,
        )
        self.out = nn.Linear(config.predictor_dim, config.embed_dim)

    def forward(self, context: Tensor, masks: JepaMasks, positions: Tensor) -> Tensor:
        """``context`` ``(B, Lc, D)``, ``positions`` ``(R * P, D)`` -> predictions ``(B, Lt, D)``."""
        # The predictor reads the encoder's positions but must not reshape them.
        position = self.position_proj(positions.detach())  # (R * P, Dp)
        context = self.embed(context) + position[masks.context_index]  # (B, Lc, Dp)
        queries = self.mask_token + position[masks.target_index]  # (B, Lt, Dp)
        x = torch.cat([context, queries], dim=1)  # (B, Lc + Lt, Dp)
        mask = torch.cat([masks.context_valid, masks.target_valid], dim=1)  # (B, Lc + Lt)
        x = self.transformer(x.masked_fill(~mask[..., None], 0.0), mask)
        return self.out(x[:, context.shape[1]:])  # (B, Lt, D)


@dataclass
class JepaMasks:
    """Flat token indices (``r * P + p``) of the context and the targets, batch-padded."""

    context_index: Tensor  # (B, Lc) int64
    context_valid: Tensor  # (B, Lc) bool, False = batch padding
    target_index: Tensor  # (B, Lt) int64
    target_valid: Tensor  # (B, Lt) bool

    def to(self, device: torch.device) -> JepaMasks:
        return JepaMasks(*(t.to(device) for t in (self.context_index, self.context_valid,
                                                   self.target_index, self.target_valid)))


def _pad_index_lists(lists: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack variable-length index lists: ``(B, L_max)`` indices (0-padded) and validity."""
    length = max(1, max(len(item) for item in lists))
    index = torch.zeros(len(lists), length, dtype=torch.long)
    valid = torch.zeros(len(lists), length, dtype=torch.bool)
    for row, item in enumerate(lists):
        index[row, : len(item)] = item
        valid[row, : len(item)] = True
    return index, valid


def sample_jepa_masks(
    *, n_patches: Tensor, n_rois: int, grid_patches: int, config: HarmonixFConfig, generator: torch.Generator
) -> JepaMasks:
    """Draw JEPA target blocks (ROI range x patch run) and the complementary context.

    Parameters
    ----------
    n_patches : Tensor
        ``(B,)`` real patches per sample (>= 1).
    n_rois : int
        ROIs per sample.
    grid_patches : int
        P, patches on the token grid (flat index ``r * P + p``).
    config : HarmonixFConfig
        ``target_blocks``, ``target_roi_fraction``, ``target_time_fraction``.
    generator : torch.Generator
        CPU generator; the only source of randomness (exact resume).

    Returns
    -------
    JepaMasks
        Context = real tokens outside every target block; targets only on real patches.
    """
    contexts, targets = [], []
    roi_lo, roi_hi = config.target_roi_fraction
    time_lo, time_hi = config.target_time_fraction
    for real in n_patches.tolist():
        real = int(real)
        draws = torch.rand(config.target_blocks, 4, generator=generator, dtype=torch.float64)  # (blocks, 4)
        blocks = []
        for roi_u, roi_pos, time_u, time_pos in draws.tolist():
            roi_len = max(1, round((roi_lo + (roi_hi - roi_lo) * roi_u) * n_rois))
            time_len = max(1, round((time_lo + (time_hi - time_lo) * time_u) * real))
            roi_start = int(roi_pos * (n_rois - roi_len + 1))
            time_start = int(time_pos * (real - time_len + 1))
            blocks.append((roi_start, roi_len, time_start, time_len))
        while True:
            target = torch.zeros(n_rois, grid_patches, dtype=torch.bool)  # (R, P)
            for roi_start, roi_len, time_start, time_len in blocks:
                target[roi_start: roi_start + roi_len, time_start: time_start + time_len] = True
            context = torch.zeros_like(target)
            context[:, :real] = ~target[:, :real]
            if context.any() or len(blocks) == 1:
                break
            blocks.pop()  # the union covered every real token: keep fewer blocks
        contexts.append(context.reshape(-1).nonzero().squeeze(1))  # (Lc_b,) flat r * P + p
        targets.append(target.reshape(-1).nonzero().squeeze(1))  # (Lt_b,)
    context_index, context_valid = _pad_index_lists(contexts)
    target_index, target_valid = _pad_index_lists(targets)
    return JepaMasks(context_index, context_valid, target_index, target_valid)


class HarmonixF(nn.Module):
    """harmonix-F with its JEPA pretraining heads.

    Parameters
    ----------
    config : HarmonixFConfig
    geometry : Tensor, optional
        ``(n_rois, geometry_dim)`` standardised eigenmodes (:func:`read_geometry`);
        zeros when the weights come from a checkpoint, which holds the geometry.
    """

    def __init__(self, config: HarmonixFConfig, geometry: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        if geometry is None:
            geometry = torch.zeros(config.n_rois, config.geometry_dim)
        self.encoder = FmriEncoder(config, geometry)
        self.predictor = JepaPredictor(config)
        init_weights(self)
        nn.init.trunc_normal_(self.predictor.mask_token, std=0.02)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """JEPA loss of a collated fMRI batch.

        Parameters
        ----------
        batch : dict
            ``x`` ``(B, R, T)``, ``patch_mask`` ``(B, P_max)``, ``k`` ``(B,)`` (see ``bh_models.models.data``).
        generator : torch.Generator
            CPU generator for the block masks.

        Returns
        -------
        loss : Tensor
            Scalar.
        metrics : dict
            ``context_tokens`` and ``target_tokens`` per sample (means).
        """
        x, k, patch_mask = crop_to_real_patches(batch)
        masks = sample_jepa_masks(
            n_patches=patch_mask.sum(dim=1).cpu(), n_rois=x.shape[1], grid_patches=patch_mask.shape[1],
            config=self.config, generator=generator,
        ).to(x.device)
        with torch.no_grad():
            target_tokens, _ = self.target_encoder(x, k, patch_mask)  # (B, R * P, D)
            target_tokens = F.layer_norm(target_tokens.float(), (target_tokens.shape[-1],))
            targets = gather_tokens(target_tokens, masks.target_index)  # (B, Lt, D)
        context, _ = self.encoder(x, k, patch_mask, masks.context_index, masks.context_valid)  # (B, Lc, D)
        predictions = self.predictor(context, masks, self.encoder.positions(patch_mask.shape[1]))
        token_loss = F.smooth_l1_loss(predictions.float(), targets, reduction="none").mean(dim=-1)  # (B, Lt)
        loss = masked_token_mean(token_loss, masks.target_valid).mean()
        metrics = {
            "context_tokens": float(masks.context_valid.sum(dim=1).float().mean()),
            "target_tokens": float(masks.target_valid.sum(dim=1).float().mean()),
        }
        return loss, metrics

    @torch.no_grad()
    def on_optimizer_step(self, *, step: int, total_steps: int) -> None:
        """EMA update of the target encoder after optimiser step ``step`` (1-based)."""
        progress = min(1.0, step / max(1, total_steps))
        momentum = self.config.ema_start + (self.config.ema_end - self.config.ema_start) * progress
        target = list(self.target_encoder.parameters())
        online = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)

    @torch.no_grad()
    def encode(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Latent tokens of the target (EMA) encoder, the representation used downstream.

        Returns
        -------
        tokens : Tensor
            ``(B, R * P, D)``, P = the batch's most real patches.
        mask : Tensor
            ``(B, R * P)`` bool, True = real token.
        """
        x, k, patch_mask = crop_to_real_patches(batch)
        return self.target_encoder(x, k, patch_mask)
