"""`TrainState`: everything that changes during training, as one pytree (checkpointed as a whole)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class TrainState(struct.PyTreeNode):
    """Training state; the optimizer (optax GradientTransformation) is rebuilt from the config, not stored.

    Attributes:
      step: int32 scalar, number of updates applied so far.
      params: model parameters (float32 pytree).
      ema_params: exponential moving average of `params` (same structure).
      opt_state: optax state of the optimizer.
      rng: uint32 (2,) PRNG key; the key of update `step` is fold_in(rng, step).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def create_state(params: Any, tx: Any, rng: jax.Array) -> TrainState:
    """Step-0 state: EMA = params, fresh optimizer state. `rng` is a raw uint32 (2,) key."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=rng,
    )


def tree_all_finite(tree: Any) -> jax.Array:
    """bool scalar: every floating-point leaf of `tree` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def init_train_state(model: Any, tx: Any, image_shape: tuple[int, int, int], seed: int) -> TrainState:
    """Initial state for NHWC images of `image_shape` (H, W, C): params from model.init on a dummy batch of 1
    with key split(PRNGKey(seed))[0]; the training key is split(...)[1]. Pure: jit it with out_shardings."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    p_key, d_key = jax.random.split(init_key)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if getattr(model, "num_classes", None) is not None else None
    params = model.init({"params": p_key, "dropout": d_key}, x, t, y)["params"]
    return create_state(params, tx, train_key)
