"""Consistency distillation (CD) and consistency training (CT) losses: Song et al. 2023 ("Consistency Models",
arXiv 2303.01469, Alg. 2 and 3) with the improved recipe of Song & Dhariwal 2023 ("Improved Techniques for
Training Consistency Models", arXiv 2310.14189, iCT).

Everything is in EDM variables (x = x0 + sigma z). The discretisation of [sigma_min, sigma_max] into N levels
is Karras et al.'s rho-grid (CM eq. after (4), increasing in i):
  sigma_i = (sigma_min^(1/rho) + i/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,  i = 0..N-1;
iCT's curriculum (sec. 3.4, eq. 5): N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K/(log2 floor(s1/s0) + 1));
iCT's lognormal index distribution (sec. 3.5): p(i) ~ erf((ln sigma_{i+1} - P_mean)/(sqrt 2 P_std)) -
erf((ln sigma_i - P_mean)/(sqrt 2 P_std)); iCT's weighting lambda(sigma_i) = 1/(sigma_{i+1} - sigma_i) (sec. 3.2)
and the pseudo-Huber distance d(x, y) = sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(d) (sec. 3.3).

The loss of one example with index i and noise z (CM eq. 7 / 10):
  lambda(sigma_i) d(f_theta(x0 + sigma_{i+1} z, sigma_{i+1}), f_target(x_i, sigma_i)),
with x_i = x0 + sigma_i z (CT) or the teacher's one ODE-solver step from x0 + sigma_{i+1} z to sigma_i (CD).
The target network is stop_gradient(theta) (iCT sec. 3.2: no EMA target; the CM paper's theta^- = EMA(theta)
is not used here, for CD too).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jdiff.distill.net import Net, denoiser, per_example
from jdiff.sampling.base import Noise, Sampler, Step
from jdiff.sampling.consistency import consistency_function
from jdiff.sampling.timesteps import Grid

Array = jax.Array
P_MEAN, P_STD = -1.1, 2.0  # iCT's lognormal index distribution
S0, S1 = 10, 1280  # iCT's curriculum: initial and final number of discretisation intervals
HUBER_SCALE = 0.00054  # iCT: c = 0.00054 sqrt(d)

Level = Callable[[Array], tuple[Array, Array, Array]]  # sigma_edm -> (t, alpha, sigma) (`timesteps.level_fn`)


def karras_level(i: Array, n: Array, sigma_min, sigma_max, rho: float = 7.0) -> Array:
    """sigma_i of the N-level rho-grid, increasing in i = 0..N-1 (sigma_0 = sigma_min, sigma_{N-1} = sigma_max);
    i and N may be traced."""
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + jnp.asarray(i, jnp.float32) / (jnp.asarray(n, jnp.float32) - 1.0) * (hi - lo)) ** rho


def curriculum_levels(k: Array, total_steps: int, s0: int = S0, s1: int = S1) -> Array:
    """iCT eq. 5: the number of levels N(k) = min(s0 2^floor(k/K'), s1) + 1 at training step k of K, int32."""
    kp = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    doublings = jnp.minimum(jnp.asarray(k, jnp.int32) // kp, 30)
    return jnp.minimum(s0 * 2**doublings, s1).astype(jnp.int32) + 1


def lognormal_index_probs(n: Array, max_levels: int, sigma_min, sigma_max, rho=7.0, p_mean=P_MEAN, p_std=P_STD):
    """iCT sec. 3.5: p(i) for i = 0..max_levels-2 (nonzero for i < N-1), the probability of the pair
    (sigma_i, sigma_{i+1}) of the N-level grid; float32 (max_levels - 1,), summing to 1."""
    i = jnp.arange(max_levels - 1, dtype=jnp.float32)
    cdf = lambda s: jax.scipy.special.erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))  # noqa: E731
    w = cdf(karras_level(i + 1, n, sigma_min, sigma_max, rho)) - cdf(karras_level(i, n, sigma_min, sigma_max, rho))
    w = jnp.where(i < n - 1, jnp.maximum(w, 0.0), 0.0)
    return w / jnp.sum(w)


def huber_c(dim: int) -> float:
    """iCT's pseudo-Huber c = 0.00054 sqrt(d) for data of d = H W C values."""
    return HUBER_SCALE * math.sqrt(dim)


def pseudo_huber(a: Array, b: Array, c) -> Array:
    """sqrt(||a - b||^2 + c^2) - c per example: (B,) for (B, ...) arrays."""
    sq = jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)
    return jnp.sqrt(sq + c**2) - c


def consistency_fn(net: Net, labels: Optional[Array], level: Level, sigma_min, sigma_data) -> Callable:
    """f(x_edm (B, ...), sigma (B,)) -> (B, ...): `jdiff.sampling.consistency.consistency_function` of `net`
    (labels (B,) or None), each example at its own EDM level (its VP level from `level`)."""
    denoise = denoiser(net, labels)

    def f(x, sig):
        t, a, s, sig = (per_example(v, x) for v in (*level(sig), sig))
        return consistency_function(denoise(x * a, t, a, s).x0, x, sig, sigma_min, sigma_data)

    return f


def solver_step(sampler: Sampler, options: dict, net: Net, labels: Optional[Array], level: Level) -> Callable:
    """step(x_edm (B, ...), sigma_from (B,), sigma_to (B,)) -> x_edm at sigma_to: one step of a registered
    (deterministic) sampler on the one-row grid sigma_from -> sigma_to (per example), as its first step (a
    multistep solver takes its first-order step; heun its full trapezoid), with `net` (labels (B,) or None)
    as the model. The CD teacher's ODE solver (CM Alg. 2)."""
    denoise = denoiser(net, labels)
    noise_key = jax.random.key(0)  # a deterministic sampler never draws (ddim with eta = 0 multiplies by 0)

    def step(x, s_from, s_to):
        row = Grid(*(per_example(v, x) for v in (*level(s_from), *level(s_to))))
        st = Step(jnp.int32(0), jnp.bool_(True), jnp.bool_(False), row, 2, level)
        out = sampler.output(
            sampler.step(denoise, sampler.init(x * row.alpha), st, Noise(noise_key, 0, False), options)
        )
        return out / row.alpha_next

    return step


def consistency_loss(
    student: Callable[[Array, Array], Array],
    x0: Array,
    rng: Array,
    n: Array,
    *,
    sigma_min: float,
    sigma_max: float,
    max_levels: int,
    huber: float,
    rho: float = 7.0,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    teacher_step: Optional[Callable[[Array, Array, Array], Array]] = None,
) -> tuple[Array, dict[str, Any]]:
    """The iCT loss on the batch x0 (B, ...) with N = n levels (traced; <= max_levels): CT when teacher_step is
    None, CD with it (see module docstring). student(x_edm, sigma) is the consistency function f_theta
    (`consistency_fn`), called twice: on x_{i+1} with gradients and on x_i under stop_gradient. Returns (mean
    loss, {"mse": the mean squared distance per value, "sigma": (B,) sigma_{i+1}})."""
    b = x0.shape[0]
    k_i, k_z = jax.random.split(rng)
    probs = lognormal_index_probs(n, max_levels, sigma_min, sigma_max, rho, p_mean, p_std)
    i = jax.random.categorical(k_i, jnp.log(probs), shape=(b,))
    sig_i = karras_level(i, n, sigma_min, sigma_max, rho)
    sig_next = karras_level(i + 1, n, sigma_min, sigma_max, rho)
    z = jax.random.normal(k_z, x0.shape, jnp.float32)
    bc = lambda v: v.reshape((b,) + (1,) * (x0.ndim - 1))  # noqa: E731
    x_next = x0 + bc(sig_next) * z
    x_i = x0 + bc(sig_i) * z if teacher_step is None else teacher_step(x_next, sig_next, sig_i)
    target = jax.lax.stop_gradient(student(jax.lax.stop_gradient(x_i), sig_i))
    pred = student(x_next, sig_next)
    weight = 1.0 / (sig_next - sig_i)
    loss = jnp.mean(weight * pseudo_huber(pred, target, huber))
    mse = jnp.mean(jnp.square(pred - target))
    return loss, {"mse": mse, "sigma": sig_next}
