"""harmonix-S: the T1 encoder, a 3-D masked-autoencoder ViT (He et al. 2022).

Stages of the forward pass (as in ``models_mae.py``): patchify (16^3 voxel
cubes), random masking (75 % of the patches hidden), encoder over the visible
patches, decoder over visible + mask tokens, loss = mean squared error on the
hidden patches against per-patch normalised voxels ("norm_pix_loss").

Volumes come from the packed store on the encoder grid; :func:`fit_volume`
centre-pads (or crops) them to the model's ``img_size``, a multiple of the patch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bh_models.models.nn.blocks import Transformer, gather_tokens, init_weights, sincos_grid
from bh_models.models.nn.configs import HarmonixSConfig

__desc__ = (
    "harmonix-S, a 3-D Vision Transformer ({embed_dim} wide, {depth} layers, {num_heads} heads) over "
    "{patch_size}^3-voxel patches of the T1w volume, was pretrained as a masked autoencoder "
    "(He et al. 2022; mask ratio {mask_ratio}, decoder {decoder_dim} wide with {decoder_depth} layers, "
    "loss on per-patch normalised voxels)."
)


def grid_for_volume(*, shape: tuple[int, int, int], patch_size: int) -> tuple[int, int, int]:
    """Smallest ``img_size`` holding ``shape`` whose sides are multiples of ``patch_size``."""
    return tuple(-(-side // patch_size) * patch_size for side in shape)  # type: ignore[return-value]


def fit_volume(volume: Tensor, img_size: tuple[int, int, int]) -> Tensor:
    """Centre-pad with zeros (or centre-crop) ``(B, 1, X, Y, Z)`` volumes to ``img_size``."""
    for axis, target in enumerate(img_size, start=2):
        size = volume.shape[axis]
        if size < target:
            before = (target - size) // 2
            pad = [0, 0] * (volume.ndim - axis - 1) + [before, target - size - before]
            volume = F.pad(volume, pad)
        elif size > target:
            start = (size - target) // 2
            volume = volume.narrow(axis, start, target)
    return volume


#: Channel order of the 3-D sine-cosine table in the release (its numpy meshgrid swaps the first two axes).
RELEASE_AXES = (1, 0, 2)


class HarmonixS(nn.Module):
    """3-D MAE: encoder ``(B, 1, X, Y, Z) -> (B, N, D)`` plus a pretraining decoder."""

    def __init__(self, config: HarmonixSConfig) -> None:
        super().__init__()
        if any(side % config.patch_size for side in config.img_size):
            raise ValueError(f"img_size {config.img_size} is not a multiple of patch_size {config.patch_size}")
        if int(torch.tensor(config.grid).prod()) < 2:
            raise ValueError(f"img_size {config.img_size} holds one patch: nothing to mask and reconstruct")
        self.config = config
        patch, width = config.patch_size, config.embed_dim
        self.patch_embed = nn.Conv3d(1, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # The release's 3-D table: channel blocks [axis 1 | axis 0 | axis 2] (MAE's 'xy' meshgrid). Saved with
        # the model (as the release's fixed Parameter), so an imported table is used as it is.
        self.register_buffer("pos_embed", sincos_grid(dim=width, grid=config.grid, channel_axes=RELEASE_AXES))
        self.encoder = Transformer(
            dim=width, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, grad_checkpointing=config.grad_checkpointing,
        )
        self.decoder_embed = nn.Linear(width, config.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_grid(dim=config.decoder_dim, grid=config.grid, channel_axes=RELEASE_AXES)
        )  # (N, Dd)
        self.decoder = Transformer(
            dim=config.decoder_dim, depth=config.decoder_depth, num_heads=config.decoder_heads,
            mlp_ratio=config.mlp_ratio, grad_checkpointing=config.grad_checkpointing,
        )
        self.decoder_pred = nn.Linear(config.decoder_dim, patch**3)
        init_weights(self)
        # MAE initialises the patch projection like a linear layer (xavier on the flattened kernel).
        nn.init.xavier_uniform_(self.patch_embed.weight.view(width, -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, volume: Tensor) -> Tensor:
        """``(B, 1, X, Y, Z)`` -> ``(B, N, p^3)`` in the grid's C order."""
        p = self.config.patch_size
        gx, gy, gz = self.config.grid
        x = volume.reshape(volume.shape[0], gx, p, gy, p, gz, p)  # (B, gx, p, gy, p, gz, p)
        x = x.permute(0, 1, 3, 5, 2, 4, 6)  # (B, gx, gy, gz, p, p, p)
        return x.reshape(volume.shape[0], gx * gy * gz, p**3)  # (B, N, p^3)

    def random_masking(self, n_batch: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """Indices of the visible patches and the binary mask (1 = hidden), per sample.

        Returns
        -------
        keep_index : Tensor
            ``(B, N_keep)`` int64.
        mask : Tensor
            ``(B, N)`` float, 1 on hidden patches.
        """
        n_tokens = self.pos_embed.shape[0]
        n_keep = min(n_tokens - 1, max(1, int(n_tokens * (1 - self.config.mask_ratio))))  # >= 1 hidden, >= 1 seen
        noise = torch.rand(n_batch, n_tokens, generator=generator)  # (B, N) on CPU: same draw on any device
        shuffle = torch.argsort(noise, dim=1)
        keep_index = shuffle[:, :n_keep].to(device)
        mask = torch.ones(n_batch, n_tokens, device=device)
        mask.scatter_(1, keep_index, 0.0)
        return keep_index, mask

    def forward_encoder(self, volume: Tensor, keep_index: Tensor | None = None) -> Tensor:
        """Encode visible patches (all when ``keep_index`` is None).

        Returns
        -------
        Tensor
            ``(B, 1 + L, D)``: the class token, then the encoded patches.
        """
        tokens = self.patch_embed(volume).flatten(2).transpose(1, 2)  # (B, D, gx, gy, gz) -> (B, N, D)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        if keep_index is not None:
            tokens = gather_tokens(tokens, keep_index)  # (B, N_keep, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return self.encoder(torch.cat([cls, tokens], dim=1))

    def forward_decoder(self, latent: Tensor, keep_index: Tensor) -> Tensor:
        """Predict every patch's voxels from the visible latents: ``(B, N, p^3)``."""
        batch = latent.shape[0]
        n_tokens = self.decoder_pos_embed.shape[0]
        visible = self.decoder_embed(latent[:, 1:])  # (B, N_keep, Dd)
        full = self.mask_token.expand(batch, n_tokens, -1).to(visible.dtype).clone()  # (B, N, Dd)
        full.scatter_(1, keep_index[..., None].expand(-1, -1, visible.shape[-1]), visible)
        full = full + self.decoder_pos_embed.to(full.dtype)
        cls = self.decoder_embed(latent[:, :1])  # (B, 1, Dd)
        decoded = self.decoder(torch.cat([cls, full], dim=1))  # (B, 1 + N, Dd)
        return self.decoder_pred(decoded[:, 1:])  # (B, N, p^3)

    def forward_loss(self, volume: Tensor, prediction: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error on hidden patches, voxels normalised per patch."""
        target = self.patchify(volume).float()  # (B, N, p^3)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (prediction.float() - target).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """MAE loss of a batch ``{"t1": (B, 1, X, Y, Z), ...}``."""
        volume = fit_volume(batch["t1"], self.config.img_size)
        keep_index, mask = self.random_masking(volume.shape[0], generator, volume.device)
        latent = self.forward_encoder(volume, keep_index)
        prediction = self.forward_decoder(latent, keep_index)
        loss = self.forward_loss(volume, prediction, mask)
        return loss, {"visible_patches": float(keep_index.shape[1])}

    @torch.no_grad()
    def encode(self, t1: Tensor) -> Tensor:
        """Latent tokens of every patch (no masking, no class token): ``(B, N, D)``."""
        return self.forward_encoder(fit_volume(t1, self.config.img_size))[:, 1:]
