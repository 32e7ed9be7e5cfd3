"""Training FLOPs per sample of each model, from its config: the numerator of MFU.

Counting convention (as in the PaLM/Megatron MFU papers): only matrix products
count, at 2 FLOPs per multiply-add; a trained part costs 3 x its forward pass
(forward, and a backward of twice the forward: input and weight gradients); the
first layer, whose input needs no gradient (patch embeddings, the Harmonizer's
input projections), costs 2 x; a part run without gradients (harmonix-F's EMA
target encoder) costs 1 x; activation recomputation under checkpointing is *not*
counted (it is overhead, not model work). Elementwise work (norms, GELU,
softmax, losses) and per-batch terms (positional tables) are left out.

One pre-norm Transformer block of width ``D``, MLP ratio ``r`` over ``N`` tokens::

    forward FLOPs = (8 + 4 r) N D^2     qkv 6ND^2, output projection 2ND^2, MLP 2 x 2rND^2
                  + 4 N^2 D             QK^T and (softmax) V, 2N^2D each

so ``24 N D^2 + 4 N^2 D`` for ``r = 4``. ``tests/models/test_flops.py`` checks every
formula below against :class:`torch.utils.flop_counter.FlopCounterMode` on the
models themselves, so the formulas cannot drift from the architectures.

Token counts use the padded worst case of the configured sample: 400 ROIs x
``max_patches`` fMRI tokens (real samples often have fewer patches, and a batch
is cropped to its longest sample), the full T1 patch grid, and for harmonix-F the
mean JEPA context and target sizes of its mask sampler at that grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: bf16 dense peak of one H100 SXM (NVIDIA datasheet, without sparsity), FLOP/s.
H100_BF16_DENSE_PEAK = 989.4e12


def block_forward_flops(*, tokens: float, width: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one Transformer block over ``tokens`` tokens (see the module doc)."""
    return (8 + 4 * mlp_ratio) * tokens * width**2 + 4 * tokens**2 * width


def transformer_forward_flops(*, tokens: float, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of ``depth`` blocks."""
    return depth * block_forward_flops(tokens=tokens, width=width, mlp_ratio=mlp_ratio)


def linear_flops(*, tokens: float, fan_in: int, fan_out: int) -> float:
    """Forward FLOPs of a linear map applied to ``tokens`` vectors."""
    return 2.0 * tokens * fan_in * fan_out


@dataclass(frozen=True)
class SampleCost:
    """Training cost of one sample: FLOPs (forward + backward) and the tokens it puts through the models."""

    flops: float
    tokens: int  # input tokens of the sample (the throughput unit of tokens/s)
    detail: dict[str, float]


def harmonix_s_cost(config: Any) -> SampleCost:
    """harmonix-S (3-D MAE) per sample: patch embedding of every patch, encoder over the visible
    patches + class token, decoder over every patch + class token, voxel prediction."""
    n = int(np.prod(config.grid))
    keep = min(n - 1, max(1, int(n * (1 - config.mask_ratio))))
    voxels = config.patch_size**3
    d, dd = config.embed_dim, config.decoder_dim
    forward = {
        "patch_embed": linear_flops(tokens=n, fan_in=voxels, fan_out=d),
        "encoder": transformer_forward_flops(tokens=1 + keep, width=d, depth=config.depth, mlp_ratio=config.mlp_ratio),
        "decoder_embed": linear_flops(tokens=1 + keep, fan_in=d, fan_out=dd),
        "decoder": transformer_forward_flops(tokens=1 + n, width=dd, depth=config.decoder_depth,
                                             mlp_ratio=config.mlp_ratio),
        "decoder_pred": linear_flops(tokens=n, fan_in=dd, fan_out=voxels),
    }
    detail = {key: (2 if key == "patch_embed" else 3) * value for key, value in forward.items()}
    return SampleCost(flops=sum(detail.values()), tokens=n, detail=detail)


def jepa_token_counts(config: Any, *, n_patches: int, draws: int = 64, seed: int = 0) -> tuple[float, float]:
    """Mean context and target tokens per sample of harmonix-F's mask sampler on a full grid."""
    from bh_models.models.nn.harmonix_f import sample_jepa_masks

    masks = sample_jepa_masks(n_patches=torch.full((draws,), n_patches), n_rois=config.n_rois,
                              grid_patches=n_patches, config=config,
                              generator=torch.Generator().manual_seed(seed))
    return float(masks.context_valid.sum(dim=1).float().mean()), float(masks.target_valid.sum(dim=1).float().mean())


def harmonix_f_cost(config: Any, *, n_patches: int, context: float | None = None,
                    target: float | None = None) -> SampleCost:
    """harmonix-F (JEPA) per sample at ``n_patches`` real patches: TAPE embedding, the EMA target
    encoder over every token (forward only), the context encoder, the predictor."""
    n = config.n_rois * n_patches
    if context is None or target is None:
        context, target = jepa_token_counts(config, n_patches=n_patches)
    d, dp = config.embed_dim, config.predictor_dim
    tape = linear_flops(tokens=n, fan_in=config.base_patch, fan_out=d)  # k = base_patch frames per token
    trained = {
        "tape": tape,
        "context_encoder": transformer_forward_flops(tokens=context, width=d, depth=config.depth,
                                                     mlp_ratio=config.mlp_ratio),
        "predictor_embed": linear_flops(tokens=context, fan_in=d, fan_out=dp),
        "predictor": transformer_forward_flops(tokens=context + target, width=dp, depth=config.predictor_depth,
                                               mlp_ratio=config.mlp_ratio),
        "predictor_out": linear_flops(tokens=target, fan_in=dp, fan_out=d),
    }
    detail = {key: (2 if key == "tape" else 3) * value for key, value in trained.items()}
    detail["target_encoder"] = tape + transformer_forward_flops(tokens=n, width=d, depth=config.depth,
                                                                mlp_ratio=config.mlp_ratio)
    return SampleCost(flops=sum(detail.values()), tokens=n, detail=detail)


def harmonizer_cost(config: Any, *, n_patches: int) -> SampleCost:
    """Harmonizer (as released) per sample on cached latents: the encoder over the class token, the
    fMRI and T1 tokens and the hub tokens, and one decoder over the same positions.

    ``n_patches`` is the fixed token grid of the latent store (the config's ``n_patches``
    when the latents come from a store; padded patches are tokens too).
    """
    n_s = int(np.prod(config.s_grid))
    n = config.n_rois * n_patches + n_s
    sequence = 1 + n + config.n_hub  # [cls | tokens | hubs]
    d, dd = config.embed_dim, config.decoder_dim
    forward = {
        "pre_map": linear_flops(tokens=n, fan_in=config.dim_f, fan_out=d) if config.dim_f != d else 0.0,
        "encoder": transformer_forward_flops(tokens=sequence, width=d, depth=config.depth, mlp_ratio=config.mlp_ratio),
        "decoder_embed": linear_flops(tokens=1 + config.n_hub, fan_in=d, fan_out=dd),
        "decoder": transformer_forward_flops(tokens=sequence, width=dd, depth=config.decoder_depth,
                                             mlp_ratio=config.mlp_ratio),
        "decoder_pred": linear_flops(tokens=sequence, fan_in=dd, fan_out=config.dim_f),
    }
    detail = {key: (2 if key == "pre_map" else 3) * value for key, value in forward.items()}
    return SampleCost(flops=sum(detail.values()), tokens=n, detail=detail)


def sample_cost(*, model: str, config: Any, n_patches: int) -> SampleCost:
    """Training cost of one sample of ``model`` (``harmonix_f``, ``harmonix_s``, ``harmonizer``)."""
    if model == "harmonix_f":
        return harmonix_f_cost(config, n_patches=n_patches)
    if model == "harmonix_s":
        return harmonix_s_cost(config)
    if model == "harmonizer":
        return harmonizer_cost(config, n_patches=n_patches)
    raise ValueError(f"unknown model {model!r}")


def samples_per_s_at_mfu(*, flops_per_sample: float, mfu: float = 0.4,
                         peak: float = H100_BF16_DENSE_PEAK) -> float:
    """Samples per second one GPU consumes at ``mfu`` of ``peak`` FLOP/s."""
    return mfu * peak / flops_per_sample
