"""harmonix-S: 3-D patchify, 75 % masking, loss on hidden patches only, volume fitting."""

from __future__ import annotations

import pytest
import torch

from bh_models.models.nn.configs import model_config
from bh_models.models.nn.harmonix_s import HarmonixS, fit_volume, grid_for_volume

IMG = (32, 48, 32)  # 2 x 3 x 2 = 12 patches of 16^3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(**overrides: object) -> HarmonixS:
    torch.manual_seed(0)
    return HarmonixS(model_config(model="harmonix_s", size="tiny", overrides={"img_size": IMG, **overrides}))


def test_patchify_groups_voxels_by_patch_in_grid_order() -> None:
    model = make_model()
    gx, gy, gz = model.config.grid
    patch_id = torch.arange(gx * gy * gz, dtype=torch.float32).reshape(gx, gy, gz)
    volume = patch_id.repeat_interleave(16, 0).repeat_interleave(16, 1).repeat_interleave(16, 2)[None, None]
    patches = model.patchify(volume)
    assert patches.shape == (1, 12, 16**3)
    assert torch.equal(patches[0], torch.arange(12, dtype=torch.float32)[:, None].expand(12, 16**3))


def test_masking_hides_three_quarters() -> None:
    model = make_model()
    keep, mask = model.random_masking(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert keep.shape == (3, 3)
    assert torch.equal(mask.sum(dim=1), torch.full((3,), 9.0))
    assert torch.equal(mask.gather(1, keep), torch.zeros(3, 3))


def test_loss_ignores_visible_patches() -> None:
    """Only hidden patches are scored: replacing the target on visible ones changes nothing."""
    model = make_model()
    volume = torch.randn(2, 1, *IMG)
    keep, mask = model.random_masking(2, torch.Generator().manual_seed(1), torch.device("cpu"))
    prediction = model.forward_decoder(model.forward_encoder(volume, keep), keep)
    loss = model.forward_loss(volume, prediction, mask)
    patches = model.patchify(volume).clone()
    patches.scatter_(1, keep[..., None].expand(-1, -1, patches.shape[-1]), 5.0)
    gx, gy, gz = model.config.grid
    edited = patches.reshape(2, gx, gy, gz, 16, 16, 16).permute(0, 1, 4, 2, 5, 3, 6).reshape(2, 1, *IMG)
    assert torch.allclose(model.forward_loss(edited, prediction, mask), loss)


def test_norm_pix_target_makes_a_zero_prediction_score_one() -> None:
    model = make_model()
    volume = torch.randn(2, 1, *IMG) * 7 + 3
    mask = torch.ones(2, 12)
    loss = model.forward_loss(volume, torch.zeros(2, 12, 16**3), mask)
    assert abs(float(loss) - 1.0) < 1e-2


def test_forward_backward_and_encode_shapes() -> None:
    model = make_model()
    batch = {"t1": torch.randn(2, 1, 30, 45, 31)}  # fitted to 32 x 48 x 32
    loss, metrics = model(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert metrics["visible_patches"] == 3
    assert model.patch_embed.weight.grad is not None and model.decoder_pred.weight.grad is not None
    tokens = model.encode(batch["t1"])
    assert tokens.shape == (2, 12, 64)


def test_fit_volume_pads_and_crops_around_the_centre() -> None:
    volume = torch.ones(1, 1, 30, 50, 32)
    fitted = fit_volume(volume, (32, 48, 32))
    assert fitted.shape == (1, 1, 32, 48, 32)
    assert fitted[0, 0, 0].sum() == 0 and fitted[0, 0, 31].sum() == 0  # one zero slab each side
    assert fitted[0, 0, 1:31].min() == 1
    assert grid_for_volume(shape=(97, 115, 97), patch_size=16) == (112, 128, 112)
