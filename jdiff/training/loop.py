"""The training loop: init or resume, step, log, checkpoint, sample, stop cleanly on SIGTERM/SIGINT.

The hot loop never waits for the device except every `log_every` steps (metrics are summed on device),
before a checkpoint (finiteness check) and before a sample grid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

import jdiff
from jdiff.training import mesh as mesh_lib
from jdiff.training.checkpoint import Checkpointer, CheckpointError
from jdiff.training.config import TrainConfig
from jdiff.training.factory import build_model, build_schedule, build_source, model_num_classes
from jdiff.training.optim import make_optimizer
from jdiff.training.run_config import save_run_config
from jdiff.training.samples import generate, image_grid, sample_path, save_png
from jdiff.training.state import TrainState, init_train_state, tree_all_finite
from jdiff.training.step import init_accumulator, make_step_fn

SAMPLE_SEED_SALT = 0x5EED


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss/gradient/state; nothing after the last good checkpoint was saved."""

    def __init__(self, step: int, last_checkpoint: Optional[int], what: str = "loss"):
        self.step = step
        self.last_checkpoint = last_checkpoint
        good = f"the last good checkpoint is step {last_checkpoint}" if last_checkpoint is not None else \
            "no checkpoint was written"
        super().__init__(f"non-finite {what} at step {step}; stopped without saving the bad state ({good})")


@dataclasses.dataclass
class TrainResult:
    """What a `train` call did: final step, why it stopped, last checkpoint and sample grid written."""

    step: int
    stopped_by: Optional[str]  # None (finished), "SIGTERM", "SIGINT" or "stop_after"
    last_checkpoint: Optional[int]
    sample_path: Optional[str]


class StopFlag:
    """Set by SIGTERM/SIGINT handlers (installed by `catch_signals`); read by the loop between steps."""

    def __init__(self):
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


class catch_signals:
    """Context manager: SIGTERM/SIGINT set `flag` instead of killing the process; a second SIGINT raises
    KeyboardInterrupt. Handlers are only installed in the main thread and restored on exit."""

    def __init__(self, flag: StopFlag):
        self.flag, self._old = flag, {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag.request(name)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self.flag

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsWriter:
    """Appends metric dicts as JSON lines to workdir/metrics.jsonl (and TensorBoard if tensorboardX exists)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._f = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1, file=sys.stderr)


def _count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def train(
    config: TrainConfig,
    *,
    devices: Optional[list] = None,
    stop_after: Optional[int] = None,
    batch_hook: Optional[Callable[[int, dict], dict]] = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> TrainResult:
    """Trains (or resumes) the run described by `config` in `config.workdir`.

    Args:
      config: a validated TrainConfig (see `jdiff.training.run_config.resolve_config` for resume rules).
      devices: devices of the data-parallel mesh (default: all).
      stop_after: stop (with a checkpoint) after this many steps of this call, as if preempted.
      batch_hook: (step, global batch) -> batch, applied before the step (tests: inject NaNs).
      progress: show a tqdm progress bar.
      log: receives one-line status messages.

    Raises:
      NonFiniteLossError, CheckpointError, ConfigError (bad dataset/model settings), ValueError.
    """
    workdir = config.workdir
    primary = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(devices)
    mesh_lib.check_batch_size(config.batch_size, mesh)
    rep = mesh_lib.replicated(mesh)

    source = build_source(config)
    num_classes = model_num_classes(config, getattr(source, "num_classes", None))
    image_shape = tuple(int(d) for d in source.image_shape)
    model = build_model(config, num_classes)
    schedule = jax.device_put(build_schedule(config), rep)
    tx = make_optimizer(config)
    if primary:
        save_run_config(workdir, config, {
            "num_classes": num_classes, "image_shape": list(image_shape), "dataset_size": len(source),
            "jdiff_version": jdiff.__version__,
        })

    init_fn = jax.jit(functools.partial(init_train_state, model, tx, image_shape, config.seed), out_shardings=rep)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), jax.eval_shape(init_fn))
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoint)
    try:
        return _run(config, ckpt, mesh, source, model, schedule, init_fn, abstract, num_classes, image_shape,
                    stop_after=stop_after, batch_hook=batch_hook, progress=progress and primary, log=log,
                    primary=primary)
    finally:
        ckpt.close()  # waits for asynchronous saves: a finished checkpoint is never lost


def _run(config, ckpt, mesh, source, model, schedule, init_fn, abstract, num_classes, image_shape, *,
         stop_after, batch_hook, progress, log, primary) -> TrainResult:
    from jdiff.data import iterate_batches

    workdir, end = config.workdir, config.steps
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(abstract, latest)
        if int(state.step) != latest:
            raise CheckpointError(f"checkpoint {latest} in {ckpt.directory} holds step {int(state.step)}")
        log(f"resumed from checkpoint step {latest} in {ckpt.directory}")
    else:
        state = init_fn()
    start = int(state.step)
    stop_at = end if stop_after is None else min(end, start + stop_after)
    log(f"jdiff: {config.model} ({_count_params(state.params) / 1e6:.2f}M params) on {config.dataset} "
        f"({len(source)} images {image_shape}, {num_classes or 'no'} classes), {mesh.devices.size} device(s), "
        f"batch {config.batch_size}, steps {start} -> {end}, workdir {workdir}")

    finite_fn = jax.jit(tree_all_finite)
    rep = mesh_lib.replicated(mesh)
    last_ckpt = latest
    written_sample = None

    def check_finite(acc, state, step: int) -> None:
        bad = int(acc["first_bad"])
        if bad >= 0:
            ckpt.wait()
            raise NonFiniteLossError(bad, last_ckpt)
        if not bool(finite_fn(state)):
            ckpt.wait()
            raise NonFiniteLossError(step, last_ckpt, what="parameters/optimizer state")

    def save(acc, state, step: int) -> None:
        nonlocal last_ckpt
        if step == last_ckpt:
            return
        check_finite(acc, state, step)  # never write a bad state
        ckpt.save(step, state)
        last_ckpt = step

    def write_samples(state, step: int) -> Optional[str]:
        if not primary or config.num_samples == 0:
            return None
        params = mesh_lib.local_copy(state.ema_params)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLE_SEED_SALT)
        images = generate(model, schedule_local, params, config, image_shape, key, num_classes)
        grid = image_grid(images, columns=config.sample_columns, upscale=config.sample_upscale)
        return save_png(grid, sample_path(workdir, step))

    schedule_local = mesh_lib.local_copy(schedule)
    if start >= end:
        log(f"already trained to step {start} (steps={end}); nothing to do")
        if not os.path.exists(sample_path(workdir, start)):
            written_sample = write_samples(state, start)
        return TrainResult(start, None, last_ckpt, written_sample)

    step_fn = make_step_fn(model, config, mesh)
    acc = jax.device_put(init_accumulator(), rep)
    writer = MetricsWriter(workdir, enabled=primary)
    batches = iterate_batches(source, start_step=start, global_batch_size=config.batch_size, seed=config.seed,
                              num_steps=stop_at - start, random_flip=config.random_flip,
                              sharding=mesh_lib.batch_sharding(mesh), prefetch=2)
    bar = _progress(end, start, False)  # replaced by a live bar once the step has compiled
    stopped_by = None
    t_window, n_window, t_start = time.perf_counter(), 0, time.perf_counter()
    done = start
    try:
        with catch_signals(StopFlag()) as flag:
            for step in range(start, stop_at):
                batch = next(batches)
                if batch_hook is not None:
                    batch = batch_hook(step, batch)
                state, acc = step_fn(state, batch, schedule, acc)
                done = step + 1
                n_window += 1
                if step == start:  # one-time compile: time it separately, then start the progress bar
                    jax.block_until_ready(acc)
                    log(f"compiled the train step in {time.perf_counter() - t_start:.1f}s")
                    t_window, n_window = time.perf_counter(), 0
                    bar = _progress(end, start, progress)
                bar.update(1)
                if done % config.log_every == 0 or done == stop_at or flag.requested:
                    acc, t_window, n_window = _log(acc, done, t_window, n_window, config, writer, bar, ckpt)
                if config.checkpoint_every and done % config.checkpoint_every == 0:
                    save(acc, state, done)
                if config.sample_every and done % config.sample_every == 0 and done != end:
                    written_sample = write_samples(state, done)
                if flag.requested:
                    stopped_by = flag.reason
                    break
            else:
                if stop_at < end:
                    stopped_by = "stop_after"
        save(acc, state, done)
        ckpt.wait()
        if stopped_by is None:
            written_sample = write_samples(state, done)
            log(f"finished {done} steps in {time.perf_counter() - t_start:.1f}s; checkpoint {done}"
                + (f", samples {written_sample}" if written_sample else ""))
        else:
            log(f"stopped by {stopped_by} at step {done}: saved checkpoint {done} in {ckpt.directory}")
        return TrainResult(done, stopped_by, last_ckpt, written_sample)
    finally:
        batches.close()
        bar.close()
        writer.close()


def _log(acc, done, t_window, n_window, config, writer, bar, ckpt):
    """Fetches the window's metric sums, raises on a non-finite loss, writes a record, resets the window."""
    host = jax.device_get(acc)
    if int(host["first_bad"]) >= 0:
        ckpt.wait()
        raise NonFiniteLossError(int(host["first_bad"]), ckpt.latest_step())
    now = time.perf_counter()
    count = max(int(host["count"]), 1)
    dt = max(now - t_window, 1e-9)
    rec = {
        "step": done,
        "loss": float(host["loss"]) / count,
        "mse": float(host["mse"]) / count,
        "grad_norm": float(host["grad_norm"]) / count,
        "lr": float(host["lr"]),
        "steps_per_sec": n_window / dt if n_window else None,
        "images_per_sec": n_window * config.batch_size / dt if n_window else None,
        "time": time.time(),
    }
    writer.write(rec)
    post = {"loss": f"{rec['loss']:.4f}"}
    if rec["images_per_sec"]:
        post["img/s"] = f"{rec['images_per_sec']:.0f}"
    bar.set_postfix(post, refresh=False)
    if bar.disable and writer.enabled:
        print(f"step {done}: loss {rec['loss']:.4f}"
              + (f", {rec['steps_per_sec']:.2f} steps/s" if rec["steps_per_sec"] else ""), file=sys.stderr)
    new_acc = jax.device_put(init_accumulator(), acc["count"].sharding)
    return new_acc, now, 0
