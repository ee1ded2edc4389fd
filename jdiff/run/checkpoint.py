"""Checkpoints of the `TrainState` with orbax, and loading a trained model for inference.

Layout: <workdir>/checkpoints/<step>/default/... (orbax), <workdir>/config.json. The data position is the
step itself (batches are a pure function of (seed, step)), so the state is all that is saved.
Restoring uses an abstract target (shapes, dtypes and the *current* mesh's shardings), so a checkpoint
written on N devices restores onto M devices, and optax namedtuples come back as namedtuples.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Optional

import jax
import numpy as np

from jdiff._logs import one_line, quiet_absl
from jdiff.run.integrity import checksum_path, mismatches, read_checksums, tree_checksums, write_checksums
from jdiff.run.rundir import RunError, RunInfo, open_run

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RunError):
    """A missing, corrupted or incompatible checkpoint of a run; the message is one readable line."""


def _ocp():
    import orbax.checkpoint as ocp  # local: importing orbax is slow and noisy

    return ocp


def _orbax_reason(e: BaseException) -> str:
    """The readable head of an orbax/tensorstore error (without the JSON spec it appends); for a failed file
    operation, the operating system's reason (e.g. "No space left on device") and the checkpoint it hit."""
    text = one_line(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        step = re.search(r"[/\\](\d+)\.orbax-checkpoint-tmp", text)
        where = f" (writing checkpoint {step.group(1)})" if step else ""
        return f"{os.strerror(int(code.group(1)))}{where}"
    return one_line(e, 300).split(" [tensorstore_spec", 1)[0]


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a finished checkpoint (a step directory; orbax's temporary ones do not count)."""
    d = checkpoint_dir(workdir)
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


class Checkpointer:
    """Saves / restores one `TrainState` pytree per step with an orbax CheckpointManager.

    Args:
      workdir: run directory; checkpoints go to workdir/checkpoints.
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread (the device-to-host copy is still synchronous, so the
        state may be donated to the next step right after `save` returns).
      create: create the directory (False: read only; a missing directory is a CheckpointError).
    """

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, create: bool = True):
        ocp = _ocp()
        self.workdir, self.directory = workdir, checkpoint_dir(workdir)
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        try:
            with quiet_absl(not create):  # orbax warns about every option that read-only mode turns off
                options = ocp.CheckpointManagerOptions(
                    max_to_keep=keep, create=create, enable_async_checkpointing=async_save, read_only=not create
                )
                self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001 - orbax raises many types; report one line
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {one_line(e, 300)}") from None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> bool:
        """Starts saving `state` as checkpoint `step` (a no-op if it exists), with the checksum of every array
        (`jdiff.run.integrity`) written first. Callers check finiteness."""
        ocp = _ocp()
        if step in self._manager.all_steps():
            return False
        sums = tree_checksums(state)
        with self._writing(step):
            if jax.process_index() == 0:
                write_checksums(self.workdir, step, sums, keep_steps=self.all_steps())
            return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    @contextlib.contextmanager
    def _writing(self, step: Optional[int] = None):
        """Turns a failed write (disk full, no permission; orbax reports it from its background thread at the
        next save or wait) into one CheckpointError line."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax and the OS raise many types
            what = f"checkpoint {step}" if step is not None else "a checkpoint"
            raise CheckpointError(f"cannot write {what} in {self.directory}: {_orbax_reason(e)}") from None

    def _corrupted(self, step: int, reason: str) -> CheckpointError:
        """The one-line error for an unreadable checkpoint `step`, naming the older one to fall back to; for
        arrays whose saved shapes differ from the model's, the mismatch (older checkpoints share it)."""
        shapes = re.search(r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))", reason)
        if shapes:
            return CheckpointError(
                f"checkpoint {os.path.join(self.directory, str(step))} does not match the model of the run's "
                f"config.json (a saved array of shape {shapes.group(2)} where the model has {shapes.group(1)}): "
                "config.json describes another model than the checkpoints"
            )
        older = [s for s in self.all_steps() if s < step]
        hint = f"; move it away to resume from checkpoint {older[-1]}" if older else ""
        return CheckpointError(
            f"checkpoint {os.path.join(self.directory, str(step))} is corrupted or does not match "
            f"this model/optimizer{hint} ({reason})"
        )

    def verify(self, tree: Any, step: int, prefix: str = "") -> Any:
        """`tree` (restored from checkpoint `step`; `prefix`: its path in the saved state, e.g. ".ema_params")
        if its arrays match their saved checksums and are finite, else CheckpointError."""
        sums = read_checksums(self.workdir, step)
        if sums is None:
            raise self._corrupted(step, f"its checksums {checksum_path(self.workdir, step)} are missing or unreadable")
        bad = mismatches(tree, sums, prefix)
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise self._corrupted(step, f"checksum mismatch in {bad[0]}{more}")
        return tree

    def resolve_step(self, step: Optional[int] = None) -> int:
        """`step` if that checkpoint exists, the latest one for None; else CheckpointError."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (available: {self.all_steps()})")
        return step

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
        """Restores checkpoint `step` (default: latest) onto `abstract_state` (ShapeDtypeStructs with
        shardings). Raises CheckpointError if there is none or it cannot be read."""
        ocp = _ocp()
        step = self.resolve_step(step)
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # noqa: BLE001
            raise self._corrupted(step, _orbax_reason(e)) from None
        return self.verify(state, step)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk (CheckpointError if one failed)."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# Inference.


def load_params(
    run: RunInfo,
    *,
    step: Optional[int] = None,
    which: str = "ema",
    device: Any = None,
    model: Any = None,
    abstract: Any = None,
):
    """Loads a trained model for sampling: (model, schedule, params) of run `run` (see `jdiff.run.open_run`),
    restoring only the requested parameters from disk.

    Args:
      step: checkpoint step (default: latest).
      which: "ema" (the EMA parameters, what samples should use) or "params" (the raw parameters).
      device: where to put the parameters (default: jax.devices()[0]).
      model: the run's model if the caller has built it already (`jdiff.run.build_model`).
      abstract: its parameters' shapes if the caller has them already (`jdiff.models.abstract_params`), so the
        model is not traced a second time.

    Sample with `jdiff.sample(model.apply, schedule, shape, rng, params={"params": params},
    prediction=run.config.diffusion.prediction, ...)` or `jdiff.run.Generator`.
    Raises CheckpointError (one line) for a missing/corrupted checkpoint.
    """
    from jdiff.models import abstract_params
    from jdiff.run.build import build_run_model, build_schedule

    if which not in ("ema", "params"):
        raise ValueError(f"which must be 'ema' or 'params', got {which!r}")
    model = model or build_run_model(run)
    if abstract is None:
        abstract = abstract_params(model, (1, *run.image_shape), with_labels=model.num_classes is not None)
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    key = "ema_params" if which == "ema" else "params"
    params = restore_subtree(run.workdir, key, abstract, sharding, step=step)
    return model, build_schedule(run.config), params


def load_for_inference(workdir: str, *, step: Optional[int] = None, which: str = "ema", device: Any = None):
    """(config, model, schedule, params) of the training run in `workdir` (see `load_params`)."""
    run = open_run(workdir)
    return (run.config, *load_params(run, step=step, which=which, device=device))


def restore_subtree(workdir: str, key: str, abstract: Any, sharding: Any, *, step: Optional[int] = None) -> Any:
    """Restores only `state.<key>` (e.g. "ema_params") of a checkpoint, placed with `sharding`, and checks it
    against its saved checksums."""
    ocp = _ocp()
    with Checkpointer(workdir, create=False) as ckpt:
        step = ckpt.resolve_step(step)
        path = os.path.join(ckpt.directory, str(step), "default")
        item = {key: abstract}
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=a.shape, dtype=a.dtype), item
        )
        try:
            with ocp.PyTreeCheckpointer() as ck:
                args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
                tree = ck.restore(path, args=args)[key]
        except Exception as e:  # noqa: BLE001
            raise ckpt._corrupted(step, _orbax_reason(e)) from None
        shapes_ok = jax.tree.map(lambda a, b: tuple(np.shape(a)) == tuple(b.shape), tree, abstract)
        if not all(jax.tree.leaves(shapes_ok)):
            raise CheckpointError(
                f"checkpoint {os.path.dirname(path)} has parameter shapes that do not match the model"
            )
        return ckpt.verify(tree, step, prefix=f".{key}")
