"""Denoising training loss as a pure function of (model_fn, schedule, x0, rng)."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jdiff.forward import PREDICTIONS, broadcast_to, check_prediction, target_from_x0_eps
from jdiff.schedules import Schedule

Array = jax.Array

WEIGHTINGS = ("simple", "min_snr")


def snr_weight(snr: Array, *, objective: str, weighting: str, min_snr_gamma: float = 5.0) -> Array:
    """Per-example loss weight on the MSE of the given objective.

    "simple": 1 (DDPM eq. 14 for eps; the plain MSE for x0 and v).
    "min_snr": Min-SNR-gamma (Hang et al. 2023, eq. 10 and sec. 3.4): the x0-space weight
    min(SNR, gamma) expressed for the objective's MSE: x0 -> min(SNR, gamma), eps -> min(SNR, gamma)/SNR,
    v -> min(SNR, gamma)/(SNR + 1).
    """
    if weighting == "simple":
        return jnp.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"Unknown weighting {weighting!r}; allowed values: {list(WEIGHTINGS)}.")
    clipped = jnp.minimum(snr, min_snr_gamma)
    if objective == "x0":
        return clipped
    if objective == "eps":
        # min(SNR, gamma)/SNR -> 1 as SNR -> 0 (zero-terminal-SNR step).
        return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
    return clipped / (snr + 1.0)


def diffusion_loss(
    model_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    objective: str = "eps",
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
      objective: what the model predicts: "eps", "x0" or "v" (Salimans & Ho 2022).
      weighting: "simple" or "min_snr" (see `snr_weight`).
      weights: optional (B,) per-example weights or 0/1 mask; the loss is sum(w l) / sum(w).

    Returns:
      (loss scalar float32, metrics dict with "mse" (unweighted, same averaging)).
    """
    check_prediction(objective, "objective")
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
    target = target_from_x0_eps(objective, x0, noise, alpha, sigma)
    per_example = jnp.mean(
        jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=tuple(range(1, x0.ndim))
    )
    snr = schedule.alphas_cumprod[t] / (1.0 - schedule.alphas_cumprod[t])
    w_t = snr_weight(snr, objective=objective, weighting=weighting, min_snr_gamma=min_snr_gamma)
    ex_w = jnp.ones((batch,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    denom = jnp.maximum(jnp.sum(ex_w), 1e-12)
    loss = jnp.sum(ex_w * w_t * per_example) / denom
    mse = jnp.sum(ex_w * per_example) / denom
    return loss, {"mse": mse}


__all__ = ["diffusion_loss", "snr_weight", "WEIGHTINGS", "PREDICTIONS"]
