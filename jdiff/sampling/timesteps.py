"""Which noise levels a sampler visits when it takes N <= T steps.

A sampler's *grid* is N model-evaluation levels, from the noisiest to the cleanest, followed by the clean
level (abar = 1). Every array here is built from `lax.iota` inside the trace (no N-sized constants), so the
lowered program of a sampler does not grow with N and the grid depends on the schedule's values only as
traced data.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdiff import flow
from jdiff.schedules import Schedule, t_from_log_snr

Array = jax.Array

SPACINGS = ("linspace", "leading", "trailing", "karras", "flow", "flow_sigmas")
FLOW_SPACINGS = ("flow", "flow_sigmas")
FINAL_LEVELS = ("clean", "first")


class Grid(NamedTuple):
    """Per-step data of a sampling run of N steps; every field has shape (N,), float32.

    Step i goes from level i (model timestep `t[i]`, x = alpha[i] x0 + sigma[i] eps) to level i+1, the
    last step to the final level: the clean level (alpha = 1, sigma = 0, t = -1), or with
    final_level="first" the schedule's first training level t = 0 (`make_grid`).
    """

    t: Array
    alpha: Array
    sigma: Array
    t_next: Array
    alpha_next: Array
    sigma_next: Array


def check_steps_offset(spacing: str, num_steps: int, num_timesteps: int, steps_offset: int) -> None:
    """ValueError unless steps_offset is an int >= 0, 0 for a spacing other than "leading", and keeps the
    largest leading timestep (N-1) (T // N) + steps_offset within T-1."""
    if not isinstance(steps_offset, (int, np.integer)) or isinstance(steps_offset, bool) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}.")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset applies to spacing 'leading' only (as diffusers'), got spacing {spacing!r}.")
    top = (num_steps - 1) * (num_timesteps // num_steps) + steps_offset
    if top > num_timesteps - 1:
        raise ValueError(
            f"steps_offset={steps_offset} puts the first of {num_steps} leading timesteps at {top}, beyond T-1="
            f"{num_timesteps - 1}; use fewer steps or a smaller offset."
        )


def discrete_timesteps(spacing: str, num_steps: int, num_timesteps: int, steps_offset: int = 0) -> Array:
    """N integer timesteps in [0, T-1], decreasing (Lin et al. 2024, Table 2):

    linspace: round(linspace(T-1, 0, N));  leading: (N-1-i) * (T // N) + steps_offset;
    trailing: round(T - i T/N) - 1. steps_offset (static, "leading" only) is diffusers' `steps_offset`
    (StableDiffusionPipeline sets 1). Returns int32 (N,).
    """
    n, big_t = num_steps, num_timesteps
    check_steps_offset(spacing, n, big_t, steps_offset)
    i = lax.iota(jnp.float32, n)
    if spacing == "linspace":
        step = (big_t - 1) / max(n - 1, 1)
        t = jnp.round((big_t - 1) - i * step)
    elif spacing == "leading":
        t = (n - 1 - i) * (big_t // n) + steps_offset
    elif spacing == "trailing":
        t = jnp.round(big_t - i * (big_t / n)) - 1
    else:
        raise ValueError(f"Unknown spacing {spacing!r}; allowed values: {list(SPACINGS)}.")
    return t.astype(jnp.int32)


def karras_sigmas(sigma_min: Array, sigma_max: Array, num_steps: int, rho: float = 7.0) -> Array:
    """Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho.

    sigma is the EDM noise level sqrt((1 - abar)/abar). Returns float32 (N,), decreasing.
    """
    i = lax.iota(jnp.float32, num_steps) / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + i * (lo - hi)) ** rho


def default_spacing(schedule: Schedule) -> str:
    """The spacing a sampler uses unless told: "flow" for a flow-matching schedule, else "linspace"."""
    return "flow" if schedule.flow_shift is not None else "linspace"


def flow_times(schedule: Schedule, spacing: str, num_steps: int) -> Array:
    """The N flow times s (`jdiff.flow`, s = sigma/(alpha + sigma)) of a flow spacing, decreasing, float32.

    With k the schedule's flow shift (1 for a schedule that is not "flow") and s(t) the flow time of step t:
      flow:        s_i = shift_k(linspace(s(T-1), s(0), N)_i)  (diffusers FlowMatchEulerDiscreteScheduler's
                   set_timesteps: linspace between its largest and smallest training sigma, shifted again);
      flow_sigmas: s_i = shift_k((1 - 1/T)(1 - i/N))  (DPMSolverMultistep / UniPCMultistep use_flow_sigmas).
    """
    big_t = schedule.num_timesteps
    k = jnp.ones((), jnp.float32) if schedule.flow_shift is None else schedule.flow_shift
    i = lax.iota(jnp.float32, num_steps)
    if spacing == "flow":
        a, sg = schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod
        s_hi, s_lo = (flow.from_vp(a[j], sg[j])[0] for j in (big_t - 1, 0))
        u = s_hi + i * ((s_lo - s_hi) / max(num_steps - 1, 1))
    elif spacing == "flow_sigmas":
        u = (1.0 - 1.0 / big_t) * (1.0 - i / num_steps)
    else:
        raise ValueError(f"Unknown flow spacing {spacing!r}; allowed values: {list(FLOW_SPACINGS)}.")
    return flow.shift_time(u, k)


def make_grid(
    schedule: Schedule,
    spacing: str,
    num_steps: int,
    *,
    rho: float = 7.0,
    steps_offset: int = 0,
    final_level: str = "clean",
) -> Grid:
    """The sampling grid of `num_steps` levels for `spacing` (see module docstring and `flow_times`).

    steps_offset: added to every "leading" timestep (`discrete_timesteps`). final_level: where the last step
    goes: "clean" (alpha = 1, sigma = 0, t = -1; the output is x0) or "first", the schedule's first training
    level t = 0 (alpha^2 = alphas_cumprod[0]; the output is x at that level), which is diffusers'
    DDIMScheduler with set_alpha_to_one=False (its final alpha_prod_t_prev = alphas_cumprod[0]).
    """
    big_t = schedule.num_timesteps
    if final_level not in FINAL_LEVELS:
        raise ValueError(f"Unknown final_level {final_level!r}; allowed values: {list(FINAL_LEVELS)}.")
    check_steps_offset(spacing, num_steps, big_t, steps_offset)
    if spacing in FLOW_SPACINGS:
        s = flow_times(schedule, spacing, num_steps)
        alpha, sigma = flow.to_vp(s)
        # lambda = -inf at s = 1: any finite value below the schedule's range gives t = T - 1.
        t = t_from_log_snr(schedule, jnp.maximum(2.0 * (jnp.log(alpha) - jnp.log(sigma)), -100.0))
    elif spacing == "karras":
        abar = schedule.alphas_cumprod
        edm = jnp.sqrt((1.0 - abar) / abar)  # EDM sigma at each integer step
        s = karras_sigmas(edm[0], edm[big_t - 1], num_steps, rho)
        t = t_from_log_snr(schedule, -2.0 * jnp.log(s))
        alpha = 1.0 / jnp.sqrt(1.0 + s**2)
        sigma = s * alpha
    else:
        ti = discrete_timesteps(spacing, num_steps, big_t, steps_offset)
        t = ti.astype(jnp.float32)
        alpha = schedule.sqrt_alphas_cumprod[ti]
        sigma = schedule.sqrt_one_minus_alphas_cumprod[ti]
    nxt = lambda a, last: jnp.concatenate([a[1:], jnp.reshape(last, (1,)).astype(a.dtype)])
    if final_level == "first":
        ends = (0.0, schedule.sqrt_alphas_cumprod[0], schedule.sqrt_one_minus_alphas_cumprod[0])
    else:
        ends = (-1.0, 1.0, 0.0)
    return Grid(t, alpha, sigma, *(nxt(a, e) for a, e in zip((t, alpha, sigma), ends)))


def level_fn(schedule: Schedule):
    """level(sigma_edm) -> (t, alpha, sigma) for `Step.level`: the model timestep of the EDM noise level
    sigma_edm = sigma/alpha (`t_from_log_snr`, fractional, clamped to [0, T-1]: beyond the schedule's range the
    model sees its nearest trained timestep, as k-diffusion's discrete-schedule wrappers do) and the VP
    coefficients of sigma_edm itself, alpha = 1/sqrt(1 + sigma_edm^2), sigma = sigma_edm alpha."""

    def level(sigma_edm):
        alpha = lax.rsqrt(1.0 + sigma_edm**2)
        return t_from_log_snr(schedule, -2.0 * jnp.log(sigma_edm)), alpha, sigma_edm * alpha

    return level
