"""Small shared building blocks: input checks, group-count choice, multi-head attention, adaLN modulation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def check_inputs(x: jax.Array, y: jax.Array | None, num_classes: int | None, multiple: int, why: str) -> None:
    """Raise ``ValueError`` unless ``x`` is NHWC with H and W multiples of ``multiple`` and ``y`` is None
    for an unconditional model (``num_classes=None``). ``why`` starts the size message, e.g.
    ``'UNet with ch_mult=(1, 2) downsamples 1 times'``. Label values are checked by ``LabelEmbedder``."""
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (B, H, W, C), got shape {x.shape}")
    hgt, wid = x.shape[1:3]
    if hgt % multiple or wid % multiple:
        m = multiple
        raise ValueError(
            f"{why}, so image height and width must be multiples of {m} (allowed: {m}, {2 * m}, "
            f"{3 * m}, ...); got x.shape={tuple(x.shape)} (H={hgt}, W={wid})"
        )
    if y is not None and num_classes is None:
        raise ValueError("y was given but the model is unconditional (num_classes=None)")


def num_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm (Wu & He 2018) group count: the largest divisor of ``channels`` that is
    <= ``max_groups`` and leaves >= ``min_group_size`` channels per group (DDPM: 128 ch /
    32 groups = 4). Groups of one channel would subtract the per-channel mean and so
    cancel the U-Net's additive timestep embedding."""
    limit = max(1, min(max_groups, channels // min_group_size))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
    """Softmax attention (Vaswani et al. 2017, Eq. 1): `jax.nn.dot_product_attention`, which runs cuDNN's fused
    (flash) attention on GPUs where it applies and XLA's otherwise; logits and softmax in float32 for any input
    dtype (the mixed-precision policy: bf16 compute, float32 softmax). ``is_causal``: query i attends to keys
    0..i only (a text encoder's causal mask).

    q: (B, Lq, heads, head_dim), k, v: (B, Lk, heads, head_dim) -> (B, Lq, heads, head_dim) in q's dtype.
    """
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)


class MultiHeadSelfAttention(nn.Module):
    """Fused-qkv multi-head self-attention on tokens: (B, L, C) -> (B, L, C).

    Parameters: qkv Dense(C -> 3C) and output Dense(C -> C), both with bias
    (same count as separate q, k, v, proj layers: 4 C^2 + 4 C).
    """

    num_heads: int = 1
    kernel_init: Any = nn.initializers.lecun_normal()
    out_kernel_init: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention width {c} not divisible by num_heads={self.num_heads}")
        qkv = nn.Dense(3 * c, kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(
            x
        )
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads), 3, axis=2)
        h = dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0]).reshape(b, n, c)
        return nn.Dense(
            c,
            kernel_init=self.out_kernel_init or self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(h)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation ``x * (1 + scale) + shift`` (DiT Sec. 3.2); shift/scale (B, C) broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]
