"""What the multistep exponential integrators in x0 space (dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, unipc) share:
the half log-SNR lambda of a grid level, the order of each step (warm-up and lower-order final steps), the
carry of the second-order methods and their two second-order rules.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.schedules import ABAR_FLOOR
from jdiff.spec import Spec

# diffusers' stand-in for abar = 0 (its rescale_betas_zero_snr sets abar_{T-1} = 2^-24): the alpha that a
# zero-terminal-SNR level's lambda is computed from.
ZERO_SNR_ALPHA = ABAR_FLOOR**0.5

LOWER_ORDER_FINAL_BELOW = 15
LOWER_ORDER_FINALS = ("diffusers", "none", "ddim_last")
LOWER_ORDER_FINAL = Spec(
    str,
    "diffusers",
    "multistep solvers' lower-order final steps (the last step, to sigma = 0, is always first order): "
    "diffusers (its lower_order_final=True: the step into the smallest noise level at most second order; "
    f"for DPM-Solver++ only when N < {LOWER_ORDER_FINAL_BELOW}), none (k-diffusion), ddim_last (N < "
    f"{LOWER_ORDER_FINAL_BELOW}: that step first order, the one before at most second; the most accurate "
    "at <= 5 steps)",
    choices=LOWER_ORDER_FINALS,
    static=True,
)
SOLVER_TYPES = ("midpoint", "heun")
SOLVER_TYPE = Spec(
    str,
    "midpoint",
    "second-order rule of the DPM-Solver++ steps (diffusers' solver_type): midpoint (D0 + D1/2, Lu et al. "
    "2022 Alg. 2) or heun (D1 weighted by phi_2, k-diffusion's dpmpp_3m_sde warm-up)",
    choices=SOLVER_TYPES,
    static=True,
)


def log_alpha_sigma(alpha, sigma):
    """lambda = log(alpha/sigma), +inf at the clean level (sigma = 0). Only a zero-terminal-SNR level
    (alpha = 0 exactly) is given a stand-in, alpha = ZERO_SNR_ALPHA, so that lambda stays finite there; any
    positive alpha, however small (cosine: 4.9e-5 at t = T-1), keeps its own lambda, so distinct levels never
    share one (h = 0 made r = 0/0 and NaN samples)."""
    return jnp.log(jnp.where(alpha > 0, alpha, ZERO_SNR_ALPHA)) - jnp.log(sigma)


def multistep_order(index, num_steps: int, max_order: int, lower_order_final: str, *, always: bool = False):
    """The order of multistep step `index` of `num_steps` (int32 scalar): min(max_order, index + 1) (the
    warm-up from one stored x0), 1 on the last step (to sigma = 0: the final denoising), and on the step before
    it (into the grid's smallest noise level), by `lower_order_final`:
      "diffusers": at most 2 when num_steps < LOWER_ORDER_FINAL_BELOW (DPMSolverMultistepScheduler), or for
        any num_steps with always=True (UniPCMultistepScheduler);
      "none": unchanged (k-diffusion);
      "ddim_last": when num_steps < LOWER_ORDER_FINAL_BELOW, at most k on the k-th step before the last
        (1 into the smallest noise level, at most 2 before it)."""
    num_steps = jnp.asarray(num_steps, jnp.int32)  # as data: the program's structure does not depend on N
    order = jnp.minimum(max_order, index + 1)
    short = jnp.asarray(True) if always else num_steps < LOWER_ORDER_FINAL_BELOW
    if lower_order_final == "diffusers":
        order = jnp.where(short & (index == num_steps - 2), jnp.minimum(order, 2), order)
    elif lower_order_final == "ddim_last":
        order = jnp.where(short, jnp.minimum(order, num_steps - 1 - index), order)
    elif lower_order_final != "none":
        raise ValueError(f"lower_order_final must be one of {LOWER_ORDER_FINALS}, got {lower_order_final!r}")
    return jnp.where(index >= num_steps - 1, 1, jnp.maximum(order, 1))


def multistep_init(x):
    """Carry (x, previous x0, previous step size h) of the second-order multistep updates."""
    return x, jnp.zeros_like(x), jnp.zeros((), x.dtype)


def second_order_weight(h, solver_type: str):
    """w of the second-order term w alpha_next D1 of a DPM-Solver++ step of size h (in lambda), D1 = (D_i -
    D_{i-1})/r: midpoint: (1 - e^{-h})/2 (Lu et al. 2022, Alg. 2: D = D_i + D1/2); heun: 1 - (1 - e^{-h})/h =
    h phi_2(h) (D linear in lambda, integrated exactly). For the SDE variant pass 2h."""
    if solver_type == "midpoint":
        return -0.5 * jnp.expm1(-h)
    if solver_type == "heun":
        return jnp.expm1(-h) / h + 1.0
    raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
