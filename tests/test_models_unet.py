"""DDPM/ADM U-Net: shapes, parameter count, conditioning, dropout, dtypes, training, errors.

Compiles are the cost on CPU: one real (jitted) init shared by a module fixture, other
params come from ``eval_shape`` + numpy noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_testing import assert_adam_reduces_loss, assert_bf16_close_to_f32, fast_jit, inputs, jit_fwd, perturb

from jdiff.models import UNet, count_params, get_model

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.3, num_classes=10)


def random_params(model, *args, seed=0):
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    return perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), seed)


def jit_apply(m):
    return fast_jit(m.apply, static_argnames="train")


@pytest.fixture(scope="module")
def tiny():
    """(model, real init params, init output, x, t, y, jitted fwd) of a tiny class-conditional U-Net."""
    m = UNet(**TINY)
    x, t = inputs((4, 8, 8, 1))
    y = jnp.array([1, 2, 3, 10], jnp.int32)
    out, v = fast_jit(m.init_with_output)(jax.random.key(1), x, t, y)
    return m, v["params"], out, x, t, y, jit_fwd(m)


def test_ddpm_cifar10_param_count_exact():
    # pesser/pytorch_diffusion & diffusers google/ddpm-cifar10-32 UNet2DModel: 35,746,307.
    assert count_params(get_model("unet_ddpm_cifar10"), (1, 32, 32, 3)) == 35_746_307


def test_init_output_zero_and_f32_params(tiny):
    m, p, out, x, t, y, _ = tiny
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised final conv (DDPM/ADM)
    assert {a.dtype for a in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
    assert p["label_embed"]["table"]["embedding"].shape == (11, 64)  # num_classes + null row


@pytest.mark.parametrize(
    "cfg,shape",
    [
        (dict(ch_mult=(1, 2), attention_resolutions=(6,)), (1, 12, 20, 3)),
        (
            dict(
                ch_mult=(1, 2, 2),
                attention_resolutions=(3,),
                num_head_channels=8,
                use_scale_shift_norm=True,
                resblock_updown=True,
            ),
            (1, 12, 20, 2),
        ),
    ],
)
def test_shapes_odd_sizes(cfg, shape):
    m = UNet(**{**TINY, **cfg, "num_classes": None})
    x, t = inputs(shape)
    p = random_params(m, x, t)
    assert any("attn" in k for k in p)
    out = jit_apply(m)({"params": p}, x, t)
    assert out.shape == shape and out.dtype == jnp.float32 and np.all(np.isfinite(out))


def test_learn_sigma_and_out_channels():
    x, t = inputs((1, 8, 8, 3))
    shape = lambda m: jax.eval_shape(lambda: m.init_with_output(jax.random.key(0), x, t)[0]).shape
    assert shape(UNet(**TINY, learn_sigma=True)) == (1, 8, 8, 6)
    assert shape(UNet(**TINY, learn_sigma=True, out_channels=1)) == (1, 8, 8, 2)
    assert shape(UNet(**TINY, out_channels=5)) == (1, 8, 8, 5)


def test_indivisible_size_raises():
    m = UNet(**{**TINY, "ch_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match=r"ch_mult=\(1, 2, 2\).*multiples of 4.*H=10"):
        m.init(jax.random.key(0), jnp.zeros((1, 10, 8, 1)), jnp.zeros((1,)))
    with pytest.raises(ValueError, match="multiples of 8"):
        jax.eval_shape(
            lambda: get_model("unet_ddpm_cifar10").init(jax.random.key(0), jnp.zeros((1, 32, 28, 3)), jnp.zeros((1,)))
        )


def test_conditioning_changes_output(tiny):
    m, p, _, x, t, y, f = tiny
    p, k = perturb(p), jax.random.key(0)
    base = f(p, x, t, y, k, train=False)
    assert not np.allclose(base, f(p, x, t + 100.0, y, k, train=False), atol=1e-3)
    assert not np.allclose(base, f(p, x, t, y[::-1], k, train=False), atol=1e-3)
    shape = jax.eval_shape(lambda: m.apply({"params": p}, x, jnp.float32(3.0), y)).shape  # scalar t broadcasts
    assert shape == x.shape


def test_label_errors(tiny):
    m, p, _, x, t, _, _ = tiny
    with pytest.raises(ValueError, match=r"\[0, num_classes\]=\[0, 10\]"):
        m.apply({"params": p}, x, t, jnp.array([0, 1, 2, 11], jnp.int32))  # eager: labels concrete
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(
            lambda: UNet(**{**TINY, "num_classes": None}).init(jax.random.key(0), x, t, jnp.zeros((4,), jnp.int32))
        )


def test_dropout_train_vs_eval(tiny):
    m, p, _, x, t, y, f = tiny
    p = perturb(p)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    a, b = f(p, x, t, y, k0, train=True), f(p, x, t, y, k1, train=True)
    assert not np.allclose(a, b, atol=1e-3)
    np.testing.assert_array_equal(a, f(p, x, t, y, k0, train=True))
    e = f(p, x, t, y, k0, train=False)
    np.testing.assert_array_equal(e, f(p, x, t, y, k1, train=False))  # eval ignores the rng
    assert not np.allclose(a, e, atol=1e-3)


def test_bf16_compute_close_to_f32(tiny):
    assert_bf16_close_to_f32(tiny)


def test_adam_reduces_loss(tiny):
    m, p, _, x, t, y, _ = tiny
    m = m.clone(dropout=0.0)  # dropout masks' RNG code would triple the compile time
    target = jax.random.normal(jax.random.key(3), x.shape)
    assert_adam_reduces_loss(lambda p: jnp.mean((m.apply({"params": p}, x, t, y, train=True) - target) ** 2), p)
