"""Embeddings, registry and stats of jdiff.models (U-Net / DiT specifics: test_models_unet/dit.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models import (
    PROTOCOL_FIELDS,
    DiT,
    LabelEmbedder,
    UNet,
    abstract_params,
    check_model_class,
    count_params,
    drop_labels,
    forward_flops,
    get_model,
    list_models,
    make_registry,
    model_config,
    model_input_shape,
    sincos_2d,
    timestep_embedding,
    tree_size,
)
from jdiff.models.layers import check_inputs

# ---------------------------------------------------------------- embeddings


def test_timestep_embedding_formula_and_fractional_t():
    t = jnp.array([0.0, 1.0, 2.5, 999.0])
    e = timestep_embedding(t, 8)
    assert e.shape == (4, 8) and e.dtype == jnp.float32
    freqs = 10000.0 ** (-np.arange(4) / 4)
    ref = np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs))], axis=1)
    np.testing.assert_allclose(e, ref, atol=1e-4)
    np.testing.assert_allclose(
        timestep_embedding(t, 8, cos_first=True), np.concatenate([ref[:, 4:], ref[:, :4]], axis=1), atol=1e-4
    )
    assert not np.allclose(timestep_embedding(jnp.array([2.5]), 8), timestep_embedding(jnp.array([2.0]), 8))
    odd = timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and np.all(np.asarray(odd[:, -1]) == 0)


def _official_2d_sincos(dim, grid):  # facebookresearch/DiT models.py, square grid
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)
    g = g.reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


def test_sincos_2d_matches_dit_reference_and_non_square():
    np.testing.assert_allclose(sincos_2d(64, 4, 4), _official_2d_sincos(64, 4), atol=1e-6)
    e = sincos_2d(32, 3, 5)
    assert e.shape == (15, 32) and len(np.unique(e.round(5), axis=0)) == 15
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 2, 2)


def test_label_embedder_null_row_and_validation():
    emb = LabelEmbedder(num_classes=10, hidden=8)
    p = emb.init(jax.random.key(0), jnp.array([0, 10], jnp.int32), 2)
    assert p["params"]["table"]["embedding"].shape == (11, 8)
    null = emb.apply(p, None, 3)
    np.testing.assert_array_equal(null, emb.apply(p, jnp.full((3,), 10, jnp.int32), 3))
    for bad in ([0, 11], [-1, 3]):
        with pytest.raises(ValueError, match=r"\[0, num_classes\]=\[0, 10\]"):
            emb.apply(p, jnp.array(bad, jnp.int32), 2)
    with pytest.raises(ValueError, match="integer"):
        emb.apply(p, jnp.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="shape"):
        emb.apply(p, jnp.array([0, 1, 2], jnp.int32), 2)
    # Traced labels cannot be checked: no error under jit (documented).
    jax.jit(lambda y: emb.apply(p, y, 2))(jnp.array([0, 11], jnp.int32))


def test_drop_labels():
    y = jnp.arange(1000, dtype=jnp.int32) % 10
    k = jax.random.key(0)
    np.testing.assert_array_equal(drop_labels(k, y, 0.0, 10), y)
    assert drop_labels(k, y, 0.0, 10) is y and drop_labels(k, y, -1, 10) is y  # no draw for a Python prob <= 0
    np.testing.assert_array_equal(drop_labels(k, y, 1.0, 10), 10)
    frac = float(jnp.mean(drop_labels(k, y, 0.1, 10) == 10))
    assert 0.05 < frac < 0.15


def test_check_inputs_shared_by_unet_and_dit():
    x = jnp.zeros((1, 8, 12, 1))
    check_inputs(x, None, None, 4, "M")
    check_inputs(x, jnp.zeros((1,), jnp.int32), 10, 2, "M")
    with pytest.raises(ValueError, match=r"NHWC .* got shape \(8, 12, 1\)"):
        check_inputs(x[0], None, None, 1, "M")
    with pytest.raises(ValueError, match=r"^M, so .* multiples of 8 \(allowed: 8, 16, 24, ...\).*H=8, W=12"):
        check_inputs(x, None, None, 8, "M")
    with pytest.raises(ValueError, match="unconditional"):
        check_inputs(x, jnp.zeros((1,), jnp.int32), None, 4, "M")


# ---------------------------------------------------------------- registry


def test_registry_names():
    names = list_models()
    for n in ["unet_ddpm_cifar10", "unet_small", "unet_tiny", "unet_mnist", "dit_tiny"]:
        assert n in names
    for s in ["s", "b", "l", "xl"]:
        for p in (2, 4, 8):
            assert f"dit_{s}{p}" in names
            assert model_config(f"dit_{s}{p}")["patch_size"] == p
    assert isinstance(get_model("unet_small"), UNet) and isinstance(get_model("dit_s2"), DiT)


def test_registry_overrides_and_errors():
    m = get_model("unet_small", ch_mult=[1, 2, 2])  # lists (JSON) -> tuples: module stays hashable
    assert m.ch_mult == (1, 2, 2) and isinstance(hash(m), int)
    m = get_model("dit_s2", num_classes=10, dtype=jnp.bfloat16)
    assert m.num_classes == 10 and m.dtype == jnp.bfloat16 and m.depth == 12
    cfg = model_config("unet_ddpm_cifar10")
    assert cfg["ch"] == 128 and tuple(cfg["ch_mult"]) == (1, 2, 2, 2) and cfg["dropout"] == 0.1
    cfg["ch"] = 1  # a copy: the registry is unchanged
    assert model_config("unet_ddpm_cifar10")["ch"] == 128 and get_model("unet_ddpm_cifar10").ch == 128
    assert model_input_shape("dit_xl2") == (32, 32, 4)
    with pytest.raises(ValueError, match="unknown model name.*allowed:.*unet_small"):
        get_model("unet_huge")
    with pytest.raises(ValueError, match="unknown model name"):
        model_config("nope")
    with pytest.raises(ValueError, match=r"unknown override.*'chanels'.*allowed fields:.*ch_mult"):
        get_model("unet_small", chanels=3)


class _Good(nn.Module):
    num_classes: int | None = None
    learn_sigma: bool = False
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        return nn.Dense(x.shape[-1])(x)


class _NoLabels(nn.Module):  # lacks num_classes and learn_sigma
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    def __call__(self, x, t, y=None, train=False):
        return x


class _NoTrainFlag(_Good):
    def __call__(self, x, t, y=None):
        return x


class _RequiredLabels(_Good):
    def __call__(self, x, t, y, train=False):
        return x


def test_registered_models_follow_the_protocol():
    """Every registered class has the protocol's fields and call signature; a class without them is refused
    when it is registered, naming what it lacks."""
    for name in list_models():
        check_model_class(type(get_model(name)))
        cfg = model_config(name)
        assert all(f in cfg for f in PROTOCOL_FIELDS), name
    reg = make_registry({"good": (_Good, {"learn_sigma": True}, (8, 8, 1))})
    assert reg["good"].cls is _Good and dict(reg["good"].defaults) == {"learn_sigma": True}
    with pytest.raises(TypeError, match=r"_NoLabels lacks the protocol field\(s\) \['num_classes', 'learn_sigma'\]"):
        make_registry({"bad": (_NoLabels, {}, (8, 8, 1))})
    for cls in (_NoTrainFlag, _RequiredLabels):
        with pytest.raises(TypeError, match=r"must be called as __call__\(self, x, t, y=None, train=False\)"):
            make_registry({"bad": (cls, {}, (8, 8, 1))})
    with pytest.raises(TypeError, match="must be a flax.linen.Module class"):
        make_registry({"bad": (object, {}, (8, 8, 1))})
    with pytest.raises(TypeError, match=r"registry entry 'bad': \['chanels'\] are not fields of _Good"):
        make_registry({"bad": (_Good, {"chanels": 3}, (8, 8, 1))})


def test_small_configs_param_budgets():
    assert count_params(get_model("unet_small"), (1, 8, 8, 1)) < 1_000_000
    assert count_params(get_model("unet_tiny"), (1, 8, 8, 1)) < 250_000
    assert 1_000_000 <= count_params(get_model("unet_mnist"), (1, 28, 28, 1)) <= 4_000_000
    assert count_params(get_model("dit_tiny"), (1, 8, 8, 1)) < 2_000_000


# ---------------------------------------------------------------- stats


def test_count_params_with_labels_and_no_allocation():
    m = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), num_classes=5)
    n = count_params(m, (1, 8, 8, 1))
    assert count_params(m, (1, 8, 8, 1), with_labels=True) == n
    assert count_params(m.clone(num_classes=None), (1, 8, 8, 1)) == n - 6 * 64  # (5 + null) x 4*ch
    p = abstract_params(m, (1, 8, 8, 1))
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(p))
    assert tree_size(p) == n


def test_tree_size_counts_any_leaves():
    tree = {"a": np.zeros((2, 3)), "b": [jnp.ones(4), jax.ShapeDtypeStruct((5, 1), jnp.bfloat16)], "c": 1.0}
    assert tree_size(tree) == 6 + 4 + 5 + 1 and isinstance(tree_size(tree), int)
    assert tree_size({}) == 0


def test_forward_flops_scales_with_spatial_size():
    m = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    p = abstract_params(m, (1, 8, 8, 1))
    f8 = forward_flops(m, p, (1, 8, 8, 1))
    f16 = forward_flops(m, p, (1, 16, 16, 1))
    assert f8 > 0 and 3.6 < f16 / f8 < 4.6, (f8, f16)
    assert forward_flops(m, p, (2, 8, 8, 1)) == pytest.approx(2 * f8, rel=0.02)
    assert forward_flops(m, p, (1, 8, 8, 1), compile=True) == pytest.approx(f8, rel=0.05)
    # a 3x3 conv from 16 to 16 channels on 8x8 alone costs 2*9*16*16*64 FLOPs
    assert f8 > 2 * 9 * 16 * 16 * 64


# ---------------------------------------------------------------- attention


def _attention_f64(q, k, v):
    """Softmax attention (Vaswani et al. 2017, Eq. 1) in float64 numpy: softmax(q k^T / sqrt(d)) v per head."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


def test_attention_equals_the_float64_formula_for_self_and_cross_attention():
    from jdiff.models.layers import dot_product_attention

    keys = jax.random.split(jax.random.key(0), 3)
    for lq, lk in ((16, 16), (16, 7)):  # self-attention and cross-attention over 7 tokens
        q = 3.0 * jax.random.normal(keys[0], (2, lq, 4, 8))
        k, v = (jax.random.normal(kk, (2, lk, 4, 8)) for kk in keys[1:])
        out = dot_product_attention(q, k, v)
        assert out.shape == (2, lq, 4, 8) and out.dtype == jnp.float32
        np.testing.assert_allclose(out, _attention_f64(q, k, v), atol=2e-6, rtol=1e-5)


def test_attention_in_bfloat16_keeps_a_float32_softmax():
    """bf16 inputs: the result stays within bf16 rounding of the exact value (a bf16 softmax over 256 keys with
    large logits would not), and comes back in bf16."""
    from jdiff.models.layers import dot_product_attention

    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (1, 64, 2, 32)) for kk in keys)
    q = 4.0 * q
    out = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    ref = _attention_f64(*(np.asarray(a.astype(jnp.bfloat16), np.float64) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=3e-2)
