"""Drawing images from a model: the one sampling front-end of jdiff's tools (sample.py, the training
preview grids, the benchmarks).

`Generator` compiles one sharded program that draws a global batch of images with `jdiff.sample` and runs
it over as many batches as asked. Validation is the library's own: the sampler registry checks the options
when a Generator is built, and `jdiff.sample` the steps, spacing and shapes while the program is traced,
which `compile` does with abstract parameters, so a bad request fails before any weights are read. Errors
are ValueErrors with one-line messages.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff.run.mesh import batch_sharding, check_batch_size, make_mesh, replicated
from jdiff.sampling import default_spacing, split_options

TRAJECTORY_SAMPLES = 8  # samples kept in a trajectory (strip / GIF)
DEFAULT_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to draw: sampler, its steps, spacing and options (e.g. {"eta": 1.0}), classifier-free guidance
    scale (None: plain conditional), clipping to [-1, 1] (of x0 at every step in pixel space; of the decoded
    images when a Generator decodes latents, whose values are not bounded), and trajectory_every=k to also
    keep every k-th state of the first `TRAJECTORY_SAMPLES` samples. spacing None: the schedule's default
    (`jdiff.sampling.default_spacing`: "flow" for the flow schedule, else "linspace"); a Generator's
    `settings` hold the resolved name."""

    sampler: str = "ddim"
    steps: int = 50
    spacing: Optional[str] = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    guidance: Optional[float] = None
    clip: bool = True
    trajectory_every: Optional[int] = None


def labels_for(num: int, num_classes: Optional[int], labels: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """(num,) int32 labels: `labels` cycled, or 0, 1, ..., C-1, 0, ... (None for an unconditional model).
    ValueError for labels outside [0, num_classes)."""
    if not num_classes:
        if labels is not None:
            raise ValueError("labels given, but this model is unconditional")
        return None
    base = np.asarray(labels if labels is not None and len(labels) else np.arange(num_classes), np.int64)
    bad = base[(base < 0) | (base >= num_classes)]
    if bad.size:
        raise ValueError(
            f"labels {sorted(set(bad.tolist()))} out of range: this model has classes 0..{num_classes - 1}"
        )
    return np.resize(base, num).astype(np.int32)


def tokens_for(tokenizer: Any, num: int, prompts: Sequence[str]) -> np.ndarray:
    """(num, L) int32 token ids of `prompts` cycled to `num` (a text model's conditions; see `labels_for`)."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    ids = tokenizer(list(prompts))
    return ids[np.resize(np.arange(len(ids)), num)]


def auto_batch(num: int, num_devices: int, limit: Optional[int] = None) -> int:
    """The global batch for `num` samples on `num_devices`: min(limit, num rounded up to a multiple of the
    device count). A `limit` the user chose must itself split over the devices (the same rule as training's
    batch_size; ValueError otherwise); without one, jdiff picks DEFAULT_BATCH rounded up to a multiple."""
    round_up = lambda n: -(-n // num_devices) * num_devices
    if limit is None:
        limit = round_up(DEFAULT_BATCH)
    check_batch_size(limit, num_devices, flag="--batch_size")
    return min(limit, round_up(num))


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """Compilation of the sampling program: seconds to trace+lower and to compile, whether JAX's persistent
    cache served it, and JAX's own estimate of the seconds it saved (whole seconds; None on a miss)."""

    trace_lower_s: float
    compile_s: float
    cache_hit: bool
    jax_saved_s: Optional[float] = None

    def describe(self, cache_dir: Optional[str]) -> str:
        text = f"trace+lower {self.trace_lower_s:.2f} s, compile {self.compile_s:.2f} s"
        if cache_dir is None:
            return text + " (persistent cache off)"
        if not self.cache_hit:
            return text + f" (persistent cache miss; stored in {cache_dir})"
        saved = "" if self.jax_saved_s is None else f"; JAX estimates {max(self.jax_saved_s, 0):.0f} s saved"
        return text + f" (persistent cache hit{saved})"


def enable_compilation_cache(cache_dir: str) -> str:
    """Turns on JAX's persistent compilation cache in `cache_dir` for every program (no time/size floor)."""
    path = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor
    return path


class Generator:
    """One jitted program drawing a global batch of `batch` images of `image_shape` from `model`, sharded
    along the batch over a 1-D mesh of `devices` (default: all); parameters and schedule are replicated.

    Image j of a draw with `seed` takes all its randomness, x_T and every step's noise, from its own key
    fold_in(key(seed), j) (`jdiff.sample`'s sample_keys): with any sampler, deterministic or stochastic, it
    depends only on (seed, j), not on the batch size or the device count (up to float rounding, ~1e-6).
    Traced inputs (a change never recompiles): params, the seed, labels, guidance scale and the sampler's
    traced options (e.g. eta).

    Latent models (DiT on VAE latents): `image_shape` is the latent shape (h, w, c) the model samples and
    `decode(decode_params, z)` maps a batch of sampled latents (B, h, w, c) to images (B, H, W, C) in [-1, 1]
    inside the same program (e.g. `jdiff.pretrained.autoencoder.Autoencoder.decode_latents`, i.e. the VAE
    decoder of z / scaling_factor); `decode_params` (its weights) are a traced, replicated argument.
    `output_shape` is the (H, W, C) of the images returned (= image_shape without `decode`). Trajectory frames
    are decoded too.
    """

    def __init__(
        self,
        model: Any,
        schedule: Any,
        settings: Settings,
        *,
        image_shape: Sequence[int],
        num_classes: Optional[int],
        prediction: str,
        batch: int,
        devices: Optional[Sequence[Any]] = None,
        decode: Optional[Callable[[Any, jax.Array], jax.Array]] = None,
        decode_params: Any = None,
        tokenizer: Any = None,
    ):
        if settings.spacing is None:
            settings = dataclasses.replace(settings, spacing=default_spacing(schedule))
        s = settings
        self.mesh = make_mesh(devices)
        check_batch_size(batch, self.mesh.devices.size)
        # a text model's conditions are token ids (B, L); its "no text" is the empty caption's ids
        self.tokenizer = tokenizer
        null = num_classes if tokenizer is None else tokenizer([""])[0]
        self._conditioned = conditioned = bool(num_classes) or tokenizer is not None
        self._condition_shape = (batch,) if tokenizer is None else (batch, tokenizer.max_length)
        if s.guidance is not None and not conditioned:
            raise ValueError("guidance needs a class-conditional or text model; this one is unconditional")
        # The registry checks the options here; traced ones are arguments of the program, so another value
        # (a new --eta) reuses it from the persistent cache.
        static_options, self._traced = split_options(s.sampler, s.options)
        self.settings, self.batch, self.num_classes = s, batch, num_classes
        self.shape = (batch, *image_shape)
        self._rows, self._rep = batch_sharding(self.mesh), replicated(self.mesh)
        self._schedule = jax.device_put(schedule, self._rep)
        guided = conditioned and s.guidance is not None
        self._decode_params = None if decode is None else jax.device_put(decode_params, self._rep)
        if decode is None:
            self.output_shape = tuple(int(d) for d in image_shape)
        else:
            z = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
            out = jax.eval_shape(decode, self._decode_params, z)
            if len(out.shape) != 4 or out.shape[0] != 1:
                raise ValueError(f"decode must map latents (B, h, w, c) to images (B, H, W, C), got {out.shape}")
            self.output_shape = tuple(int(d) for d in out.shape[1:])

        def to_images(dparams, z):  # latents -> images in [-1, 1] (latent models only)
            x = decode(dparams, z.reshape(-1, *z.shape[-3:])).astype(jnp.float32)
            x = jnp.clip(x, -1.0, 1.0) if s.clip else x
            return x.reshape(*z.shape[:-3], *x.shape[-3:])

        def run(params, dparams, sch, seed_key, batch_index, labels, traced_options, guidance):
            idx = batch_index * batch + jnp.arange(batch)
            keys = jax.vmap(lambda j: jax.random.fold_in(seed_key, j))(idx)  # image j's key: its global index
            out = jdiff.sample(
                model.apply,
                sch,
                self.shape,
                None,
                sample_keys=jax.lax.with_sharding_constraint(keys, self._rows),
                params={"params": params},
                sampler=s.sampler,
                num_steps=s.steps,
                options={**static_options, **traced_options},
                prediction=prediction,
                spacing=s.spacing,
                labels=labels,
                guidance_scale=guidance if guided else None,
                null_label=null if guided else None,
                clip_x0=(-1.0, 1.0) if s.clip and decode is None else None,
                return_trajectory_every=s.trajectory_every,
            )
            x, traj = (out, None) if s.trajectory_every is None else (out[0], out[1][:, :TRAJECTORY_SAMPLES])
            if decode is not None:
                x = jax.lax.with_sharding_constraint(to_images(dparams, x), self._rows)
                # one frame (<= 8 images) at a time: the decoder's activations are large at 256x256
                traj = None if traj is None else jax.lax.map(lambda f: to_images(dparams, f), traj)
            return x, traj

        self._fn = jax.jit(run, out_shardings=(self._rows, self._rep))
        self._compiled = None

    @classmethod
    def from_run(
        cls,
        run: Any,
        settings: Settings,
        *,
        batch: int,
        devices: Optional[Sequence[Any]] = None,
        model: Any = None,
        vae: Any = None,
        tokenizer: Any = None,
    ) -> "Generator":
        """The Generator of a trained model: `run` is a training run (`jdiff.run.RunInfo`, see `open_run`) or a
        diffusers checkpoint (`jdiff.pretrained.Pretrained`, see `jdiff.pretrained.load`), whose model,
        schedule, sample shape, label count, prediction and VAE (latent models: samples are decoded) it uses.
        For a RunInfo, `model` (default: `build_run_model`) and `vae` (default: the autoencoder of
        its config's data.vae, loaded) and, for a text run, `tokenizer` (default: the one saved in its workdir) may
        be passed when the caller holds them already. A text run's conditions are token ids (`tokens_for`)."""
        from jdiff.pretrained.pipeline import Pretrained
        from jdiff.run.build import build_run_model, build_schedule, run_tokenizer
        from jdiff.run.rundir import RunInfo

        if isinstance(run, RunInfo):
            c = run.config
            if vae is None and c.data.vae:
                from jdiff.pretrained.autoencoder import load_autoencoder_dir

                vae = load_autoencoder_dir(c.data.vae)
            if c.model.is_text() and tokenizer is None:
                tokenizer = run_tokenizer(run.workdir, run.derived.get("text_fields"))
            model = build_run_model(run) if model is None else model
            schedule, shape, num_classes = build_schedule(c), run.image_shape, run.num_classes
            prediction = c.diffusion.prediction
        elif isinstance(run, Pretrained):
            model, schedule, shape, vae = run.model, run.schedule, run.sample_shape, run.vae
            num_classes, prediction = run.num_classes, run.prediction
        else:
            raise TypeError(f"run must be a jdiff.run.RunInfo or a jdiff.pretrained.Pretrained, got {type(run)}")
        return cls(
            model,
            schedule,
            settings,
            image_shape=shape,
            num_classes=num_classes,
            prediction=prediction,
            batch=batch,
            devices=devices,
            decode=None if vae is None else vae.decode_latents,
            decode_params=None if vae is None else vae.params,
            tokenizer=tokenizer,
        )

    def _args(self, params: Any, seed: int, index: int, labels: Optional[np.ndarray]):
        rep = lambda x: jax.device_put(x, self._rep)
        return (
            params,
            self._decode_params,
            self._schedule,
            rep(jax.random.key(seed)),
            rep(jnp.int32(index)),
            None if labels is None else jax.device_put(jnp.asarray(labels, jnp.int32), self._rows),
            {k: rep(v) for k, v in self._traced.items()},
            rep(jnp.float32(self.settings.guidance or 0.0)),
        )

    def compile(self, params: Any) -> CompileStats:
        """Traces, lowers and compiles the program once, timing each and noting persistent-cache hits.
        `params` may be abstract (jax.ShapeDtypeStruct leaves), so this runs before weights are loaded; a bad
        request raises ValueError here."""
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._rep), params)
        labels = np.zeros(self._condition_shape, np.int32) if self._conditioned else None
        args = self._args(params, 0, 0, labels)
        hits, saved = [], []
        on_event = lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
        on_duration = lambda name, secs, **kw: (
            saved.append(secs) if name == "/jax/compilation_cache/compile_time_saved_sec" else None
        )
        jax.monitoring.register_event_listener(on_event)
        jax.monitoring.register_event_duration_secs_listener(on_duration)
        try:
            t0 = time.perf_counter()
            lowered = self._fn.trace(*args).lower()
            t1 = time.perf_counter()
            self._compiled = lowered.compile()
            t2 = time.perf_counter()
        finally:
            jax.monitoring.unregister_event_listener(on_event)
            jax.monitoring.unregister_event_duration_listener(on_duration)
        return CompileStats(t1 - t0, t2 - t1, bool(hits), saved[-1] if saved else None)

    def __call__(self, params: Any, index: int, labels: Optional[np.ndarray], *, seed: int = 0):
        """Batch `index`: (x0 (batch, *output_shape), trajectory (F, <=8, *output_shape) or None) as numpy."""
        if self._compiled is None:
            self.compile(params)
        params = jax.device_put(params, self._rep)
        x, traj = self._compiled(*self._args(params, seed, index, labels))
        return np.asarray(x), None if traj is None else np.asarray(traj)

    def batches(
        self, params: Any, num: int, *, seed: int = 0, labels: Optional[np.ndarray] = None, progress: bool = False
    ):
        """Yields, batch by batch, (start, images (n, H, W, C) float32 of samples start..start+n-1, trajectory
        of batch 0 (None for later batches or without trajectory_every), seconds spent). Only one batch is held
        at a time. `labels`: (num,) ints (see `labels_for`), or a text model's (num, L) token ids (`tokens_for`);
        the last batch is padded with its own labels."""
        from tqdm.auto import tqdm

        b = self.batch
        params = jax.device_put(params, self._rep)
        for i in tqdm(range(-(-num // b)), desc="sampling", unit="batch", disable=None if progress else True):
            y = None
            if labels is not None:
                y = labels[i * b : (i + 1) * b]
                y = np.resize(y, (b, *y.shape[1:])) if len(y) < b else y  # whole rows repeated
            t0 = time.perf_counter()
            x, traj = self(params, i, y, seed=seed)
            n = min(b, num - i * b)
            yield i * b, x[:n], None if traj is None else traj[:, :n], time.perf_counter() - t0

    def draw(
        self, params: Any, num: int, *, seed: int = 0, labels: Optional[np.ndarray] = None, progress: bool = False
    ):
        """`num` images: (images (num, H, W, C) float32 in [-1, 1] when clipping, trajectory of batch 0 or
        None, seconds spent sampling after compilation); see `batches` to stream them instead."""
        out = list(self.batches(params, num, seed=seed, labels=labels, progress=progress))
        return np.concatenate([x for _, x, _, _ in out]), out[0][2], sum(t for *_, t in out)
