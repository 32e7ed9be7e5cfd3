"""Model configurations: one frozen dataclass per architecture, factories per size.

Two sizes per model:

* ``tiny`` runs the whole chain on CPU on the demo cohort in minutes;
* ``base`` is the paper's scale (Dong et al. 2025): ViT-B encoders
  (768 wide, 12 layers, 12 heads, about 86M parameters each), a ViT-B
  Harmonizer with 128 hub tokens and 512-wide, 8-layer, 16-head decoders.

A config is stored inside every checkpoint (``dataclasses.asdict``) and the
model is rebuilt from it on resume or load, so a checkpoint alone fixes the
architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bh_models.core.errors import BHConfigError

__desc__ = (
    "Model sizes: {size} (harmonix-F {f_width}x{f_depth}, harmonix-S {s_width}x{s_depth}, "
    "Harmonizer {h_width}x{h_depth} with {n_hub} hub tokens)."
)

SIZES = ("tiny", "base")


@dataclass(frozen=True)
class HarmonixFConfig:
    """harmonix-F: fMRI ViT over ROIs x time patches, pretrained with JEPA."""

    n_rois: int = 400
    geometry_dim: int = 200  # M, columns of the geometric eigenmode matrix; set from the TSV
    gradient_dim: int = 30  # columns of the functional-gradient matrix; set from the TSV
    base_patch: int = 48  # k0 of TAPE (48 frames at TR 0.735 s = tau 35.28 s)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    predictor_dim: int = 384
    predictor_depth: int = 6
    predictor_heads: int = 12
    ema_start: float = 0.996  # EMA momentum of the target encoder, ramped linearly ...
    ema_end: float = 1.0  # ... to this value over training (I-JEPA)
    masking: str = "brain_jepa"  # "brain_jepa" (the paper's) or "block" (see models.nn.masking)
    # brain_jepa scheme: Brain-JEPA's ukb_vitb_ep300.yaml values
    observation_roi_scale: tuple[float, float] = (0.84, 1.0)  # enc_mask_scale, ROI share
    observation_time_scale: tuple[float, float] = (0.84, 1.0)  # enc_mask_scale, patch share
    cross_roi_roi_scale: tuple[float, float] = (0.45, 0.6)  # pred_mask_R_scale
    cross_roi_time_scale: tuple[float, float] = (0.2, 0.6)  # pred_mask_T_roi_scale
    cross_time_roi_scale: tuple[float, float] = (0.15, 0.3)  # pred_mask_R_roi_scale
    cross_time_time_scale: tuple[float, float] = (0.0, 0.4)  # pred_mask_T_scale
    edge_fraction: float = 0.3  # edge patches of the cross-time targets: 3 of Brain-JEPA's 10
    # block scheme
    target_blocks: int = 4  # JEPA target blocks per sample
    target_roi_fraction: tuple[float, float] = (0.15, 0.3)  # share of ROIs per block
    target_time_fraction: tuple[float, float] = (0.3, 0.6)  # share of a sample's real patches per block
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class HarmonixSConfig:
    """harmonix-S: 3-D MAE ViT over T1 volumes."""

    img_size: tuple[int, int, int] = (160, 192, 160)  # 10 x 12 x 10 = 1,200 patches, as in the paper
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    grad_checkpointing: bool = False

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patches per axis."""
        return tuple(s // self.patch_size for s in self.img_size)  # type: ignore[return-value]


@dataclass(frozen=True)
class HarmonizerConfig:
    """Harmonizer (the release's ``OneTokRegViT``): hub tokens fused from frozen encoder latents."""

    dim_s: int = 768  # width of harmonix-S tokens
    dim_f: int = 768  # width of harmonix-F tokens (must equal dim_s: one token sequence)
    s_grid: tuple[int, int, int] = (10, 12, 10)  # harmonix-S patch grid
    n_rois: int = 400
    n_patches: int = 18  # fMRI patches per ROI on the fixed token grid (augment.max_patches)
    n_hub: int = 128
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # targets normalised per token (the release's --norm_pix_loss)
    loss_on_padded: bool = True  # the release's loss covers padded fMRI tokens; False = real tokens only
    include_unpaired: bool = False  # the release trains on paired subjects only
    grad_checkpointing: bool = False

    @property
    def n_f_tokens(self) -> int:
        return self.n_rois * self.n_patches

    @property
    def n_s_tokens(self) -> int:
        return self.s_grid[0] * self.s_grid[1] * self.s_grid[2]


_FACTORIES: dict[str, dict[str, Any]] = {
    "harmonix_f": {
        "base": HarmonixFConfig,
        "tiny": lambda: HarmonixFConfig(
            embed_dim=64, depth=2, num_heads=4, predictor_dim=64, predictor_depth=2, predictor_heads=4,
        ),
    },
    "harmonix_s": {
        "base": HarmonixSConfig,
        "tiny": lambda: HarmonixSConfig(
            embed_dim=64, depth=2, num_heads=4, decoder_dim=64, decoder_depth=2, decoder_heads=4,
        ),
    },
    "harmonizer": {
        "base": HarmonizerConfig,
        "tiny": lambda: HarmonizerConfig(
            dim_s=64, dim_f=64, embed_dim=64, depth=2, num_heads=4, n_hub=8, decoder_dim=32, decoder_depth=1,
            decoder_heads=4,
        ),
    },
}

CONFIG_CLASSES = {"harmonix_f": HarmonixFConfig, "harmonix_s": HarmonixSConfig, "harmonizer": HarmonizerConfig}


def model_config(*, model: str, size: str, overrides: dict[str, Any] | None = None) -> Any:
    """The config of ``model`` at ``size``, with optional field overrides.

    Parameters
    ----------
    model : str
        ``harmonix_f``, ``harmonix_s`` or ``harmonizer``.
    size : str
        ``tiny`` or ``base``.
    overrides : dict, optional
        Field values replacing the size's defaults (e.g. ``{"depth": 4}``).

    Returns
    -------
    HarmonixFConfig | HarmonixSConfig | HarmonizerConfig
    """
    if model not in _FACTORIES:
        raise BHConfigError("model", f"unknown model '{model}'", f"use one of {sorted(_FACTORIES)}")
    if size not in _FACTORIES[model]:
        raise BHConfigError("model_size", f"unknown size '{size}'", f"use one of {list(SIZES)}")
    config = _FACTORIES[model][size]()
    return replace_fields(config, overrides or {})


def replace_fields(config: Any, overrides: dict[str, Any]) -> Any:
    """``dataclasses.replace`` that names an unknown field and keeps tuples as tuples."""
    names = {field.name for field in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise BHConfigError(
            f"model_overrides.{unknown[0]}", f"not a field of {type(config).__name__}", f"use one of {sorted(names)}"
        )
    fixed = {key: tuple(value) if isinstance(value, list) else value for key, value in overrides.items()}
    return dataclasses.replace(config, **fixed)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-able dict with the model kind, for checkpoints."""
    kind = next(name for name, cls in CONFIG_CLASSES.items() if isinstance(config, cls))
    return {"kind": kind, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`."""
    values = dict(data)
    kind = values.pop("kind")
    cls = CONFIG_CLASSES[kind]
    return replace_fields(cls(), values)
