"""diffusers scheduler configs (``scheduler/scheduler_config.json`` of DDPMScheduler, DDIMScheduler, ...) <->
jdiff's training noise schedule and prediction type.

Only the training schedule is read (beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas,
rescale_betas_zero_snr, prediction_type, variance_type); how to sample (steps, spacing, clipping) is chosen
at sampling time by jdiff's sampler options.
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


def schedule_from_config(config: dict) -> tuple[Schedule, str]:
    """(jdiff Schedule, prediction "eps"/"v"/"x0") of a diffusers scheduler config; PretrainedError (one line
    naming the key and the supported values) for a schedule jdiff does not have."""
    c = {**DEFAULT, **{k: v for k, v in config.items() if v is not None}}
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
    it back."""
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
