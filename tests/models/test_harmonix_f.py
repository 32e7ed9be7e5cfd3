"""harmonix-F: padded patches are invisible, the positional formula is the release's, JEPA masks have
Brain-JEPA's statistics, the EMA update is right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bh_models.core.errors import BHInputError
from bh_models.models.nn.configs import model_config
from bh_models.models.nn.harmonix_f import HarmonixF, read_geometry, read_gradients
from bh_models.models.nn.masking import brain_jepa_sample, sample_jepa_masks

N_ROIS, GEOMETRY_DIM, GRADIENT_DIM, MAX_PATCHES = 12, 6, 3, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int = 0, **overrides) -> HarmonixF:
    torch.manual_seed(seed)
    config = model_config(model="harmonix_f", size="tiny", overrides={
        "n_rois": N_ROIS, "geometry_dim": GEOMETRY_DIM, "gradient_dim": GRADIENT_DIM, **overrides})
    return HarmonixF(config, 0.01 * torch.randn(N_ROIS, GEOMETRY_DIM), 0.1 * torch.randn(N_ROIS, GRADIENT_DIM))


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


def test_block_masks_partition_real_tokens() -> None:
    config = make_model(masking="block").config
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
    assert model.encoder.pos_embed.geo_harm_proj.weight.grad is not None
    assert model.encoder.pos_embed.grad_proj.weight.grad is not None
    assert model.encoder.pos_embed.decoder_pos_embed_proj.weight.grad is not None
    assert model.predictor.mask_token.grad is not None
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert metrics["target_tokens"] > 0 and metrics["context_tokens"] > 0


def test_read_tables_keep_raw_values_and_validate(tmp_path: Path) -> None:
    """The release feeds its eigenmode and gradient tables unscaled: so do we."""
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 0.01, size=(N_ROIS, 3))
    table = pd.DataFrame(values, columns=["mode_001", "mode_002", "mode_003"])
    table.insert(0, "name", [f"roi{i}" for i in range(N_ROIS)])
    path = tmp_path / "geometry.tsv"
    table.to_csv(path, sep="\t", index=False)
    assert np.allclose(read_geometry(path=path).numpy(), values, atol=1e-6)
    with pytest.raises(BHInputError, match="gradient_"):
        read_gradients(path=path)
    table.drop(columns="name").to_csv(path, sep="\t", index=False)
    with pytest.raises(BHInputError, match="name"):
        read_geometry(path=path)
    with pytest.raises(BHInputError, match="not found"):
        read_geometry(path=tmp_path / "missing.tsv")


def sincos_reference(positions: np.ndarray, width: int) -> np.ndarray:
    """[sin(p w_0..), cos(p w_0..)] with w_i = 1 / 10000^(i / (width / 2)), written out."""
    half = width // 2
    omega = 1.0 / 10000.0 ** (np.arange(half) / half)
    angles = positions[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def test_positions_are_the_releases_formula() -> None:
    """pos[r * P + p] = [sincos_{D/2}(p), minmax(0.5 (G A + Gr B))[r]] with one global min-max, and the
    predictor's = [sincos_{Dp/2}(p), C minmax(..)[r]], computed here from the weights with numpy."""
    model = make_model(seed=3)
    positions = model.encoder.pos_embed
    with torch.no_grad():  # non-zero biases, so the formula's affine parts are exercised
        for linear in (positions.geo_harm_proj, positions.grad_proj, positions.decoder_pos_embed_proj):
            linear.bias.normal_()
    n_patches, width, predictor_width = MAX_PATCHES, model.config.embed_dim, model.config.predictor_dim
    G, Gr = positions.eigenmodes.double().numpy(), positions.gradients.double().numpy()  # noqa: N806
    a = G @ positions.geo_harm_proj.weight.detach().double().numpy().T + positions.geo_harm_proj.bias.detach().numpy()
    b = Gr @ positions.grad_proj.weight.detach().double().numpy().T + positions.grad_proj.bias.detach().numpy()
    roi = 0.5 * (a + b)
    roi = 2 * (roi - roi.min()) / (roi.max() - roi.min()) - 1  # ONE min and max over all ROIs and channels
    assert roi.min() == -1 and roi.max() == 1
    time = sincos_reference(np.arange(n_patches, dtype=np.float64), width // 2)
    expected = np.zeros((N_ROIS * n_patches, width))
    for r in range(N_ROIS):
        for p in range(n_patches):
            expected[r * n_patches + p] = np.concatenate([time[p], roi[r]])  # time half FIRST
    ours = positions.encoder_positions(n_patches).detach().numpy()
    assert ours.shape == (N_ROIS * n_patches, width)
    assert np.abs(ours - expected).max() < 1e-5

    c = roi @ positions.decoder_pos_embed_proj.weight.detach().double().numpy().T \
        + positions.decoder_pos_embed_proj.bias.detach().numpy()
    time_p = sincos_reference(np.arange(n_patches, dtype=np.float64), predictor_width // 2)
    expected_p = np.stack([np.concatenate([time_p[p], c[r]]) for r in range(N_ROIS) for p in range(n_patches)])
    assert np.abs(positions.predictor_positions(n_patches).detach().numpy() - expected_p).max() < 1e-5

    # The encoder adds exactly these positions to the TAPE tokens (zero signal: TAPE gives its bias).
    batch = make_batch([48], [n_patches])
    batch["x"].zero_()
    tokens, _ = model.encoder.tokens(batch["x"], batch["k"], torch.ones(1, n_patches, dtype=torch.bool))
    bias = model.encoder.tape.bias.detach().numpy()
    assert np.abs(tokens[0].detach().numpy() - bias - expected).max() < 1e-5


def test_a_padded_token_depends_on_its_own_input_only() -> None:
    """As the release's flash-attention unpadding: padded tokens are dropped as queries too, so their
    outputs do not change when the real tokens do (and real tokens never see them)."""
    model = make_model()
    one = make_batch([24], [2], seed=1)
    two = make_batch([24], [2], seed=2)  # other real frames, same (zero) padding
    tokens_one, mask = model.encode(one, full_grid=True)
    tokens_two, _ = model.encode(two, full_grid=True)
    assert tokens_one.shape[1] == N_ROIS * MAX_PATCHES  # the full grid, padded patches included
    assert torch.allclose(tokens_one[0][~mask[0]], tokens_two[0][~mask[0]], atol=1e-6)
    assert not torch.allclose(tokens_one[0][mask[0]], tokens_two[0][mask[0]], atol=1e-3)
    cropped, cropped_mask = model.encode(one)
    assert torch.allclose(cropped[0][cropped_mask[0]], tokens_one[0][mask[0]], atol=1e-5)


# ----------------------------------------------------------------------------- Brain-JEPA mask statistics

H, W = 400, 10  # Brain-JEPA's grid (450 ROIs there; 400 here, as the paper's release)


def brain_jepa_config():
    return model_config(model="harmonix_f", size="tiny", overrides={"n_rois": H})


def draws(n: int, seed: int = 0, real: int = W) -> list:
    from bh_models.models.nn.masking import batch_fractions

    config, generator = brain_jepa_config(), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        fractions = batch_fractions(config=config, generator=generator)
        out.append(brain_jepa_sample(n_rois=H, real_patches=real, grid_patches=W, fractions=fractions,
                                     config=config, generator=generator))
    return out


def test_brain_jepa_block_sizes_and_positions() -> None:
    """Sizes and windows as Brain-JEPA's ukb_vitb_ep300 settings imply (spec of the release, section 4)."""
    for draw in draws(300):
        h_obs, (t0, t1) = len(draw.observed_rois), draw.observed_patches
        assert int(0.84 * H) <= h_obs <= H - 1 and len(set(draw.observed_rois.tolist())) == h_obs
        assert int(0.84 * W) <= t1 - t0 <= W - 1 and t1 <= W - 1  # the last patch is never observed
        assert int(0.45 * H) <= len(draw.alpha_rois) <= int(0.6 * H)
        a0, a1 = draw.alpha_patches
        assert t0 <= a0 < a1 <= t1 and 1 <= a1 - a0 < t1 - t0  # alpha window inside the observation window
        right, left = draw.edge_targets
        assert set(right[1].tolist()) <= {7, 8, 9} and set(left[1].tolist()) <= {0, 1, 2}
        assert len(right[1]) <= 3 and len(left[1]) <= 3
    # Observed ROIs are random subsets, not contiguous ranges (a range is one network in Schaefer order).
    gaps = [np.diff(np.sort(d.observed_rois.numpy())) for d in draws(20, seed=1)]
    assert all((gap > 1).any() for gap in gaps)


def test_brain_jepa_context_and_targets_are_disjoint_and_constrained() -> None:
    for draw in draws(200, seed=2):
        context = draw.context  # (R, P) bool
        observed = torch.zeros(H, W, dtype=torch.bool)
        observed[draw.observed_rois, draw.observed_patches[0]: draw.observed_patches[1]] = True
        assert context.any() and not (context & ~observed).any()  # context inside the observation block
        assert not context[draw.alpha_rois].any()  # no token of an alpha ROI, at any time
        for rois, patches in draw.edge_targets:
            assert not context[:, patches].any()  # no token of a cross-time patch, in any ROI
        targets = torch.cat(draw.targets)
        assert not context.reshape(-1)[targets].any()
        # beta ROIs come from the observed alpha ROIs, gamma ROIs from the rest, in equal proportion.
        group1 = set(draw.observed_rois.tolist()) & set(draw.alpha_rois.tolist())
        for rois, patches in draw.edge_targets:
            n1 = sum(r in group1 for r in rois.tolist())
            n2 = len(rois) - n1
            assert 0.15 * len(group1) - 1 <= n1 <= 0.3 * len(group1)
            assert 0.15 * (H - len(group1)) - 1 <= n2 <= 0.3 * (H - len(group1))


def test_brain_jepa_context_share_matches_its_expectation() -> None:
    """Mean context ROI count ~ E[h_obs (H - h_alpha) / H] (hypergeometric), computed here from the scales."""
    samples = draws(400, seed=3)
    context_rois = np.mean([int(d.context.any(dim=1).sum()) for d in samples])
    rng = np.random.default_rng(0)  # the same size distribution, sampled independently
    h_obs = (H * rng.uniform(0.84, 1.0, 100000)).astype(int).clip(max=H - 1)
    h_alpha = (H * rng.uniform(0.45, 0.6, 100000)).astype(int)
    expected = float(np.mean(h_obs * (H - h_alpha) / H))
    assert abs(context_rois - expected) < 0.03 * expected, (context_rois, expected)


def test_brain_jepa_batches_share_sizes_and_respect_real_patches() -> None:
    config = brain_jepa_config()
    n_patches = torch.tensor([10, 10, 6, 4])
    masks = sample_jepa_masks(n_patches=n_patches, n_rois=H, grid_patches=W, config=config,
                              generator=torch.Generator().manual_seed(4))
    for row, real in enumerate(n_patches.tolist()):
        context = masks.context_index[row][masks.context_valid[row]]
        target = masks.target_index[row][masks.target_valid[row]]
        assert len(context) and len(target)
        assert ((context % W) < real).all() and ((target % W) < real).all()  # real patches only
        assert not set(context.tolist()) & set(target.tolist())
    again = sample_jepa_masks(n_patches=n_patches, n_rois=H, grid_patches=W, config=config,
                              generator=torch.Generator().manual_seed(4))
    assert torch.equal(masks.context_index, again.context_index) and torch.equal(masks.target_index,
                                                                                  again.target_index)
    # Equal real lengths, one batch: the same observed/alpha ROI counts (sizes are batch-shared).
    from bh_models.models.nn.masking import batch_fractions

    generator = torch.Generator().manual_seed(5)
    fractions = batch_fractions(config=config, generator=generator)
    pair = [brain_jepa_sample(n_rois=H, real_patches=W, grid_patches=W, fractions=fractions, config=config,
                              generator=generator) for _ in range(2)]
    assert len(pair[0].observed_rois) == len(pair[1].observed_rois)
    assert len(pair[0].alpha_rois) == len(pair[1].alpha_rois)
    assert not torch.equal(pair[0].observed_rois, pair[1].observed_rois)


@pytest.mark.parametrize("real", [1, 2, 3, 4, 6])
def test_brain_jepa_short_samples_keep_a_context_and_a_target(real: int) -> None:
    for draw in draws(30, seed=real, real=real):
        assert draw.context.any() and len(draw.targets[0])
        assert not draw.context[:, real:].any()
