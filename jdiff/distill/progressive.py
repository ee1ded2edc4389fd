"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", arXiv 2202.00512, Alg. 2), on jdiff's discrete grids.

A student of N steps is trained to take, from the level t of its grid, the step the teacher's deterministic
DDIM (eta = 0) takes in two steps t -> t' -> t'' on the grid of 2N steps. On the VP state z = alpha x + sigma eps
one DDIM step is z_s = alpha_s x_hat + (sigma_s/sigma_t)(z_t - alpha_t x_hat). The student's x-target is the
x_tilde whose single DDIM step t -> t'' lands on the teacher's z_t'' (Alg. 2):
  x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),
and the loss is the truncated-SNR weighted x-MSE max(alpha_t^2/sigma_t^2, 1) ||x_tilde - x_hat_student(z_t)||^2
(their sec. 4 "truncated SNR" weighting, the x-space form of their v-prediction loss).

The grids are the "trailing" spacing (`jdiff.sampling.timesteps.discrete_timesteps`: t_i = round(T - i T/N) - 1):
its N-step grid is every other level of its 2N-step grid, so the teacher's midpoint t' is row 2i + 1 of the 2N
grid and t'' row i + 1 of the N grid (the clean level after the last row). The student is sampled with
`ddim` (eta = 0), N steps, spacing trailing.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jdiff.distill.net import Net, denoiser, per_example
from jdiff.schedules import Schedule

Array = jax.Array
X0Fn = Callable[[Array, Array, Array, Array], Array]  # (z (B, ...), t (B,), alpha (B,), sigma (B,)) -> x_hat


def trailing_level(schedule: Schedule, i: Array, n: Array) -> tuple[Array, Array, Array]:
    """(t, alpha, sigma) of row i of the N-step trailing grid (i and N may be traced): t = round(T - i T/N) - 1,
    and the clean level (t = -1, alpha = 1, sigma = 0) for i = N. Equal to `make_grid(schedule, "trailing", N)`."""
    big_t = schedule.num_timesteps
    i_f, n_f = jnp.asarray(i, jnp.float32), jnp.asarray(n, jnp.float32)
    t = (jnp.round(big_t - i_f * (big_t / n_f)) - 1).astype(jnp.int32)
    clean = i_f >= n_f
    tc = jnp.clip(t, 0, big_t - 1)
    alpha = jnp.where(clean, 1.0, schedule.sqrt_alphas_cumprod[tc])
    sigma = jnp.where(clean, 0.0, schedule.sqrt_one_minus_alphas_cumprod[tc])
    return jnp.where(clean, -1.0, t.astype(jnp.float32)), alpha, sigma


def ddim_step(x_hat: Array, z: Array, alpha, sigma, alpha_next, sigma_next) -> Array:
    """One deterministic DDIM step (Song et al. 2021 eq. 12, eta = 0) from z at (alpha, sigma) to
    (alpha_next, sigma_next) with the prediction x_hat."""
    return alpha_next * x_hat + (sigma_next / sigma) * (z - alpha * x_hat)


def ddim_target(z: Array, z_next: Array, alpha, sigma, alpha_next, sigma_next) -> Array:
    """Salimans & Ho 2022 Alg. 2: the x_tilde whose DDIM step from z at (alpha, sigma) reaches z_next at
    (alpha_next, sigma_next): (z_next - (sigma_next/sigma) z)/(alpha_next - (sigma_next/sigma) alpha)."""
    r = sigma_next / sigma
    return (z_next - r * z) / (alpha_next - r * alpha)


def truncated_snr_weight(alpha, sigma) -> Array:
    """max(SNR, 1) = max(alpha^2/sigma^2, 1) (Salimans & Ho 2022 sec. 4, "truncated SNR")."""
    return jnp.maximum(alpha**2 / sigma**2, 1.0)


def _bc(v: Array, x: Array) -> Array:
    return v.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def progressive_loss(
    student: X0Fn, teacher: X0Fn, schedule: Schedule, x0: Array, rng: Array, n: Array
) -> tuple[Array, dict]:
    """The loss of one Alg. 2 update for a student of N = n steps (traced) on the batch x0 (B, ...): i uniform
    in [0, N), z_t = alpha_t x0 + sigma_t eps at row i of the N grid, the teacher's two DDIM steps through
    row 2i + 1 of the 2N grid, the x_tilde target (under stop_gradient) and the truncated-SNR weighted MSE
    (mean over values). Returns (loss, {"mse": the unweighted MSE})."""
    b = x0.shape[0]
    k_i, k_e = jax.random.split(rng)
    i = jax.random.randint(k_i, (b,), 0, n)
    t, a, s = trailing_level(schedule, i, n)
    t1, a1, s1 = trailing_level(schedule, 2 * i + 1, 2 * n)
    t2, a2, s2 = trailing_level(schedule, i + 1, n)
    eps = jax.random.normal(k_e, x0.shape, jnp.float32)
    z = _bc(a, x0) * x0 + _bc(s, x0) * eps
    x_t = teacher(z, t, a, s)
    z1 = ddim_step(x_t, z, *(_bc(v, x0) for v in (a, s, a1, s1)))
    x_t1 = teacher(z1, t1, a1, s1)
    z2 = ddim_step(x_t1, z1, *(_bc(v, x0) for v in (a1, s1, a2, s2)))
    target = jax.lax.stop_gradient(ddim_target(z, z2, *(_bc(v, x0) for v in (a, s, a2, s2))))
    pred = student(z, t, a, s)
    per = jnp.mean(jnp.square(pred - target).reshape(b, -1), axis=1)
    loss = jnp.mean(truncated_snr_weight(a, s) * per)
    return loss, {"mse": jnp.mean(per)}


def x0_fn(net: Net, labels: Optional[Array]) -> X0Fn:
    """x_hat(z (B, ...), t (B,), alpha (B,), sigma (B,)) of `net` (labels (B,) or None), each example at its
    own level."""
    denoise = denoiser(net, labels)
    return lambda z, t, a, s: denoise(z, *(per_example(v, z) for v in (t, a, s))).x0
