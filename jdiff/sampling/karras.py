"""Euler and Heun ODE samplers of Karras et al. 2022 ("EDM", Alg. 1) on a VP model.

They integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma in the EDM variables
x_edm = x/alpha, sigma_edm = sigma/alpha, where D is the model's x0. Euler on the same grid equals DDIM
with eta = 0; Heun adds the trapezoidal correction except on the last step (to sigma = 0).
"""

from __future__ import annotations

from jax import lax

from jdiff.sampling.base import Sampler, register


def euler_step(denoise, x, s, key, opts):
    d = denoise(x, s.t, s.alpha, s.sigma)
    sig, sig_next = s.sigma / s.alpha, s.sigma_next / s.alpha_next
    x_edm = x / s.alpha
    slope = (x_edm - d.x0) / sig
    return (x_edm + (sig_next - sig) * slope) * s.alpha_next


def heun_step(denoise, x, s, key, opts):
    d = denoise(x, s.t, s.alpha, s.sigma)
    sig, sig_next = s.sigma / s.alpha, s.sigma_next / s.alpha_next
    x_edm = x / s.alpha
    slope = (x_edm - d.x0) / sig
    x_euler = x_edm + (sig_next - sig) * slope

    def correct(_):
        d2 = denoise(x_euler * s.alpha_next, s.t_next, s.alpha_next, s.sigma_next)
        slope2 = (x_euler - d2.x0) / sig_next
        return x_edm + (sig_next - sig) * 0.5 * (slope + slope2)

    x_next = lax.cond(s.is_last, lambda _: x_euler, correct, None)
    return x_next * s.alpha_next


EULER = register(Sampler(name="euler", step=euler_step, nfe=lambda n: n, stochastic=False))
HEUN = register(Sampler(name="heun", step=heun_step, nfe=lambda n: 2 * n - 1, stochastic=False))
