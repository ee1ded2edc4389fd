"""Reverse-process samplers, each a `lax.scan` over its grid of noise levels."""

# Importing the sampler modules registers them.
from jdiff.sampling import ddim, ddpm, dpm_solver, karras  # noqa: F401
from jdiff.sampling.api import ddim_invert, sample
from jdiff.sampling.base import SAMPLERS, Sampler, get_sampler, register
from jdiff.sampling.timesteps import SPACINGS, discrete_timesteps, karras_sigmas, make_grid

__all__ = ["sample", "ddim_invert", "SAMPLERS", "Sampler", "get_sampler", "register", "SPACINGS",
           "discrete_timesteps", "karras_sigmas", "make_grid"]
