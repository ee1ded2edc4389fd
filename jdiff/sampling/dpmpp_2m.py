"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), multistep second order in x0 space; diffusers
DPMSolverMultistepScheduler (solver_order=2, algorithm_type="dpmsolver++") and k-diffusion `sample_dpmpp_2m`.

With lambda = log(alpha/sigma), h_i = lambda_next - lambda_i, r = h_{i-1}/h_i and D1 = (x0_i - x0_{i-1})/r:
  x_next = (sigma_next/sigma) x - alpha_next (exp(-h) - 1) x0_i + w(h) alpha_next D1,
  w = (1 - e^{-h})/2 (solver_type "midpoint", Alg. 2: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}) or
  w = 1 - (1 - e^{-h})/h ("heun"); w = 0 (first order, DDIM) on the first step and on the last step (to
sigma = 0). That is diffusers' and k-diffusion's rule alike (lower_order_final "diffusers" or "none"; for a
second-order method diffusers' lower_order_final changes nothing). lower_order_final="ddim_last" also makes
the step into the grid's smallest noise level first order when N < 15 (`jdiff.sampling.multistep`): with a
narrow, well-separated Gaussian mixture and an exact predictor this makes 5 NFE on the linspace / karras grids
1.2x / 1.5x more accurate than DDIM instead of 2.7x / 1.2x less.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.sampling.multistep import (
    LOWER_ORDER_FINAL,
    SOLVER_TYPE,
    log_alpha_sigma,
    multistep_init,
    multistep_order,
    second_order_weight,
)


def dpmpp_2m_step(denoise, carry, s, noise, opts):
    x, x0_prev, h_prev = carry
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    lam = log_alpha_sigma(g.alpha, g.sigma)
    lam_next = log_alpha_sigma(g.alpha_next, g.sigma_next)  # +inf on the last step
    h = lam_next - lam
    first_order = multistep_order(s.index, s.num_steps, 2, opts["lower_order_final"]) == 1
    hs = jnp.where(first_order, 1.0, h)  # finite stand-in where the first-order update is used
    r = jnp.where(first_order, 1.0, h_prev / hs)
    d1 = jnp.where(first_order, 0.0, (d.x0 - x0_prev) / r)
    w = second_order_weight(hs, opts["solver_type"])
    x_next = (g.sigma_next / g.sigma) * x - g.alpha_next * jnp.expm1(-h) * d.x0 + w * g.alpha_next * d1
    return x_next, d.x0, h


DPMPP_2M = register(
    Sampler(
        "dpmpp_2m",
        dpmpp_2m_step,
        nfe=lambda n: n,
        stochastic=False,
        zero_terminal_snr=True,
        options={"lower_order_final": LOWER_ORDER_FINAL, "solver_type": SOLVER_TYPE},
        init=multistep_init,
        output=lambda carry: carry[0],
    )
)
