"""Training losses as pure functions of (model_fn, schedule, x0, rng): the denoising MSE (`diffusion_loss`),
and the variational bound's terms (`normal_kl`, `discretized_gaussian_log_likelihood`, `vlb_term`) with the
hybrid / VLB losses of improved DDPM (Nichol & Dhariwal 2021: learned variance, `vlb_loss`) and its
importance sampling of t (`importance_probs`, `update_loss_history`).

VLB units: every term is in bits per dimension (nats averaged over the non-batch axes, divided by ln 2), so
the full bound sum_t L_t + L_prior of `jdiff.likelihood.vlb_bpd` is in bits/dim.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jdiff.forward import PREDICTIONS, broadcast_to, check_prediction, q_posterior, target_from_x0_eps, to_x0_eps
from jdiff.schedules import Schedule

Array = jax.Array

WEIGHTINGS = ("simple", "min_snr")
LOSSES = ("simple", "hybrid", "vlb")
VARIANCES = ("posterior", "beta", "learned")  # of p(x_{t-1} | x_t), as the ddpm sampler names them
HISTORY_PER_T = 10  # improved DDPM sec. 3.3: the last 10 values of L_t per t


def snr_weight(snr: Array, *, prediction: str, weighting: str, min_snr_gamma: float = 5.0) -> Array:
    """Per-example loss weight on the MSE of the given prediction.

    "simple": 1 (DDPM eq. 14 for eps; the plain MSE for x0 and v).
    "min_snr": Min-SNR-gamma (Hang et al. 2023, eq. 10 and sec. 3.4): the x0-space weight
    min(SNR, gamma) expressed for the prediction's MSE: x0 -> min(SNR, gamma), eps -> min(SNR, gamma)/SNR,
    v -> min(SNR, gamma)/(SNR + 1).
    """
    if weighting == "simple":
        return jnp.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"Unknown weighting {weighting!r}; allowed values: {list(WEIGHTINGS)}.")
    clipped = jnp.minimum(snr, min_snr_gamma)
    if prediction == "x0":
        return clipped
    if prediction == "eps":
        # min(SNR, gamma)/SNR -> 1 as SNR -> 0 (zero-terminal-SNR step).
        return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
    return clipped / (snr + 1.0)


def diffusion_loss(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    prediction: str = "eps",
    weighting: str = "simple",
    min_snr_gamma: float = 5.0,
    weights: Optional[Array] = None,
) -> tuple[Array, dict]:
    """Monte-Carlo estimate of the denoising loss  E_{t, eps} w(t) || target - model(x_t, t) ||^2.

    t ~ Uniform{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps) (DDPM Alg. 1).

    Args:
      model_fn: (x_t (B, ...), t (B,) float32) -> prediction (B, ...); if its last axis has twice the
        channels of x0 (learned variance), the first half is the prediction.
      schedule: the noise schedule.
      x0: clean data (B, ...), float.
      rng: PRNG key; split here into the timestep and noise draws.
      prediction: what the model predicts: "eps", "x0" or "v" (Salimans & Ho 2022).
      weighting: "simple" or "min_snr" (see `snr_weight`).
      weights: optional (B,) per-example weights or 0/1 mask; the loss is sum(w l) / sum(w).

    Returns:
      (loss scalar float32, metrics dict with "mse" (unweighted, same averaging)).
    """
    check_prediction(prediction, allowed=PREDICTIONS)  # EDM predictions: jdiff.edm.edm_loss
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; allowed values: {list(WEIGHTINGS)}.")
    batch = x0.shape[0]
    if weights is not None and jnp.shape(weights) != (batch,):
        raise ValueError(f"weights must have shape ({batch},) to match x0, got {jnp.shape(weights)}.")
    t_rng, n_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps)
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32).astype(x0.dtype)
    alpha = broadcast_to(schedule.sqrt_alphas_cumprod[t], x0)
    sigma = broadcast_to(schedule.sqrt_one_minus_alphas_cumprod[t], x0)
    x_t = alpha * x0 + sigma * noise
    out = model_fn(x_t, t.astype(jnp.float32))
    if out.shape[-1] == 2 * x0.shape[-1] and out.shape[:-1] == x0.shape[:-1]:
        out = out[..., : x0.shape[-1]]
    if out.shape != x0.shape:
        raise ValueError(f"model_fn returned shape {out.shape}; expected {x0.shape} (or 2x channels).")
    target = target_from_x0_eps(prediction, x0, noise, alpha, sigma)
    per_example = jnp.mean(
        jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=tuple(range(1, x0.ndim))
    )
    snr = schedule.alphas_cumprod[t] / (1.0 - schedule.alphas_cumprod[t])
    w_t = snr_weight(snr, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma)
    ex_w = jnp.ones((batch,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    denom = jnp.maximum(jnp.sum(ex_w), 1e-12)
    loss = jnp.sum(ex_w * w_t * per_example) / denom
    mse = jnp.sum(ex_w * per_example) / denom
    return loss, {"mse": mse}


# ----------------------------------------------------------------------------------------------------
# The variational bound (DDPM sec. 3; Nichol & Dhariwal 2021 sec. 3.1), per timestep, in bits/dim.

LN2 = math.log(2.0)


def mean_flat(x: Array) -> Array:
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(*, mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats:
    0.5 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)."""
    return 0.5 * (logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2) - 1.0)


def gaussian_log_likelihood(x: Array, *, mean: Array, logvar: Array) -> Array:
    """log N(x; mean, e^logvar) elementwise, in nats (the decoder term of continuous data)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + jnp.square(x - mean) * jnp.exp(-logvar))


def _log_diff_cdf(lo: Array, hi: Array) -> Array:
    """log(Phi(hi) - Phi(lo)) for lo < hi, without cancellation: both tails are evaluated where they are small
    (Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)), and log(Phi(b) - Phi(a)) = log Phi(b) + log(-expm1(log Phi(a) -
    log Phi(b)))."""
    flip = lo > 0
    a, b = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
    la, lb = jax.scipy.special.log_ndtr(a), jax.scipy.special.log_ndtr(b)
    return lb + jnp.log(-jnp.expm1(jnp.minimum(la - lb, -1e-30)))


def discretized_gaussian_log_likelihood(x: Array, *, mean: Array, logvar: Array, levels: int) -> Array:
    """log P(x) elementwise, in nats, for data on `levels` evenly spaced values in [-1, 1] under
    N(mean, e^logvar) discretised into bins (DDPM sec. 3.3): the bin of x is [x - h, x + h], h = 1/(levels - 1)
    (half the spacing 2/(levels - 1)), except that the bin of -1 extends to -inf and the bin of 1 to +inf,
    so the probabilities of all `levels` values sum to 1. Evaluated with the exact normal CDF (log_ndtr)."""
    if not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}.")
    h = 1.0 / (levels - 1)
    inv_std = jnp.exp(-0.5 * logvar)
    lo = (x - h - mean) * inv_std
    hi = (x + h - mean) * inv_std
    bottom = x < -1.0 + h  # the value -1
    top = x > 1.0 - h  # the value 1
    lo = jnp.where(bottom, -jnp.inf, lo)
    hi = jnp.where(top, jnp.inf, hi)
    log_cdf_hi = jax.scipy.special.log_ndtr(hi)
    log_sf_lo = jax.scipy.special.log_ndtr(-lo)
    # finite placeholders on the open edges keep the unused branch (and its gradient) finite
    mid = _log_diff_cdf(jnp.where(bottom, hi - 1.0, lo), jnp.where(top, lo + 1.0, hi))
    return jnp.where(bottom, log_cdf_hi, jnp.where(top, log_sf_lo, mid))


def split_output(out: Array, channels: int) -> tuple[Array, Optional[Array]]:
    """(prediction, variance values v or None) of a model output with `channels` or 2x `channels` (learned
    variance, [prediction | v], Nichol & Dhariwal 2021 sec. 3.1) channels."""
    if out.shape[-1] == 2 * channels:
        return out[..., :channels], out[..., channels:]
    if out.shape[-1] != channels:
        raise ValueError(f"model output has {out.shape[-1]} channels; expected {channels} or {2 * channels}.")
    return out, None


def check_variance(variance: str, learned: bool) -> str:
    """The variance type of p(x_{t-1} | x_t): `variance` (None: "learned" when the model has a variance
    output, else "posterior"); a fixed variance ignores a variance output, "learned" needs one."""
    if variance is None:
        return "learned" if learned else "posterior"
    if variance not in VARIANCES:
        raise ValueError(f"Unknown variance {variance!r}; allowed values: {list(VARIANCES)}.")
    if variance == "learned" and not learned:
        raise ValueError('variance="learned" needs a model output with 2x the data channels ([prediction | v]).')
    return variance


def p_mean_logvar(
    schedule: Schedule,
    x_t: Array,
    t: Array,
    pred: Array,
    var_values: Optional[Array] = None,
    *,
    prediction: str,
    variance: str,
    clip_x0: bool = False,
) -> tuple[Array, Array]:
    """Mean and log variance of the reverse step p(x_{t-1} | x_t) = N(mu, e^logvar I), t (B,) int.

    mu = coef1_t x0_hat + coef2_t x_t (DDPM eq. 7 with the predicted x0_hat, clipped to [-1, 1] if clip_x0);
    logvar: "posterior": log beta-tilde_t (clipped at t = 0 to log beta-tilde_1); "beta": log beta_t (at t = 0
    log beta-tilde_1, as improved-diffusion's fixed-large); "learned": f log beta_t + (1 - f) log beta-tilde_t with
    f = (var_values + 1) / 2 (Nichol & Dhariwal 2021, eq. 15; beta-tilde clipped as above, beta_0 itself at t = 0).
    """
    alpha = broadcast_to(schedule.sqrt_alphas_cumprod[t], x_t)
    sigma = broadcast_to(schedule.sqrt_one_minus_alphas_cumprod[t], x_t)
    x0_hat, _ = to_x0_eps(prediction, pred.astype(jnp.float32), x_t, alpha, sigma)
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    mean, _, min_log = q_posterior(schedule, x0_hat, x_t, t)
    if variance == "posterior":
        return mean, jnp.broadcast_to(min_log, x_t.shape)
    max_log = broadcast_to(jnp.log(schedule.betas)[t], x_t)
    if variance == "beta":
        large = jnp.where(broadcast_to(t, x_t) == 0, min_log, max_log)  # fixed-large decoder: beta-tilde_1
        return mean, jnp.broadcast_to(large, x_t.shape)
    if var_values is None:
        raise ValueError('variance="learned" needs the model\'s variance output (2x channels).')
    frac = (var_values.astype(jnp.float32) + 1.0) / 2.0
    return mean, frac * max_log + (1.0 - frac) * min_log


def vlb_term(
    schedule: Schedule,
    x0: Array,
    x_t: Array,
    t: Array,
    out: Array,
    *,
    prediction: str = "eps",
    variance: Optional[str] = None,
    levels: Optional[int] = 256,
    clip_x0: bool = False,
) -> Array:
    """L_t of the variational bound (DDPM eq. 5) per example, in bits/dim, for a model output `out` at x_t:

    t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (the Gaussian KL, `normal_kl`);
    t = 0: -log p(x_0 | x_1), the decoder: `discretized_gaussian_log_likelihood` with `levels` values per
    dimension, or the Gaussian density of continuous data (levels None).
    `out`: the prediction (C channels) or [prediction | v] (2C, learned variance); variance: see
    `p_mean_logvar` (None: learned with 2C channels, else posterior). Returns (B,) float32.
    """
    check_prediction(prediction, allowed=PREDICTIONS)
    pred, v = split_output(out, x0.shape[-1])
    variance = check_variance(variance, v is not None)
    mean, logvar = p_mean_logvar(schedule, x_t, t, pred, v, prediction=prediction, variance=variance, clip_x0=clip_x0)
    true_mean, _, true_logvar = q_posterior(schedule, x0, x_t, t)
    kl = mean_flat(normal_kl(mean1=true_mean, logvar1=true_logvar, mean2=mean, logvar2=logvar)) / LN2
    if levels is None:
        ll = gaussian_log_likelihood(x0, mean=mean, logvar=logvar)
    else:
        ll = discretized_gaussian_log_likelihood(x0, mean=mean, logvar=logvar, levels=levels)
    return jnp.where(t == 0, -mean_flat(ll) / LN2, kl)


def prior_bpd(schedule: Schedule, x0: Array) -> Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in bits/dim (x_T at the last index T-1)."""
    last = schedule.num_timesteps - 1
    mean = schedule.sqrt_alphas_cumprod[last] * x0
    logvar = jnp.log(jnp.maximum(1.0 - schedule.alphas_cumprod[last], 1e-20))
    return mean_flat(normal_kl(mean1=mean, logvar1=logvar, mean2=jnp.zeros_like(x0), logvar2=0.0)) / LN2


# ----------------------------------------------------------------------------------------------------
# Improved DDPM training: hybrid and VLB losses, importance sampling of t.


def sample_timesteps(rng: Array, batch: int, num_timesteps: int, probs: Optional[Array] = None):
    """(t (B,) int32, weights (B,) float32): t ~ Uniform{0..T-1} with weights 1, or t ~ probs (T,) with the
    importance weights 1 / (T p_t) that keep T-weighted estimates unbiased (improved DDPM eq. 18)."""
    if probs is None:
        return jax.random.randint(rng, (batch,), 0, num_timesteps), jnp.ones((batch,), jnp.float32)
    t = jax.random.choice(rng, num_timesteps, (batch,), p=probs)
    return t.astype(jnp.int32), 1.0 / (num_timesteps * probs[t])


def vlb_loss(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    prediction: str = "eps",
    loss: str = "hybrid",
    vlb_weight: float = 1e-3,
    levels: Optional[int] = 256,
    t_probs: Optional[Array] = None,
    weighting: str = "simple",
    min_snr_gamma: float = 5.0,
) -> tuple[Array, dict]:
    """The improved-DDPM losses (Nichol & Dhariwal 2021), one Monte-Carlo draw of (t, eps) per example:

    "hybrid" (sec. 3.1): L_simple + lambda L_vlb with lambda = vlb_weight, L_vlb estimated by T * L_t (in
      bits/dim) with the predicted mean under stop-gradient, so L_vlb trains only the variance output v;
    "vlb": T * L_t alone (gradients reach the mean and the variance).
    L_t is `vlb_term` (KL for t > 0, discretised decoder with `levels` values at t = 0). t is uniform, or
    drawn from `t_probs` (T,) with importance weights 1 / (T p_t) on the per-example loss (sec. 3.3).
    The model output has 2x the data channels ([prediction | v], learned variance) or, for "vlb" only, as many
    (fixed posterior variance).

    Returns (loss scalar, metrics {"mse": unweighted MSE, "vlb": mean L_t (bits/dim), "t": (B,) timesteps,
    "per_example": (B,) loss before the importance weights (what the importance history records)}).
    """
    check_prediction(prediction, allowed=PREDICTIONS)
    if loss not in ("hybrid", "vlb"):
        raise ValueError(f"Unknown loss {loss!r} for vlb_loss; allowed values: ['hybrid', 'vlb'].")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; allowed values: {list(WEIGHTINGS)}.")
    batch, channels, T = x0.shape[0], x0.shape[-1], schedule.num_timesteps
    t_rng, n_rng = jax.random.split(rng)
    t, w = sample_timesteps(t_rng, batch, T, t_probs)
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32).astype(x0.dtype)
    alpha = broadcast_to(schedule.sqrt_alphas_cumprod[t], x0)
    sigma = broadcast_to(schedule.sqrt_one_minus_alphas_cumprod[t], x0)
    x_t = alpha * x0 + sigma * noise
    out = model_fn(x_t, t.astype(jnp.float32))
    if out.shape[:-1] != x0.shape[:-1]:
        raise ValueError(f"model_fn returned shape {out.shape}; expected {x0.shape} (or 2x channels).")
    pred, v = split_output(out, channels)
    if loss == "hybrid" and v is None:
        raise ValueError('loss "hybrid" needs a learned-variance model (output with 2x the data channels).')
    target = target_from_x0_eps(prediction, x0, noise, alpha, sigma)
    mse = mean_flat(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
    if loss == "hybrid":
        frozen = jnp.concatenate([jax.lax.stop_gradient(pred), v], axis=-1)
        l_t = vlb_term(schedule, x0, x_t, t, frozen, prediction=prediction, levels=levels)
        snr = schedule.alphas_cumprod[t] / (1.0 - schedule.alphas_cumprod[t])
        w_t = snr_weight(snr, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma)
        per_example = w_t * mse + vlb_weight * T * l_t
    else:
        l_t = vlb_term(schedule, x0, x_t, t, out, prediction=prediction, levels=levels)
        per_example = T * l_t
    metrics = {"mse": jnp.mean(mse), "vlb": jnp.mean(l_t), "t": t, "per_example": per_example}
    return jnp.mean(w * per_example), metrics


def importance_probs(history: Array, count: Array, *, uniform_share: float = 1e-3) -> Optional[Array]:
    """p_t proportional to sqrt(E[L_t^2]) over the recorded history (T, 10) (improved DDPM sec. 3.3), mixed with
    `uniform_share` of the uniform distribution (as improved-diffusion's LossSecondMomentResampler); uniform
    until every t has its 10 values (count (T,) int)."""
    T = history.shape[0]
    rms = jnp.sqrt(jnp.mean(jnp.square(history), axis=1))
    p = rms / jnp.maximum(jnp.sum(rms), 1e-30)
    p = p * (1.0 - uniform_share) + uniform_share / T
    warm = jnp.all(count >= history.shape[1]) & (jnp.sum(rms) > 0)
    return jnp.where(warm, p, jnp.full((T,), 1.0 / T, p.dtype))


def update_loss_history(history: Array, count: Array, t: Array, losses: Array) -> tuple[Array, Array]:
    """Appends losses[i] to the history row of t[i], in order i = 0..B-1, keeping the last 10 per t (a full
    row shifts left). history (T, 10) float32, count (T,) int32; returns the new (history, count)."""
    n = history.shape[1]

    def push(carry, item):
        h, c = carry
        ti, li = item
        row, k = h[ti], c[ti]
        shifted = jnp.where(k >= n, jnp.roll(row, -1).at[n - 1].set(li), row.at[jnp.minimum(k, n - 1)].set(li))
        return (h.at[ti].set(shifted), c.at[ti].set(jnp.minimum(k + 1, n))), None

    (history, count), _ = jax.lax.scan(push, (history, count), (t, losses.astype(history.dtype)))
    return history, count


__all__ = [
    "diffusion_loss",
    "snr_weight",
    "vlb_loss",
    "vlb_term",
    "prior_bpd",
    "normal_kl",
    "gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
    "p_mean_logvar",
    "split_output",
    "sample_timesteps",
    "importance_probs",
    "update_loss_history",
    "WEIGHTINGS",
    "LOSSES",
    "VARIANCES",
    "PREDICTIONS",
]
