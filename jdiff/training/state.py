"""`TrainState`: everything that changes during training, as one pytree (checkpointed as a whole)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jdiff.losses import HISTORY_PER_T, importance_probs, update_loss_history
from jdiff.models.text_unet import dummy_condition


class TrainState(struct.PyTreeNode):
    """Training state; the optimizer (optax GradientTransformation, `Setup.tx`) is not stored, its state is.

    Attributes:
      step: int32 scalar, number of updates applied so far.
      params: model parameters (float32 pytree).
      ema_params: exponential moving average of `params` (same structure).
      opt_state: optax state of the optimizer.
      rng: uint32 (2,) PRNG key; the key of update `step` is fold_in(rng, step).
      loss_history: the `LossHistory` of a run with importance-sampled timesteps (diffusion.t_sampling
        importance), checkpointed with the rest; None (an empty subtree) otherwise.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    loss_history: Optional["LossHistory"] = None


class LossHistory(struct.PyTreeNode):
    """The last `HISTORY_PER_T` per-example losses of every timestep (improved DDPM sec. 3.3 importance sampling).

    Attributes:
      values: float32 (T, 10), a row's oldest value first.
      count: int32 (T,), values recorded per t (at most 10; sampling stays uniform until all are 10).
    """

    values: jax.Array
    count: jax.Array

    @classmethod
    def empty(cls, num_timesteps: int) -> "LossHistory":
        return cls(jnp.zeros((num_timesteps, HISTORY_PER_T), jnp.float32), jnp.zeros((num_timesteps,), jnp.int32))

    def probs(self) -> jax.Array:
        """(T,) sampling probabilities of t (`jdiff.losses.importance_probs`)."""
        return importance_probs(self.values, self.count)

    def record(self, t: jax.Array, losses: jax.Array) -> "LossHistory":
        """The history with losses (B,) of timesteps t (B,) appended in batch order."""
        return LossHistory(*update_loss_history(self.values, self.count, t, losses))


def create_state(params: Any, tx: Any, rng: jax.Array, *, history_steps: int = 0) -> TrainState:
    """Step-0 state: EMA = params, fresh optimizer state. `rng` is a raw uint32 (2,) key. history_steps: T of
    an empty loss history (importance-sampled timesteps; 0: none)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=rng,
        loss_history=LossHistory.empty(history_steps) if history_steps else None,
    )


def tree_all_finite(tree: Any) -> jax.Array:
    """bool scalar: every floating-point leaf of `tree` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def init_train_state(
    model: Any, tx: Any, image_shape: tuple[int, int, int], seed: int, *, history_steps: int = 0
) -> TrainState:
    """Initial state for NHWC images of `image_shape` (H, W, C): params from model.init on a dummy batch of 1
    with key split(PRNGKey(seed))[0]; the training key is split(...)[1]. Pure: jit it with out_shardings.
    history_steps: T for importance-sampled timesteps (a state with a `LossHistory`), else 0."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    p_key, d_key = jax.random.split(init_key)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    y = dummy_condition(model)
    params = model.init({"params": p_key, "dropout": d_key}, x, t, y)["params"]
    return create_state(params, tx, train_key, history_steps=history_steps)
