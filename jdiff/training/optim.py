"""Optimizer (AdamW + warm-up/cosine schedule + global-norm clipping) and the parameter EMA."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jdiff.config import OptimConfig


def lr_schedule(config: OptimConfig) -> optax.Schedule:
    """Learning rate at an update count: linear warm-up 0 -> lr over `warmup_steps` (lr(0) = 0, as in
    DDPM), then constant or cosine decay to lr * end_lr_factor at step `steps`."""
    peak = config.lr
    warm = config.warmup_steps
    rest = max(config.steps - warm, 1)
    if config.lr_decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=config.end_lr_factor)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices/kernels only (ndim >= 2), not on biases, norms or embeddings' scales."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: OptimConfig, frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (if > 0) followed by AdamW with `lr_schedule(config)`. The parameter
    subtrees named in `frozen` (top-level keys, e.g. a fixed text encoder's "text_encoder") get no update and no
    optimizer state (optax.multi_transform with set_to_zero)."""
    tx = _adamw(config)
    if not frozen:
        return tx
    labels = lambda params: {
        k: jax.tree.map(lambda _: "frozen" if k in frozen else "train", v) for k, v in params.items()
    }
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _adamw(config: OptimConfig) -> optax.GradientTransformation:
    adam = optax.adamw(
        lr_schedule(config),
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=_decay_mask,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)
    return adam


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay for update `step` (0-based): min(decay, (1 + step) / (10 + step)) with warm-up, else decay."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + s) / (10.0 + s))


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float, warmup: bool) -> Any:
    """ema <- d * ema + (1 - d) * params with d = ema_decay_at(step, decay, warmup)."""
    d = ema_decay_at(step, decay, warmup)
    return optax.incremental_update(params, ema, step_size=1.0 - d)
