"""Helpers shared by the U-Net and DiT tests: fast CPU jits, parameter noise, and the checks both models pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Tests only: XLA's -O0 backend cuts CPU compile time (mostly the params' RNG code) ~4x.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(f, **kw):
    return jax.jit(f, compiler_options=FAST if jax.default_backend() == "cpu" else None, **kw)


def perturb(params, seed=0, scale=0.05):
    """Numpy noise on every leaf (no JAX RNG compile): moves params off the zero init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (np.asarray(a) + scale * rng.standard_normal(a.shape)).astype(a.dtype), params)


def jit_fwd(m):
    """Jitted ``(params, x, t, y, key, train) -> out``: one compile per (shapes, train) for all tests."""
    return fast_jit(
        lambda p, x, t, y, key, train: m.apply({"params": p}, x, t, y, train=train, rngs={"dropout": key}),
        static_argnames="train",
    )


def inputs(shape, seed=0):
    """(x ~ N(0, I) of `shape`, t = linspace(0, 999) over the batch)."""
    return jax.random.normal(jax.random.key(seed), shape), jnp.linspace(0.0, 999.0, shape[0])


def assert_bf16_close_to_f32(tiny):
    """bfloat16 compute of the `tiny` fixture's model: float32 output within 5% relative RMS of float32."""
    m, p, _, x, t, y, f = tiny
    p, k = perturb(p), jax.random.key(0)
    o16 = jit_fwd(m.clone(dtype=jnp.bfloat16))(p, x, t, y, k, train=False)
    o32 = f(p, x, t, y, k, train=False)
    assert o16.dtype == jnp.float32
    rel = float(jnp.sqrt(jnp.mean((o16 - o32) ** 2) / jnp.mean(o32**2)))
    assert rel < 0.05, rel


def assert_adam_reduces_loss(loss_fn, params, steps=30, lr=3e-3):
    """`steps` Adam updates on loss_fn(params) (a fixed batch) bring the loss below 0.7x its start."""
    opt = optax.adam(lr)

    @fast_jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    s, losses = opt.init(params), []
    for _ in range(steps):
        params, s, loss = step(params, s)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
