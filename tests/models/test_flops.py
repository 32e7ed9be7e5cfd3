"""The FLOP formulas of bh_models.models.flops against torch's FlopCounterMode on the models themselves."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bh_models.models.flops import (
    block_forward_flops,
    harmonix_f_cost,
    harmonix_s_cost,
    harmonizer_cost,
    samples_per_s_at_mfu,
)
from bh_models.models.nn.configs import model_config
from bh_models.models.nn.harmonix_f import HarmonixF, sample_jepa_masks
from bh_models.models.nn.harmonix_s import HarmonixS
from bh_models.models.nn.harmonizer import Harmonizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(embed_dim=128, depth=2, num_heads=4)


def counted_training_flops(step) -> int:
    """FLOPs torch counts for forward + backward, with math attention (explicit matmuls)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step().backward()
    return counter.get_total_flops()


def test_block_formula_is_the_counted_forward():
    from bh_models.models.nn.blocks import Block

    block = Block(dim=96, num_heads=4)
    x = torch.randn(2, 50, 96)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        block(x)
    assert counter.get_total_flops() == 2 * block_forward_flops(tokens=50, width=96)


def test_harmonix_s_formula_matches_the_counter():
    config = model_config(model="harmonix_s", size="tiny", overrides={**SMALL, "img_size": (64, 64, 48),
                                                                       "decoder_dim": 64, "decoder_depth": 2})
    model = HarmonixS(config)
    batch = {"t1": torch.randn(2, 1, 64, 64, 48)}
    counted = counted_training_flops(lambda: model(batch, torch.Generator().manual_seed(0))[0])
    expected = 2 * harmonix_s_cost(config).flops
    assert counted == pytest.approx(expected, rel=0.01)


def test_harmonix_f_formula_matches_the_counter():
    config = model_config(model="harmonix_f", size="tiny", overrides={
        **SMALL, "n_rois": 40, "geometry_dim": 20, "predictor_dim": 64, "predictor_depth": 2})
    model = HarmonixF(config, torch.randn(40, 20), torch.randn(40, config.gradient_dim))
    n_patches = 6
    batch = {"x": torch.randn(1, 40, n_patches * 48), "patch_mask": torch.ones(1, n_patches, dtype=torch.bool),
             "k": torch.tensor([48])}
    masks = sample_jepa_masks(n_patches=torch.tensor([n_patches]), n_rois=40, grid_patches=n_patches, config=config,
                              generator=torch.Generator().manual_seed(5))
    context, target = float(masks.context_valid.sum()), float(masks.target_valid.sum())
    counted = counted_training_flops(lambda: model(batch, torch.Generator().manual_seed(5))[0])
    expected = harmonix_f_cost(config, n_patches=n_patches, context=context, target=target).flops
    assert counted == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("dim_in", [64, 48], ids=["raw-latents", "pre_map"])
def test_harmonizer_formula_matches_the_counter(dim_in):
    config = model_config(model="harmonizer", size="tiny", overrides={
        **SMALL, "dim_s": dim_in, "dim_f": dim_in, "s_grid": (4, 4, 3), "n_rois": 40, "n_patches": 6, "n_hub": 8,
        "decoder_dim": 64, "decoder_depth": 2})
    model = Harmonizer(config)
    tokens = torch.randn(2, model.n_tokens, dim_in)
    mask = torch.ones(2, model.n_tokens, dtype=torch.bool)
    counted = counted_training_flops(lambda: model(tokens, mask)[0])
    expected = 2 * harmonizer_cost(config, n_patches=6).flops
    assert counted == pytest.approx(expected, rel=0.01)


def test_base_costs_and_rates_are_in_the_expected_range():
    # Hand figures: the Harmonizer's encoder alone over [cls | 8,400 tokens | 128 hubs] = 8,529 tokens is
    # 3 x 12 x (24 N D^2 + 4 N^2 D) = 12.4 TFLOP.
    harmonizer = harmonizer_cost(model_config(model="harmonizer", size="base"), n_patches=18)
    assert harmonizer.detail["encoder"] == pytest.approx(3 * 12 * (24 * 8529 * 768**2 + 4 * 8529**2 * 768))
    assert 12e12 < harmonizer.flops < 20e12
    assert samples_per_s_at_mfu(flops_per_sample=1e12, mfu=0.4, peak=1e15) == pytest.approx(400.0)
