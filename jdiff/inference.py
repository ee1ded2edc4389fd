"""Sampling from a training run (the library side of sample.py).

`Request` describes what to draw; `check_request` validates it against the run's saved config (before any
weights are loaded); `BatchSampler` compiles one sharded sampling program for a fixed global batch (timing
its compilation and persistent-cache use) and `draw` runs it over all batches; `write_*` save the results
(grids via `jdiff.training.samples`).
Errors a user can cause are `SampleError` (a ValueError) with a one-line message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff.training.mesh import batch_sharding, make_mesh, replicated
from jdiff.training.samples import image_grid, save_png

TRAJECTORY_SAMPLES = 8  # samples shown in the trajectory strip / GIF
_LEDGER = "jdiff-compile-times.json"  # cold compile seconds per program, next to JAX's cache entries


class SampleError(ValueError):
    """A bad request (arguments that do not fit the trained model); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What to draw. labels: explicit class labels, cycled to `num` (None: 0, 1, ..., C-1, 0, ... for a
    class-conditional model). trajectory_every: also keep every k-th state of the first samples."""

    num: int = 64
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "linspace"
    guidance: Optional[float] = None
    labels: Optional[tuple[int, ...]] = None
    seed: int = 0
    batch_size: int = 256
    clip: bool = True
    trajectory_every: Optional[int] = None


def check_request(req: Request, num_timesteps: int, num_classes: Optional[int]) -> None:
    """Raises SampleError unless `req` fits a model trained with T=`num_timesteps` and `num_classes`
    labels (None: unconditional)."""
    if req.sampler not in jdiff.SAMPLERS:
        raise SampleError(f"unknown sampler {req.sampler!r}; allowed: {', '.join(sorted(jdiff.SAMPLERS))}")
    if req.spacing not in jdiff.SPACINGS:
        raise SampleError(f"unknown spacing {req.spacing!r}; allowed: {', '.join(jdiff.SPACINGS)}")
    for name in ("num", "steps", "batch_size"):
        if getattr(req, name) < 1:
            raise SampleError(f"{name} must be >= 1, got {getattr(req, name)}")
    if req.steps > num_timesteps:
        raise SampleError(f"steps ({req.steps}) must be <= the model's number of diffusion steps T={num_timesteps}")
    if not 0.0 <= req.eta <= 1.0:
        raise SampleError(f"eta must be in [0, 1], got {req.eta}")
    if req.trajectory_every is not None and req.trajectory_every < 1:
        raise SampleError(f"trajectory-every must be >= 1, got {req.trajectory_every}")
    if not num_classes:
        if req.guidance is not None:
            raise SampleError("guidance needs a class-conditional model; this one is unconditional")
        if req.labels is not None:
            raise SampleError("labels given, but this model is unconditional")
        return
    if req.guidance is not None and not math.isfinite(req.guidance):
        raise SampleError(f"guidance must be a finite number, got {req.guidance}")
    bad = [y for y in req.labels or () if not 0 <= y < num_classes]
    if bad:
        raise SampleError(f"labels {bad} out of range: this model has classes 0..{num_classes - 1}")


def sample_labels(req: Request, num_classes: Optional[int]) -> Optional[np.ndarray]:
    """(num,) int32 labels (explicit ones cycled, else 0..C-1 repeated), or None when unconditional."""
    if not num_classes:
        return None
    base = np.asarray(req.labels if req.labels else np.arange(num_classes), np.int32)
    return np.resize(base, req.num).astype(np.int32)


def enable_compilation_cache(cache_dir: str) -> str:
    """Turns on JAX's persistent compilation cache in `cache_dir` for every program (no time/size floor)."""
    path = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor, no override
    return path


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """Compilation of the sampling program: seconds to trace+lower and to compile; whether the persistent
    cache served it; on a hit, how long the cold compile took (recorded by an earlier run in the cache
    directory; None when unknown) and JAX's own estimate of the time saved (it stores the cold compile time
    in whole seconds)."""

    trace_lower_s: float
    compile_s: float
    cache_hit: bool
    cold_compile_s: Optional[float]
    jax_saved_s: Optional[float] = None

    def describe(self, cache_dir: Optional[str]) -> str:
        text = f"trace+lower {self.trace_lower_s:.2f} s, compile {self.compile_s:.2f} s"
        if cache_dir is None:
            return text + " (persistent cache off)"
        if not self.cache_hit:
            return text + f" (persistent cache miss; stored in {cache_dir})"
        if self.cold_compile_s is None:
            est = "" if self.jax_saved_s is None else f"; JAX estimates {max(self.jax_saved_s, 0):.0f} s saved"
            return text + f" (persistent cache hit; cold compile time not recorded{est})"
        saved = self.cold_compile_s - self.compile_s
        return text + f" (persistent cache hit: cold compile was {self.cold_compile_s:.2f} s, saved {saved:.2f} s)"


class BatchSampler:
    """One jitted program drawing a global batch of `batch` samples, sharded along the batch over a 1-D
    mesh ("data") of `devices`; parameters and schedule are replicated.

    Sample j of batch i starts from x_T = normal(fold_in(fold_in(seed, 0), i * batch + j)) and batch i's
    sampler noise uses fold_in(fold_in(seed, 1), i): with a deterministic sampler an image depends only on
    (seed, its index), not on the batch size or the device count (up to float rounding: programs for other
    shapes or device counts may round differently, ~1e-7).
    """

    def __init__(self, model, schedule, params, req: Request, image_shape: Sequence[int], num_classes, *,
                 batch: int, prediction: str, devices=None, cache_dir: Optional[str] = None):
        self.mesh = make_mesh(devices)
        self.batch, self.req, self.cache_dir = batch, req, cache_dir
        self.shape = (batch, *image_shape)
        self._rows, self._rep = batch_sharding(self.mesh), replicated(self.mesh)
        self._params = jax.device_put(params, self._rep)
        self._schedule = jax.device_put(schedule, self._rep)
        self._cond = bool(num_classes)
        guided = self._cond and req.guidance is not None
        keep = TRAJECTORY_SAMPLES
        seed_key = jax.random.key(req.seed)
        self._keys = (jax.random.fold_in(seed_key, 0), jax.random.fold_in(seed_key, 1))

        def run(params, sch, init_key, loop_key, first_index, labels, eta, guidance):
            idx = first_index + jnp.arange(batch)
            x_t = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(init_key, i), self.shape[1:]))(idx)
            x_t = jax.lax.with_sharding_constraint(x_t, self._rows)
            out = jdiff.sample(
                model.apply, sch, self.shape, loop_key, params={"params": params}, sampler=req.sampler,
                num_steps=req.steps, eta=eta, prediction=prediction, spacing=req.spacing, x_init=x_t,
                labels=labels, guidance_scale=guidance if guided else None,
                null_label=num_classes if guided else None, clip_x0=(-1.0, 1.0) if req.clip else None,
                return_trajectory_every=req.trajectory_every)
            if req.trajectory_every is None:
                return out, None
            return out[0], out[1][:, :keep]

        self._fn = jax.jit(run, out_shardings=(self._rows, self._rep))
        self._compiled = None

    def _args(self, index: int, labels: Optional[np.ndarray]):
        init_key, loop_key = self._keys
        dev = lambda x, s: jax.device_put(x, s)
        return (self._params, self._schedule, dev(init_key, self._rep),
                dev(jax.random.fold_in(loop_key, index), self._rep),
                dev(jnp.int32(index * self.batch), self._rep),
                None if labels is None else dev(jnp.asarray(labels, jnp.int32), self._rows),
                dev(jnp.float32(self.req.eta), self._rep),
                dev(jnp.float32(self.req.guidance or 0.0), self._rep))

    def compile(self) -> CompileStats:
        """Traces, lowers and compiles the program (once), timing each and noting persistent-cache hits."""
        args = self._args(0, np.zeros((self.batch,), np.int32) if self._cond else None)  # (eager ops: not timed)
        hits, saved = [], []
        on_event = lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
        on_duration = lambda name, secs, **kw: (
            saved.append(secs) if name == "/jax/compilation_cache/compile_time_saved_sec" else None)
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
        hit = bool(hits)
        cold = None
        if self.cache_dir is not None:
            key = hashlib.sha256((lowered.as_text() + jax.__version__ + str(jax.devices())).encode()).hexdigest()
            cold = _ledger(self.cache_dir, key, None if hit else t2 - t1)
        return CompileStats(t1 - t0, t2 - t1, hit, cold if hit else None, saved[-1] if saved else None)

    def __call__(self, index: int, labels: Optional[np.ndarray]):
        """Batch `index`: (x0 (batch, H, W, C), trajectory (F, <=8, H, W, C) or None) as numpy."""
        if self._compiled is None:
            self.compile()
        x, traj = self._compiled(*self._args(index, labels))
        return np.asarray(x), None if traj is None else np.asarray(traj)


def _ledger(cache_dir: str, key: str, cold_s: Optional[float]) -> Optional[float]:
    """Records `cold_s` for program `key` (when given) in the cache dir's ledger; returns the recorded value."""
    path = os.path.join(cache_dir, _LEDGER)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    if cold_s is None:
        v = data.get(key)
        return float(v) if isinstance(v, (int, float)) else None
    data[key] = round(cold_s, 4)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # the ledger only improves the report
    return cold_s


def global_batch(req: Request, num_devices: int) -> int:
    """The batch actually used: min(batch_size, num) rounded up to a multiple of the device count."""
    b = min(req.batch_size, req.num)
    return -(-b // num_devices) * num_devices


def draw(sampler: BatchSampler, req: Request, labels: Optional[np.ndarray], *, progress: bool = True):
    """All `req.num` samples in batches: (images (num, H, W, C) float32, trajectory of batch 0 or None,
    seconds spent sampling after compilation)."""
    from tqdm.auto import tqdm

    b, n = sampler.batch, req.num
    num_batches = -(-n // b)
    out, traj, spent = [], None, 0.0
    for i in tqdm(range(num_batches), desc="sampling", unit="batch", disable=None if progress else True):
        y = None
        if labels is not None:
            y = labels[i * b:(i + 1) * b]
            y = np.concatenate([y, np.resize(y, b - len(y))]) if len(y) < b else y  # pad the last batch
        t0 = time.perf_counter()
        x, tr = sampler(i, y)
        spent += time.perf_counter() - t0
        out.append(x)
        traj = tr if i == 0 else traj
    return np.concatenate(out)[:n], None if traj is None else traj[:, :n], spent


# ---------------------------------------------------------------------------------------------------
# Files.


def upscale_for(image_shape: Sequence[int], min_side: int = 64) -> int:
    """Nearest-neighbour factor that makes a tile at least `min_side` pixels (8x8 digits -> 8)."""
    return max(1, -(-min_side // max(image_shape[0], image_shape[1])))


def write_npz(path: str, images: np.ndarray, labels: Optional[np.ndarray], **meta: Any) -> str:
    """images float32 (N, H, W, C) as sampled, labels int32 (N,) (empty if unconditional), and `meta`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path, images=images.astype(np.float32),
             labels=np.zeros((0,), np.int32) if labels is None else labels.astype(np.int32),
             **{k: np.asarray(v) for k, v in meta.items()})
    return path


def write_trajectory(traj: np.ndarray, png_path: str, gif_path: str, upscale: int) -> tuple[str, str]:
    """traj (F, S, H, W, C): a strip PNG (one row per sample, one column per kept step, x_T first) and
    an animated GIF (one frame per kept step, the samples side by side; the last frame held longer)."""
    from PIL import Image

    f, s = traj.shape[:2]
    strip = image_grid(np.swapaxes(traj, 0, 1).reshape(f * s, *traj.shape[2:]), columns=f, upscale=upscale)
    save_png(strip, png_path)
    frames = []
    for k in range(f):
        g = image_grid(traj[k], columns=s, upscale=upscale)
        frames.append(Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g))
    os.makedirs(os.path.dirname(gif_path) or ".", exist_ok=True)
    frames[0].save(gif_path, save_all=True, append_images=frames[1:], duration=[120] * (f - 1) + [1200], loop=0)
    return png_path, gif_path
