"""Optimizer schedule, gradient clipping, EMA and label dropout of jdiff.training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdiff.config import apply_overrides, get_preset
from jdiff.models import drop_labels
from jdiff.training.optim import ema_decay_at, ema_update, lr_schedule, make_optimizer


def cfg(**kw):
    """The optimizer section of the digits preset with `kw` (config keys) changed."""
    return apply_overrides(get_preset("digits"), {f"optim.{k}": v for k, v in kw.items()}.items()).optim


def test_warmup_then_constant():
    s = lr_schedule(cfg(lr=1e-3, warmup_steps=100, lr_decay="constant", steps=1000))
    np.testing.assert_allclose(
        [s(0), s(25), s(50), s(100), s(101), s(999)], [0.0, 2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6, atol=1e-12
    )


def test_warmup_then_cosine_to_end_factor():
    s = lr_schedule(cfg(lr=2e-3, warmup_steps=10, lr_decay="cosine", end_lr_factor=0.1, steps=110))
    np.testing.assert_allclose(float(s(5)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 2e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 2e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half-way: cos = 0
    np.testing.assert_allclose(float(s(110)), 2e-4, rtol=1e-5)


def test_no_warmup():
    s = lr_schedule(cfg(lr=1e-4, warmup_steps=0, lr_decay="constant"))
    assert float(s(0)) == pytest.approx(1e-4)


def test_gradient_clipping_is_applied_before_adam():
    c = cfg(grad_clip=0.5, lr=1e-3, warmup_steps=0, adam_b1=0.9)
    tx = make_optimizer(c)
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    grads = {"w": jnp.full((3, 4), 2.0), "b": jnp.full(4, 2.0)}  # global norm 8
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    adam_state = next(
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    )
    # mu = (1 - b1) * clipped grads, clipped to global norm 0.5.
    np.testing.assert_allclose(float(optax.tree.norm(adam_state.mu)), 0.1 * 0.5, rtol=1e-5)
    tx_off = make_optimizer(cfg(grad_clip=0.0, lr=1e-3))
    st = tx_off.init(params)
    _, st = tx_off.update(grads, st, params)
    mu = next(
        s
        for s in jax.tree.leaves(st, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ).mu
    np.testing.assert_allclose(float(optax.tree.norm(mu)), 0.1 * 8.0, rtol=1e-5)


def test_weight_decay_only_on_matrices():
    c = cfg(weight_decay=0.5, lr=0.1, warmup_steps=0, lr_decay="constant", grad_clip=0.0)
    tx = make_optimizer(c)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], np.zeros(2), atol=1e-12)


def test_ema_decay_warmup_values():
    np.testing.assert_allclose(
        [float(ema_decay_at(s, 0.999, True)) for s in (0, 1, 10, 10_000)], [1 / 10, 2 / 11, 11 / 20, 0.999], rtol=1e-6
    )
    assert float(ema_decay_at(0, 0.9999, False)) == pytest.approx(0.9999)


def test_ema_closed_form():
    """Constant params p from ema_0: without warm-up ema_k = d^k ema_0 + (1 - d^k) p; with warm-up the
    product of the per-step decays replaces d^k."""
    d, k = 0.9, 7
    ema0 = {"a": jnp.full((3,), 2.0)}
    p = {"a": jnp.full((3,), -1.0)}
    ema = ema0
    for s in range(k):
        ema = ema_update(ema, p, s, d, False)
    np.testing.assert_allclose(ema["a"], d**k * 2.0 + (1 - d**k) * -1.0, rtol=1e-6)
    ema, prod = ema0, 1.0
    for s in range(k):
        ema = ema_update(ema, p, s, d, True)
        prod *= min(d, (1 + s) / (10 + s))
    np.testing.assert_allclose(ema["a"], prod * 2.0 + (1 - prod) * -1.0, rtol=1e-6)


def test_label_dropout():
    y = jnp.arange(10_000, dtype=jnp.int32) % 10
    out = drop_labels(jax.random.PRNGKey(0), y, 0.25, 10)
    dropped = np.asarray(out == 10)
    assert 0.23 < dropped.mean() < 0.27
    np.testing.assert_array_equal(np.asarray(out)[~dropped], np.asarray(y)[~dropped])
    assert drop_labels(jax.random.PRNGKey(0), y, 0.0, 10) is y
