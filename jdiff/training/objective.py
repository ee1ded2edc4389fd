"""The loss a training run minimises, chosen by the config's diffusion section.

`training_loss` is the one place train_step asks for its loss; each objective is a function
(diffusion config, model_fn, schedule, x0, rng) -> (loss scalar, metrics {"mse": ...}). Adding an objective
is one function here (its math lives in the math layer: `jdiff.losses` and siblings) and one config choice.
"""

from __future__ import annotations

from typing import Callable

import jax

import jdiff
from jdiff.config.schema import DiffusionConfig
from jdiff.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


def simple_loss(d: DiffusionConfig, model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array):
    """The weighted denoising MSE of `jdiff.diffusion_loss` (DDPM eq. 14, min-SNR weighting)."""
    return jdiff.diffusion_loss(
        model_fn, schedule, x0, rng, objective=d.objective, weighting=d.weighting, min_snr_gamma=d.min_snr_gamma
    )


def training_loss(d: DiffusionConfig, model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array):
    """The loss of a run with diffusion settings `d` on the batch x0 (B, H, W, C); see module docstring."""
    return simple_loss(d, model_fn, schedule, x0, rng)
