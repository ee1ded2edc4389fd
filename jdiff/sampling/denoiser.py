"""Turns a user's model function into the denoiser every sampler calls: (x, t, alpha, sigma) -> (x0, eps).

It applies, in order: the model call (with classifier-free guidance as one batched call of 2B examples),
the split of a learned-variance output, the conversion of the model's prediction type to (x0, eps), and
x0 clipping or dynamic thresholding (with eps re-derived from the clipped x0).

EDM-preconditioned networks (predictions "edm", "edm_vp", "edm_ve"; Karras et al. 2022, `jdiff.edm`) meet the
VP state x = alpha x0 + sigma eps here and only here: with x_edm = x/alpha and sigma_edm = sigma/alpha the
network is called as F(c_in x_edm, c_noise(sigma_edm)) (the time input is c_noise, not the timestep t), and
x0 = D = c_skip x_edm + c_out F, eps = (x_edm - D)/sigma_edm. So every sampler runs on an EDM model unchanged.
Flow-matching networks (prediction "flow", `jdiff.flow`) meet it here too: with s = sigma/(alpha + sigma) and
x_s = x/(alpha + sigma) the network is called as v(x_s, T s) (T = `flow_time_scale`, diffusers'
num_train_timesteps) and x0 = x_s - s v, eps = x_s + (1 - s) v, finite at alpha = 0 (s = 1).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jdiff import edm
from jdiff.forward import EDM_PREDICTIONS, FLOW_PREDICTIONS, eps_from_x0, to_x0_eps
from jdiff.schedules import ABAR_FLOOR

Array = jax.Array

# The alpha an EDM network is evaluated at on a zero-terminal-SNR level (alpha = 0 has no finite EDM sigma;
# sigma_edm = 4096 there). Every positive alpha, however small, is used as it is.
EDM_ALPHA_FLOOR = ABAR_FLOOR**0.5


class Denoised(NamedTuple):
    x0: Array  # (B, ...) predicted clean data
    eps: Array  # (B, ...) predicted noise, consistent with x0: x = alpha x0 + sigma eps
    var_values: Optional[Array]  # (B, ...) learned-variance output in [-1, 1] (Nichol & Dhariwal), or None


class Guidance(NamedTuple):
    """Traced conditioning inputs: labels (B,) int32 or None, null_label () int32, scale () float32; for a text
    model labels are token ids (B, L) and null_label the empty caption's ids (L,)."""

    labels: Optional[Array]
    null_label: Optional[Array]
    scale: Optional[Array]


def dynamic_threshold(x0: Array, percentile: Array) -> Array:
    """Imagen (Saharia et al. 2022, sec. 2.3): s = max(1, quantile_p(|x0|)) per example; x0 <- clip(x0, -s, s)/s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def make_denoiser(
    model_fn: Callable[..., Array],
    params: Any,
    *,
    prediction: str,
    guidance: Guidance,
    clip_range: Optional[Array] = None,
    threshold_percentile: Optional[Array] = None,
    flow_time_scale: float = 1000.0,
) -> Callable[[Array, Array, Array, Array], Denoised]:
    """Builds denoise(x (B, ...), t () float32, alpha (), sigma ()) -> Denoised. t, alpha and sigma may also be
    per example, shaped (B, 1, ..., 1) like x (the distillation losses: `jdiff.distill.net`).

    model_fn is called as model_fn([params,] x, t_batch[, y]) with t_batch a (B,) float32 array of
    training-timestep indices; `params` is passed first when it is not None. For an EDM prediction it is
    called as model_fn([params,] c_in x/alpha, c_noise[, y]) (see module docstring; t is unused).
    For prediction "flow" it is called as model_fn([params,] x/(alpha + sigma), flow_time_scale s[, y]).
    clip_range: (2,) float32 [lo, hi] to clip x0 to, or None. threshold_percentile: () float32 or None.
    """

    def call(x, t, y):
        args = (x, t) if y is None else (x, t, y)
        return model_fn(*args) if params is None else model_fn(params, *args)

    precond = edm.preconditioning_of(prediction) if prediction in EDM_PREDICTIONS else None

    def denoise(x: Array, t: Array, alpha: Array, sigma: Array) -> Denoised:
        b, c = x.shape[0], x.shape[-1]
        x_in, t_in = x, t
        if precond is not None:
            x_edm, sig = edm.from_vp(x=x, alpha=jnp.where(alpha > 0, alpha, EDM_ALPHA_FLOOR), sigma=sigma)
            coef = edm.coefficients(precond, sigma=sig)
            x_in, t_in = coef.c_in * x_edm, coef.c_noise
        elif prediction in FLOW_PREDICTIONS:
            x_in, t_in = x / (alpha + sigma), flow_time_scale * sigma / (alpha + sigma)
        tb = jnp.broadcast_to(jnp.reshape(t_in, (-1,)), (b,)).astype(jnp.float32)  # one level, or one per example
        if guidance.scale is not None:
            null = jnp.broadcast_to(guidance.null_label, guidance.labels.shape).astype(jnp.int32)
            xx = jnp.concatenate([x_in, x_in])
            out = call(xx, jnp.concatenate([tb, tb]), jnp.concatenate([guidance.labels, null]))
            cond, uncond = out[:b], out[b:]
        else:
            cond = call(x_in, tb, guidance.labels)
            uncond = None
        if cond.shape[:-1] != x.shape[:-1] or cond.shape[-1] not in (c, 2 * c):
            raise ValueError(
                f"model_fn returned shape {cond.shape} for x of shape {x.shape}; expected {x.shape} "
                f"(or {x.shape[:-1] + (2 * c,)} with a learned variance)."
            )
        var_values = None
        if cond.shape[-1] == 2 * c:
            var_values = cond[..., c:].astype(jnp.float32)
            cond = cond[..., :c]
            uncond = None if uncond is None else uncond[..., :c]
        out = cond.astype(jnp.float32)
        if uncond is not None:
            # Ho & Salimans 2022, eq. 6 with w = scale - 1: uncond + scale (cond - uncond).
            out = uncond.astype(jnp.float32) + guidance.scale * (out - uncond.astype(jnp.float32))
        if precond is None:
            x0, eps = to_x0_eps(prediction, out, x, alpha, sigma)
        else:  # guidance combined on F equals guidance on D: D is affine in F with the same coefficients
            x0 = coef.c_skip * x_edm + coef.c_out * out
            eps = (x_edm - x0) / sig
        if clip_range is not None or threshold_percentile is not None:
            if threshold_percentile is not None:
                x0 = dynamic_threshold(x0, threshold_percentile)
            if clip_range is not None:
                x0 = jnp.clip(x0, clip_range[0], clip_range[1])
            eps = eps_from_x0(x, x0, alpha, sigma)
        return Denoised(x0, eps, var_values)

    return denoise
