"""Models of Brain Harmony: TAPE, harmonix-F, harmonix-S, the Harmonizer and the fine-tuning classifier.

One architecture per module, as in the authors' release; sizes live in
:mod:`bh_models.models.nn.configs`, harmonix-F's JEPA masks in :mod:`bh_models.models.nn.masking`.
"""

from bh_models.models.nn.configs import (
    HarmonixFConfig,
    HarmonixSConfig,
    HarmonizerConfig,
    config_from_dict,
    config_to_dict,
    model_config,
)
from bh_models.models.nn.harmonix_f import HarmonixF, read_geometry, read_gradients
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
    "read_gradients",
]
