"""The pure training step: diffusion loss, gradients, optimizer update, EMA."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jdiff.models import drop_labels, is_text_model
from jdiff.schedules import Schedule
from jdiff.training.loss import LossFn
from jdiff.training.optim import ema_update
from jdiff.training.state import TrainState


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: nn.Module,
    schedule: Schedule,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: Optional[Callable[[jax.Array], jax.Array]] = None,
    ema_decay: float,
    ema_warmup: bool = True,
    label_dropout: float = 0.0,
    null_condition: Any = None,
    grad_accum: int = 1,
    param_sharding: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on a global batch.

    Args:
      state: the current state (step s); its `loss_history`, when present, gives the importance-sampling
        probabilities of t and records this step's losses.
      batch: {"image": float32 (B, H, W, C) in [-1, 1], "label": int32 (B,)}, and for a text model "tokens":
        int32 (B, L), the captions' token ids.
      model: a registered model (`jdiff.models.registry`), called as model.apply({"params": p}, x, t, y,
        train=True, rngs={"dropout": k}); y is the labels when model.num_classes is not None, the tokens for a
        text model (`jdiff.models.is_text_model`), else None.
      schedule: noise schedule (traced data).
      loss_fn: (model_fn, schedule, x0, rng, t_probs) -> (loss, aux with "mse"; with t_probs also "t" and
        "per_example"), e.g. `jdiff.training.loss.make_loss(config.diffusion, levels)`.
      tx: the optimizer; `state.opt_state` is its state.
      lr_schedule: the learning rate `tx` follows, reported as the "lr" metric (None: reported as NaN).
      ema_decay, ema_warmup: the parameter EMA (`jdiff.training.optim.ema_update`).
      label_dropout: probability of replacing a label by the null label, or a caption by the empty caption
        (classifier-free guidance).
      null_condition: a text model's empty-caption token ids (L,) (its tokenizer of "").
      grad_accum: K micro-batches per update (`loss_and_grads`).
      param_sharding: shardings of the parameters (a pytree like state.params; None: unconstrained); the
        gradients (and their sum over micro-batches) are kept in them.

    The randomness of update s is fold_in(state.rng, s), split into the diffusion draw (t, noise), the
    dropout key and the label-dropout key, so no key is reused across steps and the draws over the global
    batch do not depend on how it is sharded. With grad_accum = K the batch runs as K micro-batches with the
    same draws, so the update equals the K = 1 update up to float reassociation.

    Returns:
      (state at step s + 1, metrics {"loss", "mse", "grad_norm" (before clipping), "lr"} float32 scalars).
    """
    key = jax.random.fold_in(state.rng, state.step)
    diff_key, dropout_key, label_key = jax.random.split(key, 3)
    x0 = batch["image"].astype(jnp.float32)
    labels = None
    if is_text_model(model):
        if null_condition is None:
            raise ValueError("a text model's train_step needs null_condition, the empty caption's token ids")
        labels = drop_labels(label_key, batch["tokens"].astype(jnp.int32), label_dropout, null_condition)
    elif model.num_classes is not None:
        labels = drop_labels(label_key, batch["label"].astype(jnp.int32), label_dropout, model.num_classes)
    history = state.loss_history  # importance-sampled t, or None
    t_probs = None if history is None else history.probs()

    def batch_loss(model_fn):
        return loss_fn(model_fn, schedule, x0, diff_key, t_probs)

    def apply(params, x_t, t, y, rng):
        return model.apply({"params": params}, x_t, t, y, train=True, rngs={"dropout": rng})

    (loss, aux), grads = loss_and_grads(
        batch_loss, apply, state.params, labels, dropout_key, grad_accum, param_sharding
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, ema_decay, ema_warmup)
    lr = jnp.nan if lr_schedule is None else lr_schedule(state.step)
    metrics = {"loss": loss, "mse": aux["mse"], "grad_norm": optax.tree.norm(grads), "lr": jnp.asarray(lr, jnp.float32)}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    if history is not None:
        new_state = new_state.replace(loss_history=history.record(aux["t"], aux["per_example"]))
    return new_state, metrics


def _micro(x: jax.Array, i: jax.Array, k: int) -> jax.Array:
    """Micro-batch i of k of a global-batch array x (n, ...): rows i, i + k, i + 2k, ... (strided, so that every
    device of a batch-sharded mesh holds n / k / devices rows of each micro-batch)."""
    return jax.lax.dynamic_index_in_dim(x.reshape(x.shape[0] // k, k, *x.shape[1:]), i, axis=1, keepdims=False)


def loss_and_grads(batch_loss, apply, params, labels, dropout_key, grad_accum: int = 1, param_sharding=None):
    """((loss, aux), grads) of `batch_loss(model_fn)` (the run's loss on the global batch, which draws t and the
    noise for the whole batch and calls model_fn(x_t, t) once) with model_fn = apply(params, x_t, t, labels,
    dropout_key).

    grad_accum = K > 1 (gradient accumulation): a `lax.scan` over K micro-batches (`_micro`) so that only one
    micro-batch's activations are live. Iteration i evaluates the same batch_loss -- the same draws of t and
    noise for the whole global batch -- with a model_fn that runs the network on micro-batch i only (dropout
    key fold_in(dropout_key, i)) and returns zeros for the other rows; since the loss is a mean of per-example
    terms, the gradient of iteration i is exactly micro-batch i's share of the global gradient, and the sum
    over i is the global gradient. The reported loss and aux are the batch_loss of the assembled outputs of
    all micro-batches. So the update equals the K = 1 update on the same batch up to float reassociation
    (and, with dropout, the dropout masks, which are drawn per micro-batch). Costs over K = 1: the
    element-wise loss (not the network) once more per micro-batch."""
    if grad_accum == 1:
        loss_fn = lambda p: batch_loss(lambda x_t, t: apply(p, x_t, t, labels, dropout_key))  # noqa: E731
        return jax.value_and_grad(loss_fn, has_aux=True)(params)
    k = grad_accum
    keep = (lambda g: g) if param_sharding is None else (lambda g: jax.lax.with_sharding_constraint(g, param_sharding))

    def micro_loss(p, i):
        outs = []

        def model_fn(x_t, t):
            n = x_t.shape[0]
            if n % k:
                raise ValueError(f"grad_accum={k} must divide the batch the model is called on ({n})")
            t_i = _micro(t, i, k) if jnp.ndim(t) and jnp.shape(t)[0] == n else t
            y_i = None if labels is None else _micro(labels, i, k)
            out = apply(p, _micro(x_t, i, k), t_i, y_i, jax.random.fold_in(dropout_key, i))
            outs.append(out)
            full = jnp.zeros((n // k, k, *out.shape[1:]), out.dtype)
            return jax.lax.dynamic_update_index_in_dim(full, out, i, axis=1).reshape(n, *out.shape[1:])

        loss, _ = batch_loss(model_fn)
        if len(outs) != 1:
            raise NotImplementedError(f"grad_accum needs a batch_loss that calls the model once, not {len(outs)} times")
        return loss, outs[0]

    def body(total, i):
        (_, out), g = jax.value_and_grad(micro_loss, has_aux=True)(params, i)
        return keep(jax.tree.map(jnp.add, total, keep(g))), out

    grads, outs = jax.lax.scan(body, keep(jax.tree.map(jnp.zeros_like, params)), jnp.arange(k))
    full = jnp.swapaxes(outs, 0, 1).reshape(-1, *outs.shape[2:])  # (K, n/K, ...) -> rows in global order
    return batch_loss(lambda x_t, t: full), grads


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


def make_step_fn(step: Callable, mesh: Any, state_sharding: Any = None) -> Any:
    """jit of (state, batch, schedule, acc) -> (state, acc) running `step(state, batch, schedule=...,
    param_sharding=...) -> (state, metrics)` (`train_step` with its pieces bound, e.g. by functools.partial):
    batch sharded over all mesh axes, the state in `state_sharding` (a pytree of shardings like the state,
    e.g. `jdiff.run.mesh.fsdp_sharding`; None: replicated), schedule and acc replicated; state and acc are
    donated. XLA inserts the collectives."""
    from jdiff.run.mesh import batch_sharding, replicated

    rep = replicated(mesh)
    state_sharding = rep if state_sharding is None else state_sharding
    param_sharding = state_sharding.params if isinstance(state_sharding, TrainState) else None

    def fn(state, batch, schedule, acc):
        new_state, metrics = step(state, batch, schedule=schedule, param_sharding=param_sharding)
        return new_state, accumulate(acc, metrics, state.step)

    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding(mesh), rep, rep),
        out_shardings=(state_sharding, rep),
        donate_argnums=(0, 3),
    )
