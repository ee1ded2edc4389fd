"""Euler ancestral sampler (k-diffusion `sample_euler_ancestral` with eta = 1; diffusers
EulerAncestralDiscreteScheduler), written for a VP model.

In EDM variables (x_edm = x/alpha, s = sigma/alpha, D = the model's x0) each step from s to s_next splits
s_next into a deterministic and a fresh-noise part (Song et al. 2021's ancestral step in sigma form):
  s_up = s_next sqrt(1 - s_next^2/s^2),  s_down = sqrt(s_next^2 - s_up^2),
  x_edm_next = x_edm + (s_down - s) (x_edm - D)/s + s_up z,  z ~ N(0, I).
Back in VP variables (x = alpha x_edm) this is, with every factor finite even at alpha = 0:
  x_next = alpha_next [(s_down/sigma) x + (1 - s_down alpha/sigma) D + s_up z],
so it also starts from a zero-terminal-SNR level (s = inf: s_down = 0, s_up = s_next). The last step (to
s_next = 0) returns D. One model call per step.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register


def euler_ancestral_step(denoise, x, s, noise, opts):
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    s_next = g.sigma_next / g.alpha_next
    ratio = g.sigma_next * g.alpha / (g.alpha_next * g.sigma)  # s_next / s, 0 at alpha = 0
    s_up = s_next * jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))
    s_down = s_next * ratio  # sqrt(s_next^2 - s_up^2)
    z = noise(x.shape, x.dtype)
    return g.alpha_next * ((s_down / g.sigma) * x + (1.0 - s_down * g.alpha / g.sigma) * d.x0 + s_up * z)


EULER_ANCESTRAL = register(
    Sampler(name="euler_ancestral", step=euler_ancestral_step, nfe=lambda n: n, stochastic=True, zero_terminal_snr=True)
)
