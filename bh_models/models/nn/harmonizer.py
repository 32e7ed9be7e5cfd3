"""The Harmonizer: brain hub tokens fused from frozen harmonix-S and harmonix-F tokens.

Encoder
    Input ``[Z_S ; H ; Z_F]``: the frozen encoders' latent tokens (each linearly
    projected to the Harmonizer width, plus a fixed sine-cosine position on its
    own grid and a learned modality embedding) around ``n_hub`` learnable hub
    tokens ``H``. A Transformer mixes them; the output hub tokens are the
    subject's representation (their mean is the embedding used downstream).

Decoders
    Two decoders rebuild ``Z_S`` and ``Z_F`` **from the output hub tokens only**:
    each decoder sees the hub tokens plus one query per token to rebuild, and a
    query carries nothing but a learned mask token and its position, so all
    information about the subject must pass through the hubs.

Loss
    ``||D_S(H) - Z_S||^2 + ||D_F(H) - Z_F||^2``: mean squared error over
    feature channels, averaged over the *real* tokens of each sample (padded
    fMRI patches are excluded, unlike the authors' release), then over the
    samples that have that modality; the two modality terms are added.

Unpaired subjects
    A subject with one modality enters with the other modality's tokens all
    masked: they are dropped as attention keys (the hubs never see them) and
    the missing modality's reconstruction term is zero for that sample. Hub
    tokens are therefore learned from every subject, and the embedding of a
    one-modality subject is defined the same way at extraction time. Set
    ``include_unpaired=False`` to train on paired subjects only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bh_models.models.nn.blocks import Transformer, init_weights, masked_token_mean, sincos_grid
from bh_models.models.nn.configs import HarmonizerConfig

__desc__ = (
    "The Harmonizer ({embed_dim} wide, {depth} layers, {num_heads} heads) fused the frozen "
    "harmonix-S and harmonix-F tokens with {n_hub} learnable brain hub tokens; two decoders "
    "({decoder_dim} wide, {decoder_depth} layers, {decoder_heads} heads) reconstructed each "
    "modality's tokens from the hub tokens alone, with a mean-squared-error loss over real "
    "(non-padded) tokens. Subjects with a single modality were included with the missing "
    "modality masked out of attention and of the loss."
)


class HubDecoder(nn.Module):
    """Rebuild a token sequence from hub tokens: queries hold only mask token + position."""

    def __init__(
        self, *, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, out_dim: int, n_hub: int,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.hub_position = nn.Parameter(torch.zeros(1, n_hub, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.transformer = Transformer(
            dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, grad_checkpointing=grad_checkpointing
        )
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, hub: Tensor, query_positions: Tensor, query_mask: Tensor) -> Tensor:
        """Predict the tokens at ``query_positions``.

        Parameters
        ----------
        hub : Tensor
            ``(B, N_hub, D)`` output hub tokens.
        query_positions : Tensor
            ``(N_q, dim)`` positions of the tokens to rebuild.
        query_mask : Tensor
            ``(B, N_q)`` bool, True = real token (padded queries are not attention keys).

        Returns
        -------
        Tensor
            ``(B, N_q, out_dim)``.
        """
        batch, n_hub, _ = hub.shape
        hubs = self.embed(hub) + self.hub_position  # (B, N_hub, dim)
        queries = (self.mask_token + query_positions[None].to(hubs.dtype)).expand(batch, -1, -1)  # (B, N_q, dim)
        x = torch.cat([hubs, queries], dim=1)  # (B, N_hub + N_q, dim)
        mask = torch.cat([torch.ones(batch, n_hub, dtype=torch.bool, device=hub.device), query_mask], dim=1)
        return self.pred(self.transformer(x, mask)[:, n_hub:])  # (B, N_q, out_dim)


class Harmonizer(nn.Module):
    """Hub-token fusion of T1 and fMRI latents, with dual reconstruction decoders."""

    def __init__(self, config: HarmonizerConfig) -> None:
        super().__init__()
        self.config = config
        width = config.embed_dim
        self.input_s = nn.Linear(config.dim_s, width)
        self.input_f = nn.Linear(config.dim_f, width)
        self.modality_s = nn.Parameter(torch.zeros(1, 1, width))
        self.modality_f = nn.Parameter(torch.zeros(1, 1, width))
        self.hub_tokens = nn.Parameter(torch.zeros(1, config.n_hub, width))
        self.register_buffer("s_positions", sincos_grid(dim=width, grid=config.s_grid), persistent=False)
        self.transformer = Transformer(
            dim=width, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, grad_checkpointing=config.grad_checkpointing,
        )
        decoder = dict(
            in_dim=width, dim=config.decoder_dim, depth=config.decoder_depth, num_heads=config.decoder_heads,
            mlp_ratio=config.mlp_ratio, n_hub=config.n_hub, grad_checkpointing=config.grad_checkpointing,
        )
        self.decoder_s = HubDecoder(out_dim=config.dim_s, **decoder)
        self.decoder_f = HubDecoder(out_dim=config.dim_f, **decoder)
        self.register_buffer(
            "s_query_positions", sincos_grid(dim=config.decoder_dim, grid=config.s_grid), persistent=False
        )
        init_weights(self)
        for parameter in (self.modality_s, self.modality_f, self.hub_tokens,
                          self.decoder_s.hub_position, self.decoder_f.hub_position,
                          self.decoder_s.mask_token, self.decoder_f.mask_token):
            nn.init.trunc_normal_(parameter, std=0.02)

    @property
    def n_s_tokens(self) -> int:
        return self.s_positions.shape[0]

    def f_positions(self, *, dim: int, n_tokens: int, device: torch.device) -> Tensor:
        """2-D sine-cosine positions of the fMRI grid (ROI, patch): ``(R * P, dim)``."""
        n_patches = n_tokens // self.config.n_rois
        return sincos_grid(dim=dim, grid=(self.config.n_rois, n_patches)).to(device)

    def fuse(self, z_s: Tensor, s_mask: Tensor, z_f: Tensor, f_mask: Tensor) -> Tensor:
        """Output hub tokens.

        Parameters
        ----------
        z_s : Tensor
            ``(B, N_S, dim_s)`` harmonix-S tokens.
        s_mask : Tensor
            ``(B, N_S)`` bool, all False for a subject without T1.
        z_f : Tensor
            ``(B, R * P, dim_f)`` harmonix-F tokens (ROI-major).
        f_mask : Tensor
            ``(B, R * P)`` bool, False on padded patches and for a subject without fMRI.

        Returns
        -------
        Tensor
            ``(B, N_hub, D)``.
        """
        batch = z_s.shape[0]
        s_tokens = self.input_s(z_s) + self.s_positions.to(z_s.dtype) + self.modality_s  # (B, N_S, D)
        f_positions = self.f_positions(dim=self.config.embed_dim, n_tokens=z_f.shape[1], device=z_f.device)
        f_tokens = self.input_f(z_f) + f_positions.to(z_f.dtype) + self.modality_f  # (B, R * P, D)
        hubs = self.hub_tokens.expand(batch, -1, -1)  # (B, N_hub, D)
        x = torch.cat([s_tokens, hubs, f_tokens], dim=1)  # (B, N_S + N_hub + R * P, D)
        hub_mask = torch.ones(batch, self.config.n_hub, dtype=torch.bool, device=z_s.device)
        mask = torch.cat([s_mask, hub_mask, f_mask], dim=1)
        x = self.transformer(x.masked_fill(~mask[..., None], 0.0), mask)
        return x[:, self.n_s_tokens: self.n_s_tokens + self.config.n_hub]

    def forward(self, z_s: Tensor, s_mask: Tensor, z_f: Tensor, f_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Dual reconstruction loss (arguments as in :meth:`fuse`).

        Returns
        -------
        loss : Tensor
            Scalar ``loss_s + loss_f``.
        metrics : dict
            ``loss_s``, ``loss_f``, and how many samples had each modality.
        """
        pred_s, pred_f = self.reconstruct(self.fuse(z_s, s_mask, z_f, f_mask), s_mask, f_mask)
        loss_s, has_s = _modality_loss(pred_s, z_s, s_mask)
        loss_f, has_f = _modality_loss(pred_f, z_f, f_mask)
        metrics = {"loss_s": float(loss_s.detach()), "loss_f": float(loss_f.detach()),
                   "samples_s": float(has_s), "samples_f": float(has_f)}
        return loss_s + loss_f, metrics

    def reconstruct(self, hub: Tensor, s_mask: Tensor, f_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Rebuild both token sequences from hub tokens alone (masks give only the layout).

        Returns
        -------
        pred_s : Tensor
            ``(B, N_S, dim_s)``.
        pred_f : Tensor
            ``(B, R * P, dim_f)`` with ``R * P = f_mask.shape[1]``.
        """
        f_queries = self.f_positions(dim=self.config.decoder_dim, n_tokens=f_mask.shape[1], device=hub.device)
        pred_s = self.decoder_s(hub, self.s_query_positions, s_mask)
        pred_f = self.decoder_f(hub, f_queries, f_mask)
        return pred_s, pred_f

    @torch.no_grad()
    def hub_embedding(self, z_s: Tensor, s_mask: Tensor, z_f: Tensor, f_mask: Tensor) -> Tensor:
        """Mean of the output hub tokens: ``(B, D)``."""
        return self.fuse(z_s, s_mask, z_f, f_mask).mean(dim=1)


def _modality_loss(prediction: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """MSE over real tokens, averaged over samples that have the modality.

    Returns the loss (0 when no sample has the modality; still a graph node so
    every parameter takes part in every step, as DDP requires) and the count.
    """
    token_loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=-1)  # (B, N)
    per_sample = masked_token_mean(token_loss, mask)  # (B,)
    present = mask.any(dim=1)
    count = present.sum()
    total = torch.where(present, per_sample, torch.zeros_like(per_sample)).sum()
    return total / count.clamp_min(1), count
