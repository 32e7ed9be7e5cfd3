"""Harmonizer as released: one sequence with one 1-D sin-cos, hubs appended, one decoder, norm_pix targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bh_models.models.latents import pack_rows
from bh_models.models.nn.configs import model_config
from bh_models.models.nn.harmonizer import Harmonizer
from bh_models.models.nn.hub_classifier import HubClassifier

N_ROIS, N_PATCHES, S_GRID, DIM = 6, 3, (2, 2, 2), 64  # DIM = the tiny width: no pre_map
N_F, N_S = N_ROIS * N_PATCHES, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(**overrides) -> Harmonizer:
    torch.manual_seed(0)
    config = model_config(model="harmonizer", size="tiny", overrides={
        "dim_s": DIM, "dim_f": DIM, "s_grid": S_GRID, "n_rois": N_ROIS, "n_patches": N_PATCHES, **overrides,
    })
    return Harmonizer(config)


def make_latents(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, N_F + N_S, DIM, generator=generator) * 2 + 0.5
    patch_mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]][:batch])
    f_mask = patch_mask[:, None, :].expand(batch, N_ROIS, N_PATCHES).reshape(batch, -1)  # ROI-major
    return tokens, torch.cat([f_mask, torch.ones(batch, N_S, dtype=torch.bool)], dim=1)


def sincos_reference(positions: np.ndarray, width: int) -> np.ndarray:
    half = width // 2
    omega = 1.0 / 10000.0 ** (np.arange(half) / half)
    angles = positions[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def test_positions_are_one_sincos_over_fmri_then_t1_with_a_zero_class_row() -> None:
    model = make_model()
    n = N_F + N_S
    for table, width in ((model.pos_embed, model.config.embed_dim), (model.decoder_pos_embed, model.config.decoder_dim)):
        assert table.shape == (1 + n, width)
        assert torch.all(table[0] == 0)
        assert np.abs(table[1:].numpy() - sincos_reference(np.arange(n, dtype=np.float64), width)).max() < 1e-6
    assert model.pre_map is None  # raw latents: no input projection at equal widths (the release's base)
    assert "pos_embed" not in model.state_dict()  # fixed tables are recomputed, not stored


def test_encoder_sequence_is_cls_tokens_hubs_and_output_is_cls_plus_hubs() -> None:
    """Recompute the encoder by hand: [cls + pos0 | x + pos[1:] | hubs + their positions], padded tokens out."""
    from bh_models.models.nn.blocks import run_blocks

    model = make_model()
    tokens, mask = make_latents()
    out = model.forward_features(tokens, mask)
    assert out.shape == (3, 1 + model.config.n_hub, model.config.embed_dim)
    with torch.no_grad():
        cls = model.cls_token.expand(3, -1, -1)
        hubs = (model.latent_tokens + model.enc_latent_token_positional_embedding).expand(3, -1, -1)
        x = torch.cat([cls, tokens + model.pos_embed[1:], hubs], dim=1)
        full = torch.cat([torch.ones(3, 1, dtype=torch.bool), mask, torch.ones(3, model.config.n_hub, dtype=torch.bool)], 1)
        x = model.norm(run_blocks(model.blocks, x, full))
        expected = torch.cat([x[:, :1], x[:, -model.config.n_hub:]], dim=1)
    assert torch.allclose(out, expected, atol=1e-5)
    # A padded fMRI token's value reaches neither the class nor the hub tokens.
    noisy = tokens.clone()
    noisy[~mask] = 1e3 * torch.randn(int((~mask).sum()), DIM)
    assert torch.allclose(model.forward_features(noisy, mask), out, atol=1e-4)


def test_one_decoder_rebuilds_every_token_from_cls_and_hubs_only() -> None:
    model = make_model()
    tokens, mask = make_latents()
    latent = model.forward_features(tokens, mask)
    prediction = model.forward_decoder(latent)
    assert prediction.shape == tokens.shape
    # Identical latent -> identical reconstruction, whatever the input tokens were: queries carry no data.
    other_latent = model.forward_features(torch.randn_like(tokens), mask)
    assert not torch.allclose(model.forward_decoder(other_latent), prediction)
    assert torch.equal(model.forward_decoder(latent.clone()), prediction)
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert {"decoder_blocks", "decoder_pred", "mask_token"} <= names
    assert not any(name.startswith(("decoder_s", "decoder_f", "input_")) for name in names)


def test_loss_is_mse_to_per_token_normalised_targets_over_all_tokens() -> None:
    """norm_pix targets computed here: per token, minus the mean over channels, over sqrt(unbiased var + 1e-6);
    the release averages over every token of the batch, padded fMRI tokens included."""
    model = make_model()
    tokens, mask = make_latents()
    loss, metrics = model(tokens, mask)
    with torch.no_grad():
        prediction = model.forward_decoder(model.forward_features(tokens, mask)).double().numpy()
    t = tokens.double().numpy()
    target = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    error = ((prediction - target) ** 2).mean(-1)  # (B, N)
    assert abs(float(loss.detach()) - error.mean()) < 1e-5
    real = mask.numpy()
    assert abs(metrics["loss_f"] - error[:, :N_F][real[:, :N_F]].mean()) < 1e-5
    assert abs(metrics["loss_s"] - error[:, N_F:].mean()) < 1e-5
    # The option excluding padded tokens averages over real tokens only.
    real_only = make_model(loss_on_padded=False)
    loss_real, _ = real_only(tokens, mask)
    assert abs(float(loss_real.detach()) - error[real].mean()) < 1e-5
    assert abs(float(loss_real.detach()) - float(loss)) > 1e-4
    # Raw targets when norm_pix_loss is off.
    raw = make_model(norm_pix_loss=False)
    with torch.no_grad():
        raw_prediction = raw.forward_decoder(raw.forward_features(tokens, mask)).double().numpy()
    assert abs(float(raw(tokens, mask)[0]) - ((raw_prediction - t) ** 2).mean()) < 1e-4


def test_a_missing_modality_is_masked_out_of_attention_and_loss() -> None:
    """Unpaired training (an option): a subject without T1 adds nothing from its T1 slot."""
    model = make_model(include_unpaired=True)
    tokens, mask = make_latents()
    mask[1, N_F:] = False  # subject 1 has fMRI only
    loss, _ = model(tokens, mask)
    garbage = tokens.clone()
    garbage[1, N_F:] = 1e3 * torch.randn(N_S, DIM)
    assert torch.allclose(model(garbage, mask)[0], loss, atol=1e-5)
    weights = model.loss_weights(mask)
    assert weights[1, :N_F].all() and not weights[1, N_F:].any()  # padded fMRI in (release), missing T1 out


def test_hub_classifier_is_the_releases_fine_tuning_model() -> None:
    model = make_model()
    tokens, mask = make_latents()
    classifier = HubClassifier(model, 2)
    names = {name for name, _ in classifier.named_parameters()}
    assert not any(n.startswith(("fusion.decoder", "fusion.norm.", "fusion.mask_token")) for n in names)
    assert {"fc_norm.weight", "head.weight", "fusion.latent_tokens"} <= names
    assert float(classifier.head.weight.std()) < 1e-4 and torch.all(classifier.head.bias == 0)
    with torch.no_grad():
        expected = model.forward_features(tokens, mask, final_norm=False)[:, 1:].mean(dim=1)  # (B, D)
        logits = classifier(pack_rows(tokens, mask))
    assert torch.allclose(logits, classifier.head(classifier.fc_norm(expected)), atol=1e-5)
    groups = classifier.layer_groups()
    assert len(groups) == model.config.depth + 2
    assert groups[0] == [classifier.fusion.cls_token]
    last = {id(p) for p in groups[-1]}
    assert id(classifier.fusion.latent_tokens) in last and id(classifier.head.weight) in last
    listed = sorted(id(p) for group in groups for p in group)
    assert listed == sorted(id(p) for p in classifier.parameters())


def test_narrower_latents_get_the_releases_pre_map() -> None:
    model = make_model(dim_s=16, dim_f=16)
    assert model.pre_map is not None and model.pre_map.in_features == 16
    tokens = torch.randn(2, N_F + N_S, 16)
    loss, _ = model(tokens, torch.ones(2, N_F + N_S, dtype=torch.bool))
    assert torch.isfinite(loss)
