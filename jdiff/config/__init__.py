"""Typed training configuration: sections with declared fields (`schema`), keys and overrides (`keys`),
named presets (`presets`)."""

from jdiff.config.keys import KEYS, apply_overrides, fixed_conflicts, from_dict, resolve, suggest, to_dict
from jdiff.config.presets import PRESETS, get_preset
from jdiff.config.schema import (
    SECTIONS,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SamplingConfig,
    TrainConfig,
)

__all__ = [
    "TrainConfig",
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "DiffusionConfig",
    "OptimConfig",
    "SamplingConfig",
    "SECTIONS",
    "ConfigError",
    "KEYS",
    "resolve",
    "suggest",
    "apply_overrides",
    "to_dict",
    "from_dict",
    "fixed_conflicts",
    "PRESETS",
    "get_preset",
]
