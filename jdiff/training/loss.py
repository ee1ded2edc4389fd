"""The loss a training run minimises, chosen by the config's diffusion section.

`training_loss` is the one place train_step's loss comes from; each kind of loss is a function
(diffusion config, model_fn, schedule, x0, rng) -> (loss scalar, metrics {"mse": ...}). Adding a loss
is one function here (its math lives in the math layer: `jdiff.losses` and siblings) and one config choice.
"""

from __future__ import annotations

from typing import Callable

import jax

import jdiff
from jdiff import edm, flow
from jdiff.config.schema import DiffusionConfig
from jdiff.forward import EDM_PREDICTIONS, FLOW_PREDICTIONS
from jdiff.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
LossFn = Callable[..., tuple[Array, dict]]  # (model_fn, schedule, x0, rng, t_probs) -> (loss, aux)


def simple_loss(d: DiffusionConfig, model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array):
    """The weighted denoising MSE of `jdiff.diffusion_loss` (DDPM eq. 14, min-SNR weighting)."""
    return jdiff.diffusion_loss(
        model_fn, schedule, x0, rng, prediction=d.prediction, weighting=d.weighting, min_snr_gamma=d.min_snr_gamma
    )


def edm_loss(d: DiffusionConfig, model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array):
    """EDM's loss (Karras et al. 2022, eq. 2 / Sec. 5, `jdiff.edm.edm_loss`) for predictions edm, edm_vp, edm_ve:
    continuous sigma from the preconditioning's training distribution; the schedule is not used (it only sets
    the sampling grid). model_fn is the network F, called as F(c_in x, c_noise)."""
    return edm.edm_loss(
        model_fn, x0, rng, preconditioning=edm.preconditioning_of(d.prediction), p_mean=d.edm_p_mean, p_std=d.edm_p_std
    )


def flow_matching_loss(d: DiffusionConfig, model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array):
    """The flow-matching velocity MSE (`jdiff.flow.flow_loss`) for prediction flow: continuous s from
    diffusion.t_sampling, shifted by diffusion.shift; the model is called with t = T s."""
    return flow.flow_loss(
        model_fn,
        x0,
        rng,
        num_timesteps=schedule.num_timesteps,
        t_sampling=d.t_sampling,
        mean=d.logit_mean,
        std=d.logit_std,
        scale=d.mode_scale,
        shift=d.shift,
    )


def improved_loss(d: DiffusionConfig, model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array, **vlb):
    """Improved DDPM's hybrid (L_simple + lambda L_vlb) or VLB loss (`jdiff.losses.vlb_loss`); `vlb` holds the
    data's `levels` and the importance-sampling `t_probs` (None: uniform t)."""
    return jdiff.losses.vlb_loss(
        model_fn,
        schedule,
        x0,
        rng,
        prediction=d.prediction,
        loss=d.loss,
        vlb_weight=d.vlb_weight,
        weighting=d.weighting,
        min_snr_gamma=d.min_snr_gamma,
        **vlb,
    )


def training_loss(
    d: DiffusionConfig, model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array, *, levels=256, t_probs=None
):
    """The loss of a run with diffusion settings `d` on the batch x0 (B, H, W, C); see module docstring.
    levels: values per pixel of the data (the VLB's decoder term); t_probs: (T,) importance-sampling
    probabilities of t (diffusion.t_sampling importance) or None."""
    if d.loss in ("hybrid", "vlb"):
        return improved_loss(d, model_fn, schedule, x0, rng, levels=levels, t_probs=t_probs)
    if d.prediction in EDM_PREDICTIONS:
        return edm_loss(d, model_fn, schedule, x0, rng)
    if d.prediction in FLOW_PREDICTIONS:
        return flow_matching_loss(d, model_fn, schedule, x0, rng)
    return simple_loss(d, model_fn, schedule, x0, rng)


def make_loss(d: DiffusionConfig, levels: int = 256) -> LossFn:
    """The loss function `train_step` takes for a run with diffusion settings `d` and data of `levels` values
    per pixel: (model_fn, schedule, x0, rng, t_probs) -> (loss, aux) (`training_loss`)."""

    def loss_fn(model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array, t_probs=None):
        return training_loss(d, model_fn, schedule, x0, rng, levels=levels, t_probs=t_probs)

    return loss_fn
