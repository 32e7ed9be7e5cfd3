"""JEPA context and target masks of harmonix-F over the ROI x time-patch token grid.

Two schemes (``HarmonixFConfig.masking``):

``brain_jepa`` (default; the scheme of the paper's fMRI encoder, which descends from
Brain-JEPA, Dong et al. 2024, ``src/masks/spatialtemporal_multiblock.py``)
    Per sample, on its ``W`` real patches of the ``H`` ROIs:

    * an **observation block**: a random subset of ``h_e`` ROIs (not a contiguous
      range: in Schaefer order a range is one network of one hemisphere) x a run of
      ``w_e`` patches starting at ``t0``, drawn from ``[0, W - w_e)`` (so, as in
      Brain-JEPA, the last patch is never observed);
    * a **cross-ROI target** (alpha): another random subset of ``h_a`` ROIs x a run of
      ``w_a`` patches inside the observation run; the context loses *every* token of
      the alpha ROIs;
    * **cross-time targets** on both edges (right, then left): with
      ``u ~ U(cross_time_roi_scale)``, ``int(|G1| u)`` ROIs of ``G1`` = observed
      alpha ROIs (beta) and ``int(|G2| u)`` of the other ROIs ``G2`` (gamma) x
      ``n_t`` edge patches drawn from the first (left) or last (right) ``e`` patches;
      the context loses those patches entirely (a double-cross target for beta);
    * context = observation block minus the alpha ROIs minus the edge patches.

    The block sizes (ROI and time fractions of alpha and of the observation block)
    are shared by the batch, as in Brain-JEPA; the edge sizes are drawn per sample.
    Targets are listed alpha, right, left (duplicates are kept, as in Brain-JEPA).

    Generalisation of Brain-JEPA's fixed ``W = 10`` (it hard-codes the edge patches as
    ``{0, 1, 2}`` and ``{7, 8, 9}``): the edge width is ``e = floor(edge_fraction * W)``
    (``edge_fraction = 0.3`` gives 3 of 10), ``n_t = min(e, int(W u_t))``, and sizes are
    clamped so that every sample keeps a context on short samples
    (``1 <= w_e <= W - 1`` when ``W > 1``; ``1 <= w_a <= w_e``). With ``W = 10`` and the
    Brain-JEPA settings the draws are distributed exactly as Brain-JEPA's. Samples of one
    batch may have different ``W`` (TAPE): fractions are shared, sizes follow each ``W``.
    Brain-JEPA truncates every sample's index lists to the batch minimum; here they are
    padded with a validity mask instead, so no drawn token is dropped.

``block`` (this project's earlier I-JEPA-style scheme, kept as an option)
    ``target_blocks`` target blocks, each a contiguous ROI range x a contiguous run of
    patches; context = the real tokens outside every block.

All randomness comes from the CPU generator passed in (exact resume), never from
the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bh_models.models.nn.configs import HarmonixFConfig

__desc__ = (
    "JEPA masks followed Brain-JEPA (Dong et al. 2024): per sample, an observation block of randomly chosen "
    "ROIs x a run of patches, a cross-ROI target (other random ROIs, whose tokens were all removed from the "
    "context) and cross-time targets on the first and last patches (removed from the context), block sizes "
    "shared within a batch."
)

MASKING_SCHEMES = ("brain_jepa", "block")


@dataclass
class JepaMasks:
    """Flat token indices (``r * P + p``) of the context and the targets, batch-padded."""

    context_index: Tensor  # (B, Lc) int64
    context_valid: Tensor  # (B, Lc) bool, False = batch padding
    target_index: Tensor  # (B, Lt) int64
    target_valid: Tensor  # (B, Lt) bool

    def to(self, device: torch.device) -> JepaMasks:
        return JepaMasks(*(t.to(device) for t in (self.context_index, self.context_valid,
                                                   self.target_index, self.target_valid)))


def _pad_index_lists(lists: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack variable-length index lists: ``(B, L_max)`` indices (0-padded) and validity."""
    length = max(1, max(len(item) for item in lists))
    index = torch.zeros(len(lists), length, dtype=torch.long)
    valid = torch.zeros(len(lists), length, dtype=torch.bool)
    for row, item in enumerate(lists):
        index[row, : len(item)] = item
        valid[row, : len(item)] = True
    return index, valid


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, high: int) -> int:
    """Uniform integer in ``[0, high)`` (``high >= 1``)."""
    return int(torch.randint(0, max(1, high), (1,), generator=generator))


@dataclass
class BrainJepaSample:
    """One sample's draw (0-based ROI and patch numbers), for inspection and tests."""

    observed_rois: Tensor  # (h_e,) int64, in draw order
    observed_patches: tuple[int, int]  # [t0, t0 + w_e)
    alpha_rois: Tensor  # (h_a,)
    alpha_patches: tuple[int, int]  # inside observed_patches
    edge_targets: list[tuple[Tensor, Tensor]]  # [(rois, patches)] right then left
    context: Tensor  # (R, P) bool
    targets: list[Tensor]  # flat indices: alpha, right, left


def batch_fractions(*, config: HarmonixFConfig, generator: torch.Generator) -> dict[str, float]:
    """Block-size fractions shared by a batch (alpha ROIs and patches, observation ROIs and patches)."""
    return {
        "alpha_rois": _uniform(generator, *config.cross_roi_roi_scale),
        "alpha_patches": _uniform(generator, *config.cross_roi_time_scale),
        "observed_rois": _uniform(generator, *config.observation_roi_scale),
        "observed_patches": _uniform(generator, *config.observation_time_scale),
    }


def brain_jepa_sample(
    *, n_rois: int, real_patches: int, grid_patches: int, fractions: dict[str, float], config: HarmonixFConfig,
    generator: torch.Generator,
) -> BrainJepaSample:
    """One sample's observation block, cross-ROI and cross-time targets and context (module doc)."""
    H, W = n_rois, real_patches  # noqa: N806 - the paper's grid names
    h_alpha = min(H - 1, max(1, int(H * fractions["alpha_rois"])))
    h_obs = min(H - 1, max(1, int(H * fractions["observed_rois"])))
    w_obs = 1 if W == 1 else min(W - 1, max(1, int(W * fractions["observed_patches"])))
    w_alpha = min(w_obs, max(1, int(W * fractions["alpha_patches"])))

    observed_rois = torch.randperm(H, generator=generator)[:h_obs]
    t0 = _randint(generator, W - w_obs)
    alpha_rois = torch.randperm(H, generator=generator)[:h_alpha]
    offset = _randint(generator, w_obs - w_alpha)
    alpha_start = t0 + offset

    observed = torch.zeros(H, dtype=torch.bool)
    observed[observed_rois] = True
    alpha = torch.zeros(H, dtype=torch.bool)
    alpha[alpha_rois] = True
    group1 = (observed & alpha).nonzero().squeeze(1)  # beta ROIs come from here
    group2 = (~(observed & alpha)).nonzero().squeeze(1)  # gamma ROIs

    context = torch.zeros(H, grid_patches, dtype=torch.bool)
    context[observed, t0: t0 + w_obs] = True
    context[alpha] = False
    target_alpha = torch.zeros(H, grid_patches, dtype=torch.bool)
    target_alpha[alpha, alpha_start: alpha_start + w_alpha] = True
    targets = [target_alpha.reshape(-1).nonzero().squeeze(1)]

    edge = int(config.edge_fraction * W)
    edge_targets, excluded = [], torch.zeros(grid_patches, dtype=torch.bool)
    for side in ("right", "left"):
        u = _uniform(generator, *config.cross_time_roi_scale)
        n1, n2 = int(len(group1) * u), int(len(group2) * u)
        n_t = min(edge, int(W * _uniform(generator, *config.cross_time_time_scale)))
        rois = torch.cat([group1[torch.randperm(len(group1), generator=generator)[:n1]],
                          group2[torch.randperm(len(group2), generator=generator)[:n2]]])
        patches = torch.randperm(max(edge, 1), generator=generator)[:n_t]
        if side == "right":
            patches = patches + (W - edge)
        target = torch.zeros(H, grid_patches, dtype=torch.bool)
        if n_t:
            target[rois[:, None], patches[None, :]] = True
            excluded[patches] = True
        edge_targets.append((rois, patches))
        targets.append(target.reshape(-1).nonzero().squeeze(1))
    if (context & ~excluded[None, :]).any():  # a short sample keeps its context: skip the exclusion otherwise
        context &= ~excluded[None, :]
    return BrainJepaSample(observed_rois=observed_rois, observed_patches=(t0, t0 + w_obs), alpha_rois=alpha_rois,
                           alpha_patches=(alpha_start, alpha_start + w_alpha), edge_targets=edge_targets,
                           context=context, targets=targets)


def sample_brain_jepa_masks(
    *, n_patches: Tensor, n_rois: int, grid_patches: int, config: HarmonixFConfig, generator: torch.Generator
) -> JepaMasks:
    """Brain-JEPA masks of a batch (see the module doc).

    Parameters
    ----------
    n_patches : Tensor
        ``(B,)`` real patches per sample (>= 1).
    n_rois : int
        ROIs per sample.
    grid_patches : int
        P, patches on the token grid (flat index ``r * P + p``).
    config : HarmonixFConfig
        The ``observation_*``, ``cross_roi_*``, ``cross_time_*`` scales and ``edge_fraction``.
    generator : torch.Generator
        CPU generator; the only source of randomness.

    Returns
    -------
    JepaMasks
    """
    fractions = batch_fractions(config=config, generator=generator)
    contexts, targets = [], []
    for real in n_patches.tolist():
        draw = brain_jepa_sample(n_rois=n_rois, real_patches=int(real), grid_patches=grid_patches,
                                 fractions=fractions, config=config, generator=generator)
        contexts.append(draw.context.reshape(-1).nonzero().squeeze(1))  # (Lc_b,) flat r * P + p
        targets.append(torch.cat(draw.targets))  # (Lt_b,)
    context_index, context_valid = _pad_index_lists(contexts)
    target_index, target_valid = _pad_index_lists(targets)
    return JepaMasks(context_index, context_valid, target_index, target_valid)


def sample_block_masks(
    *, n_patches: Tensor, n_rois: int, grid_patches: int, config: HarmonixFConfig, generator: torch.Generator
) -> JepaMasks:
    """Block masks: ``target_blocks`` ROI-range x patch-run targets, context = the rest (module doc).

    Arguments as :func:`sample_brain_jepa_masks`; uses ``target_blocks``,
    ``target_roi_fraction`` and ``target_time_fraction``.
    """
    contexts, targets = [], []
    roi_lo, roi_hi = config.target_roi_fraction
    time_lo, time_hi = config.target_time_fraction
    for real in n_patches.tolist():
        real = int(real)
        draws = torch.rand(config.target_blocks, 4, generator=generator, dtype=torch.float64)  # (blocks, 4)
        blocks = []
        for roi_u, roi_pos, time_u, time_pos in draws.tolist():
            roi_len = max(1, round((roi_lo + (roi_hi - roi_lo) * roi_u) * n_rois))
            time_len = max(1, round((time_lo + (time_hi - time_lo) * time_u) * real))
            roi_start = int(roi_pos * (n_rois - roi_len + 1))
            time_start = int(time_pos * (real - time_len + 1))
            blocks.append((roi_start, roi_len, time_start, time_len))
        while True:
            target = torch.zeros(n_rois, grid_patches, dtype=torch.bool)  # (R, P)
            for roi_start, roi_len, time_start, time_len in blocks:
                target[roi_start: roi_start + roi_len, time_start: time_start + time_len] = True
            context = torch.zeros_like(target)
            context[:, :real] = ~target[:, :real]
            if context.any() or len(blocks) == 1:
                break
            blocks.pop()  # the union covered every real token: keep fewer blocks
        contexts.append(context.reshape(-1).nonzero().squeeze(1))  # (Lc_b,) flat r * P + p
        targets.append(target.reshape(-1).nonzero().squeeze(1))  # (Lt_b,)
    context_index, context_valid = _pad_index_lists(contexts)
    target_index, target_valid = _pad_index_lists(targets)
    return JepaMasks(context_index, context_valid, target_index, target_valid)


def sample_jepa_masks(
    *, n_patches: Tensor, n_rois: int, grid_patches: int, config: HarmonixFConfig, generator: torch.Generator
) -> JepaMasks:
    """The masks of ``config.masking`` (``brain_jepa`` or ``block``)."""
    if config.masking == "brain_jepa":
        sampler = sample_brain_jepa_masks
    elif config.masking == "block":
        sampler = sample_block_masks
    else:
        raise ValueError(f"unknown masking scheme {config.masking!r}; use one of {MASKING_SCHEMES}")
    return sampler(n_patches=n_patches, n_rois=n_rois, grid_patches=grid_patches, config=config, generator=generator)
