"""DiT: parameter counts vs the paper, adaLN-Zero output, conditioning, dtypes, training, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_testing import assert_adam_reduces_loss, assert_bf16_close_to_f32, fast_jit, inputs, jit_fwd, perturb

from jdiff.models import DiT, count_params, get_model

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=None, learn_sigma=False)
POS = lambda d: 256 * d  # the reference stores the (frozen) 16x16-patch pos-embed as a parameter


@pytest.mark.parametrize(
    "name,paper,official",
    [
        ("dit_xl2", 675e6, 675_129_632),  # facebookresearch/DiT models.py DiT_XL_2
        ("dit_s2", 33.0e6, 32_963_360),  # same code, DiT_S_2 (counted by hand from models.py)
        ("dit_b2", 130e6, None),
        ("dit_l2", 458e6, None),
    ],
)
def test_param_counts_match_paper(name, paper, official):
    m = get_model(name)
    n = count_params(m, (1, 32, 32, 4), with_labels=True)
    assert abs(n - paper) / paper < 0.01, n
    if official is not None:
        assert n + POS(m.hidden_size) == official


@pytest.fixture(scope="module")
def tiny():
    """(model, real init params, init output, x, t, y) of a tiny class-conditional DiT, non-square input."""
    m = DiT(**{**TINY, "num_classes": 10, "learn_sigma": True})
    x, t = inputs((4, 8, 12, 1))
    y = jnp.array([0, 3, 7, 10], jnp.int32)
    out, v = fast_jit(m.init_with_output)(jax.random.key(1), x, t, y)
    return m, v["params"], out, x, t, y, jit_fwd(m)


def test_untrained_outputs_zero_and_shapes(tiny):
    m, p, out, x, t, _, _ = tiny
    assert out.shape == (4, 8, 12, 2) and out.dtype == jnp.float32  # learn_sigma doubles channels
    np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero + zero final linear
    assert {a.dtype for a in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
    shape = lambda m: jax.eval_shape(lambda: m.init_with_output(jax.random.key(0), x, t)[0]).shape
    assert shape(DiT(**TINY)) == (4, 8, 12, 1)
    assert shape(DiT(**{**TINY, "out_channels": 3, "learn_sigma": True})) == (4, 8, 12, 6)


def test_remat_keeps_param_tree():
    x, t = inputs((1, 8, 8, 1))
    tree = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), x, t))
    assert tree(DiT(**TINY, remat=True)) == tree(DiT(**TINY))


def test_patch_size_error():
    with pytest.raises(ValueError, match=r"patch_size=4.*multiples of 4"):
        DiT(**{**TINY, "patch_size": 4}).init(jax.random.key(0), jnp.zeros((1, 8, 10, 1)), jnp.zeros((1,)))


def test_conditioning_changes_output(tiny):
    m, p, _, x, t, y, f = tiny
    p, k = perturb(p), jax.random.key(0)
    base = f(p, x, t, y, k, train=False)
    assert not np.allclose(base, f(p, x, t + 100.0, y, k, train=False), atol=1e-3)
    assert not np.allclose(base, f(p, x, t, y[::-1], k, train=False), atol=1e-3)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        m.apply({"params": p}, x, t, jnp.array([-1, 2, 3, 4], jnp.int32))  # eager: labels are concrete
    # no dropout layers (label dropout is the caller's drop_labels): train=True gives the same output
    np.testing.assert_array_equal(base, f(p, x, t, y, k, train=True))


def test_bf16_compute_close_to_f32(tiny):
    assert_bf16_close_to_f32(tiny)


def test_adam_reduces_loss(tiny):
    m, p, _, x, t, y, _ = tiny
    target = jax.random.normal(jax.random.key(3), (4, 8, 12, 2))
    assert_adam_reduces_loss(lambda p: jnp.mean((m.apply({"params": p}, x, t, y) - target) ** 2), p)
