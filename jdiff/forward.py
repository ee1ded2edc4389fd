"""The forward (noising) process q and its posterior, and conversions between model parameterizations.

All functions are pure and jit/vmap/grad friendly. `t` is a (B,) int array of timestep indices in
[0, T-1]; per-step coefficients are gathered from the schedule and broadcast against NHWC (or any
(B, ...)) arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff.schedules import Schedule

Array = jax.Array

# What a plain network's output is (the regression targets of `jdiff.diffusion_loss`).
PREDICTIONS = ("eps", "x0", "v")
# EDM-preconditioned networks (Karras et al. 2022, Table 1; `jdiff.edm`): the output is F of
# D = c_skip x + c_out F(c_in x; c_noise) with the "edm", "vp" or "ve" preconditioning. They are trained by
# `jdiff.edm.edm_loss` (not `diffusion_loss`), and sampled through `jdiff.sampling.denoiser`.
EDM_PREDICTIONS = ("edm", "edm_vp", "edm_ve")
# A flow-matching network (`jdiff.flow`): its output is the velocity v = eps - x0 of x_s = (1 - s) x0 + s eps,
# called with the flow-scaled state x_s and time T s; trained by `jdiff.flow.flow_loss`, sampled through
# `jdiff.sampling.denoiser`.
FLOW_PREDICTIONS = ("flow",)
# Every prediction a sampler's denoiser understands (`jdiff.sample(prediction=...)`).
ALL_PREDICTIONS = PREDICTIONS + EDM_PREDICTIONS + FLOW_PREDICTIONS


def check_prediction(prediction: str, name: str = "prediction", allowed: tuple = ALL_PREDICTIONS) -> None:
    """ValueError naming `name` and the allowed values unless `prediction` is one of `allowed` (default: every
    prediction the sampling denoiser understands)."""
    if prediction not in allowed:
        raise ValueError(f"Unknown {name} {prediction!r}; allowed values: {list(allowed)}.")


def _plain_only(prediction: str) -> None:
    if prediction in EDM_PREDICTIONS:
        raise ValueError(
            f"prediction {prediction!r} is an EDM-preconditioned network (jdiff.edm): it has no x0/eps/v "
            f"conversion of its own output and trains with jdiff.edm.edm_loss; allowed here: {list(PREDICTIONS)}."
        )
    check_prediction(prediction, allowed=PREDICTIONS)


def broadcast_to(coef: Array, x: Array) -> Array:
    """Reshapes a per-example coefficient of shape (B,) (or scalar) to broadcast against x (B, ...)."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def _gather(arr: Array, t: Array, x: Array) -> Array:
    return broadcast_to(arr[t], x)


def check_shapes(x: Array, t: Array, **others: Array) -> None:
    """ValueError unless t is (B,) or scalar for x of shape (B, ...) and every other array has x's shape."""
    if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != jnp.shape(x)[0]):
        raise ValueError(f"t must have shape ({jnp.shape(x)[0]},) to match the batch, got {jnp.shape(t)}.")
    for name, a in others.items():
        if jnp.shape(a) != jnp.shape(x):
            raise ValueError(f"{name} must have shape {jnp.shape(x)}, got {jnp.shape(a)}.")


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (DDPM eq. 4).

    Args: x0 and noise (B, ...) float; t (B,) int in [0, T-1]. Returns x_t (B, ...).
    """
    check_shapes(x0, t, noise=noise)
    return (
        _gather(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def q_posterior(schedule: Schedule, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde I)  (DDPM eqs. 6-7).

    Returns (mean (B, ...), variance (B, 1...), clipped log variance (B, 1...)).
    """
    check_shapes(x_t, t, x0=x0)
    mean = _gather(schedule.posterior_mean_coef1, t, x_t) * x0 + _gather(schedule.posterior_mean_coef2, t, x_t) * x_t
    return (
        mean,
        _gather(schedule.posterior_variance, t, x_t),
        _gather(schedule.posterior_log_variance_clipped, t, x_t),
    )


# ----------------------------------------------------------------------------------------------------
# Parameterizations in terms of (alpha, sigma) = (sqrt(abar), sqrt(1 - abar)), alpha^2 + sigma^2 = 1.
# With x = alpha x0 + sigma eps and v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4):
#   x0 = alpha x - sigma v,  eps = sigma x + alpha v.


def x0_from_eps(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """x0 = (x - sigma eps) / alpha."""
    return (x - sigma * eps) / alpha


def eps_from_x0(x: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
    """eps = (x - alpha x0) / sigma."""
    return (x - alpha * x0) / sigma


def v_from_eps_x0(eps: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
    """v = alpha eps - sigma x0  (Salimans & Ho 2022, eq. in sec. 4 / appendix D)."""
    return alpha * eps - sigma * x0


def to_x0_eps(prediction: str, out: Array, x: Array, alpha: Array, sigma: Array) -> tuple[Array, Array]:
    """Converts a model output of type `prediction` ("eps", "x0", "v" or "flow") at x into (x0, eps).

    alpha and sigma broadcast against x. For "eps" at alpha = 0 the x0 is undefined (inf); use "v" with
    zero-terminal-SNR schedules. "flow": out is the velocity eps - x0 at the flow state x/(alpha + sigma)
    (`jdiff.flow`), x0 = x_s - s out, eps = x_s + (1 - s) out with s = sigma/(alpha + sigma).
    """
    if prediction == "flow":
        r = alpha + sigma
        x_s, s = x / r, sigma / r
        return x_s - s * out, x_s + (1.0 - s) * out
    if prediction == "eps":
        return x0_from_eps(x, out, alpha, sigma), out
    if prediction == "x0":
        return out, eps_from_x0(x, out, alpha, sigma)
    if prediction == "v":
        return alpha * x - sigma * out, sigma * x + alpha * out
    _plain_only(prediction)
    raise AssertionError  # unreachable


def target_from_x0_eps(prediction: str, x0: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """The regression target of a model of type `prediction` given the true x0 and eps ("flow": eps - x0)."""
    if prediction == "flow":
        return eps - x0
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_eps_x0(eps, x0, alpha, sigma)
    _plain_only(prediction)
    raise AssertionError  # unreachable


def convert_prediction(out: Array, x: Array, alpha: Array, sigma: Array, *, source: str, target: str) -> Array:
    """Converts a prediction between the "eps", "x0" and "v" parameterizations at x."""
    x0, eps = to_x0_eps(source, out, x, alpha, sigma)
    return target_from_x0_eps(target, x0, eps, alpha, sigma)
