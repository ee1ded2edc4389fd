"""Discrete noise schedules of the variance-preserving (VP) diffusion.

A schedule of T steps is fixed by its betas; every quantity a sampler or loss needs is derived from them
once, on the host in float64, and stored as float32 arrays of shape (T,) in a `Schedule` pytree. Because a
`Schedule` is data (not a static argument), two schedules with the same T share one compiled program.

Notation (Ho et al. 2020, "DDPM"): alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, SNR_t = abar_t / (1 - abar_t), log-SNR lambda_t = log SNR_t.
Indices t run over 0..T-1 (the paper's t = 1..T).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdiff.flow import flow_betas

Array = jax.Array

# The smallest abar used where a logarithm of it is needed (diffusers uses the same floor for
# zero-terminal-SNR schedules); abar itself is stored exactly, 0 included.
ABAR_FLOOR = 2.0**-24


@struct.dataclass
class Schedule:
    """All per-step quantities of a discrete VP schedule, each a float32 array of shape (T,).

    Attributes:
      betas: beta_t.
      alphas: alpha_t = 1 - beta_t.
      alphas_cumprod: abar_t = prod_{s<=t} alpha_s.
      alphas_cumprod_prev: abar_{t-1}, with abar_{-1} = 1.
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: the coefficients of q(x_t | x_0).
      sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod: x_0 = a * x_t - b * eps (DDPM eq. 4 inverted).
      log_snr: lambda_t = log(abar_t / (1 - abar_t)); -inf where abar_t = 0 (zero terminal SNR).
      posterior_variance: beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)  (DDPM eq. 7).
      posterior_log_variance_clipped: log beta-tilde_t with the t=0 entry (which is 0) replaced by the
        t=1 entry (Ho et al. 2020 code; Nichol & Dhariwal 2021).
      posterior_mean_coef1, posterior_mean_coef2: mu-tilde_t = coef1 * x_0 + coef2 * x_t  (DDPM eq. 7),
        coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t), coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t).
      flow_shift: see the field's comment.
    """

    betas: Array
    alphas: Array
    alphas_cumprod: Array
    alphas_cumprod_prev: Array
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    sqrt_recip_alphas_cumprod: Array
    sqrt_recipm1_alphas_cumprod: Array
    log_snr: Array
    posterior_variance: Array
    posterior_log_variance_clipped: Array
    posterior_mean_coef1: Array
    posterior_mean_coef2: Array
    # The shift of a flow-matching schedule ("flow", `jdiff.flow`), a float32 scalar; None for every other
    # schedule. Its presence (static structure) makes the flow grid the default spacing; its value is data.
    flow_shift: Optional[Array] = None

    @property
    def num_timesteps(self) -> int:
        """T, a static Python int (from the array shape, so it is known while tracing)."""
        return self.betas.shape[-1]


def schedule_from_betas(betas) -> Schedule:
    """Builds a `Schedule` from betas, shape (T,), every beta in (0, 1] (1 only as the last entry).

    All quantities are computed in float64 with numpy and stored as float32.

    Raises:
      ValueError: if `betas` is not a non-empty 1-D array of finite values in (0, 1), except that the last
        beta may be exactly 1 (zero terminal SNR).
    """
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}.")
    if not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b[:-1] >= 1) or b[-1] > 1:
        bad = b[~((b > 0) & (b < 1))]
        raise ValueError(
            "betas must lie in the open interval (0, 1) (the last may be 1 for zero terminal SNR); "
            f"got values such as {bad[:3].tolist()}."
        )
    alphas = 1.0 - b
    abar = np.cumprod(alphas)
    if b[-1] == 1.0:
        abar[-1] = 0.0  # exact, not a rounding residue
    abar_prev = np.append(1.0, abar[:-1])
    one_minus = 1.0 - abar
    with np.errstate(divide="ignore"):
        log_snr = np.log(abar) - np.log(one_minus)
        sqrt_recip = 1.0 / np.sqrt(abar)
        sqrt_recipm1 = np.sqrt(1.0 / abar - 1.0)
    post_var = b * (1.0 - abar_prev) / one_minus
    # Clipped log variance: the t=0 posterior variance is 0; use the t=1 value there.
    clip_src = np.append(post_var[1], post_var[1:]) if b.size > 1 else np.full(1, b[0])
    post_logvar = np.log(clip_src)
    coef1 = b * np.sqrt(abar_prev) / one_minus
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / one_minus
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(
        betas=f32(b),
        alphas=f32(alphas),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(one_minus)),
        sqrt_recip_alphas_cumprod=f32(sqrt_recip),
        sqrt_recipm1_alphas_cumprod=f32(sqrt_recipm1),
        log_snr=f32(log_snr),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(coef1),
        posterior_mean_coef2=f32(coef2),
    )


# ----------------------------------------------------------------------------------------------------
# Beta schedules: keyword-only float64 numpy functions of T.


def linear_betas(num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM (Ho et al. 2020, sec. 4): beta_t = linspace(beta_start, beta_end, T)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, *, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Latent diffusion / Stable Diffusion: beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2."""
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, *, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2,
    beta_t = min(1 - abar(t+1)/abar(t), max_beta)."""
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def sigmoid_betas(
    num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02, sigmoid_range: float = 6.0
) -> np.ndarray:
    """GeoDiff (Xu et al. 2022): beta_t = sigmoid(linspace(-r, r, T)) (beta_end - beta_start) + beta_start."""
    x = np.linspace(-sigmoid_range, sigmoid_range, num_timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def edm_sigmas(
    num_timesteps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """EDM's noise levels (Karras et al. 2022, eq. 5) in increasing order, one per step t = 0..T-1:
    sigma_t = (sigma_min^(1/rho) + t/(T-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho. T >= 2, float64."""
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
        raise ValueError(f"num_timesteps of the edm schedule must be an int >= 2, got {num_timesteps!r}.")
    if not (0 < sigma_min < sigma_max < math.inf) or not rho > 0:
        raise ValueError(
            f"the edm schedule needs 0 < sigma_min < sigma_max < inf and rho > 0, got sigma_min={sigma_min!r}, "
            f"sigma_max={sigma_max!r}, rho={rho!r}."
        )
    i = np.arange(num_timesteps, dtype=np.float64) / (num_timesteps - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + i * (hi - lo)) ** rho


def edm_betas(num_timesteps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """The VP schedule whose levels are EDM's sigma grid (`edm_sigmas`): abar_t = 1/(1 + sigma_t^2)
    (x_vp = x_edm/sqrt(1 + sigma^2)), beta_t = 1 - abar_t/abar_{t-1} (abar_{-1} = 1).

    Its EDM sigma sqrt((1 - abar_t)/abar_t) is sigma_t, so the "karras" spacing on it is EDM's time grid
    (Alg. 1's t_i) and "linspace" with N = T is that grid exactly.
    """
    abar = 1.0 / (1.0 + edm_sigmas(num_timesteps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho) ** 2)
    return 1.0 - abar / np.append(1.0, abar[:-1])


BETA_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "edm": edm_betas,
    "flow": flow_betas,
}


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1.

    Shifts sqrt(abar) so that its last entry is 0 and scales it so that its first entry is unchanged:
    s' = (s - s_T) * s_0 / (s_0 - s_T); then betas are re-derived (the last beta becomes 1).
    """
    b = np.asarray(betas, dtype=np.float64)
    s = np.sqrt(np.cumprod(1.0 - b))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    abar = s**2
    alphas = np.append(abar[0], abar[1:] / abar[:-1])
    return 1.0 - alphas


def get_schedule(
    name: str = "linear", num_timesteps: int = 1000, *, zero_terminal_snr: bool = False, betas=None, **kwargs
) -> Schedule:
    """Returns the named schedule of `num_timesteps` steps.

    Args:
      name: one of "linear", "scaled_linear", "cosine", "sigmoid", "edm" (EDM's sigma grid, `edm_betas`),
        "flow" (the flow-matching levels s = shift((t + 1)/T), `jdiff.flow.flow_betas`; zero terminal SNR), or
        "custom" (then give `betas`).
      num_timesteps: T >= 1 (ignored for "custom", where T = len(betas)).
      zero_terminal_snr: rescale so that abar_{T-1} = 0 (Lin et al. 2024); pair it with v-prediction.
      betas: the betas of a "custom" schedule.
      **kwargs: the beta function's keyword arguments (beta_start, beta_end, s, max_beta, sigmoid_range;
        "edm": sigma_min, sigma_max, rho; "flow": shift, SD3's timestep shift > 0).
    """
    if name == "custom":
        if betas is None:
            raise ValueError('schedule "custom" needs betas=<1-D array of values in (0, 1)>.')
        b = np.asarray(betas, dtype=np.float64)
    else:
        if name not in BETA_SCHEDULES:
            raise ValueError(f"Unknown schedule name {name!r}; allowed values: {sorted(BETA_SCHEDULES) + ['custom']}.")
        if betas is not None:
            raise ValueError(f'betas= is only accepted with name="custom", not with {name!r}.')
        if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}.")
        try:
            b = BETA_SCHEDULES[name](int(num_timesteps), **kwargs)
        except TypeError as e:
            raise ValueError(f"Bad keyword argument for schedule {name!r}: {e}") from None
    if zero_terminal_snr:
        schedule_from_betas(b)  # validate the input before rescaling
        b = rescale_zero_terminal_snr(b)
    if name == "flow":
        return schedule_from_betas(b).replace(flow_shift=jnp.asarray(kwargs.get("shift", 1.0), jnp.float32))
    return schedule_from_betas(b)


# ----------------------------------------------------------------------------------------------------
# Continuous time: interpolation between the discrete steps.


def _finite_log_snr(schedule: Schedule) -> Array:
    """lambda_t with a zero-terminal-SNR entry (-inf) replaced by log(ABAR_FLOOR) (diffusers' stand-in for
    abar = 0), or by the linear extrapolation 2 lambda_{T-2} - lambda_{T-3} where that is lower, so lambda
    stays strictly decreasing. Finite entries are kept as they are, however low (cosine, T = 1000:
    lambda_{T-1} = -19.8): flooring them gave distinct levels one lambda, one abar and one model timestep."""
    lam = schedule.log_snr
    floor = jnp.float32(math.log(ABAR_FLOOR) - math.log1p(-ABAR_FLOOR))
    if lam.shape[-1] >= 3:
        floor = jnp.minimum(floor, 2.0 * lam[-2] - lam[-3])
    return jnp.where(jnp.isfinite(lam), lam, floor)


def log_snr_at(schedule: Schedule, t) -> Array:
    """lambda(t) at fractional t in [0, T-1] by linear interpolation of lambda between integer steps.

    Integer t gives the stored values exactly (a zero-terminal-SNR -inf entry is floored, see
    `_finite_log_snr`). Shape of `t`, float32.
    """
    t = jnp.asarray(t, jnp.float32)
    grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
    return jnp.interp(t, grid, _finite_log_snr(schedule))


def alpha_bar_at(schedule: Schedule, t) -> Array:
    """abar(t) = sigmoid(lambda(t)) at fractional t (see `log_snr_at`)."""
    return jax.nn.sigmoid(log_snr_at(schedule, t))


def t_from_log_snr(schedule: Schedule, log_snr) -> Array:
    """Inverse of `log_snr_at`: the fractional t in [0, T-1] whose interpolated lambda equals `log_snr`.

    lambda is decreasing in t; values outside the schedule's range are clamped to t = 0 or T-1.
    """
    lam = _finite_log_snr(schedule)
    grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
    # jnp.interp needs increasing x: flip.
    return jnp.interp(jnp.asarray(log_snr, jnp.float32), lam[::-1], grid[::-1])
