"""Everything a training run needs before its first step, built once from a `TrainConfig`: the mesh, data
source, model, schedule, optimizer, the jitted init and step functions, and the batch iterator. The loop,
`benchmarks/train_throughput.py` and the tests all start from `setup(config)`."""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np
import optax

import jdiff
from jdiff._logs import one_line
from jdiff.config import ConfigError, TrainConfig
from jdiff.models.text_unet import TEXT_PARAMS
from jdiff.run import (
    Checkpointer,
    CheckpointError,
    RunInfo,
    batch_sharding,
    build_model,
    build_schedule,
    build_source,
    captioned_source,
    check_batch_size,
    make_mesh,
    model_num_classes,
    replicated,
)
from jdiff.run.build import TextSetup
from jdiff.run.mesh import FSDP_RULES, fsdp_sharding, per_device_bytes
from jdiff.training.evaluate import check_evaluation
from jdiff.training.loss import LossFn, make_loss
from jdiff.training.optim import lr_schedule, make_optimizer
from jdiff.training.state import TrainState, init_train_state
from jdiff.training.step import init_accumulator, make_step_fn, train_step


@dataclasses.dataclass(frozen=True)
class Setup:
    """The parts of a run, each used as it is: `tx` is the optimizer that runs (its state is initialised by
    `init_fn` and updated by `step_fn`), `loss_fn` the loss it minimises (`jdiff.training.loss.make_loss`),
    `lr_schedule` the learning rate `tx` follows (the logged "lr"). `schedule` is replicated over `mesh`.
    To change a part, build a new Setup: `dataclasses.replace(s, tx=optax.sgd(1e-2))` (the derived parts
    below are rebuilt from it).

    Derived when it is built: `abstract_state`, the state's shapes, dtypes and shardings (the restore target:
    parameters, EMA and optimizer state sharded over the mesh's "fsdp" axis, `jdiff.run.mesh.fsdp_sharding`);
    `init_fn()`, the jitted initial state; `step_fn(state, batch, schedule, acc) -> (state, acc)`, the jitted,
    sharded `train_step` (`compile_step` compiles it ahead of time and reports its memory)."""

    config: TrainConfig
    mesh: Any
    source: Any
    model: Any
    schedule: Any
    tx: optax.GradientTransformation
    loss_fn: LossFn
    lr_schedule: Optional[optax.Schedule]
    num_classes: Optional[int]
    image_shape: tuple[int, int, int]
    vae: Any = None  # a `jdiff.pretrained.autoencoder.Autoencoder` when training on its latents (data.vae)
    encode: Any = None  # (step, device batch) -> the batch with images replaced by latents (data.vae)
    text: Optional[TextSetup] = None  # a text model's tokenizer, text fields and text encoder to load
    init_fn: Any = dataclasses.field(init=False, repr=False)
    abstract_state: Any = dataclasses.field(init=False, repr=False)
    step_fn: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        c = self.config
        history = c.diffusion.num_timesteps if c.diffusion.t_sampling == "importance" else 0
        init = functools.partial(
            init_train_state, self.model, self.tx, self.image_shape, c.run.seed, history_steps=history
        )
        try:  # traces the model once: its own constraints on its fields and the image shape are checked here
            shapes = jax.eval_shape(init)
        except (ValueError, TypeError, ZeroDivisionError, IndexError) as e:
            raise ConfigError(
                f"model {c.model.name!r} with fields {dict(c.model.fields)} cannot be built for "
                f"{self.image_shape} images: {one_line(e, 300)}"
            ) from None
        init_fn, abstract, state_sharding = sharded_init(init, shapes, self.model, self.mesh, c.run.fsdp_min_size)
        parts = {"model": self.model, "loss_fn": self.loss_fn, "tx": self.tx, "lr_schedule": self.lr_schedule}
        if self.text is not None:
            parts["null_condition"] = self.text.tokenizer([""])[0]
            if self.text.encoder_dir:
                init_fn = with_text_encoder(init_fn, self.text.encoder_dir, state_sharding)
        step = functools.partial(train_step, **{**train_step_args(c), **parts})  # this Setup's parts, as they are
        object.__setattr__(self, "init_fn", init_fn)
        object.__setattr__(self, "abstract_state", abstract)
        object.__setattr__(self, "step_fn", make_step_fn(step, self.mesh, state_sharding))

    def derived(self) -> dict[str, Any]:
        """Facts config.json records beside the config."""
        return {
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "dataset_size": len(self.source),
            **({"decoded_shape": list(self.decoded_shape())} if self.vae is not None else {}),
            **({"vae_fingerprint": self.vae.fingerprint} if self.vae is not None else {}),
            **({"text_fields": dict(self.text.fields)} if self.text is not None else {}),
            "jdiff_version": jdiff.__version__,
        }

    def decoded_shape(self) -> tuple[int, ...]:
        """The pixel shape of the data: the source's images, or the images a latent cache was encoded from."""
        return tuple(getattr(self.source, "pixel_shape", self.source.image_shape))

    def run_info(self) -> RunInfo:
        """What the run's config.json records (`jdiff.run.open_run` of its workdir reads the same)."""
        return RunInfo(self.config.run.workdir, self.config, self.image_shape, self.num_classes, self.derived())

    def restore_or_init(self, ckpt: Checkpointer, log=lambda s: None) -> TrainState:
        """The latest checkpoint's state in `ckpt`, or the initial state when there is none."""
        latest = ckpt.latest_step()
        if latest is None:
            return self.init_fn()
        state = ckpt.restore(self.abstract_state, latest)
        if int(state.step) != latest:
            raise CheckpointError(f"checkpoint {latest} in {ckpt.directory} holds step {int(state.step)}")
        log(f"resumed from checkpoint step {latest} in {ckpt.directory}")
        return state

    def abstract_step_args(self) -> tuple:
        """(state, batch, schedule, acc) of `step_fn` as ShapeDtypeStructs with their shardings (nothing
        allocated; the schedule is the real one, it is small)."""
        b, rows, rep = self.config.optim.batch_size, batch_sharding(self.mesh), replicated(self.mesh)
        batch = {
            "image": jax.ShapeDtypeStruct((b, *self.image_shape), jax.numpy.float32, sharding=rows),
            "label": jax.ShapeDtypeStruct((b,), jax.numpy.int32, sharding=rows),
        }
        if self.text is not None:
            batch["tokens"] = jax.ShapeDtypeStruct((b, self.model.max_length), jax.numpy.int32, sharding=rows)
        acc = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), init_accumulator())
        return self.abstract_state, batch, self.schedule, acc

    def compile_step(self) -> tuple[Any, "MemoryReport"]:
        """Compiles `step_fn` ahead of time for this run's shapes and shardings (jit keeps the executable, so
        the first step does not compile again) and returns (compiled, its `MemoryReport`)."""
        compiled = self.step_fn.lower(*self.abstract_step_args()).compile()
        return compiled, MemoryReport.of(self.abstract_state, compiled)

    def batches(self, start: int, num_steps: Optional[int] = None, prefetch: int = 2):
        """Global batches of steps start, start + 1, ..., sharded over the mesh (a closeable iterator)."""
        from jdiff.data import iterate_batches

        c = self.config
        return iterate_batches(
            self.source,
            start_step=start,
            global_batch_size=c.optim.batch_size,
            seed=c.run.seed,
            num_steps=num_steps,
            random_flip=c.data.random_flip,
            sharding=batch_sharding(self.mesh),
            prefetch=prefetch,
            transform=self.encode,
        )


def setup(config: TrainConfig, devices: Optional[Sequence[Any]] = None) -> Setup:
    """Builds the parts of the run `config` describes on `devices` (default: all): the optimizer
    (`make_optimizer`), loss (`make_loss`) and the rest from the config. Nothing is computed yet: the init and
    step functions compile on first use. Raises ConfigError / ValueError for bad settings."""
    mesh = make_mesh(devices, config.run.mesh)
    try:
        check_batch_size(config.optim.batch_size, mesh, flag="--optim.batch_size", grad_accum=config.optim.grad_accum)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    rep = replicated(mesh)
    source = build_source(config)
    check_evaluation(config)  # run.eval_every's settings, before anything compiles
    num_classes = model_num_classes(config, getattr(source, "num_classes", None))
    image_shape = tuple(int(d) for d in source.image_shape)
    vae, encode = None, None
    if config.data.vae:
        vae, image_shape, encode = latent_space(config, image_shape, mesh, source)
    elif getattr(source, "vae_fingerprint", None):
        raise ConfigError(
            f"data.dataset {config.data.dataset} is a latent cache: set data.vae to the VAE it was encoded with "
            "(previews and sample.py decode through it)"
        )
    text = None
    if config.model.is_text():
        source, text = captioned_source(config, source)
    model = with_remat(build_model(config, num_classes, None if text is None else text.fields), config)
    return Setup(
        config,
        mesh,
        source,
        model,
        jax.device_put(build_schedule(config), rep),
        **{k: v for k, v in train_step_args(config).items() if k in ("tx", "loss_fn", "lr_schedule")},
        num_classes=num_classes,
        image_shape=image_shape,
        vae=vae,
        encode=encode,
        text=text,
    )


def train_step_args(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of `train_step` that `config` determines: loss_fn (`make_loss`), tx
    (`make_optimizer`), lr_schedule, ema_decay, ema_warmup, label_dropout, grad_accum. `setup` builds a
    Setup's tx, loss_fn and lr_schedule with it; `functools.partial(train_step, model=m, **train_step_args(c))`
    is the step of a config without a Setup."""
    return dict(
        loss_fn=make_loss(config.diffusion, config.data.pixel_levels()),
        tx=make_optimizer(config.optim, frozen=(TEXT_PARAMS,) if config.model.freeze_text else ()),
        lr_schedule=lr_schedule(config.optim),
        ema_decay=config.optim.ema_decay,
        ema_warmup=config.optim.ema_warmup,
        label_dropout=config.data.label_dropout,
        grad_accum=config.optim.grad_accum,
    )


VAE_SEED_SALT = 0x7AE  # posterior draws of the latent batches use key(run.seed) folded with this, then the step


def latent_space(config: TrainConfig, image_shape: tuple[int, int, int], mesh, source: Any = None):
    """Training on the latents of the AutoencoderKL in `config.data.vae` (the DiT paper's setting): (vae, latent
    shape, transform) where transform(step, batch) replaces batch["image"] by scaling_factor x a posterior draw
    of its VAE latents, with key fold_in(fold_in(key(seed), VAE_SEED_SALT), step) (a resumed run draws the same).
    The draw runs on the sharded device batch in the data thread (`iterate_batches(transform=...)`).

    When `source` is a latent cache (`jdiff.data.LatentCacheSource`, made by `jdiff.cli.encode`) its batches
    hold the stored posterior mean and std, and the draw is mean + std * eps with the same key and eps, so the
    latents equal those of encoding on the fly (up to the cache's dtype). A cache made with another VAE
    (fingerprint), or at another data.image_size / data.channels, is a ConfigError (one line)."""
    from jdiff.pretrained.autoencoder import load_autoencoder_dir
    from jdiff.pretrained.files import PretrainedError

    try:
        vae = load_autoencoder_dir(config.data.vae)
    except PretrainedError as e:
        raise ConfigError(f"data.vae: {one_line(e)}") from None
    base = jax.random.fold_in(jax.random.key(config.run.seed), VAE_SEED_SALT)
    if getattr(source, "vae_fingerprint", None):
        return vae, source.latent_shape, cached_latents(config, vae, source, base, mesh)
    f, want = vae.module.downsample_factor, vae.module.in_channels
    h, w, c = image_shape
    if c != want or h % f or w % f:
        raise ConfigError(
            f"data.vae {config.data.vae} takes images with {want} channels and sides divisible by {f}; the data gives "
            f"{image_shape} (set data.channels / data.image_size)"
        )
    rep = replicated(mesh)
    params = jax.device_put(vae.params, rep)
    to_latents = jax.jit(
        lambda p, x, step: vae.encode_latents(p, x, jax.random.fold_in(base, step)), out_shardings=batch_sharding(mesh)
    )

    def transform(step: int, batch: dict) -> dict:
        return {**batch, "image": to_latents(params, batch["image"], step)}

    return vae, vae.latent_shape(image_shape), transform


def cached_latents(config: TrainConfig, vae: Any, cache: Any, base: jax.Array, mesh: Any):
    """The transform of a latent-cache run (see `latent_space`), after checking the cache against the config."""
    d, (size, _, channels) = config.data, cache.pixel_shape
    if cache.vae_fingerprint != vae.fingerprint:
        raise ConfigError(
            f"data.dataset {d.dataset} was encoded with another VAE than data.vae {d.vae} (fingerprint "
            f"{cache.vae_fingerprint[:19]} != {vae.fingerprint[:19]}); encode it again with this VAE"
        )
    for key, want, have in (("image_size", d.image_size, size), ("channels", d.channels, channels)):
        if want is not None and want != have:
            raise ConfigError(f"data.{key}={want}, but the latent cache {d.dataset} was encoded at {key} {have}")
    if config.run.eval_every:
        raise ConfigError(
            "run.eval_every encodes held-out pixel images, but a latent cache holds posteriors; set run.eval_every 0"
        )
    if d.random_flip and not cache.flips_stored:
        raise ConfigError(f"data.random_flip needs the flipped posteriors, but {d.dataset} was encoded with --no-flip")
    c, shift, scale = cache.latent_shape[2], vae.shift_factor or 0.0, vae.scaling_factor

    @functools.partial(jax.jit, out_shardings=batch_sharding(mesh))
    def draw(x, step):
        mean, std = x[..., :c], x[..., c:]
        z = mean + std * jax.random.normal(jax.random.fold_in(base, step), mean.shape, mean.dtype)
        return (z - shift) * scale

    def transform(step: int, batch: dict) -> dict:
        return {**batch, "image": draw(batch["image"], step)}

    return transform


def sharded_init(init: Any, shapes: Any, model: Any, mesh: Any, min_size: int) -> tuple[Any, Any, Any]:
    """(init_fn, abstract_state, state_sharding) for the state init() builds (`shapes`: its eval_shape): every
    leaf sharded over the mesh's "fsdp" axis by `jdiff.run.mesh.fsdp_sharding` (with the model's FSDP_RULES),
    init_fn = init jitted to create it in place, abstract_state = shapes with those shardings."""
    rules = FSDP_RULES.get(type(model).__name__, ())
    state_sharding = fsdp_sharding(shapes, mesh, min_size=min_size, rules=rules)
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, state_sharding)
    return jax.jit(init, out_shardings=state_sharding), abstract, state_sharding


def with_text_encoder(init_fn: Any, encoder_dir: str, state_sharding: Any) -> Any:
    """init_fn whose state holds the CLIPTextModel weights of `encoder_dir` as the text encoder's parameters (and
    their EMA), in the state's shardings (model.text_encoder)."""
    from jdiff.pretrained.files import PretrainedError
    from jdiff.pretrained.text import load_text_encoder

    def init():
        state = init_fn()
        try:
            enc = load_text_encoder(encoder_dir)
        except PretrainedError as e:
            raise ConfigError(f"model.text_encoder: {one_line(e)}") from None
        host = jax.tree.map(np.asarray, enc.params)
        # one transfer per tree: params and EMA must not share buffers (the step donates both)
        put = lambda tree, sh: {**tree, TEXT_PARAMS: jax.device_put(host, sh[TEXT_PARAMS])}
        return state.replace(
            params=put(state.params, state_sharding.params), ema_params=put(state.ema_params, state_sharding.ema_params)
        )

    return init


def with_remat(model: Any, config: TrainConfig) -> Any:
    """`model` with its blocks rematerialised (`jdiff.models.remat`) when config.model.remat is set."""
    if not config.model.remat:
        return model
    return model.clone(remat=True, remat_policy=config.model.remat_policy)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of a run: the train state (its shards) and the compiled step's buffers from XLA's
    memory analysis (arguments: state + batch + schedule; outputs; temporaries: activations, gradients,
    collectives' buffers, one preallocated block sized by XLA's heap simulation; alias: outputs written into
    donated arguments). peak = arguments + outputs - alias + temporaries, what the step needs while it runs."""

    state: int
    arguments: int
    outputs: int
    alias: int
    temp: int
    peak: int

    @classmethod
    def of(cls, abstract_state: Any, compiled: Any) -> "MemoryReport":
        m = compiled.memory_analysis()
        arg, out, alias, temp = (
            int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")
        )
        return cls(per_device_bytes(abstract_state), arg, out, alias, temp, arg + out - alias + temp)

    def line(self) -> str:
        b = _bytes
        return (
            f"memory per device: state {b(self.state)}, train step peak {b(self.peak)} (arguments "
            f"{b(self.arguments)}, outputs {b(self.outputs)}, aliased {b(self.alias)}, temporaries {b(self.temp)})"
        )


def _bytes(n: int) -> str:
    """1.23 GiB / 45.6 MiB / 7.8 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n / 2**10:.1f} KiB"
