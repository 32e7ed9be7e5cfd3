"""Models of Brain Harmony: TAPE, harmonix-F, harmonix-S and the Harmonizer.

One architecture per module; sizes live in :mod:`bh_models.models.nn.configs`.
"""

from bh_models.models.nn.configs import (
    HarmonixFConfig,
    HarmonixSConfig,
    HarmonizerConfig,
    config_from_dict,
    config_to_dict,
    model_config,
)
from bh_models.models.nn.harmonix_f import HarmonixF, read_geometry
from bh_models.models.nn.harmonix_s import HarmonixS
from bh_models.models.nn.harmonizer import Harmonizer
from bh_models.models.nn.tape import TemporalAdaptivePatchEmbed

__all__ = [
    "HarmonixF",
    "HarmonixFConfig",
    "HarmonixS",
    "HarmonixSConfig",
    "Harmonizer",
    "HarmonizerConfig",
    "TemporalAdaptivePatchEmbed",
    "config_from_dict",
    "config_to_dict",
    "model_config",
    "read_geometry",
]
