"""`jdiff.sample` and `jdiff.ddim_invert`: validation on the host, then one jitted `lax.scan`.

Static (a change recompiles): model_fn, shape, sampler, num_steps, prediction, spacing, steps_offset,
final_level, the sampler's static options (e.g. ddpm's variance), rho, trajectory interval, and whether params /
labels / guidance / clipping / thresholding / x_init / sample_keys are given.
Traced (a change never recompiles): params, the schedule's values, rng, the sampler's traced options (e.g.
ddim's eta), guidance_scale, labels, null_label, clip range, threshold percentile, x_init, sample_keys.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdiff.forward import FLOW_PREDICTIONS, check_prediction
from jdiff.sampling.base import SAMPLERS, Noise, Step, get_sampler, split_options
from jdiff.sampling.denoiser import Guidance, make_denoiser
from jdiff.sampling.timesteps import FINAL_LEVELS, SPACINGS, check_steps_offset, default_spacing, level_fn, make_grid
from jdiff.schedules import Schedule

Array = jax.Array


def _concrete(x) -> Optional[np.ndarray]:
    """x as numpy if it is a concrete value, None while tracing."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # pragma: no cover - abstract values
        return None


def _check_common(schedule, shape, num_steps, spacing, prediction, labels, guidance_scale, null_label):
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a jdiff Schedule (see jdiff.get_schedule), got {type(schedule)}.")
    if not (
        isinstance(shape, (tuple, list))
        and len(shape) >= 1
        and all(isinstance(d, (int, np.integer)) and d >= 1 for d in shape)
    ):
        raise ValueError(f"shape must be a tuple of positive ints (B, ...), got {shape!r}.")
    big_t = schedule.num_timesteps
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= big_t:
        raise ValueError(
            f"num_steps must be an int in [1, T={big_t}] (the schedule's number of diffusion steps), got {num_steps!r}."
        )
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; allowed values: {list(SPACINGS)}.")
    check_prediction(prediction)
    b = shape[0]
    if labels is not None and (jnp.ndim(labels) not in (1, 2) or jnp.shape(labels)[0] != b):
        raise ValueError(
            f"labels must have shape ({b},) (class labels) or ({b}, L) (token ids), the batch size of shape; got "
            f"{jnp.shape(labels)}."
        )
    if guidance_scale is not None:
        if labels is None or null_label is None:
            raise ValueError("guidance_scale needs labels=(B,) ints and null_label=<the model's null class>.")
        if jnp.shape(null_label) != jnp.shape(labels)[1:]:
            raise ValueError(
                f"null_label must have the shape of one example's labels, {jnp.shape(labels)[1:]} (a class, or the "
                f"empty caption's token ids), got {jnp.shape(null_label)}."
            )
        g = _concrete(guidance_scale)
        if g is not None and (g.shape != () or not np.isfinite(g)):
            raise ValueError(f"guidance_scale must be a finite scalar or None, got {guidance_scale!r}.")
    abar = _concrete(schedule.alphas_cumprod)
    zero_snr = abar is not None and abar[-1] == 0.0
    if zero_snr and prediction == "eps":
        raise ValueError(
            'prediction="eps" cannot be used with a zero-terminal-SNR schedule (x0 is undefined at abar=0); '
            'allowed: prediction="v", "x0" or "flow".'
        )
    return zero_snr


def _merge_shorthands(options: Optional[Mapping[str, Any]], **shorthands: Any) -> dict:
    """options plus the keyword shorthands that are not None (eta=, variance=); one given both ways is an error."""
    out = dict(options or {})
    for name, value in shorthands.items():
        if value is not None:
            if name in out:
                raise ValueError(f"{name} is given twice: as {name}= and in options; give it once.")
            out[name] = value
    return out


def _guidance(labels, guidance_scale, null_label) -> Guidance:
    return Guidance(
        labels=None if labels is None else jnp.asarray(labels, jnp.int32),
        null_label=None if guidance_scale is None else jnp.asarray(null_label, jnp.int32),
        scale=None if guidance_scale is None else jnp.asarray(guidance_scale, jnp.float32),
    )


def _check_sample_keys(sample_keys, batch: int) -> None:
    if sample_keys is None:
        return
    dtype = getattr(sample_keys, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or np.shape(sample_keys) != (batch,):
        raise ValueError(
            f"sample_keys must be a ({batch},) array of typed PRNG keys (jax.random.key / jax.random.split; raw "
            f"uint32 keys: jax.random.wrap_key_data), got shape {np.shape(sample_keys)} dtype {dtype}."
        )


def _noise(rng, sample_keys, i) -> Noise:
    """Step i's noise: per example from sample_keys when given, else from the batch's loop key."""
    return Noise(rng, i, False) if sample_keys is None else Noise(sample_keys, i + 1, True)


def _scan_steps(sampler, denoise, grid, carry, rng, sample_keys, opts, start, length, level):
    n = grid.t.shape[0]

    def body(c, i):
        row = jax.tree.map(lambda a: a[i], grid)
        s = Step(index=i, is_first=i == 0, is_last=i == n - 1, row=row, num_steps=n, level=level)
        return sampler.step(denoise, c, s, _noise(rng, sample_keys, i), opts), None

    carry, _ = lax.scan(body, carry, start + lax.iota(jnp.int32, length))
    return carry


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_fn",
        "shape",
        "sampler",
        "num_steps",
        "prediction",
        "spacing",
        "steps_offset",
        "final_level",
        "static_options",
        "rho",
        "trajectory_every",
    ),
)
def _sample_jit(
    model_fn,
    params,
    schedule,
    rng,
    traced_options,
    guidance,
    clip_range,
    threshold,
    x_init,
    sample_keys=None,
    *,
    shape,
    sampler,
    num_steps,
    prediction,
    spacing,
    steps_offset,
    final_level,
    static_options,
    rho,
    trajectory_every,
):
    grid = make_grid(schedule, spacing, num_steps, rho=rho, steps_offset=steps_offset, final_level=final_level)
    level = level_fn(schedule)
    denoise = make_denoiser(
        model_fn,
        params,
        prediction=prediction,
        guidance=guidance,
        clip_range=clip_range,
        threshold_percentile=threshold,
        flow_time_scale=float(schedule.num_timesteps),
    )
    init_key, loop_key = (None, None) if sample_keys is not None else jax.random.split(rng)
    if x_init is None:
        per_example = sample_keys is not None
        x_init = Noise(sample_keys, 0, True)(shape) if per_example else jax.random.normal(init_key, shape, jnp.float32)
    x_init = x_init * start_scale(schedule, grid)
    opts = {**dict(static_options), **traced_options}
    carry = sampler.init(x_init)
    if trajectory_every is None:
        return sampler.output(
            _scan_steps(sampler, denoise, grid, carry, loop_key, sample_keys, opts, 0, num_steps, level)
        )
    # Trajectory: an outer scan over chunks of k steps keeps only N/k snapshots in memory.
    k = trajectory_every
    n_chunks, rest = divmod(num_steps, k)

    def chunk(c, j):
        c = _scan_steps(sampler, denoise, grid, c, loop_key, sample_keys, opts, j * k, k, level)
        return c, sampler.output(c)

    carry, snaps = lax.scan(chunk, carry, lax.iota(jnp.int32, n_chunks))
    if rest:
        carry = _scan_steps(sampler, denoise, grid, carry, loop_key, sample_keys, opts, n_chunks * k, rest, level)
        snaps = jnp.concatenate([snaps, sampler.output(carry)[None]])
    return sampler.output(carry), jnp.concatenate([x_init[None], snaps])


def sample(
    model_fn: Callable[..., Array],
    schedule: Schedule,
    shape: Sequence[int],
    rng: Optional[Array],
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    options: Optional[Mapping[str, Any]] = None,
    eta: Optional[float] = None,
    variance: Optional[str] = None,
    prediction: str = "eps",
    guidance_scale: Optional[float] = None,
    labels: Optional[Array] = None,
    null_label: Optional[int] = None,
    params: Any = None,
    spacing: Optional[str] = None,
    steps_offset: int = 0,
    final_level: str = "clean",
    clip_x0: Optional[tuple[float, float]] = None,
    dynamic_threshold: Optional[float] = None,
    karras_rho: float = 7.0,
    x_init: Optional[Array] = None,
    return_trajectory_every: Optional[int] = None,
    sample_keys: Optional[Array] = None,
):
    """Draws samples by running `sampler` for `num_steps` steps from x_T ~ N(0, I) (one `lax.scan`).

    Args:
      model_fn: model_fn(x (B, ...) float32, t (B,) float32[, y (B,) int32]) -> prediction (B, ...) (or 2x
        channels for learned variance). t are training-timestep indices in [0, T-1], fractional for the
        Karras spacing. With `params`, it is called as model_fn(params, x, t[, y]) (e.g. `model.apply`
        with params={"params": p}) so the parameters are traced arguments, not compile-time constants.
        Must be hashable (it is a static argument; keep the same object to reuse the compilation).
      schedule: the training noise schedule (`jdiff.get_schedule`).
      shape: (B, ...) of the output, e.g. (B, H, W, C).
      rng: PRNG key for x_T and the per-step noise of the whole batch (step i uses fold_in(split(rng)[1], i));
        unused (may be None) with sample_keys.
      sampler: "ddpm", "ddim", "euler", "euler_ancestral", "heun", "edm_sde", "dpmpp_2m", "dpmpp_2m_sde",
        "dpmpp_3m" or "unipc" (see jdiff.sampling.SAMPLERS).
      num_steps: N in [1, T]; model evaluations are `SAMPLERS[sampler].nfe(N)` (N, or 2N - 1 for "heun" and
        "edm_sde").
      options: the sampler's options {name: value} (`jdiff.sampling.check_options`); missing ones take their
        defaults, one the sampler does not declare is an error. "ddim": eta in [0, 1] (DDIM eq. 16, traced);
        "ddpm": variance "posterior" (beta-tilde), "beta" or "learned" (static); "edm_sde": s_churn, s_tmin,
        s_tmax, s_noise (EDM Alg. 2, traced); "unipc": order 1, 2 or 3 (static).
      eta, variance: shorthands for options={"eta": eta} / {"variance": variance}.
      prediction: what the model predicts: "eps", "x0", "v", "flow" (the velocity eps - x0 of a flow-matching
        model, called with x/(alpha + sigma) and t = T s; `jdiff.flow`) or "edm", "edm_vp", "edm_ve".
      guidance_scale: classifier-free guidance scale w (Ho & Salimans 2022), uncond + w (cond - uncond):
        1 is purely conditional. Needs labels and null_label; one model call on a batch of 2B.
      labels: (B,) int class labels passed to the model as y, or a text model's (B, L) token ids.
      null_label: the model's "no class" label for the unconditional half of guidance (for token ids: the
        empty caption's ids, shape (L,)).
      params: optional first argument of model_fn (traced).
      spacing: timestep selection for N < T: "linspace", "leading", "trailing", "karras" (Karras et al.
        2022 eq. 5, fractional t), "flow" (diffusers' FlowMatchEulerDiscreteScheduler grid) or "flow_sigmas"
        (diffusers' use_flow_sigmas grid of DPMSolverMultistep / UniPCMultistep); see
        `jdiff.sampling.timesteps.flow_times`. None (default): "flow" for a flow schedule, else "linspace".
      steps_offset: int >= 0 added to every "leading" timestep (diffusers' `steps_offset`; StableDiffusionPipeline
        sets 1); 0 for the other spacings.
      final_level: where the last step goes: "clean" (abar = 1; the output is x0) or, for "ddim" and "pndm"
        (samplers with final_level_first), "first":
        the schedule's first training level abar = alphas_cumprod[0] (diffusers' DDIMScheduler with
        set_alpha_to_one=False; the output is x at that level, not x0).
      clip_x0: (lo, hi) to clip the predicted x0 to (e.g. (-1, 1) for images), or None.
      dynamic_threshold: Imagen's percentile p in (0, 1) (e.g. 0.995), or None.
      karras_rho: rho of the Karras spacing.
      x_init: optional x_T of `shape` instead of drawing it from rng. Like the drawn x_T it is in the
        schedule's state variable: the VP x, or the flow state x_s for the flow schedule (`start_scale`).
      return_trajectory_every: k >= 1 to also return the (VP) states every k steps.
      sample_keys: optional (B,) typed PRNG keys, one per example (traced): example j's x_T (unless x_init is
        given) is normal(fold_in(sample_keys[j], 0)) and its noise at step i normal(fold_in(sample_keys[j], i + 1)),
        so sample j does not depend on the other examples, the batch size or the device count.

    Returns:
      x_0 of `shape`, float32; with return_trajectory_every=k, (x_0, trajectory) where trajectory has shape
      (1 + ceil(N/k), *shape): x_T, then the state after every k steps, ending with x_0.
    """
    smp = get_sampler(sampler)
    shape = tuple(int(d) for d in shape) if isinstance(shape, (tuple, list)) else shape
    spacing = default_spacing(schedule) if spacing is None and isinstance(schedule, Schedule) else spacing
    zero_snr = _check_common(schedule, shape, num_steps, spacing, prediction, labels, guidance_scale, null_label)
    static_options, traced_options = split_options(smp.name, _merge_shorthands(options, eta=eta, variance=variance))
    static_options = tuple(static_options.items())  # a static (hashable) jit argument
    if prediction in FLOW_PREDICTIONS and dict(static_options).get("variance") == "learned":
        raise ValueError(
            f'variance="learned" (ddpm) reads a learned variance (Nichol & Dhariwal 2021) that a prediction '
            f"{prediction!r} model does not output; use variance posterior or beta, or another sampler."
        )
    if zero_snr and spacing != "flow_sigmas" and (spacing == "karras" or not smp.zero_terminal_snr):
        able = [name for name, s in sorted(SAMPLERS.items()) if s.zero_terminal_snr]
        raise ValueError(
            f"sampler {smp.name!r} with spacing {spacing!r} needs a finite terminal SNR; with a zero-terminal-SNR "
            f"schedule use a sampler of {able} with spacing 'linspace', 'leading', 'trailing' or 'flow' (or any "
            "sampler with spacing 'flow_sigmas', which stops short of the terminal level)."
        )
    check_steps_offset(spacing, num_steps, schedule.num_timesteps, steps_offset)
    if final_level not in FINAL_LEVELS:
        raise ValueError(f"Unknown final_level {final_level!r}; allowed values: {list(FINAL_LEVELS)}.")
    if final_level != "clean" and not smp.final_level_first:
        first = sorted(n for n, v in SAMPLERS.items() if v.final_level_first)
        raise ValueError(
            f"final_level {final_level!r} applies to samplers {first} only (diffusers' set_alpha_to_one=False); "
            f"sampler {smp.name!r} ends at final_level 'clean'."
        )
    if clip_x0 is not None:
        if len(clip_x0) != 2 or not clip_x0[0] < clip_x0[1]:
            raise ValueError(f"clip_x0 must be (lo, hi) with lo < hi, or None; got {clip_x0!r}.")
        clip_x0 = jnp.asarray(clip_x0, jnp.float32)
    if dynamic_threshold is not None:
        p = _concrete(dynamic_threshold)
        if p is not None and not 0.0 < float(p) <= 1.0:
            raise ValueError(f"dynamic_threshold must be a percentile in (0, 1], got {dynamic_threshold!r}.")
        dynamic_threshold = jnp.asarray(dynamic_threshold, jnp.float32)
    if x_init is not None and jnp.shape(x_init) != shape:
        raise ValueError(f"x_init must have shape {shape}, got {jnp.shape(x_init)}.")
    if return_trajectory_every is not None and (
        not isinstance(return_trajectory_every, (int, np.integer)) or return_trajectory_every < 1
    ):
        raise ValueError(f"return_trajectory_every must be an int >= 1 or None, got {return_trajectory_every!r}.")
    _check_sample_keys(sample_keys, shape[0])
    if rng is None and sample_keys is None:
        raise ValueError("rng must be a PRNG key (it may be None only when sample_keys are given).")
    try:
        hash(model_fn)
    except TypeError:
        raise ValueError("model_fn must be hashable (a function or bound method); pass weights via params=.") from None
    guidance = _guidance(labels, guidance_scale, null_label)
    x_init = None if x_init is None else jnp.asarray(x_init, jnp.float32)
    rng = None if sample_keys is not None else rng
    traced = (params, schedule, rng, traced_options, guidance, clip_x0, dynamic_threshold, x_init, sample_keys)
    static = dict(shape=shape, sampler=smp, num_steps=int(num_steps), prediction=prediction, spacing=spacing)
    static.update(steps_offset=int(steps_offset), final_level=final_level)
    static.update(static_options=static_options, rho=float(karras_rho), trajectory_every=return_trajectory_every)
    return _sample_jit(model_fn, *traced, **static)


@functools.partial(jax.jit, static_argnames=("model_fn", "num_steps", "prediction", "spacing"))
def _invert_jit(model_fn, params, schedule, x0, guidance, *, num_steps, prediction, spacing):
    grid = make_grid(schedule, spacing, num_steps)
    denoise = make_denoiser(
        model_fn, params, prediction=prediction, guidance=guidance, flow_time_scale=float(schedule.num_timesteps)
    )

    def body(x, i):
        # From level i+1 (alpha_next; the clean level for i = N-1) up to level i, with the model evaluated
        # at level i's timestep on the current x.
        d = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        x0 = (x - grid.sigma_next[i] * d.eps) / grid.alpha_next[i]
        return grid.alpha[i] * x0 + grid.sigma[i] * d.eps, None

    x, _ = lax.scan(body, x0, num_steps - 1 - lax.iota(jnp.int32, num_steps))
    return x / start_scale(schedule, grid)


def start_scale(schedule: Schedule, grid) -> Array:
    """The VP state of x_T is start_scale * x_T: x_T ~ N(0, I) is drawn (or given as x_init) in the schedule's
    own state variable. That is the VP x (scale 1) for a VP schedule and the flow state x_s = x/(alpha + sigma)
    at the grid's first level for the flow schedule (scale alpha_0 + sigma_0), as diffusers' flow-matching
    pipelines start from x_s = eps; the two differ where the grid starts below s = 1 (e.g. "flow_sigmas")."""
    if schedule.flow_shift is None:
        return jnp.float32(1.0)
    return grid.alpha[0] + grid.sigma[0]


def ddim_invert(
    model_fn: Callable[..., Array],
    schedule: Schedule,
    x0: Array,
    *,
    num_steps: int = 50,
    prediction: str = "eps",
    spacing: Optional[str] = None,
    params: Any = None,
    labels: Optional[Array] = None,
    guidance_scale: Optional[float] = None,
    null_label: Optional[int] = None,
) -> Array:
    """DDIM inversion (Song et al. 2021, sec. 4.3; eta = 0 run backwards): encodes x0 (B, ...) into the x_T
    from which `sample(..., sampler="ddim", eta=0, x_init=x_T)` with the same grid returns ~x0.

    Uses the grid of `sample`; the model at level i is evaluated on the state of level i+1 (the usual
    approximation, exact as N -> T). Arguments as in `sample`. Returns x_T, float32 (B, ...), in the variable
    of `sample`'s x_init (`start_scale`).
    """
    x0 = jnp.asarray(x0, jnp.float32)
    spacing = default_spacing(schedule) if spacing is None and isinstance(schedule, Schedule) else spacing
    _check_common(schedule, tuple(x0.shape), num_steps, spacing, prediction, labels, guidance_scale, null_label)
    guidance = _guidance(labels, guidance_scale, null_label)
    return _invert_jit(
        model_fn, params, schedule, x0, guidance, num_steps=int(num_steps), prediction=prediction, spacing=spacing
    )
