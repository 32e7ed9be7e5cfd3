"""Transformer building blocks shared by harmonix-F, harmonix-S and the Harmonizer.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`
(SDPA) with a key-padding mask, so padded tokens never contribute to a real
token and no flash-attn build is needed: SDPA picks a fused kernel on CPU and
on GPU by itself. Positional embeddings are fixed sin-cos tables, computed on
demand for any grid, so a model is not tied to one sequence length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__desc__ = (
    "All models are pre-norm Transformers (Vaswani et al. 2017; Dosovitskiy et al. 2021) "
    "whose attention masks padded tokens out as keys (PyTorch scaled-dot-product attention), "
    "with fixed sine-cosine positional embeddings."
)

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02


def sincos_1d(*, dim: int, positions: Tensor) -> Tensor:
    """Sine-cosine embedding of scalar positions (Vaswani et al. 2017).

    Parameters
    ----------
    dim : int
        Embedding width. An odd width gets one zero column at the end.
    positions : Tensor
        Positions, shape ``(N,)``; need not be integers.

    Returns
    -------
    Tensor
        ``(N, dim)`` float32: ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000^(-2i/dim)``.
    """
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))  # (half,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, half)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, 2 * half)
    if table.shape[1] < dim:
        table = F.pad(table, (0, dim - table.shape[1]))  # (N, dim)
    return table.float()


def sincos_grid(*, dim: int, grid: tuple[int, ...]) -> Tensor:
    """Sine-cosine embedding of a regular grid, one block of channels per axis.

    Parameters
    ----------
    dim : int
        Embedding width, shared out over the axes (even blocks, the last axis takes the rest).
    grid : tuple of int
        Grid size per axis, e.g. ``(n_rois, n_patches)`` or ``(gx, gy, gz)``.

    Returns
    -------
    Tensor
        ``(prod(grid), dim)`` float32, rows in C order of the grid (last axis fastest).
    """
    n_axes = len(grid)
    block = 2 * (dim // (2 * n_axes))
    widths = [block] * (n_axes - 1) + [dim - block * (n_axes - 1)]
    coords = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    parts = [
        sincos_1d(dim=width, positions=axis_coords.reshape(-1))  # (prod(grid), width)
        for width, axis_coords in zip(widths, coords)
    ]
    return torch.cat(parts, dim=1)  # (prod(grid), dim)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Reference attention ``softmax(QK^T / sqrt(d)) V`` that materialises the score matrix.

    Used by the tests and the benchmark as the baseline that SDPA replaces.

    Parameters
    ----------
    q, k, v : Tensor
        ``(B, H, N, d)``.
    key_mask : Tensor, optional
        ``(B, N)`` bool, True = real key.

    Returns
    -------
    Tensor
        ``(B, H, N, d)``.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention with an optional key-padding mask."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B, N, C)``; ``key_mask``: ``(B, N)`` bool, True = real token."""
        batch, n_tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, n_tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
        # A (B, 1, 1, N) boolean mask broadcasts over heads and queries: padded
        # keys get zero weight for every query.
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(batch, n_tokens, width)  # (B, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block` followed by a final LayerNorm.

    Parameters
    ----------
    dim, depth, num_heads, mlp_ratio
        Width, number of blocks, heads per block, MLP expansion.
    grad_checkpointing : bool
        Recompute block activations in the backward pass (saves GPU memory at
        the full sequence length of 8,528 tokens, costs about a third more compute).
    """

    def __init__(
        self, *, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, grad_checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B, N, C)``; ``key_mask``: ``(B, N)`` bool or None (all real)."""
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None  # lets SDPA use its fastest (flash) kernel
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, key_mask, use_reentrant=False)
            else:
                x = block(x, key_mask)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms (ViT/I-JEPA recipe)."""
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(child.weight, std=INIT_STD)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """Pick tokens per sample: ``tokens`` ``(B, N, C)``, ``index`` ``(B, L)`` -> ``(B, L, C)``."""
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def masked_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens per sample.

    Parameters
    ----------
    values : Tensor
        ``(B, L)`` per-token values (or ``(B, L, C)``, averaged over tokens only).
    mask : Tensor
        ``(B, L)`` bool, True = real token.

    Returns
    -------
    Tensor
        ``(B,)`` (or ``(B, C)``); zero for a sample without real tokens.
    """
    keep = mask if values.ndim == 2 else mask[..., None]  # (B, L) or (B, L, 1)
    # where() rather than a product: a NaN in a padded slot must not leak into the mean.
    total = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=1)
    count = mask.sum(dim=1).clamp_min(1).to(values.dtype)
    return total / (count if values.ndim == 2 else count[:, None])
