"""The training loop: set up (`jdiff.training.setup`), then step, and after each step run the periodic
actions (log metrics, save a checkpoint, write a preview grid). Before each step the processes agree whether
to stop (`jdiff.training.stops`: a SIGTERM/SIGINT or an unreadable batch on any process stops all of them at
that step, with one checkpoint); `stop_after` ends the call after that many steps. Adding a periodic action
(an evaluation, say) is one function `action(loop)` that returns early unless `loop.due(every)`, passed in
`train(..., actions=ACTIONS + (action,))`.

The hot loop never waits for the device except every `run.log_every` steps (metrics are summed on device),
before a checkpoint (finiteness check), before a preview grid and, with several processes, at the stop vote
of each step.
"""

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jdiff.config import TrainConfig
from jdiff.models import tree_size
from jdiff.run import (
    Checkpointer,
    Generator,
    Settings,
    auto_batch,
    check_same_run,
    image_grid,
    labels_for,
    local_copy,
    replicated,
    sample_path,
    save_png,
    save_run_config,
    workdir_lock,
)
from jdiff.run.build import TOKENIZER_DIR
from jdiff.signals import SignalCatcher, StopFlag, signal_point
from jdiff.training.evaluate import evaluate_bpd
from jdiff.training.fid import evaluate_fid
from jdiff.training.metrics_log import MetricsWriter
from jdiff.training.setup import Setup, setup
from jdiff.training.state import TrainState, tree_all_finite
from jdiff.training.step import init_accumulator
from jdiff.training.stops import PeerDataError, Stop, StopVote

PREVIEW_SEED_SALT = 0x5EED  # preview grids use seed run.seed + this, apart from the training noise
_all_finite = jax.jit(tree_all_finite)


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss/gradient/state; nothing after the last good checkpoint was saved."""

    def __init__(self, step: int, last_checkpoint: Optional[int], what: str = "loss"):
        self.step = step
        self.last_checkpoint = last_checkpoint
        good = (
            f"the last good checkpoint is step {last_checkpoint}"
            if last_checkpoint is not None
            else "no checkpoint was written"
        )
        super().__init__(f"non-finite {what} at step {step}; stopped without saving the bad state ({good})")


@dataclasses.dataclass
class TrainResult:
    """What a `train` call did: final step, why it stopped, last checkpoint and sample grid written."""

    step: int
    stopped_by: Optional[str]  # None (finished), "SIGTERM", "SIGINT" or "stop_after"
    last_checkpoint: Optional[int]
    sample_path: Optional[str]


@dataclasses.dataclass
class Loop:
    """What the periodic actions see and update. `done` steps have been taken; `acc` holds the device-side
    metric sums of the current logging window."""

    setup: Setup
    ckpt: Checkpointer
    state: TrainState
    acc: Any
    done: int
    stop_at: int
    last_checkpoint: Optional[int]
    writer: MetricsWriter
    primary: bool
    log: Callable[[str], None]
    bar: Any = None
    stopping: bool = False  # the run stops after this step (every process agreed)
    logged_at: int = -1  # the step of the last metrics record
    sample_path: Optional[str] = None
    window: tuple[float, int] = (0.0, 0)  # (start time, steps) of the throughput window
    waited: float = 0.0  # seconds of the window spent waiting for the next batch (input pipeline)
    _generator: Optional[Generator] = None
    cache: dict = dataclasses.field(default_factory=dict)  # the periodic actions' own state (compiled evaluations)

    @property
    def config(self) -> TrainConfig:
        return self.setup.config

    def due(self, every: int) -> bool:
        """Whether an action with period `every` (0: never) runs after this step."""
        return bool(every) and self.done % every == 0

    def stop_on_bad_loss(self, first_bad: int) -> None:
        """Raises NonFiniteLossError when the logging window recorded a non-finite loss at step first_bad (>= 0),
        after pending saves finish (so the last good checkpoint it names is on disk)."""
        if first_bad >= 0:
            self.ckpt.wait()
            raise NonFiniteLossError(first_bad, self.last_checkpoint)

    def check_finite(self) -> None:
        """Raises NonFiniteLossError if the window saw a non-finite loss or the state is not finite."""
        self.stop_on_bad_loss(int(self.acc["first_bad"]))
        if not bool(_all_finite(self.state)):
            self.ckpt.wait()
            raise NonFiniteLossError(self.done, self.last_checkpoint, what="parameters/optimizer state")

    def save(self) -> None:
        """Checkpoints the current state (once per step; never a non-finite one)."""
        if self.done == self.last_checkpoint:
            return
        self.check_finite()
        self.ckpt.save(self.done, self.state)
        self.last_checkpoint = self.done

    def preview(self) -> Optional[str]:
        """Writes a grid drawn from the EMA parameters on this host's devices (primary host only; every host
        calls it, since gathering fsdp-sharded parameters is a collective)."""
        c = self.config
        if c.sampling.num_samples == 0:
            return None
        ema = local_copy(self.state.ema_params)
        if not self.primary:
            return None
        s = self.setup
        if self._generator is None:
            settings = Settings(
                sampler=c.sampling.sampler,
                steps=c.sampling.steps,
                spacing=c.sampling.spacing,
                options=dict(c.sampling.options),
                guidance=c.sampling.guidance_scale,
            )
            devices = jax.local_devices()
            batch = auto_batch(c.sampling.num_samples, len(devices))
            tokenizer = None if s.text is None else s.text.tokenizer
            self._generator = Generator.from_run(  # latent runs (data.vae) decode through the run's VAE
                s.run_info(), settings, batch=batch, devices=devices, model=s.model, vae=s.vae, tokenizer=tokenizer
            )
        if s.text is None:
            labels = labels_for(c.sampling.num_samples, s.num_classes)
        else:  # a text run: the captions of the first training examples
            labels = s.source.tokenize(s.source.captions(np.arange(c.sampling.num_samples) % len(s.source)))
        seed = c.run.seed + PREVIEW_SEED_SALT
        images, _, _ = self._generator.draw(ema, c.sampling.num_samples, seed=seed, labels=labels)
        grid = image_grid(images, columns=c.sampling.columns, upscale=c.sampling.upscale)
        self.sample_path = save_png(grid, sample_path(c.run.workdir, self.done))
        return self.sample_path


# ---------------------------------------------------------------------------------------------------
# Periodic actions: each runs after every step and returns unless it is due.


def log_metrics(loop: Loop) -> None:
    """Every run.log_every steps (and at a stop): fetches the window's metric sums, raises on a non-finite
    loss, appends a record to metrics.jsonl, updates the progress bar, resets the window."""
    if not (loop.due(loop.config.run.log_every) or loop.done == loop.stop_at or loop.stopping):
        return
    host = jax.device_get(loop.acc)
    loop.stop_on_bad_loss(int(host["first_bad"]))
    now = time.perf_counter()
    t0, n = loop.window
    count, dt = max(int(host["count"]), 1), max(now - t0, 1e-9)
    rec = {
        "step": loop.done,
        "loss": float(host["loss"]) / count,
        "mse": float(host["mse"]) / count,
        "grad_norm": float(host["grad_norm"]) / count,
        "lr": float(host["lr"]),
        "steps_per_sec": n / dt if n else None,
        "images_per_sec": n * loop.config.optim.batch_size / dt if n else None,
        "input_wait_share": min(loop.waited / dt, 1.0) if n else None,  # > 0.1 or so: input-bound
        "time": time.time(),
    }
    loop.writer.write(rec)
    loop.logged_at = loop.done
    post = {"loss": f"{rec['loss']:.4f}"}
    if rec["images_per_sec"]:
        post["img/s"] = f"{rec['images_per_sec']:.0f}"
    loop.bar.set_postfix(post, refresh=False)
    if loop.bar.disable and loop.writer.enabled:
        rate = f", {rec['steps_per_sec']:.2f} steps/s" if rec["steps_per_sec"] else ""
        print(f"step {loop.done}: loss {rec['loss']:.4f}{rate}", file=sys.stderr)
    loop.acc = jax.device_put(init_accumulator(), loop.acc["count"].sharding)
    loop.window, loop.waited = (now, 0), 0.0


def save_checkpoint(loop: Loop) -> None:
    """Every run.checkpoint_every steps."""
    if loop.due(loop.config.run.checkpoint_every):
        loop.save()


def write_preview(loop: Loop) -> None:
    """Every sampling.every steps, except the last (the final grid is written when the run finishes)."""
    if loop.due(loop.config.sampling.every) and loop.done != loop.config.optim.steps:
        loop.preview()


ACTIONS: tuple[Callable[[Loop], None], ...] = (log_metrics, save_checkpoint, write_preview, evaluate_bpd, evaluate_fid)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0,
        smoothing=0.1,
        file=sys.stderr,
    )


def train(
    config: TrainConfig,
    *,
    devices: Optional[Sequence[Any]] = None,
    stop_after: Optional[int] = None,
    batch_hook: Optional[Callable[[int, dict], dict]] = None,
    actions: Sequence[Callable[[Loop], None]] = ACTIONS,
    stop: Optional[StopFlag] = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    build: Callable[..., Setup] = setup,
) -> TrainResult:
    """Trains (or resumes) the run described by `config` in `config.run.workdir`.

    Args:
      config: the run's config (see `jdiff.cli.train.resolve_config` for the resume rules).
      devices: devices of the data-parallel mesh (default: all).
      stop_after: stop (with a checkpoint) after this many steps of this call, as if preempted.
      batch_hook: (step, global batch) -> batch, applied before the step (tests: inject NaNs).
      actions: the periodic actions run after every step, in order.
      stop: a flag that SIGTERM/SIGINT handlers set (a command line installs them at its start, so that an
        interrupt during start-up is not lost); None: `train` installs its own for the whole call. A stop
        requested before the first step ends the call before training; after, at the end of the step.
      progress: show a tqdm progress bar.
      log: receives one-line status messages.
      build: (config, devices) -> the run's `Setup` (default `setup`; distillation: `jdiff.training.distill`).

    Raises:
      NonFiniteLossError, CheckpointError, ConfigError (bad dataset/model settings), ValueError.
    """
    signal_point("setup")
    s = build(config, devices)
    primary = jax.process_index() == 0
    workdir = config.run.workdir
    with contextlib.ExitStack() as stack:  # closed in reverse: metrics, checkpoints (waits for saves), lock
        stop = stop if stop is not None else stack.enter_context(SignalCatcher(StopFlag()))
        if primary:
            stack.enter_context(workdir_lock(workdir))
            check_same_run(workdir, config, s.derived())  # never written over another run's config.json
            save_run_config(workdir, config, s.derived())
            if s.text is not None:  # sample.py and export read the run's tokenizer from here
                s.text.tokenizer.save(os.path.join(workdir, TOKENIZER_DIR))
        ckpt = stack.enter_context(
            Checkpointer(workdir, keep=config.run.keep_checkpoints, async_save=config.run.async_checkpoint)
        )
        state = s.restore_or_init(ckpt, log)
        start, end = int(state.step), config.optim.steps
        log(
            f"jdiff: {config.model.name} ({tree_size(state.params) / 1e6:.2f}M params) on {config.data.dataset} "
            f"({len(s.source)} images {s.image_shape}, {s.num_classes or 'no'} classes), {s.mesh.devices.size} "
            f"device(s), batch {config.optim.batch_size}, steps {start} -> {end}, workdir {workdir}"
        )
        writer = MetricsWriter(workdir, enabled=primary and start < end, after_step=start)
        stack.callback(writer.close)
        acc = jax.device_put(init_accumulator(), replicated(s.mesh))
        stop_at = end if stop_after is None else min(end, start + stop_after)
        loop = Loop(
            s,
            ckpt,
            state,
            acc,
            done=start,
            stop_at=stop_at,
            last_checkpoint=ckpt.latest_step(),
            writer=writer,
            primary=primary,
            log=log,
        )
        if start >= end:
            log(f"already trained to step {start} (steps={end}); nothing to do")
            if not os.path.exists(sample_path(workdir, start)):
                loop.preview()
            return TrainResult(start, None, loop.last_checkpoint, loop.sample_path)
        if not stop.requested:
            t0 = time.perf_counter()
            signal_point("compile")
            _, memory = s.compile_step()  # jit keeps the executable for the first step
            log(f"compiled the train step in {time.perf_counter() - t0:.1f}s; {memory.line()}")
        return _run(loop, actions, batch_hook, progress and primary, stop)


def _next_batch(batches) -> tuple[Any, Optional[Exception]]:
    """(the next batch, None), or (None, the exception) when this process cannot read it (an unreadable file,
    say): the error is raised once every process has agreed to stop and the steps taken are saved."""
    try:
        return next(batches), None
    except Exception as e:  # noqa: BLE001 - re-raised after the agreed stop and save
        return None, e


def _run(loop: Loop, actions, batch_hook, progress: bool, flag: StopFlag) -> TrainResult:
    start, end = loop.done, loop.config.optim.steps
    vote = StopVote()
    if flag.requested and vote.count == 1:  # during start-up: nothing new to save (several processes: voted below)
        loop.log(f"stopped by {flag.reason} before the first step (step {start})")
        return TrainResult(start, flag.reason, loop.last_checkpoint, None)
    batches = loop.setup.batches(start, loop.stop_at - start)
    loop.bar = _progress(end, start, False)  # replaced by a live bar once the step has compiled
    stopped_by = "stop_after" if loop.stop_at < end else None
    agreed: Optional[Stop] = None
    error: Optional[Exception] = None
    t_start = time.perf_counter()
    try:
        for step in range(start, loop.stop_at):
            t_wait = time.perf_counter()
            batch, error = _next_batch(batches)
            loop.waited += time.perf_counter() - t_wait
            agreed = vote(step, flag.reason, error is not None)  # every process stops at the same step
            if agreed is not None:
                break
            if batch_hook is not None:
                batch = batch_hook(step, batch)
            loop.state, loop.acc = loop.setup.step_fn(loop.state, batch, loop.setup.schedule, loop.acc)
            loop.done = step + 1
            loop.window = (loop.window[0], loop.window[1] + 1)
            if step == start:  # the first step (and its data) timed apart, then the progress bar starts
                jax.block_until_ready(loop.acc)
                loop.log(f"first step in {time.perf_counter() - t_start:.1f}s")
                loop.window, loop.waited = (time.perf_counter(), 0), 0.0
                loop.bar = _progress(end, start, progress)
            loop.bar.update(1)
            for action in actions:
                action(loop)
        where = f" (on process {agreed.process})" if agreed is not None and vote.count > 1 else ""
        if agreed is not None and agreed.reason != "data":
            stopped_by = agreed.reason
            if loop.done == start:
                loop.log(f"stopped by {stopped_by}{where} before the first step (step {start})")
                return TrainResult(start, stopped_by, loop.last_checkpoint, None)
        if agreed is not None and loop.done > start and loop.logged_at != loop.done:
            loop.stopping = True  # the metrics of the last window
            log_metrics(loop)
        loop.save()
        loop.ckpt.wait()
        if agreed is not None and agreed.reason == "data":
            if error is not None:
                raise error
            raise PeerDataError(
                f"process {agreed.process} could not read its batch for step {agreed.step} (its log names the "
                f"file); every process stopped at step {loop.done} with a checkpoint"
            )
        if stopped_by is None:
            loop.preview()
            loop.log(
                f"finished {loop.done} steps in {time.perf_counter() - t_start:.1f}s; checkpoint {loop.done}"
                + (f", samples {loop.sample_path}" if loop.sample_path else "")
            )
        else:
            loop.log(
                f"stopped by {stopped_by}{where} at step {loop.done}: saved checkpoint {loop.done} in "
                f"{loop.ckpt.directory}"
            )
        return TrainResult(loop.done, stopped_by, loop.last_checkpoint, loop.sample_path)
    finally:
        batches.close()
        loop.bar.close()
