"""EDM: the preconditioned denoiser and its training loss (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", Table 1 and Sec. 5).

EDM writes the noisy data as x = y + sigma n (y the clean data, n ~ N(0, I), no scaling) and the denoiser as

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))            (EDM eq. 7)

with F the network. Table 1 gives three preconditionings (c_skip, c_out, c_in, c_noise), each with its
training distribution of sigma and loss weight lambda(sigma):

    "edm": c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4;
           ln s ~ N(P_mean, P_std^2) (-1.2, 1.2); lambda = (s^2+sd^2)/(s sd)^2; sd = sigma_data = 0.5.
    "vp":  c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) t(s) (M = 1000, the VP-SDE time
           t(s) = sigma^-1(s) of sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1), beta_d 19.9,
           beta_min 0.1); t ~ U(eps_t, 1) (eps_t = 1e-5); lambda = 1/s^2.  (F predicts eps.)
    "ve":  c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2); ln s ~ U(ln 0.02, ln 100); lambda = 1/s^2.
           (F predicts -eps.)

For all three lambda c_out^2 = 1 (EDM eq. 8): the loss is the plain MSE of F against its effective target
(y - c_skip x)/c_out, which is how `edm_loss` computes it. sigma is continuous throughout: no timestep table.

Where EDM meets jdiff's variance-preserving (VP) state x_vp = alpha y + sigma_vp n (alpha^2 + sigma_vp^2 = 1,
`jdiff.schedules`): sigma = sigma_vp/alpha and x = x_vp/alpha (`from_vp`); abar = 1/(1 + sigma^2).
`jdiff.sampling.denoiser` uses this one conversion so that an EDM-trained network samples with every jdiff
sampler (predictions "edm", "edm_vp", "edm_ve" of `jdiff.forward.EDM_PREDICTIONS`), and the "edm" schedule
(`jdiff.schedules.edm_betas`) puts EDM's sigma grid into a `Schedule`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jdiff.forward import EDM_PREDICTIONS, broadcast_to

Array = jax.Array

PRECONDITIONINGS = ("edm", "vp", "ve")
SIGMA_DATA = 0.5  # EDM's sigma_data for images scaled to [-1, 1]
P_MEAN, P_STD = -1.2, 1.2  # EDM's log-normal training sigma (Table 1, CIFAR-10 / FFHQ / AFHQ)
VP_BETA_D, VP_BETA_MIN, VP_EPS_T, VP_M = 19.9, 0.1, 1e-5, 1000  # "vp" (Song et al. 2021's VP-SDE)
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.02, 100.0  # "ve" (Song et al. 2021's VE-SDE)


class Coefficients(NamedTuple):
    """The preconditioning of EDM eq. 7 at sigma; each has sigma's shape."""

    c_skip: Array
    c_out: Array
    c_in: Array
    c_noise: Array


def check_preconditioning(preconditioning: str) -> None:
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"Unknown preconditioning {preconditioning!r}; allowed values: {list(PRECONDITIONINGS)}.")


def preconditioning_of(prediction: str) -> str:
    """The preconditioning of an EDM prediction name: "edm" -> "edm", "edm_vp" -> "vp",
    "edm_ve" -> "ve" (`jdiff.forward.EDM_PREDICTIONS`)."""
    if prediction not in EDM_PREDICTIONS:
        raise ValueError(f"Unknown EDM prediction {prediction!r}; allowed values: {list(EDM_PREDICTIONS)}.")
    return "edm" if prediction == "edm" else prediction[len("edm_") :]


def from_vp(*, x: Array, alpha: Array, sigma: Array) -> tuple[Array, Array]:
    """(x_edm, sigma_edm) = (x_vp/alpha, sigma_vp/alpha): the VP state x_vp = alpha y + sigma_vp n in EDM's
    variables x = y + sigma n (EDM eq. 4 with s(t) = alpha). alpha, sigma broadcast against x."""
    return x / alpha, sigma / alpha


def vp_sigma(*, t: Array, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> Array:
    """EDM Table 1, VP: sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1), t in (0, 1]."""
    return jnp.sqrt(jnp.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sigma_inv(*, sigma: Array, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> Array:
    """The inverse of `vp_sigma`: t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min)/beta_d."""
    return (jnp.sqrt(beta_min**2 + 2.0 * beta_d * jnp.log1p(sigma**2)) - beta_min) / beta_d


def coefficients(preconditioning: str, *, sigma: Array, sigma_data: float = SIGMA_DATA) -> Coefficients:
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) of `preconditioning` ("edm", "vp", "ve") at sigma > 0
    (see the module docstring for the formulas; sigma_data is used by "edm" only)."""
    check_preconditioning(preconditioning)
    s = jnp.asarray(sigma, jnp.float32)
    if preconditioning == "edm":
        sd2 = sigma_data**2
        r = jnp.sqrt(s**2 + sd2)
        return Coefficients(sd2 / (s**2 + sd2), s * sigma_data / r, 1.0 / r, jnp.log(s) / 4.0)
    if preconditioning == "vp":
        one = jnp.ones_like(s)
        return Coefficients(one, -s, 1.0 / jnp.sqrt(s**2 + 1.0), (VP_M - 1) * vp_sigma_inv(sigma=s))
    return Coefficients(jnp.ones_like(s), s, jnp.ones_like(s), jnp.log(0.5 * s))


def loss_weight(preconditioning: str, *, sigma: Array, sigma_data: float = SIGMA_DATA) -> Array:
    """EDM Table 1: lambda(sigma) = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2 for "edm", 1/sigma^2 for
    "vp" and "ve"; lambda c_out^2 = 1 in every case (EDM eq. 8)."""
    check_preconditioning(preconditioning)
    s = jnp.asarray(sigma, jnp.float32)
    if preconditioning == "edm":
        return (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    return 1.0 / s**2


def training_sigma(preconditioning: str, rng: Array, shape, *, p_mean: float = P_MEAN, p_std: float = P_STD) -> Array:
    """Draws training noise levels of `shape` (EDM Table 1, "Training"): "edm": ln sigma ~ N(p_mean, p_std^2);
    "vp": sigma = vp_sigma(t), t ~ U(eps_t, 1); "ve": ln sigma ~ U(ln 0.02, ln 100). float32."""
    check_preconditioning(preconditioning)
    if preconditioning == "edm":
        return jnp.exp(p_mean + p_std * jax.random.normal(rng, shape, jnp.float32))
    u = jax.random.uniform(rng, shape, jnp.float32)
    if preconditioning == "vp":
        return vp_sigma(t=1.0 + u * (VP_EPS_T - 1.0))  # EDM's VPLoss: t = 1 + u (eps_t - 1)
    return VE_SIGMA_MIN * (VE_SIGMA_MAX / VE_SIGMA_MIN) ** u


def denoise(
    net_fn: Callable[[Array, Array], Array],
    x: Array,
    sigma: Array,
    *,
    preconditioning: str = "edm",
    sigma_data: float = SIGMA_DATA,
) -> Array:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)  (EDM eq. 7).

    net_fn(x_in (B, ...), c_noise (B,)) -> F (B, ...) (a model's first channels if it outputs more); x (B, ...);
    sigma (B,) or scalar. Returns D (B, ...) float32.
    """
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    c = coefficients(preconditioning, sigma=s, sigma_data=sigma_data)
    f = _first_channels(net_fn(broadcast_to(c.c_in, x) * x, c.c_noise), x).astype(jnp.float32)
    return broadcast_to(c.c_skip, x) * x + broadcast_to(c.c_out, x) * f


def _first_channels(out: Array, x: Array) -> Array:
    if out.shape[-1] == 2 * x.shape[-1] and out.shape[:-1] == x.shape[:-1]:
        out = out[..., : x.shape[-1]]  # a learned-variance model: its first half is F
    if out.shape != x.shape:
        raise ValueError(f"net_fn returned shape {out.shape}; expected {x.shape} (or 2x channels).")
    return out


def edm_loss(
    net_fn: Callable[[Array, Array], Array],
    x0: Array,
    rng: Array,
    *,
    preconditioning: str = "edm",
    sigma_data: float = SIGMA_DATA,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    weights: Optional[Array] = None,
) -> tuple[Array, dict]:
    """EDM's training loss (Karras et al. 2022, eq. 2 and Sec. 5 / eq. 8):

        E_{sigma, n} lambda(sigma) ||D(y + sigma n; sigma) - y||^2
          = E lambda c_out^2 ||F(c_in (y + sigma n); c_noise) - (y - c_skip (y + sigma n))/c_out||^2,

    the second form (lambda c_out^2 = 1) computed; sigma ~ `training_sigma`, n ~ N(0, I), squared errors
    averaged over pixels (EDM sums them; the factor is the number of pixels).

    Args:
      net_fn: the network F: (x_in (B, ...), c_noise (B,) float32) -> (B, ...) (or 2x channels; first half).
      x0: clean data y (B, ...), float.
      rng: PRNG key, split into the sigma and noise draws.
      preconditioning: "edm", "vp" or "ve" (Table 1).
      sigma_data, p_mean, p_std: "edm"'s sigma_data and log-normal training sigma.
      weights: optional (B,) per-example weights or 0/1 mask; the loss is sum(w l) / sum(w).

    Returns:
      (loss scalar float32, {"mse": the unweighted mean ||D - y||^2, same averaging}).
    """
    check_preconditioning(preconditioning)
    if not (isinstance(sigma_data, (int, float)) and sigma_data > 0 and math.isfinite(sigma_data)):
        raise ValueError(f"sigma_data must be a positive float, got {sigma_data!r}.")
    if not (isinstance(p_std, (int, float)) and p_std > 0):
        raise ValueError(f"p_std must be a positive float, got {p_std!r}.")
    batch = x0.shape[0]
    if weights is not None and jnp.shape(weights) != (batch,):
        raise ValueError(f"weights must have shape ({batch},) to match x0, got {jnp.shape(weights)}.")
    s_rng, n_rng = jax.random.split(rng)
    sigma = training_sigma(preconditioning, s_rng, (batch,), p_mean=p_mean, p_std=p_std)
    y = x0.astype(jnp.float32)
    x = y + broadcast_to(sigma, y) * jax.random.normal(n_rng, y.shape, jnp.float32)
    c = coefficients(preconditioning, sigma=sigma, sigma_data=sigma_data)
    f = _first_channels(net_fn((broadcast_to(c.c_in, x) * x).astype(x0.dtype), c.c_noise), x).astype(jnp.float32)
    c_skip, c_out = broadcast_to(c.c_skip, y), broadcast_to(c.c_out, y)
    target = (y - c_skip * x) / c_out
    axes = tuple(range(1, y.ndim))
    f_err = jnp.mean(jnp.square(f - target), axis=axes)
    lam_c_out2 = loss_weight(preconditioning, sigma=sigma, sigma_data=sigma_data) * c.c_out**2  # = 1 (eq. 8)
    ex_w = jnp.ones((batch,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    denom = jnp.maximum(jnp.sum(ex_w), 1e-12)
    loss = jnp.sum(ex_w * lam_c_out2 * f_err) / denom
    mse = jnp.sum(ex_w * c.c_out**2 * f_err) / denom  # ||D - y||^2 = c_out^2 ||F - target||^2
    return loss, {"mse": mse}


__all__ = [
    "PRECONDITIONINGS",
    "SIGMA_DATA",
    "P_MEAN",
    "P_STD",
    "Coefficients",
    "check_preconditioning",
    "preconditioning_of",
    "from_vp",
    "vp_sigma",
    "vp_sigma_inv",
    "coefficients",
    "loss_weight",
    "training_sigma",
    "denoise",
    "edm_loss",
]
