"""HubClassifier: the release's fine-tuning model (stage 2, ``global_pool=True``).

The pretrained Harmonizer's encoder (class token, positions, hub tokens, blocks)
without its decoder and without its final LayerNorm; the mean of the 128 output hub
tokens (the class token's output is discarded) goes through a fresh LayerNorm
(``fc_norm``) and a linear head (weights drawn with std 2e-5, zero bias).

Fine-tuned end to end by the fine-tuning job (:mod:`bh_models.models.finetune`)
with layer-wise learning-rate decay over ``layer_groups()``, ordered as the release's
layer ids: the class token (and ``pre_map``, if any) first, then each block, then the hub
tokens with their positions, ``fc_norm`` and the head.

Inputs are packed latent rows (:func:`bh_models.models.latents.read_latents_files`):
``(B, N_F + N_S, D_in + 1)``, the frozen-encoder tokens (fMRI first) with the token mask
as the last channel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bh_models.models.latents import unpack_rows
from bh_models.models.nn.blocks import LAYER_NORM_EPS
from bh_models.models.nn.harmonizer import Harmonizer

__desc__ = (
    "Fine-tuning trained the Harmonizer's encoder without its decoder and final normalisation, with a "
    "LayerNorm and a linear head on the mean output hub token (as the authors' release), end to end."
)

#: Submodules and parameters of the pretrained Harmonizer that fine-tuning does not use.
DROPPED = ("norm", "decoder_embed", "mask_token", "dec_latent_token_positional_embedding", "decoder_blocks",
           "decoder_norm", "decoder_pred")


class HubClassifier(nn.Module):
    """Pretrained Harmonizer encoder + ``fc_norm`` + linear head on the mean hub token.

    Parameters
    ----------
    harmonizer : Harmonizer
        Its weights are copied; the decoder and the final norm are not kept.
    n_outputs : int
        2 logits for classification, 1 value for regression.
    drop_path : float
        Largest stochastic-depth rate (linear over the blocks). The release fine-tunes with
        0.1; the default 0 keeps training a deterministic function of the seeded batches
        (stochastic depth draws from torch's global generator).
    """

    def __init__(self, harmonizer: Harmonizer, n_outputs: int, drop_path: float = 0.0) -> None:
        super().__init__()
        config = harmonizer.config
        self.config = config
        self.fusion = Harmonizer(config)
        self.fusion.load_state_dict(harmonizer.state_dict())
        for name in DROPPED:
            delattr(self.fusion, name)
        depth = len(self.fusion.blocks)
        for index, block in enumerate(self.fusion.blocks):
            block.drop_path = drop_path * index / max(1, depth - 1)
        self.fc_norm = nn.LayerNorm(config.embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(config.embed_dim, n_outputs)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Packed rows ``(B, N_F + N_S, D_in + 1)`` -> ``(B, n_outputs)``."""
        tokens, mask = unpack_rows(x)
        features = self.fusion.forward_features(tokens, mask, final_norm=False)  # (B, 1 + n_hub, D)
        return self.head(self.fc_norm(features[:, 1:].mean(dim=1)))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The release's layer ids: class token (+ pre_map) -> 0, block i -> i + 1, the rest last."""
        fusion = self.fusion
        first = [fusion.cls_token, *(fusion.pre_map.parameters() if fusion.pre_map is not None else [])]
        blocks = [list(block.parameters()) for block in fusion.blocks]
        last = [fusion.latent_tokens, fusion.enc_latent_token_positional_embedding,
                *self.fc_norm.parameters(), *self.head.parameters()]
        return [first, *blocks, last]


def hub_tokens(model: HubClassifier, x: Tensor) -> Tensor:
    """The fine-tuning model's output hub tokens before pooling: ``(B, n_hub, D)`` (tests, inspection)."""
    tokens, mask = unpack_rows(x)
    with torch.no_grad():
        return model.fusion.forward_features(tokens, mask, final_norm=False)[:, 1:]
