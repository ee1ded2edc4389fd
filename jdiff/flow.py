"""Flow matching / rectified flow (Liu et al. 2022; Lipman et al. 2023; SD3: Esser et al. 2024; SiT: Ma et al.
2024): the linear interpolant, its timestep shift and training-time distributions, and the flow loss.

The flow writes the noisy data as x_s = (1 - s) x0 + s eps with s in [0, 1] (s = 1 is pure noise) and trains a
network v(x_s, T s) on the velocity v = dx_s/ds = eps - x0. As in diffusers' flow-matching schedulers (and so
SD3 / Flux / SiT checkpoints), the network's time input is T s with T = num_train_timesteps (1000).

Where the flow meets jdiff's variance-preserving state x_vp = alpha x0 + sigma eps (`jdiff.schedules`): with
r = alpha + sigma,

    s = sigma / (alpha + sigma),      x_s = x_vp / (alpha + sigma)                          (`from_vp`)

and conversely alpha = (1 - s)/n, sigma = s/n with n = sqrt((1 - s)^2 + s^2) (`to_vp`). So s/(1 - s) =
sigma/alpha is EDM's sigma and x_s/(1 - s) = x_vp/alpha EDM's x (`jdiff.edm.from_vp`). A velocity v at x_s
gives x0 = x_s - s v and eps = x_s + (1 - s) v, finite at s = 1 (alpha = 0): `jdiff.sampling.denoiser` converts
a flow model's output there, so every jdiff sampler samples a flow model, and the "flow" schedule
(`flow_betas`) puts the flow's levels into a VP `Schedule` with abar = (1 - s)^2 / ((1 - s)^2 + s^2).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

T_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOGIT_MEAN, LOGIT_STD = (
    0.0,
    1.0,
)  # SD3's logit-normal timestep sampling (Esser et al. 2024, sec. 5.1: rf/lognorm(0.00, 1.00))
MODE_SCALE = 1.29  # SD3 eq. 20's mode sampling: the paper's best mode setting (rf/mode(1.29))
# Flux's resolution-dependent shift (diffusers FluxPipeline calculate_shift with the scheduler's defaults).
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def check_shift(shift) -> float:
    """shift as a float; ValueError unless it is finite and > 0."""
    if isinstance(shift, (jax.Array, np.ndarray, np.generic)) and np.shape(shift) == ():
        shift = float(shift)
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not (0.0 < shift < math.inf):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}.")
    return float(shift)


def shift_time(s, shift):
    """SD3's timestep shift (Esser et al. 2024, eq. 23 with alpha = shift): s' = shift s / (1 + (shift - 1) s).

    shift > 1 moves every level towards noise (s = 0 and 1 are fixed); shift 1 is the identity. Works on numpy
    and jax arrays alike."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def flux_shift(
    image_seq_len: int,
    *,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """Flux's resolution-dependent shift: mu linear in the number of image tokens from base_shift at
    base_seq_len to max_shift at max_seq_len (diffusers' calculate_shift), shift = exp(mu).

    diffusers' dynamic shifting applies exp(mu) / (exp(mu) + (1/s - 1)), which is `shift_time` with this
    shift. image_seq_len: the transformer's token count, e.g. (H/16) (W/16) for Flux at H x W pixels."""
    if not isinstance(image_seq_len, (int, np.integer)) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be an int >= 1, got {image_seq_len!r}.")
    if max_seq_len == base_seq_len:
        raise ValueError(f"max_seq_len must differ from base_seq_len, both are {base_seq_len}.")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = image_seq_len * m + (base_shift - m * base_seq_len)
    return math.exp(mu)


def flow_times(num_timesteps: int, shift: float = 1.0) -> np.ndarray:
    """The flow's training levels, float64 (T,), increasing: s_t = shift_time((t + 1)/T) for t = 0..T-1
    (diffusers' FlowMatchEulerDiscreteScheduler: sigmas = shift(linspace(1, T, T)/T), reversed); s_{T-1} = 1."""
    shift = check_shift(shift)
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
        raise ValueError(f"num_timesteps of the flow schedule must be an int >= 2, got {num_timesteps!r}.")
    u = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
    return shift_time(u, shift)


def flow_betas(num_timesteps: int, *, shift: float = 1.0) -> np.ndarray:
    """The VP schedule of the flow's levels (`flow_times`): abar_t = (1 - s_t)^2 / ((1 - s_t)^2 + s_t^2), so
    sqrt((1 - abar)/abar) = s/(1 - s); beta_t = 1 - abar_t/abar_{t-1}. The last level is s = 1 (abar = 0,
    beta = 1: zero terminal SNR), as in diffusers' flow-matching schedulers."""
    s = flow_times(num_timesteps, shift)
    abar = (1.0 - s) ** 2 / ((1.0 - s) ** 2 + s**2)
    b = 1.0 - abar / np.append(1.0, abar[:-1])
    b[-1] = 1.0  # exact
    return b


def from_vp(alpha: Array, sigma: Array) -> tuple[Array, Array]:
    """(s, scale): the flow time s = sigma/(alpha + sigma) of the VP level (alpha, sigma) and the factor
    scale = 1/(alpha + sigma) with x_s = scale * x_vp. See module docstring."""
    r = alpha + sigma
    return sigma / r, 1.0 / r


def to_vp(s: Array) -> tuple[Array, Array]:
    """(alpha, sigma) of flow time s: alpha = (1 - s)/n, sigma = s/n, n = sqrt((1 - s)^2 + s^2)."""
    n = jnp.sqrt((1.0 - s) ** 2 + s**2)
    return (1.0 - s) / n, s / n


def x0_eps_from_velocity(v: Array, x_s: Array, s: Array) -> tuple[Array, Array]:
    """(x0, eps) of the velocity v = eps - x0 at x_s = (1 - s) x0 + s eps: x0 = x_s - s v, eps = x_s + (1 - s) v."""
    return x_s - s * v, x_s + (1.0 - s) * v


# ----------------------------------------------------------------------------------------------------
# Training: the distribution of s and the loss.


def mode_time(u, scale: float = MODE_SCALE):
    """SD3 eq. 20: f_mode(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u); s = f_mode(u) with u ~ U(0, 1) is
    "mode sampling" (monotone for -1 <= scale <= 2/(pi - 2)). Note it maps u = 0 to s = 1."""
    xp = jnp if isinstance(u, jax.Array) else np
    return 1.0 - u - scale * (xp.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)


def check_t_sampling(t_sampling: str, *, scale: float = MODE_SCALE) -> None:
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"Unknown t_sampling {t_sampling!r}; allowed values: {list(T_SAMPLINGS)}.")
    if t_sampling == "mode" and not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
        raise ValueError(f"mode scale must lie in [-1, 2/(pi - 2)] (f_mode monotone), got {scale!r}.")


def sample_time(
    rng: Array,
    shape,
    t_sampling: str = "uniform",
    *,
    mean: float = LOGIT_MEAN,
    std: float = LOGIT_STD,
    scale: float = MODE_SCALE,
    shift: float = 1.0,
) -> Array:
    """Training flow times s of `shape`, float32, from SD3's distributions (Esser et al. 2024, sec. 3.1), then
    `shift_time`-ed by `shift`:

      uniform:       s ~ U(0, 1);
      logit_normal:  s = sigmoid(n), n ~ N(mean, std^2)  (eq. 19);
      mode:          s = f_mode(u; scale), u ~ U(0, 1)   (eq. 20).
    """
    check_t_sampling(t_sampling, scale=scale)
    if t_sampling == "logit_normal":
        s = jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))
    else:
        u = jax.random.uniform(rng, shape, jnp.float32)
        s = u if t_sampling == "uniform" else mode_time(u, scale)
    return shift_time(s, shift)


def logit_normal_density(s, mean: float = LOGIT_MEAN, std: float = LOGIT_STD):
    """pi_ln(s) = exp(-(logit s - mean)^2 / (2 std^2)) / (std sqrt(2 pi) s (1 - s))  (SD3 eq. 19), numpy."""
    s = np.asarray(s, np.float64)
    z = np.log(s / (1.0 - s))
    return np.exp(-0.5 * ((z - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi) * s * (1.0 - s))


def mode_density(s, scale: float = MODE_SCALE):
    """pi_mode(s) = 1 / |f_mode'(f_mode^{-1}(s))|, f_mode' = -1 - scale (1 - (pi/2) sin(pi u)) (SD3 eq. 20),
    with f_mode^{-1} by bisection (f_mode decreases from 1 to 0), numpy float64."""
    s = np.asarray(s, np.float64)
    lo, hi = np.zeros_like(s), np.ones_like(s)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = mode_time(mid, scale) > s  # f decreasing: the root lies to the right
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    u = 0.5 * (lo + hi)
    return 1.0 / np.abs(-1.0 - scale * (1.0 - 0.5 * math.pi * np.sin(math.pi * u)))


def flow_loss(
    model_fn: Callable[[Array, Array], Array],
    x0: Array,
    rng: Array,
    *,
    num_timesteps: int = 1000,
    t_sampling: str = "uniform",
    mean: float = LOGIT_MEAN,
    std: float = LOGIT_STD,
    scale: float = MODE_SCALE,
    shift: float = 1.0,
) -> tuple[Array, dict]:
    """The conditional flow-matching loss (Lipman et al. 2023, eq. 9 with the linear path; SD3 eq. 2 with the
    velocity target): E_s,eps || v(x_s, T s) - (eps - x0) ||^2, x_s = (1 - s) x0 + s eps, s from `sample_time`.

    model_fn(x (B, ...), t (B,) float32) -> v (B, ...). Returns (the mean over batch and elements, {"mse": same}).
    """
    s_key, n_key = jax.random.split(rng)
    b = x0.shape[0]
    s = sample_time(s_key, (b,), t_sampling, mean=mean, std=std, scale=scale, shift=shift)
    eps = jax.random.normal(n_key, x0.shape, jnp.float32)
    sb = s.reshape((b,) + (1,) * (x0.ndim - 1))
    x_s = (1.0 - sb) * x0 + sb * eps
    v = model_fn(x_s, num_timesteps * s).astype(jnp.float32)
    mse = jnp.mean((v - (eps - x0)) ** 2)
    return mse, {"mse": mse}
