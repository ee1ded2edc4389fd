"""DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++", multistep third order in x0 space; diffusers
DPMSolverMultistepScheduler with solver_order=3, algorithm_type="dpmsolver++"; k-diffusion
`sample_dpmpp_3m_sde` with eta = 0 is this sampler with lower_order_final=False, solver_type="heun"),
deterministic.

With lambda = log(alpha/sigma), h = lambda_next - lambda_i, r0 = h_{i-1}/h, r1 = h_{i-2}/h and D_i the model's
x0 at level i:
  D1_0 = (D_i - D_{i-1})/r0,  D1_1 = (D_{i-1} - D_{i-2})/r1,
  D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1)/(r0 + r1),
  x_next = (sigma_next/sigma) x - alpha_next (e^{-h} - 1) D_i + alpha_next ((e^{-h} - 1)/h + 1) D1
           - alpha_next ((e^{-h} - 1 + h)/h^2 - 1/2) D2                    (third order),
  x_next = (sigma_next/sigma) x - alpha_next (e^{-h} - 1) D_i + w(h) alpha_next D1_0
                                              (second order, = DPM-Solver++(2M) with its solver_type's w),
  x_next = (sigma_next/sigma) x - alpha_next (e^{-h} - 1) D_i               (first order, = DDIM).
Order min(3, i + 1) (multistep warm-up), first order on the last step (to sigma = 0) and on the step into the
grid's smallest noise level, by lower_order_final (`jdiff.sampling.multistep.multistep_order`): "diffusers"
(the default) at most second order when N < 15, "none" unchanged (k-diffusion), "ddim_last" first order when
N < 15 (and at most second on the step before).
One model call per step.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.sampling.multistep import (
    LOWER_ORDER_FINAL,
    SOLVER_TYPE,
    log_alpha_sigma,
    multistep_order,
    second_order_weight,
)


def dpmpp_3m_step(denoise, carry, s, noise, opts):
    x, m1, m2, h1, h2 = carry  # x0 at levels i-1, i-2; h_{i-1} = lambda_i - lambda_{i-1}, h_{i-2}
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    m0 = d.x0
    h = log_alpha_sigma(g.alpha_next, g.sigma_next) - log_alpha_sigma(g.alpha, g.sigma)  # +inf on the last step
    order = multistep_order(s.index, s.num_steps, 3, opts["lower_order_final"])
    hs = jnp.where(order > 1, h, 1.0)  # finite stand-in where the first-order update is used
    r0 = jnp.where(order > 1, h1 / hs, 1.0)
    r1 = jnp.where(order > 2, h2 / hs, 1.0)
    em1 = jnp.expm1(-h)  # e^{-h} - 1
    em1s = jnp.expm1(-hs)
    d1_0 = (m0 - m1) / r0
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    base = (g.sigma_next / g.sigma) * x - g.alpha_next * em1 * m0
    second = base + second_order_weight(hs, opts["solver_type"]) * g.alpha_next * d1_0
    third = base + g.alpha_next * ((em1s + hs) / hs) * d1 - g.alpha_next * ((em1s + hs) / hs**2 - 0.5) * d2
    x_next = jnp.where(order == 1, base, jnp.where(order == 2, second, third))
    return x_next, m0, m1, h, h1


def _init(x):
    """Carry (x, x0 at the two previous levels, the two previous step sizes in lambda)."""
    zero = jnp.zeros((), x.dtype)
    return x, jnp.zeros_like(x), jnp.zeros_like(x), zero, zero


DPMPP_3M = register(
    Sampler(
        "dpmpp_3m",
        dpmpp_3m_step,
        nfe=lambda n: n,
        stochastic=False,
        zero_terminal_snr=True,
        options={"lower_order_final": LOWER_ORDER_FINAL, "solver_type": SOLVER_TYPE},
        init=_init,
        output=lambda carry: carry[0],
    )
)
