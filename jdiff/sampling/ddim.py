"""DDIM (Song et al. 2021, eq. 12):

x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z,
s = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev)   (eq. 16).
eta = 0 is the deterministic probability-flow sampler; eta = 1 on the full grid is DDPM with the posterior
variance.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.spec import Spec

ETA = Spec(
    float,
    0.0,
    "DDIM stochasticity (Song et al. 2021, eq. 16): 0 is deterministic, 1 on the full grid is DDPM",
    ge=0.0,
    le=1.0,
)


def ddim_step(denoise, x, s, noise, opts):
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    abar, abar_prev = g.alpha**2, g.alpha_next**2
    std = opts["eta"] * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    dir_coef = jnp.sqrt(jnp.maximum(1.0 - abar_prev - std**2, 0.0))
    z = noise(x.shape, x.dtype)
    return g.alpha_next * d.x0 + dir_coef * d.eps + std * z


DDIM = register(
    Sampler(
        name="ddim",
        step=ddim_step,
        nfe=lambda n: n,
        stochastic=True,
        zero_terminal_snr=True,
        options={"eta": ETA},
        final_level_first=True,
    )
)
