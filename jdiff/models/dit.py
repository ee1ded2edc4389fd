"""Diffusion Transformer, DiT (Peebles & Xie 2023, Sec. 3.2, adaLN-Zero blocks).

``DiT(...).apply({'params': p}, x, t, y=None, train=False)`` maps NHWC ``x``
(B, H, W, C) float (typically a 32x32x4 VAE latent), ``t`` (B,) float timesteps
and optional ``y`` (B,) int32 labels to a float32 (B, H, W, out) prediction.
H and W must be multiples of ``patch_size``; the fixed 2-D sin-cos position
embedding is built for the (H/p, W/p) grid at trace time (a constant, so it is not
in the parameter count; the reference code stores it as a frozen parameter).
Untrained, the model outputs exactly zeros (adaLN-Zero + zero final linear).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.embeddings import LabelEmbedder, TimestepEmbedder, sincos_2d
from jdiff.models.layers import MultiHeadSelfAttention, check_inputs, modulate
from jdiff.models.remat import maybe_remat

Dtype = Any
xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def adaln_modulation(c: jax.Array, chunks: int, hidden: int, kw: dict) -> list[jax.Array]:
    """`chunks` (B, D) vectors (shifts, scales, gates) from Dense(SiLU(c)), zero-initialised (adaLN-Zero).
    Called inside a compact module: the Dense is that module's `adaLN_modulation`."""
    mod = nn.Dense(chunks * hidden, kernel_init=zeros, name="adaLN_modulation", **kw)(nn.silu(c))
    return jnp.split(mod, chunks, axis=-1)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (DiT Fig. 3): with (shift, scale, gate) x 2 = Dense(SiLU(c)),
    ``x += gate1 * Attn(modulate(LN(x), shift1, scale1))``;
    ``x += gate2 * MLP(modulate(LN(x), shift2, scale2))``, MLP = Dense(4D), GELU(tanh), Dense(D).
    (B, L, D), (B, D) -> (B, L, D)."""

    hidden: int
    num_heads: int
    mlp_ratio: float = 4.0
    mlp_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(c, 6, self.hidden, kw)
        ln = lambda name, eps: nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, name=name, **kw)
        h = MultiHeadSelfAttention(self.num_heads, kernel_init=xavier, name="attn", **kw)(
            modulate(ln("norm1", 1e-6)(x), shift1, scale1)
        )
        x = x + gate1[:, None] * h
        h = modulate(ln("norm2", self.mlp_norm_eps)(x), shift2, scale2)
        h = nn.Dense(int(self.hidden * self.mlp_ratio), kernel_init=xavier, name="mlp_fc1", **kw)(h)
        h = nn.Dense(self.hidden, kernel_init=xavier, name="mlp_fc2", **kw)(nn.gelu(h, approximate=True))
        return x + gate2[:, None] * h


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + zero-initialised Dense to p*p*out per token.
    (B, L, D), (B, D) -> (B, L, p*p*out)."""

    hidden: int
    patch_out: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = adaln_modulation(c, 2, self.hidden, kw)
        x = modulate(nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, name="norm", **kw)(x), shift, scale)
        return nn.Dense(self.patch_out, kernel_init=zeros, name="linear", **kw)(x)


class DiT(nn.Module):
    """DiT with adaLN-Zero conditioning on ``c = t_emb (+ y_emb)``.

    Fields: patch_size, hidden_size, depth, num_heads, mlp_ratio (4), num_classes
    (None = unconditional; else ``num_classes + 1`` label rows, the last = null label,
    used when ``y`` is None), learn_sigma (doubles output channels: [eps | v]),
    out_channels (None = input channels), remat / remat_policy (rematerialise each block in the backward pass
    with that `jdiff.models.remat` policy: less activation memory, same numbers),
    freq_shift (time-embedding frequency shift, ``embeddings.timestep_embedding``: 0 = the DiT reference
    code, 1 = diffusers' DiTTransformer2DModel), mlp_norm_eps (epsilon of the LayerNorm before the MLP: 1e-6 in
    the reference, diffusers' ``norm_eps``), dtype / param_dtype. Output is float32. ``train`` changes
    nothing (no dropout layers); label dropout for classifier-free guidance is ``drop_labels``, done by the caller.
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = 1000
    learn_sigma: bool = True
    out_channels: int | None = None
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False) -> jax.Array:
        p = self.patch_size
        check_inputs(x, y, self.num_classes, p, f"DiT with patch_size={p} cuts images into {p}x{p} patches")
        b, hgt, wid, c_in = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gh, gw, d = hgt // p, wid // p, self.hidden_size

        # Patchify: conv with kernel = stride = p (== linear on flattened patches).
        h = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            name="x_embedder",
            kernel_init=nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2)),
            **kw,
        )(x.astype(self.dtype))
        h = h.reshape(b, gh * gw, d) + jnp.asarray(sincos_2d(d, gh, gw), self.dtype)[None]

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        c = TimestepEmbedder(
            d,
            freq_dim=256,
            cos_first=True,
            freq_shift=self.freq_shift,
            kernel_init=nn.initializers.normal(0.02),
            name="t_embedder",
            **kw,
        )(t)
        if self.num_classes is not None:
            c = c + LabelEmbedder(self.num_classes, d, name="y_embedder", **kw)(y, b)

        block_cls = maybe_remat(DiTBlock, self.remat, self.remat_policy)
        for i in range(self.depth):
            h = block_cls(d, self.num_heads, self.mlp_ratio, self.mlp_norm_eps, name=f"blocks_{i}", **kw)(h, c)

        out_ch = (self.out_channels or c_in) * (2 if self.learn_sigma else 1)
        h = FinalLayer(d, p * p * out_ch, name="final_layer", **kw)(h, c)
        # Unpatchify: (B, gh*gw, p*p*out) -> (B, gh*p, gw*p, out).
        h = h.reshape(b, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, hgt, wid, out_ch)
        return h.astype(jnp.float32)
