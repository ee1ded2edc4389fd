"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), on any sub-sequence of timesteps.

Between levels with abar and abar_prev the respaced beta is 1 - abar/abar_prev (Nichol & Dhariwal 2021,
sec. 4); x_prev = mu-tilde(x0, x) + sqrt(var) z with mu-tilde from DDPM eq. 7 and var one of
  "posterior": beta-tilde = beta (1 - abar_prev)/(1 - abar),  "beta": beta,
  "learned": exp(f log beta + (1 - f) log beta-tilde), f = (v + 1)/2 from the model's extra channels
  (Nichol & Dhariwal 2021, eq. 15).
No noise is added on the last step (to the clean level).
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.spec import Spec

VARIANCES = ("posterior", "beta", "learned")
VARIANCE = Spec(
    str,
    "posterior",
    "DDPM step variance: posterior (beta-tilde), beta, or learned (Nichol & "
    "Dhariwal 2021 eq. 15; the model outputs 2x channels)",
    choices=VARIANCES,
    static=True,
)


def ddpm_step(denoise, x, s, noise, opts):
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    abar, abar_prev = g.alpha**2, g.alpha_next**2
    beta = 1.0 - abar / abar_prev
    coef1 = beta * g.alpha_next / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) / (1.0 - abar)
    mean = coef1 * d.x0 + coef2 * x
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    if opts["variance"] == "posterior":
        var = post_var
    elif opts["variance"] == "beta":
        var = beta
    else:
        if d.var_values is None:
            raise ValueError('variance="learned" needs a model whose output has 2x the input channels.')
        # log beta-tilde is clipped away from log 0 on the last step; no noise is added there anyway.
        min_log = jnp.log(jnp.maximum(post_var, 1e-20))
        frac = (d.var_values + 1.0) / 2.0
        var = jnp.exp(frac * jnp.log(beta) + (1.0 - frac) * min_log)
    z = noise(x.shape, x.dtype)
    return mean + jnp.where(s.is_last, 0.0, jnp.sqrt(var)) * z


DDPM = register(
    Sampler("ddpm", ddpm_step, nfe=lambda n: n, stochastic=True, zero_terminal_snr=True, options={"variance": VARIANCE})
)
