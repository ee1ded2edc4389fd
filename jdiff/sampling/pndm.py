"""PNDM's pseudo linear multistep method (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds", eq. 12 with the transfer of eq. 11), as Stable Diffusion runs it: diffusers' PNDMScheduler with
``skip_prk_steps=True`` (SD 1.x's default scheduler) and the PLMS sampler of the CompVis / Stability reference code.

The transfer phi(x, e, t -> t_next) is the deterministic DDIM step with noise estimate e: x0 = (x - sigma e) /
alpha, x_next = alpha_next x0 + sigma_next e (PNDM eq. 11 written out). The noise estimate of step i is a linear
multistep combination of the model's eps at the last grid points:

  step 0: e = (eps(x_0, t_0) + eps(x', t_1)) / 2 with x' = phi(x_0, eps(x_0, t_0), t_0 -> t_1)  (2 model calls;
          one call and plain DDIM when it is the only step),
  step 1: e = (3 eps_1 - eps_0) / 2,   step 2: e = (23 eps_2 - 16 eps_1 + 5 eps_0) / 12,
  step >= 3: e = (55 eps_i - 59 eps_{i-1} + 37 eps_{i-2} - 9 eps_{i-3}) / 24,

so N steps take N + 1 model calls (N = 1: one). eps is the model's noise estimate at its own level: for an eps
model exactly diffusers' PNDMScheduler; for a v model the reference code's (v converted to eps at each level,
then combined), while diffusers combines the raw v outputs and converts the result at the current level (the two
agree to the method's order). With Stable Diffusion's grid run it as diffusers does: spacing "leading",
steps_offset 1, and final_level "first" for ``set_alpha_to_one=false`` (`jdiff.pretrained.text_to_image` does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register

AB = {  # Adams-Bashforth weights of eps_i, eps_{i-1}, ... (newest first)
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def transfer(x, e, alpha, sigma, alpha_next, sigma_next):
    """PNDM's transfer phi (eq. 11): the DDIM step from (alpha, sigma) to (alpha_next, sigma_next) with noise e."""
    return alpha_next * (x - sigma * e) / alpha + sigma_next * e


def pndm_init(x):
    """Carry (x, eps_{i-1}, eps_{i-2}, eps_{i-3}) (newest first; zeros before they exist)."""
    z = jnp.zeros_like(x)
    return x, z, z, z


def pndm_step(denoise, carry, s, noise, opts):
    x, e1, e2, e3 = carry
    g = s.row
    e0 = denoise(x, g.t, g.alpha, g.sigma).eps
    step = lambda e: transfer(x, e, g.alpha, g.sigma, g.alpha_next, g.sigma_next)  # noqa: E731

    def first(_):  # pseudo improved Euler: average with eps at the DDIM prediction of the next level
        return (e0 + denoise(step(e0), g.t_next, g.alpha_next, g.sigma_next).eps) / 2

    def multistep(_):  # Adams-Bashforth of the order the history allows (a lone step: e0, plain DDIM)
        hist = (e0, e1, e2, e3)
        k = jnp.minimum(s.index + 1, 4)
        combos = [e0] + [sum(w * h for w, h in zip(AB[n], hist)) for n in (2, 3, 4)]
        return jnp.select([k == 1, k == 2, k == 3], combos[:3], combos[3])

    e = jax.lax.cond(s.is_first & ~s.is_last, first, multistep, None)
    return step(e), e0, e1, e2


PNDM = register(
    Sampler(
        "pndm",
        pndm_step,
        nfe=lambda n: n + 1 if n > 1 else 1,
        stochastic=False,
        zero_terminal_snr=False,
        options={},
        final_level_first=True,
        init=pndm_init,
        output=lambda carry: carry[0],
    )
)
