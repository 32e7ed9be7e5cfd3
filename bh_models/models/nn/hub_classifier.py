"""HubClassifier: the pretrained Harmonizer without its decoders, plus a linear head on the mean hub token.

Fine-tuned end to end by :func:`bh_models.evaluation.finetune.finetune_cross_validated`
with layer-wise learning-rate decay over ``layer_groups()``: input projections and
hub tokens first, then each transformer block, then the final norm with the head.
"""

from __future__ import annotations

from torch import Tensor, nn

from bh_models.models.latents import unpack_latents
from bh_models.models.nn.harmonizer import Harmonizer

__desc__ = (
    "Fine-tuning trained the Harmonizer without its decoders, with a linear head on the mean "
    "output hub token, end to end."
)


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
