"""Exact noise predictors for data with a known distribution, to measure sampler error without model error.

If x_0 ~ N(mu, S) then x_t = alpha x_0 + sigma eps ~ N(alpha mu, C_t), C_t = alpha^2 S + sigma^2 I, and the
optimal predictor is eps*(x, t) = -sigma grad log p_t(x) = sigma C_t^{-1} (x - alpha mu) (Tweedie). For a
mixture sum_k w_k N(mu_k, s_k^2 I), the score is the responsibility-weighted sum of the components' scores.
Data arrays are (B, ...) and flattened to (B, d).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.schedules import Schedule, alpha_bar_at

Array = jax.Array


def _alpha_sigma(schedule: Schedule, t: Array) -> tuple[Array, Array]:
    abar = alpha_bar_at(schedule, t)
    return jnp.sqrt(abar)[:, None], jnp.sqrt(1.0 - abar)[:, None]


def gaussian_eps_fn(schedule: Schedule, mean, cov) -> Callable[[Array, Array], Array]:
    """eps*(x (B, ...), t (B,)) for x_0 ~ N(mean (d,), cov (d, d)) with d = prod(x.shape[1:])."""
    mean = np.asarray(mean, np.float64)
    lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
    mean_j, lam_j, u_j = (jnp.asarray(a, jnp.float32) for a in (mean, lam, u))

    def eps_fn(x, t):
        flat = x.reshape(x.shape[0], -1)
        a, s = _alpha_sigma(schedule, t)
        z = (flat - a * mean_j) @ u_j  # eigen-coordinates
        out = (s * z / (a**2 * lam_j + s**2)) @ u_j.T
        return out.reshape(x.shape)

    return eps_fn


def gaussian_ode_solution(mean, cov, x_t: Array, alpha: float, sigma: float) -> Array:
    """The exact probability-flow ODE map from x_t at (alpha, sigma) to x_0 for N(mean, cov) data.

    In the eigenbasis of cov (eigenvalues l) each coordinate keeps its standardised value:
    x_0 = mu + U diag(sqrt(l / (alpha^2 l + sigma^2))) U^T (x_t - alpha mu).
    """
    mean = np.asarray(mean, np.float64)
    lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
    flat = np.asarray(x_t, np.float64).reshape(x_t.shape[0], -1)
    z = (flat - alpha * mean) @ u
    x0 = mean + (z * np.sqrt(lam / (alpha**2 * lam + sigma**2))) @ u.T
    return x0.reshape(x_t.shape)


def gmm_eps_fn(schedule: Schedule, means, stds, weights) -> Callable[[Array, Array], Array]:
    """eps*(x (B, ...), t (B,)) for x_0 ~ sum_k weights[k] N(means[k] (d,), stds[k]^2 I)."""
    means_j = jnp.asarray(means, jnp.float32)  # (K, d)
    var0 = jnp.asarray(stds, jnp.float32) ** 2  # (K,)
    logw = jnp.log(jnp.asarray(weights, jnp.float32) / np.sum(weights))

    def eps_fn(x, t):
        flat = x.reshape(x.shape[0], -1)
        d = flat.shape[1]
        a, s = _alpha_sigma(schedule, t)
        var = a**2 * var0[None, :] + s**2  # (B, K)
        diff = flat[:, None, :] - a[:, :, None] * means_j[None]  # (B, K, d)
        logp = logw - 0.5 * jnp.sum(diff**2, -1) / var - 0.5 * d * jnp.log(var)
        resp = jax.nn.softmax(logp, axis=1)
        score = -jnp.sum(resp[:, :, None] * diff / var[:, :, None], axis=1)
        return (-s * score).reshape(x.shape)

    return eps_fn


def gmm_x0_fn(means, stds, weights) -> Callable[[Array, Array, Array], Array]:
    """x0*(x (B, ...), alpha, sigma) = E[x0 | x] at the VP level (alpha, sigma) (scalars or (B, 1)) for x_0 ~
    sum_k weights[k] N(means[k] (d,), stds[k]^2 I): in EDM variables (x_edm = x/alpha, s = sigma/alpha) the
    posterior mean sum_k r_k (mu_k + s_k^2/(s_k^2 + s^2) (x_edm - mu_k)), r_k the responsibilities under
    N(mu_k, (s_k^2 + s^2) I). The exact denoiser D(x_edm; s) of EDM at any noise level, no timestep involved;
    it computes in x's dtype (float64 under jax x64)."""
    means, var0 = np.asarray(means, np.float64), np.asarray(stds, np.float64) ** 2
    logw = np.log(np.asarray(weights, np.float64) / np.sum(weights))

    def x0_fn(x, alpha, sigma):
        dt = x.dtype
        flat = x.reshape(x.shape[0], -1)
        alpha, sigma = (jnp.reshape(jnp.asarray(v, dt), (-1, 1, 1)) for v in (alpha, sigma))
        mu, v0 = jnp.asarray(means, dt)[None], jnp.asarray(var0, dt)[None, :, None]
        var = v0 + (sigma / alpha) ** 2  # (B|1, K, 1)
        diff = flat[:, None, :] / alpha - mu
        logp = jnp.asarray(logw, dt) - 0.5 * jnp.sum(diff**2 / var, -1) - 0.5 * flat.shape[1] * jnp.log(var[..., 0])
        resp = jax.nn.softmax(logp, axis=1)[..., None]
        return jnp.sum(resp * (mu + v0 / var * diff), axis=1).reshape(x.shape)

    return x0_fn


# ----------------------------------------------------------------------------------------------------
# Flow matching (`jdiff.flow`): exact velocity fields v*(x_s, T s) = E[eps - x0 | x_s] of x_s = (1 - s) x0 + s eps.


def gaussian_velocity_fn(mean, cov, num_timesteps: int = 1000) -> Callable[[Array, Array], Array]:
    """v*(x (B, ...), t (B,)) for x_0 ~ N(mean (d,), cov (d, d)), called as a flow model: s = t / num_timesteps.

    With a = 1 - s, b = s, C = a^2 S + b^2 I and z = x - a mu: E[eps | x] = b C^-1 z, E[x0 | x] = mu + a S C^-1 z,
    so in S's eigenbasis (eigenvalues l) v* = (b - a l)/(a^2 l + b^2) z - mu, finite at s = 0 and s = 1."""
    mean = np.asarray(mean, np.float64)
    lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
    mean_j, lam_j, u_j = (jnp.asarray(a, jnp.float32) for a in (mean, lam, u))

    def v_fn(x, t):
        flat = x.reshape(x.shape[0], -1)
        s = (jnp.asarray(t, flat.dtype) / num_timesteps)[:, None]
        a = 1.0 - s
        z = (flat - a * mean_j) @ u_j
        out = ((s - a * lam_j) / (a**2 * lam_j + s**2) * z) @ u_j.T - mean_j
        return out.reshape(x.shape)

    return v_fn


def gmm_velocity_fn(means, stds, weights, num_timesteps: int = 1000) -> Callable[[Array, Array], Array]:
    """v*(x (B, ...), t (B,)) for x_0 ~ sum_k weights[k] N(means[k] (d,), stds[k]^2 I), s = t / num_timesteps:
    the responsibility-weighted sum of the components' velocities (`gaussian_velocity_fn` with S = s_k^2 I)."""
    means_j = jnp.asarray(means, jnp.float32)  # (K, d)
    var0 = jnp.asarray(stds, jnp.float32) ** 2  # (K,)
    logw = jnp.log(jnp.asarray(weights, jnp.float32) / np.sum(weights))

    def v_fn(x, t):
        flat = x.reshape(x.shape[0], -1)
        d = flat.shape[1]
        s = (jnp.asarray(t, flat.dtype) / num_timesteps)[:, None]
        a = 1.0 - s
        var = a**2 * var0[None, :] + s**2  # (B, K)
        diff = flat[:, None, :] - a[:, :, None] * means_j[None]  # (B, K, d)
        logp = logw - 0.5 * jnp.sum(diff**2, -1) / var - 0.5 * d * jnp.log(var)
        resp = jax.nn.softmax(logp, axis=1)
        v_k = ((s - a * var0[None, :]) / var)[:, :, None] * diff - means_j[None]
        return jnp.sum(resp[:, :, None] * v_k, axis=1).reshape(x.shape)

    return v_fn
