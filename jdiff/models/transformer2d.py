"""Spatial transformer of Stable Diffusion's U-Net (Rombach et al. 2022, Sec. 3.3; diffusers' Transformer2DModel
with BasicTransformerBlock): self-attention over the H*W positions, cross-attention over the text tokens, GEGLU
feed-forward (Shazeer 2020), each pre-LayerNorm with a residual.

``Transformer2D(heads, head_dim).apply(p, x (B, H, W, C), context (B, L, D)) -> (B, H, W, C)``. Every attention
goes through `jdiff.models.layers.dot_product_attention` (float32 softmax, fused kernels where they apply).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import dot_product_attention, num_groups

Dtype = Any


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v projections (no bias) and a biased output projection
    (diffusers' Attention as in BasicTransformerBlock): queries from ``x`` (B, Lq, C), keys and values from
    ``context`` (B, Lk, D), or from ``x`` itself (self-attention) when ``context`` is None."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        ctx = x if context is None else context.astype(self.dtype)
        split = lambda a: a.reshape(*a.shape[:2], self.heads, self.head_dim)
        q = split(nn.Dense(inner, use_bias=False, name="to_q", **kw)(x))
        k = split(nn.Dense(inner, use_bias=False, name="to_k", **kw)(ctx))
        v = split(nn.Dense(inner, use_bias=False, name="to_v", **kw)(ctx))
        h = dot_product_attention(q, k, v).reshape(*x.shape[:2], inner)
        return nn.Dense(x.shape[-1], name="to_out", **kw)(h)


class GEGLUFeedForward(nn.Module):
    """``Dense(GEGLU(x))``, GEGLU(x) = a * gelu(b) for [a | b] = Dense(x) (Shazeer 2020, exact erf GELU), inner
    width ``mult * C`` (diffusers' FeedForward with activation_fn "geglu")."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a, b = jnp.split(nn.Dense(2 * self.mult * x.shape[-1], name="proj_in", **kw)(x), 2, axis=-1)
        return nn.Dense(x.shape[-1], name="proj_out", **kw)(a * nn.gelu(b, approximate=False))


class BasicTransformerBlock(nn.Module):
    """``x += SelfAttn(LN(x)); x += CrossAttn(LN(x), context); x += GEGLU-FF(LN(x))`` on tokens (B, L, C)."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)
        x = x + Attention(self.heads, self.head_dim, name="attn1", **kw)(ln("norm1")(x))
        x = x + Attention(self.heads, self.head_dim, name="attn2", **kw)(ln("norm2")(x), context)
        return x + GEGLUFeedForward(name="ff", **kw)(ln("norm3")(x))


class Transformer2D(nn.Module):
    """``x + proj_out(blocks(proj_in(GN(x))))`` over the H*W positions (diffusers' Transformer2DModel, continuous
    input). proj_in / proj_out are 1x1 convolutions or, with ``use_linear_projection`` (SD 2.x), linear
    layers: the same map on the tokens (a Dense here in both cases; they differ only in the checkpoint's
    weight layout). GroupNorm eps 1e-6, ``norm_groups`` groups (`layers.num_groups`)."""

    heads: int
    head_dim: int
    num_layers: int = 1
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        h = nn.GroupNorm(num_groups(c, self.norm_groups), epsilon=1e-6, name="norm", **kw)(x)
        h = nn.Dense(inner, name="proj_in", **kw)(h.reshape(b, hh * ww, c))
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, name=f"block_{i}", **kw)(h, context)
        h = nn.Dense(c, name="proj_out", **kw)(h)
        return x + h.reshape(b, hh, ww, c)
