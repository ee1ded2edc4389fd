"""Heun's second-order ODE sampler of Karras et al. 2022 ("EDM", Alg. 1) on a VP model.

The Euler step of `jdiff.sampling.euler` plus the trapezoidal correction
x_next = x + (sigma_next - sigma) (slope + slope(x_euler, sigma_next))/2 (Alg. 1, lines 7-8), except on the
last step (to sigma = 0), which stays Euler: 2N - 1 model calls for N steps.
"""

from __future__ import annotations

from jax import lax

from jdiff.sampling.base import Sampler, register
from jdiff.sampling.euler import edm_euler


def heun_step(denoise, x, s, noise, opts):
    g = s.row
    e = edm_euler(denoise, x, g)

    def correct(_):
        d2 = denoise(e.x_euler * g.alpha_next, g.t_next, g.alpha_next, g.sigma_next)
        slope2 = (e.x_euler - d2.x0) / e.sig_next
        return e.x_edm + (e.sig_next - e.sig) * 0.5 * (e.slope + slope2)

    x_next = lax.cond(s.is_last, lambda _: e.x_euler, correct, None)
    return x_next * g.alpha_next


HEUN = register(
    Sampler(name="heun", step=heun_step, nfe=lambda n: 2 * n - 1, stochastic=False, zero_terminal_snr=False)
)
