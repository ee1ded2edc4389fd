"""Builds the data source, model and schedule that a `TrainConfig` describes."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

import jdiff
from jdiff.schedules import Schedule
from jdiff.training.config import ConfigError, TrainConfig

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_source(config: TrainConfig):
    """`jdiff.data.make_source` for the config's dataset (raises ConfigError with a one-line message)."""
    from jdiff.data import make_source

    try:
        return make_source(config.dataset, split=config.split, image_size=config.image_size,
                           channels=config.channels, data_dir=config.data_dir)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"cannot open dataset {config.dataset!r}: {_one_line(e)}") from None


def model_num_classes(config: TrainConfig, source_classes: Optional[int]) -> Optional[int]:
    """Label count the model is conditioned on: the dataset's, unless unconditional (None)."""
    if not config.class_conditional or not source_classes:
        return None
    return int(source_classes)


def build_model(config: TrainConfig, num_classes: Optional[int]) -> nn.Module:
    """`jdiff.models.get_model(config.model, **overrides)` with num_classes and the compute dtype.

    Label dropout is done by the train step (explicit rng), so the model's own class_dropout is 0.
    """
    from jdiff.models import get_model

    over = dict(config.model_overrides)
    over.setdefault("num_classes", num_classes)
    over["dtype"] = COMPUTE_DTYPES[config.dtype]
    try:
        return get_model(config.model, **over)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build model {config.model!r}: {_one_line(e)}") from None


def build_schedule(config: TrainConfig) -> Schedule:
    """The noise schedule (a pytree; pass it to jitted code as an argument)."""
    try:
        return jdiff.get_schedule(config.schedule, config.num_timesteps,
                                  zero_terminal_snr=config.zero_terminal_snr)
    except ValueError as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def check_model_fields(config: TrainConfig) -> None:
    """Fails fast (ConfigError) on an unknown model name or override field, before any training work."""
    from jdiff.models import model_config

    try:
        fields = model_config(config.model)
    except ValueError as e:
        raise ConfigError(_one_line(e)) from None
    bad = sorted(set(config.model_overrides) - set(fields))
    if bad:
        raise ConfigError(f"unknown model field(s) {bad} for {config.model!r}; allowed: {', '.join(sorted(fields))}")
