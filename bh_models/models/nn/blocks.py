"""Transformer building blocks shared by harmonix-F, harmonix-S and the Harmonizer.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`
(SDPA) with a key-padding mask, so padded tokens never contribute to a real
token and no flash-attn build is needed: SDPA picks a fused kernel on CPU and
on GPU by itself. As in the authors' flash-attention "unpadding", a padded
token is also dropped as a *query*: its attention output is zero (the output
projection, residual and MLP still run on it), so its output depends on its own
input only. Positional embeddings are fixed sin-cos tables, computed on
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
    "whose attention drops padded tokens as keys and queries (PyTorch scaled-dot-product attention), "
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


def sincos_grid(*, dim: int, grid: tuple[int, ...], channel_axes: tuple[int, ...] | None = None) -> Tensor:
    """Sine-cosine embedding of a regular grid, one block of channels per axis.

    Parameters
    ----------
    dim : int
        Embedding width, shared out over the axes (even blocks, the last block takes the rest).
    grid : tuple of int
        Grid size per axis, e.g. ``(n_rois, n_patches)`` or ``(gx, gy, gz)``.
    channel_axes : tuple of int, optional
        The axis whose coordinate fills each channel block, in channel order; default
        ``(0, 1, ..)``. The MAE release's 3-D table is ``(1, 0, 2)`` (its ``meshgrid`` uses
        'xy' indexing, which swaps the first two axes).

    Returns
    -------
    Tensor
        ``(prod(grid), dim)`` float32, rows in C order of the grid (last axis fastest).
    """
    n_axes = len(grid)
    channel_axes = tuple(range(n_axes)) if channel_axes is None else tuple(channel_axes)
    if sorted(channel_axes) != list(range(n_axes)):
        raise ValueError(f"channel_axes {channel_axes} is not a permutation of the {n_axes} axes")
    block = 2 * (dim // (2 * n_axes))
    widths = [block] * (n_axes - 1) + [dim - block * (n_axes - 1)]
    coords = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    parts = [
        sincos_1d(dim=width, positions=coords[axis].reshape(-1))  # (prod(grid), width)
        for width, axis in zip(widths, channel_axes)
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
        if key_mask is not None:  # padded queries: zero attention output, as flash-attn's unpadding
            out = out.masked_fill(~key_mask[..., None], 0.0)
        return self.proj(out)


class Mlp(nn.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch per sample with probability ``rate`` (scaled by 1/(1-rate))."""
    if rate == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (optional stochastic depth)."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x), key_mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def make_blocks(*, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                drop_path: float = 0.0) -> nn.ModuleList:
    """``depth`` blocks; stochastic depth rising linearly from 0 to ``drop_path`` (timm)."""
    rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path] * depth
    return nn.ModuleList([Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path=rate) for rate in rates])


def run_blocks(blocks: nn.ModuleList, x: Tensor, key_mask: Tensor | None = None, *,
               grad_checkpointing: bool = False) -> Tensor:
    """Apply ``blocks`` in turn; ``key_mask`` ``(B, N)`` bool, True = real token (None: all real)."""
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None  # lets SDPA use its fastest (flash) kernel
    for block in blocks:
        if grad_checkpointing and block.training and torch.is_grad_enabled():
            x = checkpoint(block, x, key_mask, use_reentrant=False)
        else:
            x = block(x, key_mask)
    return x


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
        self.blocks = make_blocks(dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B, N, C)``; ``key_mask``: ``(B, N)`` bool or None (all real)."""
        return self.norm(run_blocks(self.blocks, x, key_mask, grad_checkpointing=self.grad_checkpointing))


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


def rescale_residual_branches(blocks: nn.ModuleList) -> None:
    """Divide block ``l``'s (1-based) attention output and MLP output weights by ``sqrt(2 l)`` (I-JEPA's init)."""
    with torch.no_grad():
        for layer, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


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
