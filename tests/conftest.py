"""Shared test setup: 8 virtual CPU devices (set before anything imports jax) and tiny training fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent XLA compilation cache for the whole session: the pytest-xdist workers and the train.py /
# sample.py subprocesses inherit it from this (controller) process, so the tiny models' train steps and
# samplers, compiled again by many tests, are compiled once (a third less CPU on test_train_checkpoint.py
# alone). Tests of the cache itself pass their own --cache-dir.
_SESSION_CACHE = None  # the cache directory this process made (the controller's; workers inherit it)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jdiff-tests-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_unconfigure(config):
    """Removes the session's compilation cache (only in the process that made it, after the workers ended)."""
    if _SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A U-Net small enough to compile in seconds: one level, 8 channels, no attention.
TINY_MODEL = {"ch": 8, "ch_mult": (1,), "num_res_blocks": 1, "attention_resolutions": (), "norm_groups": 4}
TINY_FLAGS = [
    "--model.ch",
    "8",
    "--model.ch_mult",
    "(1,)",
    "--model.num_res_blocks",
    "1",
    "--model.attention_resolutions",
    "()",
    "--model.norm_groups",
    "4",
    "--optim.batch_size",
    "8",
    "--diffusion.num_timesteps",
    "100",
    "--run.log_every",
    "2",
    "--optim.warmup_steps",
    "2",
    "--sampling.num_samples",
    "4",
    "--sampling.columns",
    "4",
    "--sampling.steps",
    "2",
    "--no_progress",
]


def make_tiny_config(workdir, **overrides):
    """The digits TrainConfig with the tiny U-Net: 4 steps of batch 8, T=100, checkpoints every 2. Overrides
    are dotted config keys: make_tiny_config(wd, **{"optim.steps": 6})."""
    from jdiff.config import apply_overrides, get_preset

    base = {
        "model.fields": dict(TINY_MODEL),
        "optim.batch_size": 8,
        "optim.steps": 4,
        "diffusion.num_timesteps": 100,
        "optim.warmup_steps": 2,
        "optim.lr": 1e-3,
        "run.log_every": 2,
        "run.checkpoint_every": 2,
        "run.keep_checkpoints": 10,
        "sampling.every": 0,
        "sampling.num_samples": 0,
        "sampling.steps": 2,
        "run.workdir": str(workdir),
    }
    return apply_overrides(get_preset("digits"), [*base.items(), *overrides.items()])


def with_changes(config, **overrides):
    """`config` with dotted config keys changed: with_changes(config, **{"optim.steps": 6})."""
    from jdiff.config import apply_overrides

    return apply_overrides(config, overrides.items())


def write_random_run(workdir, config, num_classes=None, image_shape=(8, 8, 1)):
    """A run directory without training: config.json and a step-0 checkpoint of random weights filled from the
    abstract TrainState (so that no init program compiles). Returns (model, state)."""
    import jax
    import numpy as np

    from jdiff.run import Checkpointer, build_model, save_run_config
    from jdiff.training import init_train_state, make_optimizer

    save_run_config(workdir, config, {"num_classes": num_classes, "image_shape": list(image_shape)})
    model = build_model(config, num_classes)
    abstract = jax.eval_shape(lambda: init_train_state(model, make_optimizer(config.optim), tuple(image_shape), 0))
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda a: (
            (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)
            if np.issubdtype(a.dtype, np.floating)
            else np.zeros(a.shape, a.dtype)
        ),
        abstract,
    )
    with Checkpointer(workdir, async_save=False) as ck:
        ck.save(0, state)
    return model, state


@pytest.fixture
def tiny_config(tmp_path):
    """Factory of tiny configs in a fresh workdir: tiny_config(workdir=None, **overrides) (see make_tiny_config)."""

    def make(workdir=None, **overrides):
        return make_tiny_config(workdir or tmp_path / "run", **overrides)

    return make


def shared_once(tmp_path_factory, name, build):
    """A directory built once per test session by `build(path)`, shared by every pytest-xdist worker (an
    flock serialises the builders; later callers reuse the result). Callers must not modify it: copy it."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's common temp dir
    path, done = root / f"shared_{name}", root / f"shared_{name}.done"
    with open(root / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            path.mkdir(exist_ok=True)
            build(path)
            done.touch()
    return path


def start_train_py(args, *, cwd, devices=2, env=None):
    """Starts train.py in a subprocess on `devices` virtual CPU devices (text pipes for stdout/stderr); `env`:
    more environment variables."""
    import subprocess

    env = dict(
        os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {})
    )
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_train_py(args, *, cwd, timeout=240, env=None):
    """Runs train.py in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")  # sharded, but cheap to compile
    e.update(env or {})
    e.setdefault("PYTHONPATH", str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e
    )


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """`python train.py` on the embedded digits: 4 steps, checkpoints every 2, the last 2 kept (run once per
    session and shared by the xdist workers; tests that change it work on a copy)."""

    def build(root):
        flags = ["--optim.steps", "4", "--run.checkpoint_every", "2", "--run.keep_checkpoints", "2"]
        r = run_train_py([*TINY_FLAGS, *flags, "--run.workdir", str(root / "run")], cwd=root)
        assert r.returncode == 0, r.stderr

    return shared_once(tmp_path_factory, "cli_run", build) / "run"
