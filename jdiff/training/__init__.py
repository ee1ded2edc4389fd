"""Training: the train state with EMA, the optimizer, the pure sharded train step, the setup of a run and
the loop of periodic actions (`train`). Configs live in `jdiff.config`, the run infrastructure shared with
sampling (mesh, checkpoints, config.json, image writing) in `jdiff.run`."""

from jdiff.training.loop import ACTIONS, Loop, NonFiniteLossError, TrainResult, train
from jdiff.training.loss import make_loss, training_loss
from jdiff.training.optim import ema_decay_at, ema_update, lr_schedule, make_optimizer
from jdiff.training.setup import Setup, setup, train_step_args
from jdiff.training.state import TrainState, create_state, init_train_state
from jdiff.training.step import make_step_fn, train_step

__all__ = [
    "train",
    "TrainResult",
    "NonFiniteLossError",
    "Loop",
    "ACTIONS",
    "Setup",
    "setup",
    "train_step_args",
    "make_loss",
    "training_loss",
    "TrainState",
    "create_state",
    "init_train_state",
    "train_step",
    "make_step_fn",
    "make_optimizer",
    "lr_schedule",
    "ema_update",
    "ema_decay_at",
]
