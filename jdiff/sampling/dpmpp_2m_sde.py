"""DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", the SDE variant of Alg. 2; k-diffusion
`sample_dpmpp_2m_sde` with eta = 1; diffusers DPMSolverMultistepScheduler with
algorithm_type="sde-dpmsolver++"), a second-order multistep solver of the reverse SDE in x0 space.

With lambda = log(alpha/sigma), h = lambda_next - lambda, D_i the model's x0 at level i and z ~ N(0, I):
  x_next = (sigma_next/sigma) e^{-h} x + alpha_next (1 - e^{-2h}) D_i + w(2h) alpha_next D1
           + sigma_next sqrt(1 - e^{-2h}) z,
  D1 = (D_i - D_{i-1})/r, r = h_{i-1}/h, w(2h) = (1 - e^{-2h})/2 (solver_type "midpoint") or
  1 - (1 - e^{-2h})/(2h) ("heun");   D1 = 0 (first order) on the first step and on the last step (to
  sigma = 0, where it returns D_i): diffusers' and k-diffusion's rule (lower_order_final "diffusers" or
  "none"); "ddim_last" also lowers the step into the grid's smallest noise level when N < 15
  (`jdiff.sampling.multistep.multistep_order`).
One model call per step; it starts from a zero-terminal-SNR level (there e^{-h} = 0).
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


def dpmpp_2m_sde_step(denoise, carry, s, noise, opts):
    x, x0_prev, h_prev = carry
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    h = log_alpha_sigma(g.alpha_next, g.sigma_next) - log_alpha_sigma(g.alpha, g.sigma)  # +inf on the last step
    first_order = multistep_order(s.index, s.num_steps, 2, opts["lower_order_final"]) == 1
    hs = jnp.where(first_order, 1.0, h)
    r = jnp.where(first_order, 1.0, h_prev / hs)
    d1 = jnp.where(first_order, 0.0, (d.x0 - x0_prev) / r)
    decay = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
    w = second_order_weight(2.0 * hs, opts["solver_type"])
    z = noise(x.shape, x.dtype)
    x_next = (
        (g.sigma_next / g.sigma) * jnp.exp(-h) * x
        + g.alpha_next * (decay * d.x0 + w * d1)
        + g.sigma_next * jnp.sqrt(decay) * z
    )
    return x_next, d.x0, h


DPMPP_2M_SDE = register(
    Sampler(
        "dpmpp_2m_sde",
        dpmpp_2m_sde_step,
        nfe=lambda n: n,
        stochastic=True,
        zero_terminal_snr=True,
        options={"lower_order_final": LOWER_ORDER_FINAL, "solver_type": SOLVER_TYPE},
        init=multistep_init,
        output=lambda carry: carry[0],
    )
)
