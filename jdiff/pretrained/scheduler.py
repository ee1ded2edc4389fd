"""diffusers scheduler configs (``scheduler/scheduler_config.json`` of DDPMScheduler, DDIMScheduler, ...) <->
jdiff's training noise schedule and prediction type.

Only the training schedule is read (beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas,
rescale_betas_zero_snr, prediction_type, variance_type); how to sample (steps, spacing, clipping, solver
order, Karras sigmas, ...) is chosen at sampling time by jdiff's sampler options, so those keys are accepted
and not read. ``_class_name`` must be one of `SCHEDULERS` (the discrete-time beta schedulers, which share one
training schedule; each with its own defaults) and every key must be one of that class's; anything else (EDM
and flow-matching schedulers, a continuous timestep_type, flow sigmas, trained_betas whose length is not
num_train_timesteps) is one `PretrainedError` line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jdiff.pretrained.files import PretrainedError
from jdiff.schedules import Schedule, get_schedule

BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "squaredcos_cap_v2": "cosine",
    "sigmoid": "sigmoid",
}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
LEARNED = ("learned", "learned_range")  # DDPMScheduler variance types of a learned-variance model
DEFAULT = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
MAX_TIMESTEPS = 100_000  # num_train_timesteps bound (published models use 1000)
_BASE = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
_SPACING = ("timestep_spacing", "steps_offset")
_THRESHOLD = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_FLOW = ("use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type")  # flow sigmas must be off
_MULTISTEP = ("solver_order", *_THRESHOLD, "solver_type", "lower_order_final", *_SIGMAS, *_FLOW)
_LOW_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}  # defaults of the k-diffusion ports
# diffusers scheduler class -> (its config keys (diffusers 0.3x __init__), its defaults where not DEFAULT's)
SCHEDULERS: dict[str, tuple[tuple[str, ...], dict]] = {
    "DDPMScheduler": (
        (*_BASE, "variance_type", "clip_sample", *_THRESHOLD, "clip_sample_range", *_SPACING, "rescale_betas_zero_snr"),
        {},
    ),
    "DDIMScheduler": (
        (
            *_BASE,
            "clip_sample",
            "set_alpha_to_one",
            *_THRESHOLD,
            "clip_sample_range",
            *_SPACING,
            "rescale_betas_zero_snr",
        ),
        {},
    ),
    "PNDMScheduler": ((*_BASE, "skip_prk_steps", "set_alpha_to_one", *_SPACING), {}),
    "EulerDiscreteScheduler": (
        (*_BASE, "interpolation_type", *_SIGMAS, "sigma_min", "sigma_max", *_SPACING, "timestep_type")
        + ("rescale_betas_zero_snr", "final_sigmas_type"),
        {},
    ),
    "EulerAncestralDiscreteScheduler": ((*_BASE, *_SPACING, "rescale_betas_zero_snr"), {}),
    "DPMSolverMultistepScheduler": (
        (*_BASE, *_MULTISTEP, "algorithm_type", "euler_at_final", "use_lu_lambdas", "final_sigmas_type")
        + ("lambda_min_clipped", "variance_type", *_SPACING, "rescale_betas_zero_snr"),
        {},
    ),
    "DPMSolverSinglestepScheduler": (
        (*_BASE, *_MULTISTEP, "algorithm_type", "final_sigmas_type", "lambda_min_clipped", "variance_type"),
        {},
    ),
    "LMSDiscreteScheduler": ((*_BASE, *_SIGMAS, *_SPACING), {}),
    "HeunDiscreteScheduler": ((*_BASE, *_SIGMAS, "clip_sample", "clip_sample_range", *_SPACING), _LOW_BETAS),
    "UniPCMultistepScheduler": (
        (*_BASE, *_MULTISTEP, "predict_x0", "disable_corrector", "solver_p", *_SPACING, "final_sigmas_type")
        + ("rescale_betas_zero_snr", "sigma_min", "sigma_max", "shift_terminal"),
        {},
    ),
    "KDPM2DiscreteScheduler": ((*_BASE, *_SIGMAS, *_SPACING), _LOW_BETAS),
    "KDPM2AncestralDiscreteScheduler": ((*_BASE, *_SIGMAS, *_SPACING), _LOW_BETAS),
    "DEISMultistepScheduler": ((*_BASE, *_MULTISTEP, "algorithm_type", *_SPACING), {}),
    "DPMSolverSDEScheduler": ((*_BASE, *_SIGMAS, "noise_sampler_seed", *_SPACING), _LOW_BETAS),
}


def check_scheduler_config(config: dict) -> str:
    """The scheduler class of a diffusers scheduler config (DDPMScheduler when ``_class_name`` is absent);
    PretrainedError (one line naming ``_class_name`` or the key) for a class jdiff does not map, a key that
    class does not have, flow sigmas, a continuous timestep_type, or a num_train_timesteps / trained_betas that
    is not a sane int / matching list."""
    cls = config.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULERS:
        if isinstance(cls, str) and cls.startswith("FlowMatch"):
            raise PretrainedError(
                f"scheduler _class_name {cls!r}: flow-matching schedulers are not supported yet (jdiff reads the "
                "discrete beta schedulers)"
            )
        raise PretrainedError(
            f"scheduler _class_name {cls!r} is not supported; supported: {', '.join(sorted(SCHEDULERS))}"
        )
    keys, _ = SCHEDULERS[cls]
    unknown = sorted(k for k in config if not k.startswith("_") and k not in keys)
    if unknown:
        raise PretrainedError(f"scheduler config key(s) {unknown} are not {cls} settings; its keys: {', '.join(keys)}")
    if config.get("use_flow_sigmas"):
        raise PretrainedError(f"scheduler use_flow_sigmas=true ({cls}): flow-matching schedules are not supported yet")
    if config.get("timestep_type", "discrete") != "discrete":
        raise PretrainedError(
            f"scheduler timestep_type={config['timestep_type']!r} is not supported; supported: 'discrete' (the model "
            "takes the integer timestep)"
        )
    t = config.get("num_train_timesteps", DEFAULT["num_train_timesteps"])
    if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= MAX_TIMESTEPS:
        raise PretrainedError(
            f"scheduler num_train_timesteps={t!r} is not supported; supported: an int in [1, {MAX_TIMESTEPS}]"
        )
    for key in ("beta_start", "beta_end"):
        v = config.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1):
            raise PretrainedError(f"scheduler {key}={v!r} is not supported; supported: a number in (0, 1)")
    betas = config.get("trained_betas")
    if betas is not None and (not isinstance(betas, list) or len(betas) != t):
        got = f"{len(betas)} values" if isinstance(betas, list) else repr(type(betas).__name__)
        raise PretrainedError(f"scheduler trained_betas must be a list of num_train_timesteps={t} values, got {got}")
    return cls


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# FlowMatchEulerDiscreteScheduler keys and the values jdiff's flow schedule reproduces (None: any valid value).
FLOW_KEYS = {
    "num_train_timesteps": None,
    "shift": None,
    "use_dynamic_shifting": None,
    "base_shift": None,
    "max_shift": None,
    "base_image_seq_len": None,
    "max_image_seq_len": None,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


def flow_schedule_from_config(config: dict, *, image_seq_len: int | None = None) -> tuple[Schedule, str]:
    """(the "flow" schedule, prediction "flow") of a FlowMatchEulerDiscreteScheduler config (SD3, Flux, ...):
    shift (SD3) or, with use_dynamic_shifting (Flux), the shift exp(mu) of `jdiff.flow.flux_shift` for
    `image_seq_len` tokens with the config's base/max shift and sequence lengths. PretrainedError (one line) for
    a key jdiff does not reproduce. (diffusers' dynamic grid ends at the unshifted 1/T, jdiff's "flow" spacing at
    the schedule's smallest level shift(1/T): the last level before 0 differs; the static-shift grid is equal.)"""
    from jdiff import flow

    unknown = sorted(k for k in config if not k.startswith("_") and k not in FLOW_KEYS)
    if unknown:
        raise PretrainedError(f"scheduler config key(s) {unknown} are not {FLOW_SCHEDULER} settings")
    for key, want in FLOW_KEYS.items():
        if want is not None and config.get(key) not in (None, want):
            raise PretrainedError(f"scheduler {key}={config[key]!r} is not supported; supported: {want!r}")
    if config.get("shift_terminal"):
        raise PretrainedError(
            f"scheduler shift_terminal={config['shift_terminal']!r} is not supported; supported: null"
        )
    t = config.get("num_train_timesteps", 1000)
    try:
        if config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise PretrainedError(
                    "scheduler use_dynamic_shifting=true needs image_seq_len (the transformer's token count)"
                )
            shift = flow.flux_shift(
                image_seq_len,
                base_seq_len=config.get("base_image_seq_len", flow.BASE_SEQ_LEN),
                max_seq_len=config.get("max_image_seq_len", flow.MAX_SEQ_LEN),
                base_shift=config.get("base_shift", flow.BASE_SHIFT),
                max_shift=config.get("max_shift", flow.MAX_SHIFT),
            )
        else:
            shift = config.get("shift", 1.0)
        return get_schedule("flow", t, shift=shift), "flow"
    except (ValueError, TypeError) as e:
        if isinstance(e, PretrainedError):
            raise
        raise PretrainedError(f"scheduler config: {' '.join(str(e).split())}") from None


def schedule_from_config(config: dict) -> tuple[Schedule, str]:
    """(jdiff Schedule, prediction "eps"/"v"/"x0", or "flow" for a FlowMatchEulerDiscreteScheduler config,
    `flow_schedule_from_config`) of a diffusers scheduler config; PretrainedError (one line naming the key and the
    supported values) for a schedule jdiff does not have (`check_scheduler_config`)."""
    if config.get("_class_name") == FLOW_SCHEDULER:
        return flow_schedule_from_config(config)
    cls = check_scheduler_config(config)
    c = {**DEFAULT, **SCHEDULERS[cls][1], **{k: v for k, v in config.items() if v is not None}}
    pred = c.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise PretrainedError(f"scheduler prediction_type={pred!r} is not supported; supported: {list(PREDICTIONS)}")
    zero_snr = bool(c.get("rescale_betas_zero_snr", False))
    try:
        if config.get("trained_betas") is not None:
            return get_schedule(
                "custom", betas=np.asarray(config["trained_betas"], np.float64), zero_terminal_snr=zero_snr
            ), PREDICTIONS[pred]
        name = c["beta_schedule"]
        if name not in BETA_SCHEDULES:
            raise PretrainedError(
                f"scheduler beta_schedule={name!r} is not supported; supported: {list(BETA_SCHEDULES)} or trained_betas"
            )
        t = c["num_train_timesteps"]
        kwargs = {} if name == "squaredcos_cap_v2" else {"beta_start": c["beta_start"], "beta_end": c["beta_end"]}
        return get_schedule(BETA_SCHEDULES[name], t, zero_terminal_snr=zero_snr, **kwargs), PREDICTIONS[pred]
    except (ValueError, TypeError) as e:
        if isinstance(e, PretrainedError):
            raise
        raise PretrainedError(f"scheduler config: {' '.join(str(e).split())}") from None


def config_from_schedule(schedule: Schedule | dict, prediction: str, *, learned_variance: bool) -> dict:
    """A DDPMScheduler config for a jdiff schedule: a `Schedule` is written as its ``trained_betas`` (exact);
    a dict of diffusers keys (e.g. from `named_schedule`) is written as given, after checking that jdiff reads
    it back. Prediction "flow" (the flow schedule, `jdiff.flow`) is written as a FlowMatchEulerDiscreteScheduler
    config with the schedule's shift."""
    if prediction == "flow":
        if not isinstance(schedule, Schedule) or schedule.flow_shift is None or learned_variance:
            raise PretrainedError(
                "prediction 'flow' is exported with the flow schedule (get_schedule('flow', T, shift=...)) and "
                "no learned variance"
            )
        t = int(schedule.num_timesteps)
        return {"_class_name": FLOW_SCHEDULER, "num_train_timesteps": t, "shift": float(schedule.flow_shift)}
    inverse = {v: k for k, v in PREDICTIONS.items()}
    if prediction not in inverse:
        raise PretrainedError(f"prediction {prediction!r} is not supported; supported: {list(inverse)}")
    out: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "prediction_type": inverse[prediction],
        "variance_type": "learned_range" if learned_variance else "fixed_small",
        "clip_sample": True,
        "timestep_spacing": "leading",
    }
    if isinstance(schedule, Schedule):
        betas = np.asarray(schedule.betas, np.float64)
        out.update(num_train_timesteps=int(betas.shape[0]), trained_betas=[float(b) for b in betas])
    else:
        out.update(schedule)
        schedule_from_config(out)
    return out


def named_schedule(name: str, num_timesteps: int, *, zero_terminal_snr: bool = False, **kwargs: float) -> dict:
    """diffusers scheduler keys for jdiff's ``get_schedule(name, num_timesteps, zero_terminal_snr, **kwargs)``;
    PretrainedError for one diffusers names differently or not at all (then export the betas instead)."""
    inverse = {v: k for k, v in BETA_SCHEDULES.items()}
    allowed = {
        "linear": {"beta_start", "beta_end"},
        "scaled_linear": {"beta_start", "beta_end"},
        "cosine": set(),
        "sigmoid": {"beta_start", "beta_end"},
    }
    if name not in inverse or set(kwargs) - allowed[name]:
        raise PretrainedError(f"schedule {name!r} with {sorted(kwargs)} has no diffusers beta_schedule name")
    out: dict[str, Any] = {
        "beta_schedule": inverse[name],
        "num_train_timesteps": int(num_timesteps),
        "rescale_betas_zero_snr": bool(zero_terminal_snr),
    }
    if name != "cosine":
        defaults = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "sigmoid": (1e-4, 0.02)}[name]
        out["beta_start"] = float(kwargs.get("beta_start", defaults[0]))
        out["beta_end"] = float(kwargs.get("beta_end", defaults[1]))
    return out
