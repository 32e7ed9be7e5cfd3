"""Each pretraining model with a synthetic batch of its real shapes, for the memory and GPU benchmarks.

``build(model, size, ...)`` returns the model, a batch maker and the loss call the
training loop makes (``bh_models.models.pretrain``): harmonix-F on an fMRI batch of
400 ROIs x ``n_patches`` TAPE patches (all real: the worst case), harmonix-S on T1
volumes of its ``img_size``, the Harmonizer on a latent-store batch (fMRI then T1
tokens, every token real). Nothing is read from disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bh_models.models.nn.configs import model_config
from bh_models.models.nn.harmonix_f import HarmonixF
from bh_models.models.nn.harmonix_s import HarmonixS
from bh_models.models.nn.harmonizer import Harmonizer

MODELS = ("harmonix_f", "harmonix_s", "harmonizer")
#: Shapes of the tiny (CPU) runs: the demo's 2 mm T1 grid and its 6 patches per fMRI sample.
TINY_SHAPES = {"n_patches": 6, "img_size": (80, 96, 80)}
#: Shapes of the base (paper) runs: 18 patches of 48 frames, the 1 mm 160 x 192 x 160 T1 grid.
BASE_SHAPES = {"n_patches": 18, "img_size": (160, 192, 160)}


@dataclass
class Synthetic:
    """A model, its config, a batch maker and the loss of one micro-batch."""

    name: str
    model: nn.Module
    config: Any
    n_patches: int
    make_batch: Callable[[int, int], dict]  # (batch_size, seed) -> batch on CPU
    loss: Callable[[nn.Module, dict, torch.Generator], torch.Tensor]


def _fmri_batch(batch_size: int, seed: int, *, n_rois: int, n_patches: int, patch: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch_size, n_rois, n_patches * patch, generator=generator),
            "patch_mask": torch.ones(batch_size, n_patches, dtype=torch.bool),
            "k": torch.full((batch_size,), patch, dtype=torch.int64)}


def build(name: str, *, size: str, overrides: dict[str, Any] | None = None, n_patches: int | None = None,
          img_size: tuple[int, int, int] | None = None, seed: int = 0) -> Synthetic:
    """One model at ``size`` (``tiny`` or ``base``), its shapes defaulting to :data:`TINY_SHAPES`/:data:`BASE_SHAPES`."""
    shapes = TINY_SHAPES if size == "tiny" else BASE_SHAPES
    n_patches = n_patches or shapes["n_patches"]
    img_size = tuple(img_size or shapes["img_size"])
    overrides = dict(overrides or {})
    torch.manual_seed(seed)
    if name == "harmonix_f":
        config = model_config(model=name, size=size, overrides=overrides)
        model = HarmonixF(config, torch.randn(config.n_rois, config.geometry_dim),
                          torch.randn(config.n_rois, config.gradient_dim))

        def make_batch(batch_size: int, batch_seed: int) -> dict:
            return _fmri_batch(batch_size, batch_seed, n_rois=config.n_rois, n_patches=n_patches,
                               patch=config.base_patch)

        def loss(model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
            return model(batch, generator)[0]
    elif name == "harmonix_s":
        config = model_config(model=name, size=size, overrides={"img_size": img_size, **overrides})
        model = HarmonixS(config)

        def make_batch(batch_size: int, batch_seed: int) -> dict:
            generator = torch.Generator().manual_seed(batch_seed)
            return {"t1": torch.randn(batch_size, 1, *config.img_size, generator=generator)}

        def loss(model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
            return model(batch, generator)[0]
    elif name == "harmonizer":
        width = 768 if size == "base" else 64  # the encoders' widths at this size
        s_grid = tuple(side // 16 for side in img_size)
        config = model_config(model=name, size=size, overrides={
            "dim_s": width, "dim_f": width, "s_grid": s_grid, "n_patches": n_patches, **overrides})
        model = Harmonizer(config)

        def make_batch(batch_size: int, batch_seed: int) -> dict:
            generator = torch.Generator().manual_seed(batch_seed)
            return {"tokens": torch.randn(batch_size, model.n_tokens, config.dim_f, generator=generator),
                    "mask": torch.ones(batch_size, model.n_tokens, dtype=torch.bool)}

        def loss(model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
            return model(batch["tokens"], batch["mask"])[0]
    else:
        raise ValueError(f"unknown model {name!r}; use one of {MODELS}")
    return Synthetic(name=name, model=model, config=config, n_patches=n_patches, make_batch=make_batch, loss=loss)


def stack_depths(name: str) -> tuple[str, str]:
    """Config fields of the model's two Transformer stacks (encoder first)."""
    return {"harmonix_f": ("depth", "predictor_depth"), "harmonix_s": ("depth", "decoder_depth"),
            "harmonizer": ("depth", "decoder_depth")}[name]
