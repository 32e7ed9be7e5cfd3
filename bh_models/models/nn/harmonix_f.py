"""harmonix-F: the fMRI encoder, a ViT over ROIs x time patches pretrained with JEPA.

Tokens
    Every sample is embedded by TAPE with its own patch size k, so all samples
    share one token grid: ``n_rois`` ROIs x ``P`` time patches, flattened ROI-major
    (token ``r * P + p``). Padded patches (after a sample's ``n_patches``) are
    embedded like the release does (TAPE of the zero padding plus their position),
    dropped from attention as keys and queries, and never used as a JEPA context or
    target, so they cannot reach a real token or the loss. Training crops a batch
    to its longest sample's patches, which only drops padding; :meth:`HarmonixF.encode`
    can return the full grid (the release's stage 0 always encodes 18 patches).

Positions (the release's ``BrainGradient_GeometricHarmonics_Anatomical_400_PosEmbed``)
    ``pos[r, p] = [ sincos_{D/2}(p) , minmax( (G[r] A + Gr[r] B) / 2 ) ]``: the first
    half is a fixed sine-cosine of the patch index; the second half is the mean of a
    learned linear map ``A`` of the ROI's ``M`` geometric eigenmodes ``G[r]`` and a
    learned map ``B`` of its functional gradients ``Gr[r]`` (both tables raw, as
    written by the geometry stage), scaled by ONE global min-max over all ROIs and
    channels to [-1, 1]. The predictor's positions are ``[ sincos_{Dp/2}(p) ,
    C minmax(..) ]`` with a third learned map ``C`` of the (detached) ROI half.

JEPA (Assran et al. 2023; Brain-JEPA, Dong et al. 2024)
    A context encoder sees the context tokens (:mod:`bh_models.models.nn.masking`:
    Brain-JEPA's observation block with cross-ROI, cross-time and double-cross
    targets by default); a narrow predictor, given the context tokens and the
    positions of the targets, predicts the layer-normalised outputs of an EMA
    target encoder at the target tokens; smooth-L1 loss, averaged over real target
    tokens per sample.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bh_models.core.errors import BHInputError
from bh_models.models.nn.blocks import (
    LAYER_NORM_EPS,
    gather_tokens,
    init_weights,
    rescale_residual_branches,
    make_blocks,
    masked_token_mean,
    run_blocks,
    sincos_1d,
)
from bh_models.models.nn.configs import HarmonixFConfig
from bh_models.models.nn.masking import JepaMasks, sample_jepa_masks
from bh_models.models.nn.tape import TemporalAdaptivePatchEmbed

__desc__ = (
    "harmonix-F, a Vision Transformer ({embed_dim} wide, {depth} layers, {num_heads} heads) over "
    "{n_rois} ROIs x TAPE time patches, with positions made of a sine-cosine embedding of the patch "
    "index (half the width) and, for the other half, the mean of learned linear maps of the ROI's "
    "{geometry_dim} geometric eigenmodes and {gradient_dim} functional gradients, min-max scaled "
    "to [-1, 1] (as the authors' release), was pretrained with a joint-embedding predictive objective "
    "(JEPA; EMA target encoder, momentum {ema_start} to {ema_end}; {fmri_masking} masks), with padded "
    "patches dropped from attention and from the loss."
)

#: Column prefixes of the two positional tables written by the geometry stage.
TABLE_PREFIXES = {"eigenmodes": "mode_", "gradients": "gradient_"}


def read_roi_table(*, path: Path, kind: str = "eigenmodes") -> Tensor:
    """Read a ROI x column positional table (eigenmodes or functional gradients), unscaled.

    Parameters
    ----------
    path : Path
        TSV with a ``name`` column (ROI names, atlas order) then ``mode_001`` .. (eigenmodes)
        or ``gradient_01`` .. (gradients).
    kind : {"eigenmodes", "gradients"}

    Returns
    -------
    Tensor
        ``(n_rois, C)`` float32, the values as written (the release uses its tables raw).
    """
    path = Path(path)
    prefix = TABLE_PREFIXES[kind]
    if not path.is_file():
        raise BHInputError(path, f"{kind} table not found", "run the geometry stage first")
    table = pd.read_csv(path, sep="\t")
    columns = [c for c in table.columns[1:] if str(c).startswith(prefix)]
    if table.columns[0] != "name" or not columns or len(columns) != table.shape[1] - 1:
        raise BHInputError(path, f"expected a 'name' column followed by {prefix}* columns",
                           f"regenerate the {kind} table with the geometry stage")
    values = table[columns].to_numpy(dtype=np.float64)  # (R, C)
    if not np.isfinite(values).all():
        raise BHInputError(path, f"{kind} table holds non-finite values", "regenerate it")
    return torch.from_numpy(values).float()


def read_geometry(*, path: Path) -> Tensor:
    """The ROI x mode eigenmode table, unscaled: ``read_roi_table(kind="eigenmodes")``."""
    return read_roi_table(path=path, kind="eigenmodes")


def read_gradients(*, path: Path) -> Tensor:
    """The ROI x gradient functional-gradient table, unscaled: ``read_roi_table(kind="gradients")``."""
    return read_roi_table(path=path, kind="gradients")


def minmax_scale(values: Tensor) -> Tensor:
    """``2 (v - min) / (max - min) - 1`` with ONE min and max over the whole tensor."""
    low, high = values.min(), values.max()
    return 2 * (values - low) / (high - low).clamp_min(1e-12) - 1


class GeometricPositions(nn.Module):
    """The ROI x patch positional embedding of the encoder and of the predictor (module doc).

    Parameters
    ----------
    config : HarmonixFConfig
    eigenmodes : Tensor
        ``(n_rois, geometry_dim)`` raw eigenmode table (a buffer, saved with the model).
    gradients : Tensor
        ``(n_rois, gradient_dim)`` raw functional-gradient table (a buffer).
    """

    def __init__(self, config: HarmonixFConfig, eigenmodes: Tensor, gradients: Tensor) -> None:
        super().__init__()
        if config.embed_dim % 2 or config.predictor_dim % 2:
            raise ValueError("embed_dim and predictor_dim must be even (two halves)")
        for name, table, width in (("eigenmodes", eigenmodes, config.geometry_dim),
                                   ("gradients", gradients, config.gradient_dim)):
            if tuple(table.shape) != (config.n_rois, width):
                raise ValueError(f"{name} {tuple(table.shape)} != ({config.n_rois}, {width})")
        self.config = config
        self.register_buffer("eigenmodes", eigenmodes.float().clone())  # (R, M)
        self.register_buffer("gradients", gradients.float().clone())  # (R, G)
        half, predictor_half = config.embed_dim // 2, config.predictor_dim // 2
        self.geo_harm_proj = nn.Linear(config.geometry_dim, half)
        self.grad_proj = nn.Linear(config.gradient_dim, half)
        self.decoder_pos_embed_proj = nn.Linear(half, predictor_half)

    def roi_half(self) -> Tensor:
        """``minmax((G A + Gr B) / 2)``: ``(R, D/2)``."""
        return minmax_scale(0.5 * (self.geo_harm_proj(self.eigenmodes) + self.grad_proj(self.gradients)))

    def encoder_positions(self, n_patches: int) -> Tensor:
        """``(R * P, D)``, ROI-major: the patch's time sin-cos first, the ROI half second."""
        roi = self.roi_half()  # (R, D/2)
        time = sincos_1d(dim=self.config.embed_dim // 2, positions=torch.arange(n_patches)).to(roi)  # (P, D/2)
        n_rois = roi.shape[0]
        return torch.cat([time[None].expand(n_rois, -1, -1), roi[:, None].expand(-1, n_patches, -1)],
                         dim=-1).reshape(n_rois * n_patches, -1)  # (R, P, D) -> (R * P, D)

    def predictor_positions(self, n_patches: int) -> Tensor:
        """``(R * P, Dp)``: time sin-cos of width Dp/2, then the projected, detached ROI half."""
        roi = self.decoder_pos_embed_proj(self.roi_half().detach())  # (R, Dp/2)
        time = sincos_1d(dim=self.config.predictor_dim // 2, positions=torch.arange(n_patches)).to(roi)
        n_rois = roi.shape[0]
        return torch.cat([time[None].expand(n_rois, -1, -1), roi[:, None].expand(-1, n_patches, -1)],
                         dim=-1).reshape(n_rois * n_patches, -1)  # (R, P, Dp) -> (R * P, Dp)


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
    """TAPE tokens + geometric/temporal positions + Transformer blocks + final LayerNorm."""

    def __init__(self, config: HarmonixFConfig, eigenmodes: Tensor, gradients: Tensor) -> None:
        super().__init__()
        self.config = config
        self.tape = TemporalAdaptivePatchEmbed(base_patch=config.base_patch, embed_dim=config.embed_dim)
        self.pos_embed = GeometricPositions(config, eigenmodes, gradients)
        self.blocks = make_blocks(dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
                                  mlp_ratio=config.mlp_ratio)
        self.norm = nn.LayerNorm(config.embed_dim, eps=LAYER_NORM_EPS)

    def tokens(self, x: Tensor, k: Tensor, patch_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Embedded tokens with positions and their mask.

        Returns
        -------
        tokens : Tensor
            ``(B, R * P, D)``; a padded token is TAPE(zero padding) + its position, as in the release.
        token_mask : Tensor
            ``(B, R * P)`` bool.
        """
        batch, n_rois, _ = x.shape
        n_patches = patch_mask.shape[1]
        embedded = self.tape.embed_mixed(x, patch=k, n_patches=n_patches)  # (B, R, P, D)
        embedded = embedded.reshape(batch, n_rois * n_patches, -1)  # (B, R * P, D)
        token_mask = patch_mask[:, None, :].expand(batch, n_rois, n_patches).reshape(batch, -1)  # (B, R * P)
        return embedded + self.pos_embed.encoder_positions(n_patches)[None], token_mask

    def forward(
        self, x: Tensor, k: Tensor, patch_mask: Tensor,
        keep_index: Tensor | None = None, keep_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode every token, or only those listed in ``keep_index``.

        Parameters
        ----------
        x, k, patch_mask
            As returned by :func:`crop_to_real_patches` (or uncropped: ``x`` long enough
            for ``patch_mask.shape[1]`` patches of every sample).
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
        tokens, mask = self.tokens(x, k, patch_mask)
        if keep_index is not None:
            tokens = gather_tokens(tokens, keep_index)  # (B, L, D)
            mask = keep_valid & torch.gather(mask, 1, keep_index)
        tokens = run_blocks(self.blocks, tokens, mask, grad_checkpointing=self.config.grad_checkpointing)
        return self.norm(tokens), mask


class JepaPredictor(nn.Module):
    """Narrow Transformer predicting target-token representations from context tokens (the release's names)."""

    def __init__(self, config: HarmonixFConfig) -> None:
        super().__init__()
        self.config = config
        self.predictor_embed = nn.Linear(config.embed_dim, config.predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.predictor_dim))
        self.predictor_blocks = make_blocks(dim=config.predictor_dim, depth=config.predictor_depth,
                                            num_heads=config.predictor_heads, mlp_ratio=config.mlp_ratio)
        self.predictor_norm = nn.LayerNorm(config.predictor_dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(config.predictor_dim, config.embed_dim)

    def forward(self, context: Tensor, masks: JepaMasks, positions: Tensor) -> Tensor:
        """``context`` ``(B, Lc, D)``, ``positions`` ``(R * P, Dp)`` -> predictions ``(B, Lt, D)``."""
        context = self.predictor_embed(context) + positions[masks.context_index]  # (B, Lc, Dp)
        queries = self.mask_token + positions[masks.target_index]  # (B, Lt, Dp)
        x = torch.cat([context, queries], dim=1)  # (B, Lc + Lt, Dp)
        mask = torch.cat([masks.context_valid, masks.target_valid], dim=1)  # (B, Lc + Lt)
        x = run_blocks(self.predictor_blocks, x, mask, grad_checkpointing=self.config.grad_checkpointing)
        return self.predictor_proj(self.predictor_norm(x)[:, context.shape[1]:])  # (B, Lt, D)


class HarmonixF(nn.Module):
    """harmonix-F with its JEPA pretraining heads.

    Parameters
    ----------
    config : HarmonixFConfig
    geometry : Tensor, optional
        ``(n_rois, geometry_dim)`` raw eigenmode table (:func:`read_geometry`);
        zeros when the weights come from a checkpoint, which holds the tables.
    gradients : Tensor, optional
        ``(n_rois, gradient_dim)`` raw functional-gradient table (:func:`read_gradients`); idem.

    Submodules map one to one onto the release's ``JEPA_TS_FLEX``: ``encoder`` (online),
    ``predictor`` (its ``decoder``) and ``target_encoder`` (its ``encoder_ema``, the one
    used downstream).
    """

    def __init__(self, config: HarmonixFConfig, geometry: Tensor | None = None,
                 gradients: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        if geometry is None:
            geometry = torch.zeros(config.n_rois, config.geometry_dim)
        if gradients is None:
            gradients = torch.zeros(config.n_rois, config.gradient_dim)
        self.encoder = FmriEncoder(config, geometry, gradients)
        self.predictor = JepaPredictor(config)
        init_weights(self)
        nn.init.trunc_normal_(self.predictor.mask_token, std=0.02)
        rescale_residual_branches(self.encoder.blocks)
        rescale_residual_branches(self.predictor.predictor_blocks)
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
        positions = self.encoder.pos_embed.predictor_positions(patch_mask.shape[1])  # (R * P, Dp)
        predictions = self.predictor(context, masks, positions)  # (B, Lt, D)
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
    def encode(self, batch: dict, *, full_grid: bool = False) -> tuple[Tensor, Tensor]:
        """Latent tokens of the target (EMA) encoder, the representation used downstream.

        Parameters
        ----------
        batch : dict
            A collated fMRI batch.
        full_grid : bool
            Encode every patch of the batch's grid (``patch_mask.shape[1]``, the store's
            ``max_patches``), padded ones included, as the release's stage 0 does; else
            crop to the batch's longest sample. Real tokens are identical either way.

        Returns
        -------
        tokens : Tensor
            ``(B, R * P, D)``.
        mask : Tensor
            ``(B, R * P)`` bool, True = real token.
        """
        if full_grid:
            patch_mask = torch.as_tensor(batch["patch_mask"]).bool()
            x, k = batch["x"], torch.as_tensor(batch["k"]).long().reshape(-1)
            needed = int(k.max()) * patch_mask.shape[1]
            if x.shape[-1] < needed:  # the zero padding the release appends up to P patches
                x = F.pad(x, (0, needed - x.shape[-1]))
        else:
            x, k, patch_mask = crop_to_real_patches(batch)
        return self.target_encoder(x, k, patch_mask)
