"""The Harmonizer as released (``OneTokRegViT``): brain hub tokens fused from frozen encoder latents.

Input
    One token sequence per subject, ``(N, D_in)`` with ``N = N_F + N_S``: the frozen
    harmonix-F tokens first (ROI-major ``r * P + p`` on the fixed grid of ``n_patches``
    patches per ROI, padded patches included), then the harmonix-S tokens
    (``a * gy * gz + b * gz + c``): the raw encoder outputs (after each encoder's final
    LayerNorm), with no input projection when ``D_in`` equals the Harmonizer width (the
    release's ``add_pre_mapping=False``; a ``pre_map`` Linear otherwise). A token mask
    ``(N,)`` marks padded fMRI patches (and, for the unpaired option, a missing modality).

Encoder
    ``x + pos[1:]`` with ONE fixed 1-D sine-cosine over the concatenated index
    ``0 .. N - 1`` (fMRI first, then T1); a class token (``cls_token + pos[0]``, row 0 of
    the table is zero) in front; ``n_hub`` learned hub tokens (``latent_tokens`` +
    ``enc_latent_token_positional_embedding``) appended at the end. Padded tokens are
    dropped from attention as keys and queries. Output: the class token and the hub
    tokens after the final LayerNorm; the subject embedding is the mean hub token.

Decoder (ONE decoder over all positions, as released)
    ``[cls | N mask queries | n_hub hubs]``: the embedded class token, a mask token plus a
    1-D sine-cosine position for every input token, and the embedded hub tokens plus a
    learned decoder position; no attention mask. The queries carry nothing about the
    subject, so everything the decoder rebuilds passes through the hub (and class) tokens.

Loss
    Per-token normalised targets (``norm_pix_loss``: minus the token's mean over the
    ``D_in`` channels, divided by ``sqrt(unbiased variance + 1e-6)``), mean squared error
    averaged over every token of the present modalities, padded fMRI tokens included, as
    released. ``loss_on_padded=False`` (our improvement, an option) averages over real
    tokens only. A subject's missing modality (``include_unpaired`` training) never
    enters the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bh_models.models.nn.blocks import LAYER_NORM_EPS, init_weights, make_blocks, run_blocks, sincos_1d
from bh_models.models.nn.configs import HarmonizerConfig

__desc__ = (
    "The Harmonizer ({embed_dim} wide, {depth} layers, {num_heads} heads) fused the frozen harmonix-F "
    "and harmonix-S latent tokens, one sequence with a single sine-cosine position over both "
    "modalities, with a class token and {n_hub} learnable brain hub tokens; one decoder ({decoder_dim} "
    "wide, {decoder_depth} layers, {decoder_heads} heads) rebuilt every input token from the hub and class "
    "tokens, with a mean-squared-error loss on per-token normalised targets (as the authors' release)."
)


def fixed_positions(*, n_tokens: int, dim: int) -> Tensor:
    """``(1 + N, dim)``: a zero row (class token), then the 1-D sine-cosine of ``0 .. N - 1``."""
    table = sincos_1d(dim=dim, positions=torch.arange(n_tokens))  # (N, dim)
    return torch.cat([torch.zeros(1, dim), table], dim=0)


def normalised_targets(tokens: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-token normalisation over the channels: ``(t - mean) / sqrt(var_unbiased + eps)``."""
    mean = tokens.mean(dim=-1, keepdim=True)
    var = tokens.var(dim=-1, keepdim=True)  # unbiased, as torch.var and the release
    return (tokens - mean) / (var + eps).sqrt()


class Harmonizer(nn.Module):
    """Hub-token fusion of harmonix-F and harmonix-S latents with one reconstruction decoder."""

    def __init__(self, config: HarmonizerConfig) -> None:
        super().__init__()
        if config.dim_s != config.dim_f:
            raise ValueError(f"harmonix-S width {config.dim_s} != harmonix-F width {config.dim_f}: the "
                             "Harmonizer reads one token sequence")
        self.config = config
        width, decoder, n_tokens = config.embed_dim, config.decoder_dim, self.n_tokens
        self.pre_map = nn.Linear(config.dim_f, width) if config.dim_f != width else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", fixed_positions(n_tokens=n_tokens, dim=width), persistent=False)
        self.latent_tokens = nn.Parameter(torch.zeros(config.n_hub, width))
        self.enc_latent_token_positional_embedding = nn.Parameter(torch.zeros(config.n_hub, width))
        self.blocks = make_blocks(dim=width, depth=config.depth, num_heads=config.num_heads,
                                  mlp_ratio=config.mlp_ratio)
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.decoder_embed = nn.Linear(width, decoder)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder))
        self.register_buffer("decoder_pos_embed", fixed_positions(n_tokens=n_tokens, dim=decoder),
                             persistent=False)
        self.dec_latent_token_positional_embedding = nn.Parameter(torch.zeros(1, config.n_hub, decoder))
        self.decoder_blocks = make_blocks(dim=decoder, depth=config.decoder_depth, num_heads=config.decoder_heads,
                                          mlp_ratio=config.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder, config.dim_f)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for parameter in (self.latent_tokens, self.enc_latent_token_positional_embedding,
                          self.dec_latent_token_positional_embedding):
            nn.init.normal_(parameter)  # the release draws its hub tokens with torch.randn

    @property
    def n_f_tokens(self) -> int:
        return self.config.n_f_tokens

    @property
    def n_s_tokens(self) -> int:
        return self.config.n_s_tokens

    @property
    def n_tokens(self) -> int:
        return self.config.n_f_tokens + self.config.n_s_tokens

    def _check(self, tokens: Tensor, mask: Tensor) -> None:
        expected = (self.n_tokens, self.config.dim_f)
        if tuple(tokens.shape[1:]) != expected or tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"tokens {tuple(tokens.shape)} / mask {tuple(mask.shape)}: expected (B, {expected[0]}, "
                             f"{expected[1]}) fMRI-then-T1 tokens and a (B, {expected[0]}) mask")

    def forward_features(self, tokens: Tensor, mask: Tensor, *, final_norm: bool = True) -> Tensor:
        """Encoder output: the class token then the hub tokens, ``(B, 1 + n_hub, D)``.

        Parameters
        ----------
        tokens : Tensor
            ``(B, N_F + N_S, D_in)`` frozen-encoder tokens, fMRI first.
        mask : Tensor
            ``(B, N_F + N_S)`` bool, True = real token.
        final_norm : bool
            Apply the final LayerNorm (pretraining, probing); the release's fine-tuning
            model drops it and normalises the mean hub token instead.
        """
        self._check(tokens, mask)
        batch = tokens.shape[0]
        x = self.pre_map(tokens) if self.pre_map is not None else tokens
        x = x + self.pos_embed[1:].to(x.dtype)  # (B, N, D)
        cls = (self.cls_token + self.pos_embed[:1].to(x.dtype)).expand(batch, -1, -1)  # (B, 1, D)
        hubs = (self.latent_tokens + self.enc_latent_token_positional_embedding).expand(batch, -1, -1)
        x = torch.cat([cls, x, hubs.to(x.dtype)], dim=1)  # (B, 1 + N + n_hub, D)
        ones = torch.ones(batch, 1, dtype=torch.bool, device=mask.device)
        full_mask = torch.cat([ones, mask, ones.expand(batch, self.config.n_hub)], dim=1)  # (B, 1 + N + n_hub)
        x = run_blocks(self.blocks, x, full_mask, grad_checkpointing=self.config.grad_checkpointing)
        if final_norm:
            x = self.norm(x)
        return torch.cat([x[:, :1], x[:, -self.config.n_hub:]], dim=1)  # (B, 1 + n_hub, D)

    def forward_decoder(self, latent: Tensor) -> Tensor:
        """Rebuild every input token from the class and hub tokens: ``(B, 1 + n_hub, D) -> (B, N, D_in)``."""
        batch = latent.shape[0]
        y = self.decoder_embed(latent)  # (B, 1 + n_hub, Dd)
        queries = self.mask_token.to(y.dtype).expand(batch, self.n_tokens, -1)  # (B, N, Dd)
        queries = torch.cat([y[:, :1], queries], dim=1) + self.decoder_pos_embed.to(y.dtype)  # (B, 1 + N, Dd)
        hubs = y[:, 1:] + self.dec_latent_token_positional_embedding.to(y.dtype)  # (B, n_hub, Dd)
        y = run_blocks(self.decoder_blocks, torch.cat([queries, hubs], dim=1),
                       grad_checkpointing=self.config.grad_checkpointing)  # (B, 1 + N + n_hub, Dd)
        return self.decoder_pred(self.decoder_norm(y))[:, 1: 1 + self.n_tokens]  # (B, N, D_in)

    def loss_weights(self, mask: Tensor) -> Tensor:
        """``(B, N)`` bool: the tokens the loss averages over (module doc)."""
        if not self.config.loss_on_padded:
            return mask
        n_f = self.n_f_tokens
        has_f = mask[:, :n_f].any(dim=1, keepdim=True).expand(-1, n_f)  # (B, N_F): the modality is present
        has_s = mask[:, n_f:].any(dim=1, keepdim=True).expand(-1, self.n_s_tokens)  # (B, N_S)
        return torch.cat([has_f, has_s], dim=1)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction loss of a batch of latent sequences.

        Parameters
        ----------
        tokens : Tensor
            ``(B, N_F + N_S, D_in)``, fMRI first.
        mask : Tensor
            ``(B, N_F + N_S)`` bool, True = real token.

        Returns
        -------
        loss : Tensor
            Scalar: mean squared error over the loss tokens (:meth:`loss_weights`).
        metrics : dict
            ``loss_f`` and ``loss_s``: the same error over each modality's real tokens.
        """
        prediction = self.forward_decoder(self.forward_features(tokens, mask))  # (B, N, D_in)
        target = tokens.float()
        if self.config.norm_pix_loss:
            target = normalised_targets(target)
        token_error = (prediction.float() - target).pow(2).mean(dim=-1)  # (B, N)
        weights = self.loss_weights(mask).to(token_error.dtype)
        loss = (token_error * weights).sum() / weights.sum().clamp_min(1.0)
        n_f = self.n_f_tokens
        with torch.no_grad():
            real = mask.to(token_error.dtype)
            metrics = {
                "loss_f": float((token_error[:, :n_f] * real[:, :n_f]).sum() / real[:, :n_f].sum().clamp_min(1)),
                "loss_s": float((token_error[:, n_f:] * real[:, n_f:]).sum() / real[:, n_f:].sum().clamp_min(1)),
            }
        return loss, metrics

    @torch.no_grad()
    def hub_embedding(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Mean of the output hub tokens (after the final LayerNorm): ``(B, D)``."""
        return self.forward_features(tokens, mask)[:, 1:].mean(dim=1)
