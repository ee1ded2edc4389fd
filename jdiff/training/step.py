"""The pure training step: diffusion loss, gradients, optimizer update, EMA."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jdiff.config import TrainConfig
from jdiff.models import drop_labels
from jdiff.schedules import Schedule
from jdiff.training.objective import training_loss
from jdiff.training.optim import ema_update, lr_schedule, make_optimizer
from jdiff.training.state import TrainState


def train_step(
    state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module, schedule: Schedule, config: TrainConfig
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on a global batch.

    Args:
      state: the current state (step s).
      batch: {"image": float32 (B, H, W, C) in [-1, 1], "label": int32 (B,)}.
      model: Flax module called as model.apply({"params": p}, x, t, y, train=True, rngs={"dropout": k}).
      schedule: noise schedule (traced data).
      config: static settings (objective, weighting, label dropout, optimizer, EMA).

    The randomness of update s is fold_in(state.rng, s), split into the diffusion draw (t, noise), the
    dropout key and the label-dropout key, so no key is reused across steps and the draws over the global
    batch do not depend on how it is sharded.

    Returns:
      (state at step s + 1, metrics {"loss", "mse", "grad_norm" (before clipping), "lr"} float32 scalars).
    """
    tx = make_optimizer(config.optim)
    key = jax.random.fold_in(state.rng, state.step)
    diff_key, dropout_key, label_key = jax.random.split(key, 3)
    x0 = batch["image"].astype(jnp.float32)
    num_classes = getattr(model, "num_classes", None)
    labels = None
    if num_classes is not None:
        labels = drop_labels(label_key, batch["label"].astype(jnp.int32), config.data.label_dropout, num_classes)

    def loss_fn(params):
        def model_fn(x_t, t):
            return model.apply({"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_key})

        return training_loss(config.diffusion, model_fn, schedule, x0, diff_key)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, config.optim.ema_decay, config.optim.ema_warmup)
    metrics = {
        "loss": loss,
        "mse": aux["mse"],
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(lr_schedule(config.optim)(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new_state, metrics


# ---------------------------------------------------------------------------------------------------
# The compiled, sharded step used by the loop: metrics are summed on device between log points.


def init_accumulator() -> dict[str, jax.Array]:
    """Device-side metric sums over a logging window; first_bad = first step with a non-finite loss (-1)."""
    z = lambda: jnp.zeros((), jnp.float32)  # separate buffers: the dict is donated
    return {
        "loss": z(),
        "mse": z(),
        "grad_norm": z(),
        "lr": z(),
        "count": jnp.zeros((), jnp.int32),
        "first_bad": jnp.full((), -1, jnp.int32),
    }


def accumulate(acc: dict, metrics: dict, step: jax.Array) -> dict:
    """Adds one step's metrics; records `step` as first_bad if its loss is the first non-finite one."""
    bad = ~jnp.isfinite(metrics["loss"]) | ~jnp.isfinite(metrics["grad_norm"])
    return {
        "loss": acc["loss"] + metrics["loss"],
        "mse": acc["mse"] + metrics["mse"],
        "grad_norm": acc["grad_norm"] + metrics["grad_norm"],
        "lr": metrics["lr"],
        "count": acc["count"] + 1,
        "first_bad": jnp.where((acc["first_bad"] < 0) & bad, step, acc["first_bad"]),
    }


def make_step_fn(model: nn.Module, config: TrainConfig, mesh: Any) -> Any:
    """jit of (state, batch, schedule, acc) -> (state, acc): batch sharded over "data", the rest
    replicated; state and acc are donated."""
    from jdiff.run.mesh import batch_sharding, replicated

    def fn(state, batch, schedule, acc):
        new_state, metrics = train_step(state, batch, model=model, schedule=schedule, config=config)
        return new_state, accumulate(acc, metrics, state.step)

    rep = replicated(mesh)
    return jax.jit(
        fn, in_shardings=(rep, batch_sharding(mesh), rep, rep), out_shardings=(rep, rep), donate_argnums=(0, 3)
    )
