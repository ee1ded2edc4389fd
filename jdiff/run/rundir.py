"""A run directory's config.json: the resolved `TrainConfig` plus facts derived from the data (label
count, image shape), written once by training and read once by everything that loads the run."""

import contextlib
import dataclasses
import fcntl
import json
import os
from typing import Any, Mapping, Optional

from jdiff._logs import one_line
from jdiff.config import ConfigError, TrainConfig, from_dict, to_dict

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"


class RunError(ValueError):
    """A run directory that is missing, unreadable or in use (its checkpoints: `CheckpointError`, a subclass);
    the message is one readable line."""


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What config.json says about a run: its config, and the image shape and label count of its data."""

    workdir: str
    config: TrainConfig
    image_shape: tuple[int, int, int]
    num_classes: Optional[int]
    derived: Mapping[str, Any]


def save_run_config(workdir: str, config: TrainConfig, derived: Mapping[str, Any]) -> str:
    """Writes workdir/config.json atomically: {"config": {...}, "derived": {...}}. Returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = config_path(workdir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"config": to_dict(config), "derived": dict(derived)}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def check_same_run(workdir: str, config: TrainConfig, derived: Mapping[str, Any]) -> None:
    """RunError (one line) before `config` is written over workdir/config.json of another run: a field that
    fixes the model or data differs from the saved config (with or without a checkpoint: a run killed before
    its first save is still that run), or, once the run has a checkpoint, its VAE (data.vae) holds other
    weights or config than the recorded ``vae_fingerprint``. Nothing to check when there is no config.json."""
    from jdiff.config.keys import fixed_conflicts
    from jdiff.run.checkpoint import has_checkpoint

    path = config_path(workdir)
    if not os.path.isfile(path):
        return
    try:
        saved, saved_derived = load_run_config(path)
    except (ConfigError, OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({one_line(e)}); remove it or choose another workdir") from None
    conflicts = fixed_conflicts(saved, config)
    if conflicts:
        raise RunError(
            f"{os.path.abspath(workdir)} holds another run's config.json ({'; '.join(conflicts)}); resume it with "
            "its settings or choose a new run.workdir"
        )
    was, now = saved_derived.get("vae_fingerprint"), derived.get("vae_fingerprint")
    if was and now != was and has_checkpoint(workdir):
        raise RunError(
            f"data.vae {config.data.vae} holds another VAE than the one this run was trained with (fingerprint "
            f"{str(now)[:19]} != recorded {was[:19]}); restore that VAE or start a new run"
        )


def load_run_config(path: str) -> tuple[TrainConfig, dict[str, Any]]:
    """(config, derived) from a config.json written by `save_run_config`; ConfigError if it is malformed."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path} has no 'config' object")
    return from_dict(data["config"]), dict(data.get("derived", {}))


def open_run(workdir: str) -> RunInfo:
    """Reads workdir/config.json; RunError if it is missing or bad."""
    path = config_path(workdir)
    if not os.path.isfile(path):
        raise RunError(f"no config.json in {os.path.abspath(workdir)} (not a jdiff training run?)")
    try:
        config, derived = load_run_config(path)
        shape = tuple(int(d) for d in derived["image_shape"])
        num_classes = derived.get("num_classes")
    except (ConfigError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"bad {path}: {one_line(e)}") from None
    return RunInfo(workdir, config, shape, None if num_classes is None else int(num_classes), derived)


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds an exclusive lock on the run directory while the block runs, so that two training processes
    never write one run. It is an OS lock (flock on workdir/.lock, holding the owner's pid): the OS releases it
    when its holder exits or is killed, so a kill -9 never leaves a stale lock. RunError naming the other
    process if the lock is taken."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(
                f"{os.path.abspath(workdir)} is in use by another training process (pid {other}); "
                "wait for it to finish or stop it, or choose another --run.workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
