"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1) and the consistency
function's boundary-condition parameterisation (their Appendix C), shared with `jdiff.distill`.

In EDM variables (x_edm = x/alpha, s = sigma/alpha) a consistency model is
  f(x, s) = c_skip(s) x + c_out(s) F(x, s),
  c_skip(s) = sigma_data^2/((s - s_min)^2 + sigma_data^2),  c_out(s) = sigma_data (s - s_min)/sqrt(sigma_data^2 + s^2),
so f(x, s_min) = x exactly (c_skip = 1, c_out = 0). F is the network output in EDM's preconditioning (EDM
Table 1: D = c_skip^EDM x + c_out^EDM F with c_skip^EDM = sigma_data^2/(s^2 + sigma_data^2), c_out^EDM =
s sigma_data/sqrt(s^2 + sigma_data^2)); jdiff reads F from any model through its denoiser D (the x0 of
`jdiff.sampling.denoiser`, whatever the model predicts): F = (D - c_skip^EDM x)/c_out^EDM, so
  f(x, s) = c_skip(s) x + ((s - s_min)/s) (D(x; s) - c_skip^EDM(s) x),
which for an EDM-preconditioned network is the paper's f exactly, and with s_min = 0 is D itself.

Alg. 1 on a grid of N levels s_0 > s_1 > ... > s_{N-1} (the sampler's grid; the first is the model's
s_max): x <- f(x_T, s_0), then for n = 1..N-1: x <- f(x + sqrt(s_n^2 - s_min^2) z, s_n), z ~ N(0, I).
N model calls. Use it with the spacing the student was distilled for ("trailing": the first level is T-1).
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.edm import SIGMA_DATA
from jdiff.sampling.base import Sampler, register
from jdiff.spec import Spec

CONSISTENCY_SIGMA_MIN = Spec(
    float,
    0.0,
    "consistency: s_min, the EDM noise level where the consistency function is the identity (Song et al. 2023's "
    "epsilon; a distilled student records its own; 0: f is the model's denoiser D)",
    ge=0.0,
)
CONSISTENCY_SIGMA_DATA = Spec(float, SIGMA_DATA, "consistency: sigma_data of c_skip and c_out", gt=0.0)


def boundary_coefficients(sigma, sigma_min, sigma_data=SIGMA_DATA):
    """(c_skip, c_out) of Song et al. 2023, Appendix C (eq. after (26)): c_skip(s_min) = 1, c_out(s_min) = 0."""
    d = sigma - sigma_min
    return sigma_data**2 / (d**2 + sigma_data**2), sigma_data * d / jnp.sqrt(sigma_data**2 + sigma**2)


def consistency_function(x0, x_edm, sigma, sigma_min, sigma_data=SIGMA_DATA):
    """f(x_edm, sigma) from the denoiser's x0 = D(x_edm; sigma), all in EDM variables (see module docstring):
    c_skip x + (c_out/c_out^EDM)(D - c_skip^EDM x), with c_out/c_out^EDM = (sigma - sigma_min)/sigma."""
    c_skip, _ = boundary_coefficients(sigma, sigma_min, sigma_data)
    c_skip_edm = sigma_data**2 / (sigma**2 + sigma_data**2)
    return c_skip * x_edm + ((sigma - sigma_min) / sigma) * (x0 - c_skip_edm * x_edm)


def consistency_step(denoise, x, s, noise, opts):
    """Alg. 1 step n: the first step evaluates f at x_T; later ones re-noise the last estimate to level n."""
    g, smin, sd = s.row, opts["sigma_min"], opts["sigma_data"]
    sig = g.sigma / g.alpha
    z = noise(x.shape, x.dtype)
    x_edm = jnp.where(s.is_first, x / g.alpha, x + jnp.sqrt(jnp.maximum(sig**2 - smin**2, 0.0)) * z)
    d = denoise(x_edm * g.alpha, g.t, g.alpha, g.sigma)
    return consistency_function(d.x0, x_edm, sig, smin, sd)


CONSISTENCY = register(
    Sampler(
        name="consistency",
        step=consistency_step,
        nfe=lambda n: n,
        stochastic=True,
        zero_terminal_snr=False,
        options={"sigma_min": CONSISTENCY_SIGMA_MIN, "sigma_data": CONSISTENCY_SIGMA_DATA},
    )
)
