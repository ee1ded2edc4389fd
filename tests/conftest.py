"""Shared test setup: 8 virtual CPU devices (set before anything imports jax) and tiny training fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A U-Net small enough to compile in seconds: one level, 8 channels, no attention.
TINY_MODEL = {"ch": 8, "ch_mult": (1,), "num_res_blocks": 1, "attention_resolutions": (), "norm_groups": 4}
TINY_FLAGS = [
    "--model.ch", "8", "--model.ch_mult", "(1,)", "--model.num_res_blocks", "1",
    "--model.attention_resolutions", "()", "--model.norm_groups", "4",
    "--batch_size", "8", "--num_timesteps", "100", "--log_every", "2", "--warmup_steps", "2",
    "--num_samples", "4", "--sample_columns", "4", "--sample_steps", "2", "--no_progress",
]


def make_tiny_config(workdir, **overrides):
    """A validated digits TrainConfig with the tiny U-Net: 4 steps of batch 8, T=100, checkpoints every 2."""
    from jdiff.training.config import get_preset, replace_fields, validate

    base = dict(
        model_overrides=dict(TINY_MODEL), batch_size=8, steps=4, num_timesteps=100, warmup_steps=2,
        lr=1e-3, log_every=2, checkpoint_every=2, keep_checkpoints=10, sample_every=0, num_samples=0,
        sample_steps=2, workdir=str(workdir),
    )
    base.update(overrides)
    return validate(replace_fields(get_preset("digits"), base))


@pytest.fixture
def tiny_config(tmp_path):
    """Factory of tiny configs in a fresh workdir: tiny_config(workdir=None, **overrides) (see make_tiny_config)."""

    def make(workdir=None, **overrides):
        return make_tiny_config(workdir or tmp_path / "run", **overrides)

    return make


def run_train_py(args, *, cwd, timeout=240, env=None):
    """Runs train.py in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONPATH", str(REPO))
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=e)
