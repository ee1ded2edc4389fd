"""The pure train step: data parallelism over 8 devices equals 1 device; rng use; bf16 compute."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff.config import apply_overrides, get_preset
from jdiff.run import mesh as mesh_lib
from jdiff.training.optim import make_optimizer
from jdiff.training.setup import train_step_args
from jdiff.training.state import init_train_state
from jdiff.training.step import accumulate, init_accumulator, make_step_fn, train_step


class TinyNet(nn.Module):
    """Conv denoiser with time and label embeddings and dropout: (B, H, W, C), (B,), (B,) -> (B, H, W, C)."""

    num_classes: int | None = 10
    dropout: float = 0.2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        from jdiff.models import timestep_embedding

        emb = nn.Dense(16, dtype=self.dtype)(timestep_embedding(t, 16))
        if self.num_classes is not None:
            y = jnp.full((x.shape[0],), self.num_classes, jnp.int32) if y is None else y
            emb = emb + nn.Embed(self.num_classes + 1, 16, dtype=self.dtype)(y)
        h = nn.Conv(16, (3, 3), dtype=self.dtype)(x.astype(self.dtype)) + emb[:, None, None, :]
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        return nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype)(h).astype(jnp.float32)


def _config(**kw):
    base = {"optim.batch_size": 16, "diffusion.num_timesteps": 100, "optim.lr": 1e-2, "optim.warmup_steps": 0}
    base.update({"data.label_dropout": 0.3, "optim.ema_decay": 0.9})
    base.update(kw)
    return apply_overrides(get_preset("digits"), base.items())


def _batch(n=16, seed=0):
    r = np.random.default_rng(seed)
    return {"image": r.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32), "label": r.integers(0, 10, n).astype(np.int32)}


def _run_steps(devices, config, model, num_steps=2):
    mesh = mesh_lib.make_mesh(devices)
    rep = mesh_lib.replicated(mesh)
    tx = make_optimizer(config.optim)
    state = jax.jit(functools.partial(init_train_state, model, tx, (8, 8, 1), 0), out_shardings=rep)()
    step = make_step_fn(functools.partial(train_step, model=model, **train_step_args(config)), mesh)
    schedule = jax.device_put(jdiff.get_schedule("linear", config.diffusion.num_timesteps), rep)
    acc = jax.device_put(init_accumulator(), rep)
    for i in range(num_steps):
        batch = jax.device_put(_batch(seed=i), mesh_lib.batch_sharding(mesh))
        assert len(batch["image"].sharding.device_set) == len(devices)
        state, acc = step(state, batch, schedule, acc)
    return jax.device_get(state), jax.device_get(acc)


def test_eight_devices_equal_one_device():
    assert jax.device_count() >= 8, "tests/conftest.py should give 8 host devices"
    config = _config()
    model = TinyNet()
    s8, a8 = _run_steps(jax.devices()[:8], config, model)
    s1, a1 = _run_steps(jax.devices()[:1], config, model)
    assert int(s8.step) == int(s1.step) == 2
    for name in ("params", "ema_params", "opt_state"):
        for x8, x1 in zip(jax.tree.leaves(getattr(s8, name)), jax.tree.leaves(getattr(s1, name))):
            np.testing.assert_allclose(x8, x1, rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(a8["loss"], a1["loss"], rtol=1e-5)
    # The step really changed the parameters (so the comparison is not vacuous).
    s0 = jax.jit(functools.partial(init_train_state, model, make_optimizer(config.optim), (8, 8, 1), 0))()
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params))]
    assert max(moved) > 1e-3


def test_step_rng_and_metrics():
    config = _config(**{"optim.lr": 1e-3, "optim.warmup_steps": 10})
    model = TinyNet()
    tx = make_optimizer(config.optim)
    state = jax.jit(functools.partial(init_train_state, model, tx, (8, 8, 1), 0))()
    schedule = jdiff.get_schedule("linear", 100)
    batch = jax.tree.map(jnp.asarray, _batch())
    step = jax.jit(functools.partial(train_step, model=model, **train_step_args(config)))
    s1, m1 = step(state, batch, schedule=schedule)
    s2, m2 = step(
        s1.replace(params=state.params, opt_state=state.opt_state, ema_params=state.ema_params),
        batch,
        schedule=schedule,
    )
    # Same params and batch but step 1 instead of 0: different noise/timesteps -> different loss.
    assert float(m1["loss"]) != float(m2["loss"])
    assert int(s1.step) == 1 and int(s2.step) == 2
    assert float(m1["lr"]) == 0.0 and float(m2["lr"]) == pytest.approx(1e-4)
    assert np.isfinite(float(m1["grad_norm"])) and float(m1["grad_norm"]) > 0
    # Same step twice: deterministic.
    _, m1b = step(state, batch, schedule=schedule)
    assert float(m1b["loss"]) == float(m1["loss"])
    # EMA after the first update: decay min(0.9, 1/10) = 0.1.
    for e, p0, p1 in zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(state.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params():
    config = _config(**{"model.dtype": "bfloat16"})
    model = TinyNet(dtype=jnp.bfloat16)
    tx = make_optimizer(config.optim)
    state = jax.jit(functools.partial(init_train_state, model, tx, (8, 8, 1), 0))()
    new, m = jax.jit(functools.partial(train_step, model=model, **train_step_args(config)))(
        state, jax.tree.map(jnp.asarray, _batch()), schedule=jdiff.get_schedule("linear", 100)
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.ema_params))
    assert np.isfinite(float(m["loss"]))


def test_accumulator_records_first_nonfinite_step():
    acc = init_accumulator()
    ok = {"loss": jnp.float32(1.0), "mse": jnp.float32(1.0), "grad_norm": jnp.float32(1.0), "lr": jnp.float32(0.1)}
    bad = dict(ok, loss=jnp.float32(jnp.nan))
    acc = accumulate(acc, ok, jnp.int32(3))
    acc = accumulate(acc, bad, jnp.int32(4))
    acc = accumulate(acc, bad, jnp.int32(5))
    assert int(acc["first_bad"]) == 4 and int(acc["count"]) == 3


def test_train_step_runs_the_loss_optimizer_and_ema_it_is_given():
    """train_step receives its parts: one step with a plain loss, SGD and EMA decay 0.25 (no warm-up) gives
    exactly p - lr * grad, EMA 0.25 p0 + 0.75 p1, and the loss and lr it was given."""
    import optax

    model = TinyNet(num_classes=None, dropout=0.0)
    x = jnp.asarray(_batch()["image"])
    zeros = jnp.zeros((x.shape[0],))

    def loss_fn(model_fn, schedule, x0, rng, t_probs):
        assert t_probs is None  # no loss history in this state
        mse = jnp.mean(model_fn(x0, zeros) ** 2)
        return mse, {"mse": mse}

    tx = optax.sgd(0.5)
    state = init_train_state(model, tx, (8, 8, 1), 0)
    new, m = jax.jit(
        functools.partial(
            train_step, model=model, loss_fn=loss_fn, tx=tx, lr_schedule=lambda s: 0.5, ema_decay=0.25, ema_warmup=False
        )
    )(state, {"image": x, "label": jnp.zeros(16, jnp.int32)}, schedule=jdiff.get_schedule("linear", 100))
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, x, zeros) ** 2))(state.params)
    for p0, g, p1, e in zip(*map(jax.tree.leaves, (state.params, grads, new.params, new.ema_params))):
        np.testing.assert_allclose(p1, p0 - 0.5 * g, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e, 0.25 * p0 + 0.75 * p1, rtol=1e-5, atol=1e-7)
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-5) and float(m["lr"]) == 0.5
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # the step moved something


def test_a_replaced_setup_tx_is_the_optimizer_that_runs(tiny_config):
    """dataclasses.replace(setup, tx=...) rebuilds the init and step functions from the new optimizer: with SGD at
    learning rate 0 a step leaves the parameters as they were (the config's AdamW moves them), and the optimizer
    state is SGD's (empty), not Adam's."""
    import dataclasses

    import optax

    from jdiff.training import setup

    s = setup(tiny_config(**{"optim.warmup_steps": 0}), devices=jax.devices()[:1])
    s = dataclasses.replace(s, model=TinyNet(dropout=0.0))  # a model that compiles in a second
    frozen = dataclasses.replace(s, tx=optax.sgd(0.0))
    batch = next(iter(s.batches(0, 1)))
    moved = []
    for part in (s, frozen):
        state = part.init_fn()
        p0 = jax.device_get(state.params)
        new, _ = part.step_fn(state, batch, part.schedule, jax.device_put(init_accumulator()))
        moved.append(max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(new.params))))
        if part is frozen:
            assert jax.tree.leaves(new.opt_state) == []  # SGD without momentum keeps no state
    assert moved[0] > 1e-4 and moved[1] == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tx = optax.sgd(0.0)  # a Setup is rebuilt, never patched (its step_fn would not follow)
