"""`TrainConfig`: every training setting with a default, named presets, validation and JSON I/O.

A config is an immutable dataclass; `replace_fields(config, {"lr": "1e-4", "model.ch": "64"})` applies
string overrides (from the command line) with type checking, `validate(config)` checks values, and
`to_json` / `from_json` round-trip it. Errors are `ConfigError` (a `ValueError`) with a one-line message.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Mapping, Optional

from jdiff.forward import PREDICTIONS
from jdiff.losses import WEIGHTINGS
from jdiff.sampling import SAMPLERS as SAMPLER_REGISTRY
from jdiff.schedules import BETA_SCHEDULES

PRESETS_DOC = "digits (default), mnist, cifar10, dit"

LR_DECAYS = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
OBJECTIVES = PREDICTIONS
SCHEDULES = tuple(BETA_SCHEDULES)
SAMPLERS = tuple(SAMPLER_REGISTRY)

# Fields that fix the parameters' shapes or the meaning of the model output: a resumed run must keep them.
IMMUTABLE_ON_RESUME = (
    "dataset", "image_size", "channels", "class_conditional", "model", "model_overrides",
    "schedule", "num_timesteps", "zero_terminal_snr", "objective",
)


class ConfigError(ValueError):
    """A bad field name or value; the message is one readable line."""


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All settings of a training run (defaults = the `digits` preset)."""

    # Data.
    dataset: str = _f("digits", 'dataset: "digits", a tfds name (e.g. mnist, cifar10) or an image folder path')
    data_dir: Optional[str] = _f(None, "tfds data directory (None: tfds default)")
    split: str = _f("train", "dataset split")
    image_size: Optional[int] = _f(None, "resize images to this side (None: native size)")
    channels: Optional[int] = _f(None, "1 or 3 (None: native)")
    random_flip: bool = _f(False, "random horizontal flips")
    class_conditional: bool = _f(True, "condition on labels when the dataset has them")
    label_dropout: float = _f(0.1, "probability of replacing a label by the null label (classifier-free guidance)")
    # Model.
    model: str = _f("unet_small", "registered model name (jdiff.models.list_models())")
    model_overrides: dict = _f({}, "model field overrides, set one with --model.FIELD VALUE")
    dtype: str = _f("float32", "compute dtype: float32 or bfloat16 (params stay float32)")
    # Diffusion.
    schedule: str = _f("linear", "beta schedule: linear, scaled_linear, cosine, sigmoid")
    num_timesteps: int = _f(1000, "T, number of diffusion steps")
    zero_terminal_snr: bool = _f(False, "rescale the schedule to zero terminal SNR (use with objective v)")
    objective: str = _f("eps", "what the model predicts: eps, x0 or v")
    weighting: str = _f("simple", "loss weighting: simple or min_snr")
    min_snr_gamma: float = _f(5.0, "gamma of min-SNR weighting")
    # Optimisation.
    batch_size: int = _f(128, "global batch size (all devices, all hosts)")
    steps: int = _f(2000, "total number of training steps")
    lr: float = _f(2e-3, "peak learning rate")
    warmup_steps: int = _f(100, "linear learning-rate warm-up steps (lr(0) = 0)")
    lr_decay: str = _f("cosine", "after warm-up: constant or cosine (to lr * end_lr_factor at the last step)")
    end_lr_factor: float = _f(0.05, "final lr / peak lr for cosine decay")
    adam_b1: float = _f(0.9, "Adam beta1")
    adam_b2: float = _f(0.99, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (matrices and kernels only)")
    grad_clip: float = _f(1.0, "clip gradients to this global norm (0: off)")
    ema_decay: float = _f(0.999, "EMA decay of the parameters (0: EMA = params)")
    ema_warmup: bool = _f(True, "EMA decay warm-up: min(ema_decay, (1 + step) / (10 + step))")
    seed: int = _f(0, "seed of initialisation, data order, noise and samples")
    # Bookkeeping.
    workdir: str = _f("runs/digits", "output directory (checkpoints, config.json, metrics.jsonl, samples/)")
    checkpoint_every: int = _f(1000, "save a checkpoint every N steps (and at the end; 0: only at the end)")
    keep_checkpoints: int = _f(3, "keep the last K checkpoints")
    async_checkpoint: bool = _f(True, "save checkpoints in the background")
    log_every: int = _f(100, "fetch and log metrics every N steps")
    sample_every: int = _f(0, "write a sample grid every M steps (0: only at the end)")
    num_samples: int = _f(100, "images in a sample grid (0: no sample grids)")
    sample_columns: int = _f(10, "columns of the sample grid")
    sampler: str = _f("ddim", "sampler of the grid: ddpm, ddim, dpmpp_2m, euler, heun")
    sample_steps: int = _f(100, "sampling steps of the grid")
    guidance_scale: Optional[float] = _f(None, "classifier-free guidance scale for the grid (None: plain conditional)")
    sample_upscale: int = _f(4, "nearest-neighbour upscaling of the grid PNG")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _presets() -> dict[str, dict[str, Any]]:
    return {
        # Default: CPU-sized, 8x8 digits, class-conditional; 2000 steps x 128 images: ~7 minutes on 2 cores.
        "digits": {},
        "mnist": dict(
            dataset="mnist", model="unet_mnist", batch_size=128, steps=50_000, lr=2e-4, warmup_steps=1000,
            lr_decay="constant", adam_b2=0.999, ema_decay=0.9995, label_dropout=0.1,
            workdir="runs/mnist", checkpoint_every=5000, log_every=100, sample_every=5000,
            sample_steps=100, guidance_scale=2.0, sample_upscale=2,
        ),
        # DDPM CIFAR-10 (Ho et al. 2020, App. B): 35.7M U-Net, linear betas, T=1000, eps, Adam 2e-4,
        # batch 128, warm-up 5000, clip 1.0, dropout 0.1, random flips, EMA 0.9999, 800k steps.
        "cifar10": dict(
            dataset="cifar10", model="unet_ddpm_cifar10", class_conditional=False, label_dropout=0.0,
            random_flip=True, batch_size=128, steps=800_000, lr=2e-4, warmup_steps=5000,
            lr_decay="constant", adam_b2=0.999, grad_clip=1.0, ema_decay=0.9999, ema_warmup=False,
            workdir="runs/cifar10", checkpoint_every=10_000, log_every=100, sample_every=50_000,
            num_samples=64, sample_columns=8, sample_steps=100, sample_upscale=2,
        ),
        # DiT-S/2 (Peebles & Xie 2023) in pixel space on CIFAR-10, class-conditional with CFG dropout,
        # AdamW 1e-4 without weight decay, EMA 0.9999, batch 256.
        "dit": dict(
            dataset="cifar10", model="dit_s2", model_overrides={"learn_sigma": False},
            class_conditional=True, label_dropout=0.1, random_flip=True, batch_size=256, steps=400_000,
            lr=1e-4, warmup_steps=0, lr_decay="constant", adam_b2=0.999, grad_clip=1.0,
            ema_decay=0.9999, workdir="runs/dit", checkpoint_every=10_000, log_every=100,
            sample_every=50_000, num_samples=100, sample_steps=100, guidance_scale=1.5, sample_upscale=2,
        ),
    }


PRESETS = _presets()


def get_preset(name: str) -> TrainConfig:
    """The named preset (see PRESETS_DOC)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return dataclasses.replace(TrainConfig(), **PRESETS[name])


# ---------------------------------------------------------------------------------------------------
# Parsing of string values.


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation like Optional[int]."""
    if isinstance(tp, str):
        tp = eval(tp, {"Optional": Optional, "dict": dict})  # annotations are strings (future import)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def parse_value(name: str, text: Any) -> Any:
    """Converts `text` (a string, or an already typed value) to the type of field `name`."""
    tp, optional = _base_type(FIELDS[name].type)
    if not isinstance(text, str):
        value = text
    elif optional and text.strip().lower() in ("none", "null"):
        return None
    else:
        try:
            if tp is bool:
                value = _parse_bool(text)
            elif tp is int:
                value = int(float(text)) if float(text).is_integer() else int(text)
            elif tp is float:
                value = float(text)
            elif tp is dict:
                value = json.loads(text)
            else:
                value = text
        except ValueError:
            raise ConfigError(f"bad value {text!r} for {name}: expected {tp.__name__}") from None
    if value is None and optional:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"bad value {value!r} for {name}: expected {tp.__name__}")
    return value


def parse_model_value(text: Any) -> Any:
    """A model override value: a Python/JSON literal (64, 0.1, (1, 2), true, null) or a bare string."""
    if not isinstance(text, str):
        return _tupleize(text)
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return _tupleize(ast.literal_eval(t))
    except (ValueError, SyntaxError):
        return t


def _tupleize(v: Any) -> Any:
    """Lists -> tuples (module fields must be hashable), recursively."""
    if isinstance(v, (list, tuple)):
        return tuple(_tupleize(x) for x in v)
    return v


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(FIELDS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config field {name!r}{hint}; see --help for the list")


def replace_fields(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Applies overrides {field: value}; "model.X" keys set model_overrides["X"]. Values may be strings."""
    changes: dict[str, Any] = {}
    model_over = dict(config.model_overrides)
    for key, text in overrides.items():
        if key.startswith("model."):
            field = key[len("model."):]
            if not field.isidentifier():
                raise ConfigError(f"bad model override name {key!r}; use model.FIELD")
            model_over[field] = parse_model_value(text)
        elif key in FIELDS:
            changes[key] = parse_value(key, text)
            if key == "model_overrides":
                model_over = {k: _tupleize(v) for k, v in changes.pop(key).items()}
        else:
            raise _unknown(key)
    return dataclasses.replace(config, **changes, model_overrides=model_over)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"bad value {value!r} for {name}; allowed: {', '.join(allowed)}")


def validate(config: TrainConfig) -> TrainConfig:
    """Checks value ranges and choices; returns the config. Raises ConfigError."""
    c = config
    _choice("lr_decay", c.lr_decay, LR_DECAYS)
    _choice("dtype", c.dtype, DTYPES)
    _choice("objective", c.objective, OBJECTIVES)
    _choice("weighting", c.weighting, WEIGHTINGS)
    _choice("schedule", c.schedule, SCHEDULES)
    _choice("sampler", c.sampler, SAMPLERS)
    positive = ("batch_size", "num_timesteps", "log_every", "keep_checkpoints",
                "sample_columns", "sample_steps", "sample_upscale")
    for name in positive:
        if getattr(c, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(c, name)}")
    for name in ("steps", "warmup_steps", "num_samples", "checkpoint_every", "sample_every", "seed", "weight_decay",
                 "grad_clip", "adam_eps"):
        if getattr(c, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(c, name)}")
    if not c.lr > 0:
        raise ConfigError(f"lr must be > 0, got {c.lr}")
    for name in ("label_dropout", "ema_decay", "adam_b1", "adam_b2", "end_lr_factor"):
        v = getattr(c, name)
        if not 0.0 <= v <= 1.0 or (name != "end_lr_factor" and name != "label_dropout" and v >= 1.0):
            raise ConfigError(f"{name} must be in [0, 1), got {v}")
    if c.channels is not None and c.channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {c.channels}")
    if c.image_size is not None and c.image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {c.image_size}")
    if c.sample_steps > c.num_timesteps:
        raise ConfigError(f"sample_steps ({c.sample_steps}) must be <= num_timesteps ({c.num_timesteps})")
    if c.zero_terminal_snr and c.objective == "eps":
        raise ConfigError("zero_terminal_snr needs objective v or x0 (eps cannot be sampled at SNR 0)")
    if not c.workdir:
        raise ConfigError("workdir must not be empty")
    return c


# ---------------------------------------------------------------------------------------------------
# JSON.


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain JSON-able dict of the fields (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Inverse of `to_dict`; unknown keys are a ConfigError."""
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown} in saved config")
    values = {k: parse_value(k, v) for k, v in d.items() if k != "model_overrides"}
    over = {k: _tupleize(v) for k, v in dict(d.get("model_overrides", {})).items()}
    return validate(dataclasses.replace(TrainConfig(), **values, model_overrides=over))


def immutable_conflicts(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Names of IMMUTABLE_ON_RESUME fields that differ, formatted 'name: saved -> new'."""
    a, b = to_dict(saved), to_dict(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in IMMUTABLE_ON_RESUME if a[k] != b[k]]


def field_help() -> list[tuple[str, str, str]]:
    """(name, type name, help) of every field, in declaration order."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        tp, optional = _base_type(f.type)
        out.append((f.name, tp.__name__ + ("|None" if optional else ""), f.metadata["help"]))
    return out
