"""`TrainConfig`: every setting of a training run, in six sections (run, data, model, diffusion, optim,
sampling). Each field declares its type, default, help and allowed values in one place (`setting`); a config
checks itself when it is built, so an invalid one cannot exist. Errors are `ConfigError` (a ValueError) with
a one-line message.

Two sections have fields that come from a registry rather than from this file: `model.fields` (the module
fields of the chosen model, `jdiff.models.model_config`) and `sampling.options` (the chosen sampler's
declared options, `jdiff.sampling`).
"""

import dataclasses
from typing import Any, Mapping, Optional

from jdiff.forward import PREDICTIONS
from jdiff.losses import WEIGHTINGS
from jdiff.schedules import BETA_SCHEDULES
from jdiff.spec import Spec, spec_of_annotation


class ConfigError(ValueError):
    """A bad config key or value; the message is one readable line."""


def setting(default: Any, help: str, *, alias: Optional[str] = None, fixed: bool = False, **spec: Any) -> Any:
    """A config field: default, help, allowed values (`jdiff.spec.Spec` keywords: choices, ge, gt, le, lt).

    alias: the flat pre-0.2 name when it differs from the field name (e.g. sample_steps for sampling.steps).
    fixed: the field fixes the parameters' shapes or the meaning of the model output, so a resumed run
    cannot change it.
    """
    meta = {"help": help, "alias": alias, "fixed": fixed, "spec": spec}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_spec(f: dataclasses.Field) -> Spec:
    """The `Spec` of a dataclass field declared with `setting`."""
    kind, optional = spec_of_annotation(f.type)
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return Spec(kind, default, f.metadata["help"], optional=optional, **f.metadata["spec"])


class _Section:
    """Checks every declared field with its Spec when the section is built."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.type in (dict, Mapping[str, Any]):
                continue
            try:
                value = field_spec(f).check(f"{self.section}.{f.name}", getattr(self, f.name))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            object.__setattr__(self, f.name, value)


@dataclasses.dataclass(frozen=True)
class RunConfig(_Section):
    section = "run"
    workdir: str = setting("runs/digits", "output directory (checkpoints, config.json, metrics.jsonl, samples/)")
    seed: int = setting(0, "seed of initialisation, data order, noise and samples", ge=0, le=2**32 - 1)
    checkpoint_every: int = setting(1000, "save a checkpoint every N steps (and at the end; 0: only at the end)", ge=0)
    keep_checkpoints: int = setting(3, "keep the last K checkpoints", ge=1)
    async_checkpoint: bool = setting(True, "save checkpoints in the background")
    log_every: int = setting(100, "fetch and log metrics every N steps", ge=1)

    def __post_init__(self):
        super().__post_init__()
        if not self.workdir:
            raise ConfigError("run.workdir must not be empty")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    section = "data"
    dataset: str = setting(
        "digits", 'dataset: "digits", a tfds name (e.g. mnist, cifar10) or an image folder path', fixed=True
    )
    data_dir: Optional[str] = setting(None, "tfds data directory (none: tfds default)")
    split: str = setting("train", "dataset split")
    image_size: Optional[int] = setting(None, "resize images to this side (none: native size)", fixed=True, ge=1)
    channels: Optional[int] = setting(None, "1 or 3 (none: native)", fixed=True, choices=(1, 3))
    on_bad_image: str = setting(
        "skip", "image folders: unreadable files are skipped with one warning, or refused", choices=("skip", "error")
    )
    random_flip: bool = setting(False, "random horizontal flips")
    class_conditional: bool = setting(True, "condition on labels when the dataset has them", fixed=True)
    label_dropout: float = setting(
        0.1, "probability of replacing a label by the null label (classifier-free guidance)", ge=0.0, le=1.0
    )


def _model_names() -> tuple:
    from jdiff.models import list_models

    return tuple(list_models())


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    section = "model"
    name: str = setting(
        "unet_small", "registered model (jdiff.models.list_models())", alias="model", fixed=True, choices=_model_names
    )
    dtype: str = setting("float32", "compute dtype (parameters stay float32)", choices=("float32", "bfloat16"))
    fields: dict = setting(
        {}, "module field overrides of the model, set one with --model.FIELD VALUE", alias="model_overrides", fixed=True
    )

    def __post_init__(self):
        super().__post_init__()
        from jdiff.models import model_config

        allowed = {k: v for k, v in model_config(self.name).items() if k != "dtype"}  # dtype: model.dtype
        bad = sorted(set(self.fields) - set(allowed))
        if bad:
            raise ConfigError(f"unknown model field(s) {bad} for {self.name!r}; allowed: {', '.join(sorted(allowed))}")
        for k, v in self.fields.items():
            _check_like(f"model.{k}", v, allowed[k])


def _check_like(name: str, value: Any, default: Any) -> None:
    """A model field value must have the type of the field's default (ints are accepted for floats;
    fields whose default is None take any literal)."""
    if default is None or value is None:
        return
    kind = type(default)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"bad value {value!r} for {name}: expected {kind.__name__} like {default!r}")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(_Section):
    section = "diffusion"
    schedule: str = setting("linear", "beta schedule", fixed=True, choices=tuple(BETA_SCHEDULES))
    num_timesteps: int = setting(1000, "T, number of diffusion steps", fixed=True, ge=1)
    zero_terminal_snr: bool = setting(
        False, "rescale the schedule to zero terminal SNR (use with objective v)", fixed=True
    )
    objective: str = setting("eps", "what the model predicts", fixed=True, choices=PREDICTIONS)
    weighting: str = setting("simple", "loss weighting", choices=WEIGHTINGS)
    min_snr_gamma: float = setting(5.0, "gamma of min-SNR weighting", gt=0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.zero_terminal_snr and self.objective == "eps":
            raise ConfigError("diffusion.zero_terminal_snr needs objective v or x0 (eps cannot be sampled at SNR 0)")


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    section = "optim"
    batch_size: int = setting(128, "global batch size (all devices, all hosts)", ge=1)
    steps: int = setting(2000, "total number of training steps", ge=0)
    lr: float = setting(2e-3, "peak learning rate", gt=0.0)
    warmup_steps: int = setting(100, "linear learning-rate warm-up steps (lr(0) = 0)", ge=0)
    lr_decay: str = setting(
        "cosine",
        "after warm-up: constant, or cosine to lr * end_lr_factor at the last step",
        choices=("constant", "cosine"),
    )
    end_lr_factor: float = setting(0.05, "final lr / peak lr for cosine decay", ge=0.0, le=1.0)
    adam_b1: float = setting(0.9, "Adam beta1", ge=0.0, lt=1.0)
    adam_b2: float = setting(0.99, "Adam beta2", ge=0.0, lt=1.0)
    adam_eps: float = setting(1e-8, "Adam epsilon", ge=0.0)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay (matrices and kernels only)", ge=0.0)
    grad_clip: float = setting(1.0, "clip gradients to this global norm (0: off)", ge=0.0)
    ema_decay: float = setting(0.999, "EMA decay of the parameters (0: EMA = params)", ge=0.0, lt=1.0)
    ema_warmup: bool = setting(True, "EMA decay warm-up: min(ema_decay, (1 + step) / (10 + step))")


def _sampler_names() -> tuple:
    from jdiff.sampling import SAMPLERS

    return tuple(SAMPLERS)


def _spacings() -> tuple:
    from jdiff.sampling import SPACINGS

    return tuple(SPACINGS)


@dataclasses.dataclass(frozen=True)
class SamplingConfig(_Section):
    """The preview grids written during training (the EMA parameters, `jdiff.run.generate`)."""

    section = "sampling"
    every: int = setting(0, "write a sample grid every M steps (0: only at the end)", alias="sample_every", ge=0)
    num_samples: int = setting(100, "images in a sample grid (0: no sample grids)", ge=0)
    columns: int = setting(10, "columns of the sample grid", alias="sample_columns", ge=1)
    sampler: str = setting("ddim", "sampler of the grid", choices=_sampler_names)
    steps: int = setting(100, "sampling steps of the grid", alias="sample_steps", ge=1)
    spacing: str = setting("linspace", "timestep spacing of the grid", choices=_spacings)
    guidance_scale: Optional[float] = setting(
        None, "classifier-free guidance scale for the grid (none: plain conditional)"
    )
    upscale: int = setting(4, "nearest-neighbour upscaling of the grid PNG", alias="sample_upscale", ge=1)
    options: dict = setting({}, "options of the sampler, set one with --sampling.OPTION VALUE (e.g. eta)")

    def __post_init__(self):
        super().__post_init__()
        from jdiff.sampling import check_options

        try:
            check_options(self.sampler, self.options)
        except ValueError as e:
            raise ConfigError(f"sampling.options: {' '.join(str(e).split())}") from None


SECTIONS = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "optim": OptimConfig,
    "sampling": SamplingConfig,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All settings of a training run (defaults = the `digits` preset)."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def __post_init__(self):
        if self.sampling.steps > self.diffusion.num_timesteps:
            raise ConfigError(
                f"sampling.steps ({self.sampling.steps}) must be <= diffusion.num_timesteps "
                f"({self.diffusion.num_timesteps})"
            )
