"""harmonix-F: padded patches are invisible, JEPA masks are valid, the EMA update is right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bh_models.core.errors import BHInputError
from bh_models.models.nn.configs import model_config
from bh_models.models.nn.harmonix_f import HarmonixF, read_geometry, sample_jepa_masks

N_ROIS, GEOMETRY_DIM, MAX_PATCHES = 12, 6, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int = 0) -> HarmonixF:
    torch.manual_seed(seed)
    config = model_config(model="harmonix_f", size="tiny",
                          overrides={"n_rois": N_ROIS, "geometry_dim": GEOMETRY_DIM})
    return HarmonixF(config, torch.randn(N_ROIS, GEOMETRY_DIM))


def make_batch(patches: list[int], n_real: list[int], seed: int = 0, pad_value: float = 0.0) -> dict:
    """Collated batch like ``bh_models.models.data.collate_fmri``: x padded to the batch's longest."""
    generator = torch.Generator().manual_seed(seed)
    length = MAX_PATCHES * max(patches)
    x = torch.full((len(patches), N_ROIS, length), pad_value)
    patch_mask = torch.zeros(len(patches), MAX_PATCHES, dtype=torch.bool)
    for row, (k, n) in enumerate(zip(patches, n_real)):
        x[row, :, : n * k] = torch.randn(N_ROIS, n * k, generator=generator)
        patch_mask[row, :n] = True
    return {"x": x, "patch_mask": patch_mask, "k": torch.tensor(patches), "n_patches": torch.tensor(n_real)}


def test_padding_changes_neither_real_tokens_nor_loss() -> None:
    model = make_model()
    clean = make_batch([24, 48, 16], [2, 3, 1])
    noisy = make_batch([24, 48, 16], [2, 3, 1], pad_value=0.0)
    # Put large values in every padded frame (inside and beyond each sample's patches).
    for row, (k, n) in enumerate(zip([24, 48, 16], [2, 3, 1])):
        noisy["x"][row, :, n * k:] = 1e3 * torch.randn(N_ROIS, noisy["x"].shape[2] - n * k)
    tokens_clean, mask = model.encode(clean)
    tokens_noisy, mask_noisy = model.encode(noisy)
    assert torch.equal(mask, mask_noisy)
    assert torch.allclose(tokens_clean[mask], tokens_noisy[mask], atol=1e-5)
    loss_clean, _ = model(clean, torch.Generator().manual_seed(3))
    loss_noisy, _ = model(noisy, torch.Generator().manual_seed(3))
    assert torch.allclose(loss_clean, loss_noisy, atol=1e-6)


def test_encoding_does_not_depend_on_batch_mates() -> None:
    """A short sample gives the same tokens alone or next to a longer one (more padding)."""
    model = make_model()
    pair = make_batch([24, 16], [1, 4], seed=5)
    alone = {key: value[:1] for key, value in pair.items()}
    tokens_pair, mask_pair = model.encode(pair)  # grid of 4 patches
    tokens_alone, mask_alone = model.encode(alone)  # grid of 1 patch
    real_pair = tokens_pair[0][mask_pair[0]]
    real_alone = tokens_alone[0][mask_alone[0]]
    assert real_pair.shape == real_alone.shape == (N_ROIS, 64)
    assert torch.allclose(real_pair, real_alone, atol=1e-5)


def test_jepa_masks_partition_real_tokens() -> None:
    config = make_model().config
    n_patches = torch.tensor([1, 3, 4])
    masks = sample_jepa_masks(n_patches=n_patches, n_rois=N_ROIS, grid_patches=MAX_PATCHES,
                              config=config, generator=torch.Generator().manual_seed(0))
    for row, real in enumerate(n_patches.tolist()):
        context = set(masks.context_index[row][masks.context_valid[row]].tolist())
        target = set(masks.target_index[row][masks.target_valid[row]].tolist())
        real_tokens = {r * MAX_PATCHES + p for r in range(N_ROIS) for p in range(real)}
        assert context and target
        assert context <= real_tokens and target <= real_tokens
        assert not context & target
        assert context | target == real_tokens
    again = sample_jepa_masks(n_patches=n_patches, n_rois=N_ROIS, grid_patches=MAX_PATCHES,
                              config=config, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks.target_index, again.target_index)


def test_ema_update_follows_momentum_schedule() -> None:
    model = make_model()
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    online = [p.clone() for p in model.encoder.parameters()]
    model.on_optimizer_step(step=5, total_steps=10)
    momentum = 0.996 + (1.0 - 0.996) * 0.5
    for old, new, current in zip(before, model.target_encoder.parameters(), online):
        assert torch.allclose(new, momentum * old + (1 - momentum) * current, atol=1e-6)
    assert all(not p.requires_grad for p in model.target_encoder.parameters())


def test_loss_backpropagates_to_encoder_and_predictor_only() -> None:
    model = make_model()
    loss, metrics = model(make_batch([48, 24], [2, 4]), torch.Generator().manual_seed(0))
    loss.backward()
    assert model.encoder.tape.weight.grad is not None
    assert model.encoder.geometry_proj.weight.grad is not None
    assert model.predictor.mask_token.grad is not None
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert metrics["target_tokens"] > 0 and metrics["context_tokens"] > 0


def test_read_geometry_standardises_and_validates(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(3.0, 0.01, size=(N_ROIS, 3)), columns=["mode_001", "mode_002", "mode_003"])
    table.insert(0, "name", [f"roi{i}" for i in range(N_ROIS)])
    path = tmp_path / "geometry.tsv"
    table.to_csv(path, sep="\t", index=False)
    geometry = read_geometry(path=path)
    assert geometry.shape == (N_ROIS, 3)
    assert torch.allclose(geometry.mean(dim=0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(geometry.std(dim=0, unbiased=False), torch.ones(3), atol=1e-4)
    table.drop(columns="name").to_csv(path, sep="\t", index=False)
    with pytest.raises(BHInputError, match="name"):
        read_geometry(path=path)
    with pytest.raises(BHInputError, match="not found"):
        read_geometry(path=tmp_path / "missing.tsv")
