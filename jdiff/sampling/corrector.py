"""The predictor-corrector step of Karras et al. 2022 ("EDM", Alg. 1 lines 4-8) in EDM variables, shared by
`heun` (trapezoidal correction: EDM's rule), `edm_sde` (the same after churn) and `exp_heun` (an
exponential-integrator correction).

A VP state x = alpha x0 + sigma eps is x_edm = x/alpha at the EDM noise level s = sigma/alpha; the model's x0
is EDM's denoiser D(x_edm; s) (the model is called on the VP state alpha x_edm at timestep t). Each step from s
to s' takes the Euler predictor x_e = x_edm + (s' - s) (x_edm - D(x_edm; s))/s, then, unless it is the last
step (s' = 0: Euler only, so N steps cost 2N - 1 model calls), corrects with D(x_e; s').
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

CORRECTIONS = ("trapezoid", "exponential")


def corrected(x_edm, d0, d1, sig, sig_next, correction: str):
    """The corrected x_edm at s' from x_edm at s, D0 = D(x_edm; s) and D1 = D(x_e; s').

    trapezoid (EDM Alg. 1 line 8): x' = x + (s' - s) (d + d')/2 with d = (x - D0)/s, d' = (x_e - D1)/s'.
    exponential: dx/ds = (x - D)/s has the exact solution x(s') = (s'/s) x + s' int_{s'}^{s} D(u)/u^2 du;
    with D linear in lambda = -log s between D0 and D1, integrated exactly (h = log(s/s')):
    x' = (s'/s) x + (1 - e^{-h}) D0 + (1 - (1 - e^{-h})/h) (D1 - D0)."""
    if correction == "trapezoid":
        x_e = x_edm + (sig_next - sig) * (x_edm - d0) / sig
        return x_edm + (sig_next - sig) * 0.5 * ((x_edm - d0) / sig + (x_e - d1) / sig_next)
    if correction == "exponential":
        h = jnp.log(sig / sig_next)
        w = (h + jnp.expm1(-h)) / h
        return (sig_next / sig) * x_edm - jnp.expm1(-h) * d0 + w * (d1 - d0)
    raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")


def heun_from(denoise, x_edm, t, alpha, sigma, g, is_last, correction: str):
    """One step from x_edm (EDM-scaled) at the level (t, alpha, sigma) to grid row g's next level: Euler
    predictor, then `corrected` (Euler only when is_last). Returns the VP-scaled x at the next level."""
    sig, sig_next = sigma / alpha, g.sigma_next / g.alpha_next
    d = denoise(x_edm * alpha, t, alpha, sigma)
    x_euler = x_edm + (sig_next - sig) * (x_edm - d.x0) / sig

    def correct(_):
        d2 = denoise(x_euler * g.alpha_next, g.t_next, g.alpha_next, g.sigma_next)
        return corrected(x_edm, d.x0, d2.x0, sig, sig_next, correction)

    return lax.cond(is_last, lambda _: x_euler, correct, None) * g.alpha_next
