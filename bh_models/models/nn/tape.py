"""TAPE: temporal adaptive patch embedding (Dong et al. 2025), after FlexiViT.

A patch always spans the same duration tau, so a run with repetition time TR
is cut into patches of k = round(tau / TR) frames. One linear patch embedding is
learned at the base patch size k0 (48 frames at TR 0.735 s). For any other k its
weights are resized with FlexiViT's pseudo-inverse (PI) resize (Beyer et al.
2023): if ``R_k`` (k x k0) resamples a length-k0 patch to length k, the resized
weights solve ``<x, w_k0> = <R_k x, w_k>`` in the least-squares sense, giving
``w_k = pinv(R_k^T) w_k0``. Tokens of the same signal then agree across TRs,
whereas naively interpolating the weights changes their norm by k / k0.

``R_k`` is the authors' operator (``libs/flex_patch_embed.py`` of the release):
PyTorch's anti-aliased **bicubic** resize (``F.interpolate(mode="bicubic",
antialias=True, align_corners=False)``; Keys' cubic kernel with a = -0.5, its
support widened by k0 / k when downsampling) of each one-hot basis vector.
``pinv(R_k^T)`` depends only on (k0, k), so it is computed once per k and cached
(float64 here; the release recomputes it in float32 at every forward, which
differs from ours by float32 rounding only). Bilinear resizing is not offered: measured
on band-limited signals it was no better at keeping tokens consistent across
TRs (``tests/models/test_tape.py`` prints both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__desc__ = (
    "fMRI patches were embedded with TAPE (Dong et al. 2025): a linear patch embedding "
    "learned at {base_patch} frames, resized to each sample's patch size k with the "
    "pseudo-inverse resize of FlexiViT (Beyer et al. 2023; bicubic, anti-aliased resampling, as "
    "in the authors' release)."
)


RESIZE_MODE = "bicubic"


def resize_matrix(*, source: int, target: int, mode: str = RESIZE_MODE) -> Tensor:
    """Matrix of the 1-D resampling from ``source`` to ``target`` samples.

    Anti-aliased bicubic interpolation, as the authors' TAPE (a cubic filter
    widened when downsampling); anti-aliasing matters: without it a factor-3
    downsampling just drops two frames in three. ``mode="bilinear"`` is kept for
    the comparison in the tests and the benchmark only.

    Returns
    -------
    Tensor
        ``(target, source)`` float64 ``R`` with ``resize(x) = R @ x``.
    """
    basis = torch.eye(source, dtype=torch.float64)[:, None, None, :]  # (source, 1, 1, source)
    resized = F.interpolate(basis, size=(1, target), mode=mode, antialias=True, align_corners=False)
    return resized[:, 0, 0, :].T.contiguous()  # (target, source)


def pinv_resize_operator(*, base_patch: int, patch: int) -> Tensor:
    """``pinv(R^T)``: maps base weights ``(.., k0)`` to resized weights ``(.., k)``.

    Returns
    -------
    Tensor
        ``(patch, base_patch)`` float64; ``w_k = P @ w_k0`` for a weight column.
    """
    matrix = resize_matrix(source=base_patch, target=patch)  # (k, k0)
    return torch.linalg.pinv(matrix.T)  # (k, k0)


def naive_resize_weight(weight: Tensor, patch: int) -> Tensor:
    """Baseline the tests compare against: interpolate the kernel itself.

    Parameters
    ----------
    weight : Tensor
        ``(D, k0)`` base weights.
    patch : int
        Target patch size k.

    Returns
    -------
    Tensor
        ``(D, k)``: ``R_k`` applied to every kernel row (no pseudo-inverse).
    """
    matrix = resize_matrix(source=weight.shape[1], target=patch).to(weight)  # (k, k0)
    return weight @ matrix.T  # (D, k)


class TemporalAdaptivePatchEmbed(nn.Module):
    """Linear patch embedding of ROI time series with a per-sample patch size.

    Parameters
    ----------
    base_patch : int
        k0, the patch size whose weights are learned.
    embed_dim : int
        Output width D.
    """

    def __init__(self, *, base_patch: int, embed_dim: int) -> None:
        super().__init__()
        self.base_patch = base_patch
        self.weight = nn.Parameter(torch.empty(embed_dim, base_patch))  # (D, k0)
        self.bias = nn.Parameter(torch.empty(embed_dim))
        # nn.Linear's default initialisation (the authors' Conv2d patch embedding uses the same).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / math.sqrt(base_patch), 1 / math.sqrt(base_patch))
        # k -> pinv(R_k^T) (k, k0), float64 on CPU; tensors on other devices are
        # cached alongside under (k, device, dtype). Not a buffer: it is derived.
        self._operators: dict[tuple, Tensor] = {}

    def operator(self, patch: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Cached ``pinv(R_k^T)`` for patch size ``patch`` on ``device``."""
        key = (patch, str(device), dtype)
        if key not in self._operators:
            cpu_key = (patch, "cpu", torch.float64)
            if cpu_key not in self._operators:
                self._operators[cpu_key] = pinv_resize_operator(base_patch=self.base_patch, patch=patch)
            self._operators[key] = self._operators[cpu_key].to(device=device, dtype=dtype)
        return self._operators[key]

    def weight_for(self, patch: int) -> Tensor:
        """Embedding weights for patch size ``patch``: ``(D, k)``."""
        if patch == self.base_patch:
            return self.weight
        operator = self.operator(patch, device=self.weight.device, dtype=self.weight.dtype)  # (k, k0)
        return self.weight @ operator.T  # (D, k0) @ (k0, k) -> (D, k)

    def forward(self, x: Tensor, *, patch: int, n_patches: int) -> Tensor:
        """Embed samples that share one patch size.

        Parameters
        ----------
        x : Tensor
            ``(B, R, T)`` ROI time series, ``T >= n_patches * patch``.
        patch : int
            Patch size k of these samples.
        n_patches : int
            Patches to embed per ROI (frames after ``n_patches * patch`` are ignored).

        Returns
        -------
        Tensor
            ``(B, R, n_patches, D)``.
        """
        batch, n_rois, _ = x.shape
        patches = x[..., : n_patches * patch].reshape(batch, n_rois, n_patches, patch)  # (B, R, P, k)
        return F.linear(patches, self.weight_for(patch), self.bias)  # (B, R, P, D)

    def embed_mixed(self, x: Tensor, *, patch: Tensor, n_patches: int) -> Tensor:
        """Embed a batch whose samples have different patch sizes.

        Parameters
        ----------
        x : Tensor
            ``(B, R, T)``, each sample zero-padded to the batch's longest.
        patch : Tensor
            ``(B,)`` int, each sample's k.
        n_patches : int
            Patches per ROI on the common token grid.

        Returns
        -------
        Tensor
            ``(B, R, n_patches, D)``: every sample on the same token grid.
        """
        sizes = patch.tolist()
        groups: dict[int, list[int]] = {}
        for row, size in enumerate(sizes):
            groups.setdefault(int(size), []).append(row)
        parts, order = [], []
        for size in sorted(groups):
            rows = groups[size]
            index = torch.tensor(rows, device=x.device)
            parts.append(self.forward(x.index_select(0, index), patch=size, n_patches=n_patches))
            order.extend(rows)
        stacked = torch.cat(parts, dim=0)  # (B, R, P, D), grouped by k
        inverse = torch.argsort(torch.tensor(order, device=x.device))
        return stacked.index_select(0, inverse)  # (B, R, P, D), original order
