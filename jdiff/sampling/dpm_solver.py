"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), multistep second order in x0 space.

With lambda = log(alpha/sigma) and h_i = lambda_next - lambda_i:
x_next = (sigma_next/sigma) x - alpha_next (exp(-h) - 1) D,
D = x0_i (first order: the first step, and the last step to sigma = 0), else
D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_{i-1}/h_i.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.schedules import ABAR_FLOOR


def _log_alpha_sigma(alpha, sigma):
    # Zero-terminal-SNR: alpha = 0 at the first level; floor it so lambda stays finite.
    return jnp.log(jnp.maximum(alpha, ABAR_FLOOR**0.5)) - jnp.log(sigma)


def dpmpp_2m_step(denoise, carry, s, noise, opts):
    x, x0_prev, h_prev = carry
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    lam = _log_alpha_sigma(g.alpha, g.sigma)
    lam_next = _log_alpha_sigma(g.alpha_next, g.sigma_next)  # +inf on the last step
    h = lam_next - lam
    first_order = s.is_first | s.is_last
    r = h_prev / jnp.where(first_order, 1.0, h)
    r = jnp.where(first_order, 1.0, r)
    d2 = (1.0 + 0.5 / r) * d.x0 - (0.5 / r) * x0_prev
    dd = jnp.where(first_order, d.x0, d2)
    x_next = (g.sigma_next / g.sigma) * x - g.alpha_next * jnp.expm1(-h) * dd
    return x_next, d.x0, h


def _init(x):
    """Carry (x, previous x0, previous step size h) of the multistep update."""
    return x, jnp.zeros_like(x), jnp.zeros((), jnp.float32)


DPMPP_2M = register(
    Sampler(
        "dpmpp_2m",
        dpmpp_2m_step,
        nfe=lambda n: n,
        stochastic=False,
        zero_terminal_snr=True,
        init=_init,
        output=lambda carry: carry[0],
    )
)
