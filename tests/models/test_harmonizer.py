"""Harmonizer: hub tokens only feed the decoders; padding and missing modalities are invisible."""

from __future__ import annotations

import pytest
import torch

from bh_models.models.nn.configs import model_config
from bh_models.models.nn.harmonizer import Harmonizer

N_ROIS, N_PATCHES, S_GRID, DIM_S, DIM_F = 6, 3, (2, 2, 2), 16, 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model() -> Harmonizer:
    torch.manual_seed(0)
    config = model_config(model="harmonizer", size="tiny", overrides={
        "dim_s": DIM_S, "dim_f": DIM_F, "s_grid": S_GRID, "n_rois": N_ROIS,
    })
    return Harmonizer(config)


def make_latents(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    z_s = torch.randn(batch, 8, DIM_S, generator=generator)
    s_mask = torch.ones(batch, 8, dtype=torch.bool)
    z_f = torch.randn(batch, N_ROIS * N_PATCHES, DIM_F, generator=generator)
    patch_mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]][:batch])
    f_mask = patch_mask[:, None, :].expand(batch, N_ROIS, N_PATCHES).reshape(batch, -1)  # ROI-major
    return z_s, s_mask, z_f, f_mask


def test_shapes_and_hub_embedding() -> None:
    model = make_model()
    z_s, s_mask, z_f, f_mask = make_latents()
    hub = model.fuse(z_s, s_mask, z_f, f_mask)
    assert hub.shape == (3, 8, 64)
    assert model.hub_embedding(z_s, s_mask, z_f, f_mask).shape == (3, 64)
    loss, metrics = model(z_s, s_mask, z_f, f_mask)
    loss.backward()
    assert metrics["samples_s"] == 3 and metrics["samples_f"] == 3
    assert model.hub_tokens.grad is not None and model.decoder_f.pred.weight.grad is not None


def test_padded_fmri_tokens_change_neither_hubs_nor_loss() -> None:
    model = make_model()
    z_s, s_mask, z_f, f_mask = make_latents()
    loss, _ = model(z_s, s_mask, z_f, f_mask)
    hub = model.fuse(z_s, s_mask, z_f, f_mask)
    noisy = z_f.clone()
    noisy[~f_mask] = 1e3 * torch.randn(int((~f_mask).sum()), DIM_F)  # inputs AND targets at padded tokens
    assert torch.allclose(model.fuse(z_s, s_mask, noisy, f_mask), hub, atol=1e-5)
    assert torch.allclose(model(z_s, s_mask, noisy, f_mask)[0], loss, atol=1e-6)


def test_decoders_see_the_hub_tokens_only() -> None:
    """The loss is the error of reconstructions computed from the hub tokens and masks alone."""
    model = make_model()
    z_s, s_mask, z_f, f_mask = make_latents()
    hub = model.fuse(z_s, s_mask, z_f, f_mask)
    pred_s, pred_f = model.reconstruct(hub, s_mask, f_mask)
    other_s, other_f = torch.randn_like(z_s), torch.randn_like(z_f)
    # Same hubs, different encoder tokens anywhere: identical reconstructions.
    again_s, again_f = model.reconstruct(hub, s_mask, f_mask)
    assert torch.equal(pred_s, again_s) and torch.equal(pred_f, again_f)
    token_f = ((pred_f - z_f) ** 2).mean(-1)
    expected_f = ((token_f * f_mask).sum(1) / f_mask.sum(1)).mean()
    expected_s = ((pred_s - z_s) ** 2).mean()
    loss, metrics = model(z_s, s_mask, z_f, f_mask)
    assert torch.allclose(loss, expected_s + expected_f, atol=1e-5)
    assert abs(metrics["loss_f"] - float(expected_f.detach())) < 1e-5
    # Changing the inputs changes the loss only through the hubs: feeding other tokens
    # while forcing the old hubs reproduces the old reconstructions.
    model.fuse = lambda *args: hub  # type: ignore[method-assign]
    loss_other, _ = model(other_s, s_mask, other_f, f_mask)
    token_other = ((pred_f - other_f) ** 2).mean(-1)
    expected_other = ((pred_s - other_s) ** 2).mean() + ((token_other * f_mask).sum(1) / f_mask.sum(1)).mean()
    assert torch.allclose(loss_other, expected_other, atol=1e-5)


def test_unpaired_subject_is_masked_out() -> None:
    """A subject without T1: its T1 slot is invisible and it adds nothing to loss_s."""
    model = make_model()
    z_s, s_mask, z_f, f_mask = make_latents()
    s_mask[1] = False  # subject 1 has fMRI only
    loss, metrics = model(z_s, s_mask, z_f, f_mask)
    assert metrics["samples_s"] == 2
    garbage = z_s.clone()
    garbage[1] = 1e3 * torch.randn(8, DIM_S)
    loss_garbage, metrics_garbage = model(garbage, s_mask, z_f, f_mask)
    assert torch.allclose(loss_garbage, loss, atol=1e-6)
    # Samples do not interact, so loss_s equals the mean over the two paired subjects alone.
    keep = torch.tensor([0, 2])
    _, paired_metrics = model(z_s[keep], s_mask[keep], z_f[keep], f_mask[keep])
    assert abs(paired_metrics["loss_s"] - metrics["loss_s"]) < 1e-5


def test_subject_with_t1_only_gets_a_finite_embedding() -> None:
    model = make_model()
    z_s, s_mask, z_f, f_mask = make_latents()
    f_mask[0] = False  # subject 0 has T1 only
    embedding = model.hub_embedding(z_s, s_mask, z_f, f_mask)
    loss, metrics = model(z_s, s_mask, z_f, f_mask)
    assert torch.isfinite(embedding).all() and torch.isfinite(loss)
    assert metrics["samples_f"] == 2
