"""jdiff: diffusion models in JAX/Flax.

Pure functions over a `Schedule` pytree: the forward process (`q_sample`), training losses
(`diffusion_loss`) and `lax.scan` samplers (`sample`); Flax Linen denoisers live in `jdiff.models`,
training in `jdiff.training`, input pipelines in `jdiff.data`.
"""

from jdiff.forward import convert_prediction, q_posterior, q_sample, to_x0_eps
from jdiff.losses import diffusion_loss, snr_weight
from jdiff.sampling import SAMPLERS, SPACINGS, ddim_invert, sample
from jdiff.schedules import (
    Schedule,
    alpha_bar_at,
    get_schedule,
    log_snr_at,
    rescale_zero_terminal_snr,
    schedule_from_betas,
    t_from_log_snr,
)

__version__ = "0.1.0"

__all__ = [
    "Schedule",
    "get_schedule",
    "schedule_from_betas",
    "rescale_zero_terminal_snr",
    "alpha_bar_at",
    "log_snr_at",
    "t_from_log_snr",
    "q_sample",
    "q_posterior",
    "to_x0_eps",
    "convert_prediction",
    "diffusion_loss",
    "snr_weight",
    "sample",
    "ddim_invert",
    "SAMPLERS",
    "SPACINGS",
]
