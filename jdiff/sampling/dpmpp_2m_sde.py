"""DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", the SDE variant of Alg. 2; k-diffusion
`sample_dpmpp_2m_sde` with eta = 1 and the midpoint solver type; diffusers DPMSolverMultistepScheduler with
algorithm_type="sde-dpmsolver++"), a second-order multistep solver of the reverse SDE in x0 space.

With lambda = log(alpha/sigma), h = lambda_next - lambda, D_i the model's x0 at level i and z ~ N(0, I):
  x_next = (sigma_next/sigma) e^{-h} x + alpha_next (1 - e^{-2h}) (D_i + D1/2) + sigma_next sqrt(1 - e^{-2h}) z,
  D1 = (D_i - D_{i-1})/r, r = h_{i-1}/h;   D1 = 0 (first order) on the first step, on the last step (to
  sigma = 0, where it returns D_i) and for N < 15 on the step into the grid's smallest noise level (the
  lower-order final steps of DPM-Solver, `jdiff.sampling.dpm_solver.multistep_order`).
One model call per step; it starts from a zero-terminal-SNR level (there e^{-h} = 0).
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.sampling.dpm_solver import log_alpha_sigma, multistep_init, multistep_order


def dpmpp_2m_sde_step(denoise, carry, s, noise, opts):
    x, x0_prev, h_prev = carry
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    h = log_alpha_sigma(g.alpha_next, g.sigma_next) - log_alpha_sigma(g.alpha, g.sigma)  # +inf on the last step
    first_order = multistep_order(s.index, s.num_steps, 2) == 1
    r = jnp.where(first_order, 1.0, h_prev / jnp.where(first_order, 1.0, h))
    d1 = jnp.where(first_order, 0.0, (d.x0 - x0_prev) / r)
    decay = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
    z = noise(x.shape, x.dtype)
    x_next = (
        (g.sigma_next / g.sigma) * jnp.exp(-h) * x
        + g.alpha_next * decay * (d.x0 + 0.5 * d1)
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
        init=multistep_init,
        output=lambda carry: carry[0],
    )
)
