"""EDM's stochastic sampler (Karras et al. 2022, Alg. 2) on a VP model: Heun's method (`jdiff.sampling.heun`,
the trapezoidal correction) after "churn", a temporary rise of the noise level with fresh noise; k-diffusion
`sample_heun` with s_churn > 0.

In EDM variables (x_edm = x/alpha, s = sigma/alpha, D = the model's x0), step i from s_i to s_{i+1}:
  gamma_i = min(S_churn/N, sqrt(2) - 1) if S_tmin <= s_i <= S_tmax else 0,
  s_hat = (1 + gamma_i) s_i,  x_hat = x_edm + sqrt(s_hat^2 - s_i^2) S_noise z,  z ~ N(0, I) (one draw per step),
then the Heun step of Alg. 1 from (x_hat, s_hat) to s_{i+1} (the last step, to s = 0, stays Euler): 2N - 1
model calls. The model sees s_hat's timestep (`Step.level`); above the schedule's largest level (churn at its
first level) that is T - 1 while x0 is formed with s_hat itself, as k-diffusion's discrete-schedule wrappers
do. S_churn = 0 is the deterministic sampler (Alg. 1), i.e. `heun`. All four options are traced (a change
never recompiles); the defaults are the paper's ImageNet-64 settings (Table 5).
S_tmin / S_tmax are EDM noise levels s = sqrt((1 - abar)/abar).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.sampling.corrector import heun_from
from jdiff.spec import Spec

S_CHURN = Spec(float, 40.0, "EDM stochasticity S_churn (Karras et al. 2022, Alg. 2); 0 is the Heun ODE sampler", ge=0.0)
S_TMIN = Spec(float, 0.05, "EDM S_tmin: churn only at noise levels sigma/alpha >= S_tmin", ge=0.0)
S_TMAX = Spec(float, 50.0, "EDM S_tmax: churn only at noise levels sigma/alpha <= S_tmax", ge=0.0)
S_NOISE = Spec(float, 1.003, "EDM S_noise: scale of the churn noise (slightly above 1 offsets denoiser bias)", gt=0.0)


def edm_sde_step(denoise, x, s, noise, opts):
    g = s.row
    sig = g.sigma / g.alpha
    churn = (sig >= opts["s_tmin"]) & (sig <= opts["s_tmax"])
    gamma = jnp.where(churn, jnp.minimum(opts["s_churn"] / s.num_steps, math.sqrt(2.0) - 1.0), 0.0)
    t_hat, a_hat, sg_hat = s.level(sig * (1.0 + gamma))
    use = gamma > 0.0
    t_hat, a_hat, sg_hat = (jnp.where(use, a, b) for a, b in ((t_hat, g.t), (a_hat, g.alpha), (sg_hat, g.sigma)))
    z = noise(x.shape, x.dtype)
    std = jnp.where(use, sig * jnp.sqrt(gamma * (2.0 + gamma)), 0.0)  # sqrt(s_hat^2 - s^2); exactly 0 without churn
    x_hat = x / g.alpha + std * opts["s_noise"] * z
    return heun_from(denoise, x_hat, t_hat, a_hat, sg_hat, g, s.is_last, "trapezoid")


def _validate(opts):
    lo, hi = opts["s_tmin"], opts["s_tmax"]
    if isinstance(lo, float) and isinstance(hi, float) and lo > hi:
        raise ValueError(f"edm_sde: s_tmin must be <= s_tmax, got s_tmin={lo} > s_tmax={hi}")


EDM_SDE = register(
    Sampler(
        "edm_sde",
        edm_sde_step,
        nfe=lambda n: 2 * n - 1,
        stochastic=True,
        zero_terminal_snr=False,
        options={"s_churn": S_CHURN, "s_tmin": S_TMIN, "s_tmax": S_TMAX, "s_noise": S_NOISE},
        validate=_validate,
    )
)
