"""TAPE: pseudo-inverse weight resizing keeps patch embeddings consistent across TR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bh_models.models.nn import tape as tape_module
from bh_models.models.nn.tape import (
    TemporalAdaptivePatchEmbed,
    naive_resize_weight,
    pinv_resize_operator,
    resize_matrix,
)

TAU = 35.28  # seconds per patch: 48 frames at TR 0.735 s
N_ROIS, N_PATCHES, EMBED_DIM = 20, 10, 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def band_limited_signal(times: np.ndarray, seed: int) -> np.ndarray:
    """Per-ROI sums of 12 cosines in the resting-state band 0.01-0.1 Hz: (ROIs, T)."""
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.01, 0.1, size=(N_ROIS, 12, 1))
    amps = rng.normal(size=(N_ROIS, 12, 1))
    phases = rng.uniform(0, 2 * np.pi, size=(N_ROIS, 12, 1))
    return (amps * np.cos(2 * np.pi * freqs * times[None, None, :] + phases)).sum(axis=1)


def sampled(tr: float, patch: int, seed: int = 0) -> torch.Tensor:
    times = np.arange(N_PATCHES * patch) * tr
    signal = band_limited_signal(times, seed) / 2.5  # roughly unit variance, like robust-scaled data
    return torch.tensor(signal, dtype=torch.float32)[None]  # (1, R, T)


def embed(tape: TemporalAdaptivePatchEmbed, x: torch.Tensor, weight: torch.Tensor, patch: int) -> torch.Tensor:
    patches = x.reshape(1, N_ROIS, N_PATCHES, patch)  # (1, R, P, k)
    return F.linear(patches, weight, tape.bias)  # (1, R, P, D)


def similarity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(a, b, dim=-1).mean().item()
    norm_ratio = (a.norm(dim=-1) / b.norm(dim=-1)).mean().item()
    return cosine, norm_ratio


@pytest.fixture()
def tape() -> TemporalAdaptivePatchEmbed:
    torch.manual_seed(0)
    return TemporalAdaptivePatchEmbed(base_patch=48, embed_dim=EMBED_DIM)


def test_pi_resize_keeps_embeddings_consistent_across_tr(tape: TemporalAdaptivePatchEmbed) -> None:
    fast = sampled(0.735, 48)  # k = 48 at TR 0.735 s
    slow = sampled(1.47, 24)  # k = 24 at TR 1.47 s: same 35.28 s per patch
    with torch.no_grad():
        reference = tape(fast, patch=48, n_patches=N_PATCHES)  # (1, R, P, D)
        pi = tape(slow, patch=24, n_patches=N_PATCHES)
        naive = embed(tape, slow, naive_resize_weight(tape.weight, 24), 24)
    pi_cos, pi_norm = similarity(pi, reference)
    naive_cos, naive_norm = similarity(naive, reference)
    print(f"\nk=48 @0.735 s vs k=24 @1.47 s: PI-resize cosine {pi_cos:.4f} (norm ratio {pi_norm:.3f}); "
          f"naive interpolation cosine {naive_cos:.4f} (norm ratio {naive_norm:.3f})")
    assert pi_cos >= 0.95
    assert naive_cos < pi_cos - 0.01
    # The naive kernel sums half as many frames: its tokens shrink by about k / k0.
    assert abs(pi_norm - 1) < 0.1
    assert naive_norm < 0.6


def test_pi_resize_at_slower_trs_beats_naive(tape: TemporalAdaptivePatchEmbed) -> None:
    """Report the other TRs of the augmentation (factors 3 and 4 of 0.735 s)."""
    reference = tape(sampled(0.735, 48), patch=48, n_patches=N_PATCHES).detach()
    for tr, patch in ((2.205, 16), (2.94, 12)):
        slow = sampled(tr, patch)
        with torch.no_grad():
            pi_cos, pi_norm = similarity(tape(slow, patch=patch, n_patches=N_PATCHES), reference)
            naive_cos, naive_norm = similarity(
                embed(tape, slow, naive_resize_weight(tape.weight, patch), patch), reference
            )
        print(f"\nk=48 vs k={patch} @{tr} s: PI cosine {pi_cos:.4f} (norm {pi_norm:.3f}); "
              f"naive cosine {naive_cos:.4f} (norm {naive_norm:.3f})")
        assert pi_cos > naive_cos
        assert abs(pi_norm - 1) < abs(naive_norm - 1)


def test_upsampling_is_exact() -> None:
    """For k > k0, R^T has full row rank, so <x, w_k0> = <R x, w_k> holds exactly."""
    torch.manual_seed(1)
    tape = TemporalAdaptivePatchEmbed(base_patch=48, embed_dim=8).double()
    x = torch.randn(5, 48, dtype=torch.float64)
    resized = (resize_matrix(source=48, target=96) @ x.T).T  # (5, 96)
    base = x @ tape.weight.T
    via_pi = resized @ tape.weight_for(96).T
    assert torch.allclose(base, via_pi, atol=1e-10)


def test_resize_matrix_preserves_constants() -> None:
    for target in (12, 16, 24, 49, 96):
        matrix = resize_matrix(source=48, target=target)
        assert matrix.shape == (target, 48)
        assert torch.allclose(matrix.sum(dim=1), torch.ones(target, dtype=torch.float64), atol=1e-9)


def test_operator_is_cached_per_patch_size(tape: TemporalAdaptivePatchEmbed, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = tape_module.pinv_resize_operator

    def counting(**kwargs: int) -> torch.Tensor:
        calls.append(kwargs["patch"])
        return original(**kwargs)

    monkeypatch.setattr(tape_module, "pinv_resize_operator", counting)
    for _ in range(3):
        tape.weight_for(24)
        tape.weight_for(16)
    tape.weight_for(48)  # the base size needs no operator
    assert calls == [24, 16]
    assert torch.equal(tape.weight_for(48), tape.weight)
    assert torch.allclose(tape.operator(24, device=torch.device("cpu"), dtype=torch.float64),
                          pinv_resize_operator(base_patch=48, patch=24))


def test_gradients_reach_base_weights_through_resize(tape: TemporalAdaptivePatchEmbed) -> None:
    out = tape(torch.randn(2, 3, 48), patch=16, n_patches=3)
    out.sum().backward()
    assert tape.weight.grad is not None and tape.weight.grad.abs().sum() > 0


def test_mixed_batch_matches_per_sample_embedding(tape: TemporalAdaptivePatchEmbed) -> None:
    torch.manual_seed(2)
    patches = torch.tensor([24, 48, 16, 24])
    x = torch.zeros(4, 5, 3 * 48)
    for row, k in enumerate(patches.tolist()):
        x[row, :, : 3 * k] = torch.randn(5, 3 * k)
    mixed = tape.embed_mixed(x, patch=patches, n_patches=3)
    assert mixed.shape == (4, 5, 3, EMBED_DIM)
    for row, k in enumerate(patches.tolist()):
        alone = tape(x[row: row + 1], patch=k, n_patches=3)
        assert torch.allclose(mixed[row: row + 1], alone, atol=1e-6)


def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (support [-2, 2])."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def antialiased_bicubic_matrix(source: int, target: int) -> np.ndarray:
    """The (target, source) matrix of an anti-aliased bicubic resize, written from its definition.

    Output sample i sits at input coordinate c = (i + 0.5) * s, s = source / target. When
    downsampling (s > 1) the kernel is stretched by s (low-pass before resampling); its
    support covers input samples j with |j + 0.5 - c| < 2 * max(s, 1); weights are
    normalised to sum to 1 (PIL/PyTorch "antialias" convention, a = -0.5).
    """
    scale = source / target
    stretch = max(scale, 1.0)
    matrix = np.zeros((target, source))
    for i in range(target):
        centre = (i + 0.5) * scale
        lo = max(int(centre - 2 * stretch + 0.5), 0)
        hi = min(int(centre + 2 * stretch + 0.5), source)
        j = np.arange(lo, hi)
        weights = keys_cubic((j + 0.5 - centre) / stretch)
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix


@pytest.mark.parametrize("target", [12, 16, 18, 21, 24, 36, 48, 49, 96])
def test_resize_is_the_papers_antialiased_bicubic_operator(target: int) -> None:
    """R_k equals an independent construction of the anti-aliased bicubic resize, and the
    resized weights are pinv(R_k^T) w (the release's FlexiPatchEmbed)."""
    expected = antialiased_bicubic_matrix(48, target)
    assert np.allclose(resize_matrix(source=48, target=target).numpy(), expected, atol=1e-12)
    weight = torch.randn(8, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(target))
    resized = weight.numpy() @ np.linalg.pinv(expected.T).T  # (D, k)
    tape = TemporalAdaptivePatchEmbed(base_patch=48, embed_dim=8).double()
    with torch.no_grad():
        tape.weight.copy_(weight)
    assert np.allclose(tape.weight_for(target).detach().numpy(), resized, atol=1e-9)


def test_bicubic_resizing_keeps_tokens_at_least_as_consistent_as_bilinear(tape: TemporalAdaptivePatchEmbed) -> None:
    """The measurement behind dropping the bilinear operator: per TR, the bicubic PI-resize gives
    tokens at least as close (cosine, norm) to the k0 = 48 tokens of the same signal."""
    reference = tape(sampled(0.735, 48), patch=48, n_patches=N_PATCHES).detach()
    for tr, patch in ((1.47, 24), (2.205, 16), (2.94, 12)):
        slow = sampled(tr, patch)
        scores = {}
        for mode in ("bilinear", "bicubic"):
            operator = torch.linalg.pinv(resize_matrix(source=48, target=patch, mode=mode).T).float()  # (k, k0)
            scores[mode] = similarity(embed(tape, slow, tape.weight.detach() @ operator.T, patch), reference)
        print(f"\nk={patch} @{tr} s: bicubic cosine {scores['bicubic'][0]:.4f} (norm {scores['bicubic'][1]:.3f}), "
              f"bilinear {scores['bilinear'][0]:.4f} (norm {scores['bilinear'][1]:.3f})")
        assert scores["bicubic"][0] >= scores["bilinear"][0] - 1e-4
        assert abs(scores["bicubic"][1] - 1) <= abs(scores["bilinear"][1] - 1)
