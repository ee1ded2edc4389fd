"""Euler ODE sampler of Karras et al. 2022 ("EDM", Alg. 1 without the 2nd-order correction) on a VP model.

It integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma in the EDM variables
x_edm = x/alpha, sigma_edm = sigma/alpha, where D is the model's x0. On the same grid it equals DDIM with
eta = 0: x_next = alpha_next x_euler = (sigma_next/sigma) x + (alpha_next - sigma_next alpha/sigma) D, the form
the step uses, which is finite at abar = 0 (a zero-terminal-SNR level, e.g. the flow schedule's s = 1). On the
flow schedule's grid it is diffusers' FlowMatchEulerDiscreteScheduler, x_s' = x_s + (s' - s) v (`jdiff.flow`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jdiff.sampling.base import Sampler, register


class EdmEuler(NamedTuple):
    """One Euler step in EDM variables: x_edm and sigma_edm at this level and the next, the slope
    (x_edm - D)/sigma_edm, and the Euler estimate x_euler at the next level (all EDM-scaled)."""

    x_edm: jax.Array
    sig: jax.Array
    sig_next: jax.Array
    slope: jax.Array
    x_euler: jax.Array


def edm_euler(denoise, x, g) -> EdmEuler:
    """The Euler step (EDM Alg. 1, lines 4-6) from x at grid row g."""
    d = denoise(x, g.t, g.alpha, g.sigma)
    sig, sig_next = g.sigma / g.alpha, g.sigma_next / g.alpha_next
    x_edm = x / g.alpha
    slope = (x_edm - d.x0) / sig
    return EdmEuler(x_edm, sig, sig_next, slope, x_edm + (sig_next - sig) * slope)


def euler_step(denoise, x, s, noise, opts):
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    ratio = g.sigma_next / g.sigma
    return ratio * x + (g.alpha_next - ratio * g.alpha) * d.x0  # = alpha_next * edm_euler(...).x_euler


EULER = register(Sampler(name="euler", step=euler_step, nfe=lambda n: n, stochastic=False, zero_terminal_snr=True))
