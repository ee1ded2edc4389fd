"""Negative log-likelihood in bits/dim of a trained diffusion model, per example, as pure functions (jit them):

* `vlb_bpd`: the full variational bound (DDPM eq. 5; improved DDPM's `calc_bpd_loop`): sum over all T terms
  L_t (the KL of each reverse step, the decoder at t = 0) plus the prior term L_T. Fixed or learned variance,
  eps / x0 / v models. The T model calls are batched: a `lax.scan` over chunks of `t_chunk` timesteps, each
  chunk one model call on B * t_chunk examples.
* `ode_bpd`: the exact log-likelihood of the probability-flow ODE (Song et al. 2021, "Score-based generative
  modeling through SDEs", sec. 4.3 and App. D.2; score_sde's likelihood.py): the ODE is solved from the data
  to the N(0, I) prior with diffrax's adaptive Dormand-Prince 5(4) (Tsit5 optional), carrying the
  instantaneous change of variables d log p / d tau = -div f, with the divergence exact (D forward-mode JVPs,
  small D) or estimated by Hutchinson's trace estimator (one Rademacher or Gaussian probe per example, fixed
  over the solve). Discrete data is dequantised uniformly within its bins.

`model_fn(x (N, ...), t (N,) float32[, y (N,)])` is the model as `jdiff.sample` takes it: its output is the
prediction (`prediction` "eps" | "x0" | "v"), with 2x the data's channels for a learned variance.
Data x0 is (B, ...) in [-1, 1]; `levels` is the number of values per dimension of discrete data (17 for the
sklearn digits, 256 for 8-bit images; None: continuous data, e.g. VAE latents, any real values).

Inputs are checked (`check_data`): x0 must have a batch axis of B >= 1 and at least one data axis, labels
shape (B,) of integers, levels an int >= 2 or None. Discrete data outside [-1, 1] (0..255 pixels) or with no
value below 0 in the batch ([0, 1] images, which would give a plausible but wrong bits/dim) is a ValueError
when x0 is a concrete array; under jit (x0 traced) an example with a value outside [-1, 1] gets NaN.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jdiff.forward import FLOW_PREDICTIONS, PREDICTIONS, check_prediction, to_x0_eps
from jdiff.losses import LN2, mean_flat, prior_bpd, split_output, vlb_term
from jdiff.schedules import Schedule, log_snr_at, t_from_log_snr

Array = jax.Array
PROBES = ("rademacher", "gaussian", "exact")
SOLVERS = ("dopri5", "tsit5")


def check_data(x0, labels, levels) -> Optional[Array]:
    """ValueError (naming the argument and what it must be) for data the likelihood functions cannot score;
    returns None, or under jit a (B,) bool of the examples within [-1, 1] for discrete data (see module)."""
    shape = getattr(x0, "shape", None)
    if shape is None or len(shape) < 2 or shape[0] < 1 or 0 in shape[1:]:
        raise ValueError(
            f"x0 must be an array of shape (B, ...) with B >= 1 examples and at least one non-empty data axis, "
            f"got shape {shape}."
        )
    if not jnp.issubdtype(getattr(x0, "dtype", None), jnp.floating):
        raise ValueError(f"x0 must be a floating-point array in [-1, 1], got dtype {x0.dtype}.")
    if levels is not None and (not isinstance(levels, int) or isinstance(levels, bool) or levels < 2):
        raise ValueError(f"levels must be an int >= 2 or None, got {levels!r}.")
    if labels is not None:
        lshape, ldtype = getattr(labels, "shape", None), getattr(labels, "dtype", None)
        if lshape != (shape[0],) or ldtype is None or not jnp.issubdtype(ldtype, jnp.integer):
            raise ValueError(
                f"labels must be an integer array of shape ({shape[0]},) (one per example of x0), got "
                f"{'shape ' + str(lshape) if lshape is not None else type(labels).__name__}"
                f"{' of ' + str(ldtype) if lshape is not None else ''}."
            )
    if levels is None:
        return None
    if isinstance(x0, jax.core.Tracer):
        return jnp.all((x0 >= -1.0) & (x0 <= 1.0), axis=tuple(range(1, len(shape))))
    lo, hi = float(jnp.min(x0)), float(jnp.max(x0))
    if not (-1.0 <= lo and hi <= 1.0):
        raise ValueError(
            f"x0 must lie in [-1, 1] for discrete data (levels={levels}), got values in [{lo:g}, {hi:g}]; scale "
            "8-bit pixels p as p / 127.5 - 1, or pass levels=None for continuous data."
        )
    if lo >= 0.0:
        raise ValueError(
            f"x0 has no value below 0 (range [{lo:g}, {hi:g}]): discrete data must span [-1, 1], this looks like "
            "[0, 1] images; pass 2 * x0 - 1."
        )
    return None


def _call(model_fn, x, t, labels):
    return model_fn(x, t) if labels is None else model_fn(x, t, labels)


def vlb_terms(
    model_fn: Callable[..., Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    prediction: str = "eps",
    variance: Optional[str] = None,
    levels: Optional[int] = 256,
    labels: Optional[Array] = None,
    t_chunk: int = 10,
    clip_x0: bool = False,
) -> tuple[Array, Array]:
    """(terms (B, T), prior (B,)) in bits/dim: terms[:, t] = L_t (`jdiff.losses.vlb_term`) with x_t drawn
    from q(x_t | x_0) with noise of key fold_in(rng, t), and prior = KL(q(x_T | x_0) || N(0, I)).

    variance: "posterior", "beta" or "learned" (None: learned for a 2x-channel output, else posterior).
    t_chunk: timesteps per model call (static; the memory of a call grows with B * t_chunk).
    """
    check_prediction(prediction, allowed=PREDICTIONS)
    in_range = check_data(x0, labels, levels)
    if not isinstance(t_chunk, int) or t_chunk < 1:
        raise ValueError(f"t_chunk must be an int >= 1, got {t_chunk!r}.")
    batch, T = x0.shape[0], schedule.num_timesteps
    chunk = min(t_chunk, T)
    n_chunks = -(-T // chunk)
    ts = jnp.minimum(jnp.arange(n_chunks * chunk, dtype=jnp.int32), T - 1).reshape(n_chunks, chunk)
    tile = lambda a: jnp.broadcast_to(a[None], (chunk, *a.shape)).reshape(chunk * batch, *a.shape[1:])
    x0_rep = tile(x0)
    y_rep = None if labels is None else tile(jnp.asarray(labels))

    def one_chunk(_, t_row):
        noise = jax.vmap(lambda t: jax.random.normal(jax.random.fold_in(rng, t), x0.shape, x0.dtype))(t_row)
        t_rep = jnp.repeat(t_row, batch)  # (chunk * B,), t-major like x0_rep
        noise = noise.reshape(x0_rep.shape)
        alpha = schedule.sqrt_alphas_cumprod[t_rep].reshape((-1,) + (1,) * (x0.ndim - 1))
        sigma = schedule.sqrt_one_minus_alphas_cumprod[t_rep].reshape(alpha.shape)
        x_t = (alpha * x0_rep + sigma * noise).astype(x0.dtype)
        out = _call(model_fn, x_t, t_rep.astype(jnp.float32), y_rep)
        terms = vlb_term(
            schedule, x0_rep, x_t, t_rep, out, prediction=prediction, variance=variance, levels=levels, clip_x0=clip_x0
        )
        return None, terms.reshape(chunk, batch)

    _, terms = jax.lax.scan(one_chunk, None, ts)  # (n_chunks, chunk, B)
    terms = terms.reshape(n_chunks * chunk, batch)[:T].T
    prior = prior_bpd(schedule, x0)
    if in_range is not None:  # traced discrete data outside [-1, 1]: NaN, never a plausible number
        terms, prior = jnp.where(in_range[:, None], terms, jnp.nan), jnp.where(in_range, prior, jnp.nan)
    return terms, prior


def vlb_bpd(model_fn: Callable[..., Array], schedule: Schedule, x0: Array, rng: Array, **options) -> Array:
    """The variational bound on -log2 p(x0) per dimension, (B,): sum_t L_t + L_prior (see `vlb_terms`, whose
    keyword options it takes).

    An upper bound on the model's NLL for each example in expectation over the noise (one draw of x_t per t);
    with levels=None the decoder is a Gaussian density and the result bounds -log2 p(x0) of continuous data.
    """
    terms, prior = vlb_terms(model_fn, schedule, x0, rng, **options)
    return jnp.sum(terms, axis=1) + prior


# ----------------------------------------------------------------------------------------------------
# Probability-flow ODE.


class ODELikelihood(NamedTuple):
    """Per-example results of `ode_likelihood` (all (B,) except steps and ok)."""

    bpd: Array  # -log2 p(x0) per dimension (with the dequantisation offset for discrete data)
    prior_logp: Array  # log N(x_T; 0, I), nats
    delta_logp: Array  # the integral of the divergence, nats: log p_0(x_0) = prior_logp + delta_logp
    steps: Array  # () solver steps taken, accepted and rejected (Dopri5: 6 evaluations of (f, div f) each)
    ok: Array  # () bool: the solver reached the end within max_steps


def pf_ode_drift(eps: Array, x: Array, log_snr: Array) -> Array:
    """The probability-flow ODE of the VP diffusion in the log-SNR lambda: dx/dlambda = (sigma^2 x - sigma eps) / 2
    with sigma^2 = sigmoid(-lambda) (from dx = [f x - g^2 score / 2] dt, score = -eps / sigma; it is DDIM's
    d(x / alpha) = eps d(sigma / alpha) written in lambda)."""
    var = jax.nn.sigmoid(-log_snr)
    return 0.5 * (var * x - jnp.sqrt(var) * eps)


def ode_likelihood(
    model_fn: Callable[..., Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    prediction: str = "eps",
    levels: Optional[int] = 256,
    labels: Optional[Array] = None,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    max_steps: int = 4096,
) -> ODELikelihood:
    """-log2 p(x0) per dimension under the probability-flow ODE of the model (see module docstring).

    prediction: "eps", "x0", "v" or "flow" (a flow-matching model, called as `jdiff.sampling.denoiser` calls it).
    The ODE runs in tau = -lambda from the first step of the schedule (t = 0, lambda_0) to its last (t = T-1),
    where the prior N(0, I) is assumed; the model sees t = t_from_log_snr(lambda) (fractional). So p_0 is the
    density of x at t = 0 (abar_0 = 1 - beta_0), the analogue of score_sde's eps = 1e-5.
    Discrete data (levels given) is dequantised, y = x0 + u Delta with u ~ U(-1/2, 1/2)^D and bin width
    Delta = 2 / (levels - 1), and -log2 P(x0) <= -log2 p(y) - D log2 Delta (Jensen, one draw); levels None:
    continuous data, no dequantisation.
    probe: "rademacher" or "gaussian" (Hutchinson, one probe per example) or "exact" (D JVPs per evaluation).
    rtol, atol: the PID step-size controller's tolerances; solver "dopri5" (RK45) or "tsit5".
    Usable under jit (with labels, probe, solver and max_steps static).
    """
    import diffrax  # local: diffrax (and equinox) take a second to import

    check_prediction(prediction, allowed=PREDICTIONS + FLOW_PREDICTIONS)
    in_range = check_data(x0, labels, levels)
    if probe not in PROBES:
        raise ValueError(f"Unknown probe {probe!r}; allowed values: {list(PROBES)}.")
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; allowed values: {list(SOLVERS)}.")
    batch, dims = x0.shape[0], math.prod(x0.shape[1:])
    channels = x0.shape[-1]
    dtype = jnp.result_type(x0.dtype, jnp.float32)
    deq_key, probe_key = jax.random.split(rng)
    x = x0.astype(dtype)
    offset = 0.0
    if levels is not None:
        delta = 2.0 / (levels - 1)
        x = x + delta * jax.random.uniform(deq_key, x.shape, dtype, -0.5, 0.5)
        offset = -math.log2(delta)
    T = schedule.num_timesteps
    lam_max = log_snr_at(schedule, jnp.zeros((), jnp.float32)).astype(dtype)
    lam_min = log_snr_at(schedule, jnp.full((), T - 1, jnp.float32)).astype(dtype)

    def eps_at(xs, lam):
        var = jax.nn.sigmoid(-lam)
        alpha, sigma = jnp.sqrt(1.0 - var), jnp.sqrt(var)
        if prediction in FLOW_PREDICTIONS:  # v(x/(alpha + sigma), T s), s = sigma/(alpha + sigma) (`jdiff.flow`)
            x_in, t = xs / (alpha + sigma), jnp.full((batch,), T * sigma / (alpha + sigma), jnp.float32)
        else:
            x_in, t = xs, jnp.full((batch,), t_from_log_snr(schedule, lam), jnp.float32)
        out, _ = split_output(_call(model_fn, x_in, t, labels), channels)
        _, eps = to_x0_eps(prediction, out.astype(dtype), xs, alpha, sigma)
        return eps

    def drift(tau, xs):  # dx/dtau with tau = -lambda
        lam = -tau
        return -pf_ode_drift(eps_at(xs, lam), xs, lam)

    if probe == "exact":
        basis = jnp.eye(dims, dtype=dtype).reshape(dims, 1, *x0.shape[1:])

        def divergence(tau, xs):
            f = lambda z: drift(tau, z)
            jvp = lambda e: jax.jvp(f, (xs,), (jnp.broadcast_to(e, xs.shape),))[1]
            cols = jax.lax.map(jvp, basis)  # (D, B, ...): J e_k for every basis vector
            diag = jnp.einsum("kb...,k...->bk", cols.reshape(dims, batch, -1), basis.reshape(dims, -1))
            return jnp.sum(diag, axis=1)

        f_and_div = lambda tau, xs: (drift(tau, xs), divergence(tau, xs))
    else:
        if probe == "rademacher":
            v = jax.random.rademacher(probe_key, x.shape, dtype)
        else:
            v = jax.random.normal(probe_key, x.shape, dtype)

        def f_and_div(tau, xs):
            f, jv = jax.jvp(lambda z: drift(tau, z), (xs,), (v,))
            return f, mean_flat(jv * v) * dims

    def rhs(tau, state, args):
        f, div = f_and_div(tau, state[0])
        return f, div

    term = diffrax.ODETerm(rhs)
    ode_solver = diffrax.Dopri5() if solver == "dopri5" else diffrax.Tsit5()
    sol = diffrax.diffeqsolve(
        term,
        ode_solver,
        t0=-lam_max,
        t1=-lam_min,
        dt0=None,
        y0=(x, jnp.zeros((batch,), dtype)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,
        saveat=diffrax.SaveAt(t1=True),
    )
    z, delta_logp = sol.ys[0][-1], sol.ys[1][-1]
    ok = sol.result == diffrax.RESULTS.successful
    prior_logp = -0.5 * jnp.sum(jnp.square(z).reshape(batch, -1), axis=1) - 0.5 * dims * math.log(2 * math.pi)
    logp = prior_logp + delta_logp
    bpd = -logp / (dims * LN2) + offset
    bpd = jnp.where(ok if in_range is None else ok & in_range, bpd, jnp.nan)
    return ODELikelihood(bpd, prior_logp, delta_logp, sol.stats["num_steps"], ok)


def ode_bpd(model_fn: Callable[..., Array], schedule: Schedule, x0: Array, rng: Array, **options) -> Array:
    """-log2 p(x0) per dimension, (B,), through the probability-flow ODE (`ode_likelihood`'s bpd, with its keyword
    options; NaN where the solver did not finish within max_steps)."""
    return ode_likelihood(model_fn, schedule, x0, rng, **options).bpd


__all__ = ["vlb_bpd", "vlb_terms", "ode_bpd", "ode_likelihood", "ODELikelihood", "pf_ode_drift", "check_data", "PROBES"]
