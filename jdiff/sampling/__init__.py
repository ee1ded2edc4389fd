"""Reverse-process samplers, each a `lax.scan` over its grid of noise levels, and their registry.

Every module of this package other than the infrastructure below defines and registers samplers; they are
imported here (in name order), so adding a sampler is adding its module.
"""

import importlib
import pkgutil

from jdiff.sampling.api import ddim_invert, sample
from jdiff.sampling.base import (
    SAMPLERS,
    Sampler,
    Step,
    all_options,
    check_options,
    get_sampler,
    register,
    split_options,
)
from jdiff.sampling.timesteps import SPACINGS, Grid, default_spacing, discrete_timesteps, karras_sigmas, make_grid

_INFRASTRUCTURE = {"api", "base", "corrector", "denoiser", "multistep", "timesteps"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "sample",
    "ddim_invert",
    "SAMPLERS",
    "Sampler",
    "Step",
    "Grid",
    "get_sampler",
    "register",
    "check_options",
    "split_options",
    "all_options",
    "SPACINGS",
    "default_spacing",
    "discrete_timesteps",
    "karras_sigmas",
    "make_grid",
]
