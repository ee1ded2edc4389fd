"""Reverse-process samplers, each a `lax.scan` over its grid of noise levels, and their registry."""

# Importing the sampler modules registers them.
from jdiff.sampling import ddim, ddpm, dpm_solver, euler, heun  # noqa: F401
from jdiff.sampling.api import ddim_invert, sample
from jdiff.sampling.base import SAMPLERS, Sampler, Step, all_options, check_options, get_sampler, register
from jdiff.sampling.timesteps import SPACINGS, Grid, discrete_timesteps, karras_sigmas, make_grid

__all__ = ["sample", "ddim_invert", "SAMPLERS", "Sampler", "Step", "Grid", "get_sampler", "register",
           "check_options", "all_options", "SPACINGS", "discrete_timesteps", "karras_sigmas", "make_grid"]
