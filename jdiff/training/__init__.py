"""Training: config and presets, train state, optimizer/EMA, the pure train step, data-parallel mesh,
orbax checkpoints, the loop (`train`) and `load_for_inference`.

Heavy modules (orbax, the loop) are imported on first use of their names.
"""

from jdiff.training.config import PRESETS, ConfigError, TrainConfig, get_preset, replace_fields, validate
from jdiff.training.optim import ema_decay_at, ema_update, lr_schedule, make_optimizer
from jdiff.training.state import TrainState, create_state, init_train_state
from jdiff.training.step import train_step

_LAZY = {
    "train": "jdiff.training.loop",
    "TrainResult": "jdiff.training.loop",
    "NonFiniteLossError": "jdiff.training.loop",
    "Checkpointer": "jdiff.training.checkpoint",
    "CheckpointError": "jdiff.training.checkpoint",
    "load_for_inference": "jdiff.training.checkpoint",
    "resolve_config": "jdiff.training.run_config",
    "make_mesh": "jdiff.training.mesh",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jdiff.training' has no attribute {name!r}")


__all__ = [
    "TrainConfig", "PRESETS", "get_preset", "replace_fields", "validate", "ConfigError",
    "TrainState", "create_state", "init_train_state", "train_step",
    "make_optimizer", "lr_schedule", "ema_update", "ema_decay_at", *_LAZY,
]
