"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), multistep second order in x0 space.

With lambda = log(alpha/sigma) and h_i = lambda_next - lambda_i:
x_next = (sigma_next/sigma) x - alpha_next (exp(-h) - 1) D,
D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_{i-1}/h_i, or
D = x0_i (first order) on the first step, on the last step (to sigma = 0) and, for N < 15 steps, on the step
into the smallest noise level of the grid (diffusers' lower_order_final; `multistep_order`): with a narrow,
well-separated Gaussian mixture and an exact predictor this makes 5 NFE on the linspace / karras grids 1.2x /
1.5x more accurate than DDIM instead of 2.7x / 1.2x less.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.schedules import ABAR_FLOOR


def log_alpha_sigma(alpha, sigma):
    """lambda = log(alpha/sigma), +inf at the clean level (sigma = 0). Zero-terminal-SNR: alpha = 0 at the first
    level is floored at sqrt(ABAR_FLOOR) so lambda stays finite."""
    return jnp.log(jnp.maximum(alpha, ABAR_FLOOR**0.5)) - jnp.log(sigma)


LOWER_ORDER_FINAL_BELOW = 15


def multistep_order(index, num_steps: int, max_order: int):
    """The order of multistep step `index` of `num_steps`: min(max_order, index + 1) (the warm-up from one
    stored x0), 1 on the last step (to sigma = 0: the final denoising), and, when num_steps <
    LOWER_ORDER_FINAL_BELOW, at most k on the k-th step before it (diffusers' lower_order_final: the step into
    the smallest noise level of a short grid is first order, the one before at most second). int32 scalar."""
    num_steps = jnp.asarray(num_steps, jnp.int32)  # as data: the program's structure does not depend on N
    order = jnp.minimum(max_order, index + 1)
    order = jnp.where(num_steps < LOWER_ORDER_FINAL_BELOW, jnp.minimum(order, num_steps - 1 - index), order)
    return jnp.where(index >= num_steps - 1, 1, jnp.maximum(order, 1))


def dpmpp_2m_step(denoise, carry, s, noise, opts):
    x, x0_prev, h_prev = carry
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    lam = log_alpha_sigma(g.alpha, g.sigma)
    lam_next = log_alpha_sigma(g.alpha_next, g.sigma_next)  # +inf on the last step
    h = lam_next - lam
    first_order = multistep_order(s.index, s.num_steps, 2) == 1
    r = h_prev / jnp.where(first_order, 1.0, h)
    r = jnp.where(first_order, 1.0, r)
    d2 = (1.0 + 0.5 / r) * d.x0 - (0.5 / r) * x0_prev
    dd = jnp.where(first_order, d.x0, d2)
    x_next = (g.sigma_next / g.sigma) * x - g.alpha_next * jnp.expm1(-h) * dd
    return x_next, d.x0, h


def multistep_init(x):
    """Carry (x, previous x0, previous step size h) of the multistep update."""
    return x, jnp.zeros_like(x), jnp.zeros((), x.dtype)


DPMPP_2M = register(
    Sampler(
        "dpmpp_2m",
        dpmpp_2m_step,
        nfe=lambda n: n,
        stochastic=False,
        zero_terminal_snr=True,
        init=multistep_init,
        output=lambda carry: carry[0],
    )
)
