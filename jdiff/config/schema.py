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

from jdiff.edm import P_MEAN, P_STD
from jdiff.forward import EDM_PREDICTIONS, FLOW_PREDICTIONS, PREDICTIONS
from jdiff.losses import LOSSES, WEIGHTINGS
from jdiff.schedules import BETA_SCHEDULES
from jdiff.spec import Spec, spec_of_annotation


class ConfigError(ValueError):
    """A bad config key or value; the message is one readable line."""


def setting(default: Any, help: str, *, fixed: bool = False, **spec: Any) -> Any:
    """A config field: default, help, allowed values (`jdiff.spec.Spec` keywords: choices, ge, gt, le, lt).

    fixed: the field fixes the parameters' shapes or the meaning of the model output, so a resumed run
    cannot change it.
    """
    meta = {"help": help, "fixed": fixed, "spec": spec}
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


MESH_AXES = ("data", "fsdp")  # batch axis; the axis parameters, EMA and optimizer state are sharded over


def parse_mesh(text: str) -> dict[str, int]:
    """{"data": D, "fsdp": F} of a mesh string "data=D,fsdp=F"; an axis left out is -1 (the devices left).
    ConfigError for anything else."""
    shape = {}
    for part in str(text).replace(" ", "").split(","):
        name, eq, value = part.partition("=")
        if not eq or name not in MESH_AXES or name in shape or not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f'bad run.mesh {text!r}: expected "data=D,fsdp=F" with positive integers D and F (axes: '
                f"{', '.join(MESH_AXES)}; one may be left out, e.g. fsdp=8)"
            )
        shape[name] = int(value)
    return {a: shape.get(a, -1) for a in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class RunConfig(_Section):
    section = "run"
    workdir: str = setting("runs/digits", "output directory (checkpoints, config.json, metrics.jsonl, samples/)")
    seed: int = setting(0, "seed of initialisation, data order, noise and samples", ge=0, le=2**32 - 1)
    checkpoint_every: int = setting(1000, "save a checkpoint every N steps (and at the end; 0: only at the end)", ge=0)
    keep_checkpoints: int = setting(3, "keep the last K checkpoints", ge=1)
    async_checkpoint: bool = setting(True, "save checkpoints in the background")
    log_every: int = setting(100, "fetch and log metrics every N steps", ge=1)
    eval_every: int = setting(
        0, "every N steps, held-out bits/dim (VLB) of the EMA model on a fixed batch of data.eval_split (0: off)", ge=0
    )
    eval_num: int = setting(64, "examples in the held-out bits/dim batch (the first N of data.eval_split)", ge=1)
    eval_ode: bool = setting(False, "the held-out evaluation also computes the probability-flow ODE bits/dim")
    fid_every: int = setting(
        0, "every N steps, FID of run.fid_num EMA samples (the sampling.* settings) against run.fid_ref (0: off)", ge=0
    )
    fid_num: int = setting(1000, "samples of the periodic FID (run.fid_every)", ge=2)
    fid_inception: Optional[str] = setting(None, "FID Inception weights .safetensors (see docs/fid.md)")
    fid_ref: Optional[str] = setting(None, "reference statistics .npz (mu, sigma) of the periodic FID")
    mesh: Optional[str] = setting(
        None,
        'device mesh "data=D,fsdp=F" (D*F = all devices; batch over both axes, parameters, EMA and optimizer '
        "state sharded over fsdp; none: all devices on data, state replicated)",
    )
    fsdp_min_size: int = setting(
        2**14, "parameters with fewer elements stay replicated on a fsdp mesh (0: shard every divisible one)", ge=0
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.workdir:
            raise ConfigError("run.workdir must not be empty")
        if self.fid_every and not (self.fid_inception and self.fid_ref):
            raise ConfigError("run.fid_every needs run.fid_inception (weights) and run.fid_ref (statistics .npz)")
        if self.mesh is not None:
            parse_mesh(self.mesh)


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
    workers: Optional[int] = setting(
        None, "threads decoding each batch of an image folder or tfds dataset (none: one per CPU core, at most 8)", ge=1
    )
    random_flip: bool = setting(False, "random horizontal flips")
    class_conditional: bool = setting(True, "condition on labels when the dataset has them", fixed=True)
    label_dropout: float = setting(
        0.1,
        "probability of replacing a label by the null label, or a caption by the empty one (classifier-free guidance)",
        ge=0.0,
        le=1.0,
    )
    captions: Optional[str] = setting(
        None,
        "train on captions (a text model, e.g. unet_text_small): digits (templates naming the digit) or folder "
        "(metadata.jsonl or a .txt beside each image)",
        fixed=True,
        choices=("digits", "folder"),
    )
    tokenizer: Optional[str] = setting(
        None,
        "CLIP tokenizer directory for the captions (none: the text_encoder's, else a BPE tokenizer learned from the "
        "captions); kept in the run directory",
        fixed=True,
    )
    levels: Optional[int] = setting(
        None, "values per pixel channel of the data, for the VLB decoder and bits/dim (none: 17 digits, else 256)", ge=2
    )
    eval_split: str = setting("test", "split of the held-out bits/dim evaluation (run.eval_every)")
    vae: Optional[str] = setting(
        None,
        "diffusers AutoencoderKL directory: train on its latents (a posterior draw of each batch x scaling_factor); "
        "previews and sample.py decode through it",
        fixed=True,
    )

    def pixel_levels(self) -> int:
        """`levels`, or the dataset's: 17 for the sklearn digits (0..16), 256 (8-bit) for everything else."""
        if self.levels is not None:
            return self.levels
        return 17 if self.dataset == "digits" else 256


def _model_names() -> tuple:
    from jdiff.models import list_models

    return tuple(list_models())


def _remat_policies() -> tuple:
    from jdiff.models.remat import REMAT_POLICIES

    return REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    section = "model"
    name: str = setting("unet_small", "registered model (jdiff.models.list_models())", fixed=True, choices=_model_names)
    dtype: str = setting("float32", "compute dtype (parameters stay float32)", choices=("float32", "bfloat16"))
    remat: bool = setting(
        False, "rematerialise each res/attention block (U-Net) or transformer block (DiT) in the backward pass"
    )
    remat_policy: str = setting(
        "nothing_saveable", "what a rematerialised block keeps (jax.checkpoint_policies)", choices=_remat_policies
    )
    fields: dict = setting({}, "module field overrides of the model, set one with --model.FIELD VALUE", fixed=True)
    text_encoder: Optional[str] = setting(
        None,
        "text models: initialise the text encoder from a diffusers StableDiffusionPipeline directory (its text_encoder "
        "and tokenizer) or a CLIPTextModel directory (none: from scratch)",
        fixed=True,
    )
    freeze_text: bool = setting(
        False, "text models: keep the text encoder fixed (needs model.text_encoder)", fixed=True
    )

    def __post_init__(self):
        super().__post_init__()
        from jdiff.models import model_config

        own = ("dtype", "remat", "remat_policy")  # set by model.dtype, model.remat, model.remat_policy
        allowed = {k: v for k, v in model_config(self.name).items() if k not in own}
        bad = sorted(set(self.fields) - set(allowed))
        if bad:
            raise ConfigError(f"unknown model field(s) {bad} for {self.name!r}; allowed: {', '.join(sorted(allowed))}")
        for k, v in self.fields.items():
            _check_like(f"model.{k}", v, allowed[k])
        if self.freeze_text and not self.text_encoder:
            raise ConfigError("model.freeze_text keeps a loaded text encoder fixed: set model.text_encoder")

    def is_text(self) -> bool:
        """Whether the model is conditioned on text (`jdiff.models.is_text_model`)."""
        from jdiff.models import is_text_model, model_class

        return is_text_model(model_class(self.name))


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
        False, "rescale the schedule to zero terminal SNR (use with prediction v)", fixed=True
    )
    prediction: str = setting(
        "eps",
        "what the model predicts (edm, edm_vp, edm_ve: an EDM-preconditioned network, Karras et al. 2022)",
        fixed=True,
        choices=PREDICTIONS + EDM_PREDICTIONS + FLOW_PREDICTIONS,
    )
    weighting: str = setting("simple", "loss weighting", choices=WEIGHTINGS)
    min_snr_gamma: float = setting(5.0, "gamma of min-SNR weighting", gt=0.0)
    loss: str = setting(
        "simple",
        "simple: the denoising MSE; hybrid: + vlb_weight * L_vlb for a learned variance (Nichol & Dhariwal 2021); "
        "vlb: the variational bound alone",
        choices=LOSSES,
    )
    vlb_weight: float = setting(1e-3, "lambda of the hybrid loss L_simple + lambda L_vlb", ge=0.0)
    t_sampling: str = setting(
        "uniform",
        "timestep sampling: uniform; importance (loss hybrid/vlb: p_t ~ sqrt(E[L_t^2]), improved DDPM sec. 3.3); "
        "prediction flow: logit_normal (SD3 eq. 19) or mode (SD3 eq. 20)",
        fixed=True,
        choices=("uniform", "importance", "logit_normal", "mode"),
    )
    shift: float = setting(
        1.0, "schedule flow: SD3's timestep shift s' = k s/(1 + (k - 1) s), k > 0", fixed=True, gt=0.0
    )
    logit_mean: float = setting(0.0, "t_sampling logit_normal: mean of logit(s) (SD3 default 0)")
    logit_std: float = setting(1.0, "t_sampling logit_normal: std of logit(s) (SD3 default 1)", gt=0.0)
    mode_scale: float = setting(1.29, "t_sampling mode: SD3 eq. 20's scale, in [-1, 2/(pi - 2)]", ge=-1.0, le=1.75)
    edm_p_mean: float = setting(P_MEAN, "prediction edm: mean of the log-normal training ln(sigma) (EDM P_mean)")
    edm_p_std: float = setting(P_STD, "prediction edm: std of the log-normal training ln(sigma) (EDM P_std)", gt=0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ConfigError("diffusion.zero_terminal_snr needs prediction v or x0 (eps cannot be sampled at SNR 0)")
        if self.prediction in EDM_PREDICTIONS:
            if self.weighting != "simple":
                raise ConfigError(
                    f"diffusion.weighting {self.weighting} does not apply to prediction {self.prediction} (EDM weights "
                    "its loss by lambda(sigma)); use weighting simple"
                )
            if self.zero_terminal_snr:
                raise ConfigError(f"diffusion.zero_terminal_snr does not apply to prediction {self.prediction}")
        edm_defaults = (self.edm_p_mean, self.edm_p_std) == (P_MEAN, P_STD)
        if self.prediction != "edm" and not edm_defaults:
            raise ConfigError(f"diffusion.edm_p_mean / edm_p_std apply to prediction edm only, not {self.prediction}")
        if self.loss != "simple" and self.prediction not in PREDICTIONS:
            raise ConfigError(f"diffusion.loss {self.loss} needs prediction eps, x0 or v, not {self.prediction}")
        if self.t_sampling == "importance" and self.loss == "simple":
            raise ConfigError("diffusion.t_sampling importance needs diffusion.loss vlb or hybrid")
        flow_model, flow_schedule = self.prediction in FLOW_PREDICTIONS, self.schedule == "flow"
        if flow_model != flow_schedule:
            raise ConfigError(
                f"diffusion.prediction {self.prediction} does not go with diffusion.schedule {self.schedule}: "
                "prediction flow trains on schedule flow and schedule flow on prediction flow"
            )
        if self.shift != 1.0 and not flow_schedule:
            raise ConfigError(f"diffusion.shift applies to schedule flow only, not {self.schedule}")
        if self.t_sampling in ("logit_normal", "mode") and not flow_model:
            raise ConfigError(f"diffusion.t_sampling {self.t_sampling} needs prediction flow, not {self.prediction}")
        if flow_model and (self.weighting != "simple" or self.zero_terminal_snr or self.t_sampling == "importance"):
            raise ConfigError(
                "prediction flow trains the plain velocity MSE: use weighting simple, no zero_terminal_snr and "
                "t_sampling uniform, logit_normal or mode"
            )


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    section = "optim"
    batch_size: int = setting(128, "global batch size (all devices, all hosts)", ge=1)
    grad_accum: int = setting(
        1, "gradient accumulation: each step runs the batch as K micro-batches of batch_size/K (same update)", ge=1
    )
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

    return tuple(sorted(SAMPLERS))


def _spacings() -> tuple:
    from jdiff.sampling import SPACINGS

    return tuple(SPACINGS)


@dataclasses.dataclass(frozen=True)
class SamplingConfig(_Section):
    """The preview grids written during training (the EMA parameters, `jdiff.run.generate`)."""

    section = "sampling"
    every: int = setting(0, "write a sample grid every M steps (0: only at the end)", ge=0)
    num_samples: int = setting(100, "images in a sample grid (0: no sample grids)", ge=0)
    columns: int = setting(10, "columns of the sample grid", ge=1)
    sampler: str = setting("ddim", "sampler of the grid", choices=_sampler_names)
    steps: int = setting(100, "sampling steps of the grid", ge=1)
    spacing: Optional[str] = setting(
        None, "timestep spacing of the grid (none: flow for the flow schedule, else linspace)", choices=_spacings
    )
    guidance_scale: Optional[float] = setting(
        None, "classifier-free guidance scale for the grid (none: plain conditional)"
    )
    upscale: int = setting(4, "nearest-neighbour upscaling of the grid PNG", ge=1)
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
        text = self.model.is_text()
        if text and not self.data.captions:
            raise ConfigError(f"model {self.model.name} is conditioned on text: set data.captions (digits or folder)")
        if self.data.captions and not text:
            raise ConfigError(
                f"data.captions needs a text model (unet_text_small, unet_text_sd15); {self.model.name} takes labels"
            )
        if (self.model.text_encoder or self.data.tokenizer) and not text:
            raise ConfigError(
                f"model.text_encoder / data.tokenizer are for text models; {self.model.name} takes labels"
            )
        if text and (self.run.eval_every or self.run.fid_every):
            raise ConfigError(
                "run.eval_every / run.fid_every are not available for text models (held-out captions are not wired "
                "into them); set them to 0 and evaluate with sample.py --prompt"
            )
        if self.diffusion.loss == "hybrid" and not self.learned_variance():
            raise ConfigError(
                f"diffusion.loss hybrid needs a learned variance: set --model.learn_sigma true ({self.model.name})"
            )
        if self.sampling.steps > self.diffusion.num_timesteps:
            raise ConfigError(
                f"sampling.steps ({self.sampling.steps}) must be <= diffusion.num_timesteps "
                f"({self.diffusion.num_timesteps})"
            )

    def learned_variance(self) -> bool:
        """Whether the model outputs a variance (learn_sigma: 2x channels, [prediction | v])."""
        from jdiff.models import model_config

        return bool({**model_config(self.model.name), **self.model.fields}["learn_sigma"])  # a protocol field
