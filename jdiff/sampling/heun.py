"""Heun's second-order ODE sampler, EDM's deterministic sampler (Karras et al. 2022, Alg. 1) on a VP model;
diffusers HeunDiscreteScheduler and k-diffusion `sample_heun` (s_churn = 0).

In EDM variables (x_edm = x/alpha, s = sigma/alpha, D = the model's x0) step i from s_i to s_{i+1}:
  d_i = (x_i - D(x_i; s_i))/s_i,  x_e = x_i + (s_{i+1} - s_i) d_i                 (Euler, lines 4-5),
  d'_i = (x_e - D(x_e; s_{i+1}))/s_{i+1},  x_{i+1} = x_i + (s_{i+1} - s_i)(d_i + d'_i)/2   (trapezoid, 6-8),
the last step (to s = 0) Euler only: 2N - 1 model calls for N steps. With spacing="karras" it is EDM's
deterministic sampler. The model is called at the grid level's timestep t (fractional for karras, from
`jdiff.schedules.t_from_log_snr`, as diffusers does). `exp_heun` is the same predictor with an
exponential-integrator correction, more accurate at 3-5 steps; `edm_sde` adds the churn of Alg. 2.
"""

from __future__ import annotations

from jdiff.sampling.base import Sampler, register
from jdiff.sampling.corrector import heun_from


def heun_step(denoise, x, s, noise, opts):
    g = s.row
    return heun_from(denoise, x / g.alpha, g.t, g.alpha, g.sigma, g, s.is_last, "trapezoid")


HEUN = register(
    Sampler(name="heun", step=heun_step, nfe=lambda n: 2 * n - 1, stochastic=False, zero_terminal_snr=False)
)
