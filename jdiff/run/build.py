"""Builds what a `TrainConfig` describes: the data source, the model and the noise schedule. Errors are
`ConfigError`s with one-line messages."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

import jdiff
from jdiff._logs import one_line
from jdiff.config import ConfigError, TrainConfig
from jdiff.schedules import Schedule

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_source(config: TrainConfig):
    """`jdiff.data.make_source` for the config's data section."""
    from jdiff.data import make_source

    d = config.data
    try:
        return make_source(
            d.dataset,
            split=d.split,
            image_size=d.image_size,
            channels=d.channels,
            data_dir=d.data_dir,
            on_bad_image=d.on_bad_image,
            workers=d.workers,
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"cannot open dataset {d.dataset!r}: {one_line(e)}") from None


def model_num_classes(config: TrainConfig, source_classes: Optional[int]) -> Optional[int]:
    """Label count the model is conditioned on: the dataset's, unless unconditional (None)."""
    if not config.data.class_conditional or not source_classes:
        return None
    return int(source_classes)


def build_model(config: TrainConfig, num_classes: Optional[int]) -> nn.Module:
    """`jdiff.models.get_model(model.name, **model.fields)` with num_classes and the compute dtype."""
    from jdiff.models import get_model

    fields = dict(config.model.fields)
    fields.setdefault("num_classes", num_classes)
    fields["dtype"] = COMPUTE_DTYPES[config.model.dtype]
    try:
        return get_model(config.model.name, **fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build model {config.model.name!r}: {one_line(e)}") from None


def build_schedule(config: TrainConfig) -> Schedule:
    """The noise schedule (a pytree; pass it to jitted code as an argument)."""
    d = config.diffusion
    try:
        if d.schedule == "flow":
            return jdiff.get_schedule("flow", d.num_timesteps, shift=d.shift)
        return jdiff.get_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)
    except ValueError as e:
        raise ConfigError(one_line(e)) from None
