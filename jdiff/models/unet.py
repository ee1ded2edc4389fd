"""DDPM / ADM U-Net (Ho et al. 2020, App. B; Dhariwal & Nichol 2021, Sec. 3 "ADM").

``UNet().apply({'params': p}, x, t, y=None, train=False, rngs={'dropout': k})``
maps NHWC ``x`` (B, H, W, C) float, ``t`` (B,) float timesteps and optional
``y`` (B,) int32 labels to a float32 (B, H, W, out) prediction.

With the defaults (ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16x16,
dropout 0.1) and 32x32x3 input this is the DDPM CIFAR-10 model with exactly the
35,746,307 parameters of its PyTorch ports (pesser/pytorch_diffusion,
diffusers ``google/ddpm-cifar10-32``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.embeddings import LabelEmbedder, TimestepEmbedder
from jdiff.models.layers import MultiHeadSelfAttention, check_inputs, num_groups
from jdiff.models.remat import maybe_remat

Dtype = Any

# DDPM's default_init: variance_scaling(1, 'fan_avg', 'uniform'); zero init for the
# last conv of each block, attention output and final conv (DDPM init_scale=0, ADM zero_module).
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling: (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2: (B, H, W, C) -> (B, H/2, W/2, C)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """Residual block (DDPM App. B; ADM Sec. 3 with scale-shift norm).

    ``GN, SiLU, [up/down], Conv3x3, + Dense(SiLU(emb)), GN, SiLU, Dropout, Conv3x3(zero)``;
    with ``use_scale_shift_norm`` the embedding gives (scale, shift) applied as
    ``GN(h) * (1 + scale) + shift`` (ADM AdaGN). 1x1 shortcut when channels change.
    (B, H, W, Cin), (B, E) -> (B, H', W', out_ch), H' = 2H / H/2 / H for up / down / none.
    """

    out_ch: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    updown: str | None = None  # None, 'up' or 'down'
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gn = lambda c, name: nn.GroupNorm(num_groups(c, self.norm_groups), epsilon=self.norm_eps, name=name, **kw)
        h = nn.silu(gn(x.shape[-1], "norm_0")(x))
        if self.updown == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.updown == "down":
            h, x = avg_pool2(h), avg_pool2(x)
        h = nn.Conv(self.out_ch, (3, 3), kernel_init=default_init, name="conv_0", **kw)(h)
        n_emb = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        e = nn.Dense(n_emb, kernel_init=default_init, name="emb_proj", **kw)(nn.silu(emb))
        e = e[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = gn(self.out_ch, "norm_1")(h) * (1 + scale) + shift
        else:
            h = gn(self.out_ch, "norm_1")(h + e)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = nn.Conv(self.out_ch, (3, 3), kernel_init=zero_init, name="conv_1", **kw)(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Dense(self.out_ch, kernel_init=default_init, name="shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Spatial self-attention block: ``x + proj(MHSA(GN(x)))`` over the H*W positions
    (DDPM App. B, single head; ADM multi-head). (B, H, W, C) -> (B, H, W, C)."""

    num_heads: int = 1
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.GroupNorm(num_groups(c, self.norm_groups), epsilon=self.norm_eps, name="norm", **kw)(x)
        h = MultiHeadSelfAttention(
            self.num_heads,
            kernel_init=default_init,
            out_kernel_init=zero_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(h.reshape(b, hh * ww, c))
        return x + h.reshape(b, hh, ww, c)


def conv3x3(module: nn.Module, x: jax.Array, **kw) -> jax.Array:
    """The 3x3 convolution `conv` of a resampling `module` (its dtypes), keeping the channel count."""
    kw.update(kernel_init=default_init, dtype=module.dtype, param_dtype=module.param_dtype, name="conv")
    return nn.Conv(x.shape[-1], (3, 3), **kw)(x)


class Downsample(nn.Module):
    """Learned 2x downsampling: Conv3x3 stride 2. ``padding=0``: SAME, i.e. DDPM's (0, 1) padding (diffusers'
    ``downsample_padding=0``); ``padding=1``: one pixel on every side (diffusers' default 1)."""

    padding: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = "SAME" if self.padding == 0 else ((self.padding, self.padding),) * 2
        return conv3x3(self, x, strides=(2, 2), padding=pad)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by Conv3x3."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv3x3(self, upsample_nearest(x))


class UNet(nn.Module):
    """DDPM/ADM U-Net noise-prediction network.

    Fields:
      ch: base width; level i has ``ch * ch_mult[i]`` channels.
      ch_mult: width multipliers; ``len(ch_mult) - 1`` 2x downsamplings, so H and W
        must be multiples of ``2 ** (len(ch_mult) - 1)``.
      num_res_blocks: res blocks per encoder level (decoder uses ``num_res_blocks + 1``).
      attention_resolutions: feature-map side lengths (``min(h, w)`` of the feature map,
        DDPM convention: ``(16,)`` = "attention at 16x16") that get self-attention.
      dropout: dropout rate inside res blocks (active only with ``train=True``,
        needs the ``'dropout'`` rng).
      num_classes: None = unconditional; else a label table with ``num_classes + 1``
        rows is added to the time embedding (row ``num_classes`` = null label, used
        when ``y`` is None; label dropout for CFG training is the caller's ``drop_labels``).
      learn_sigma: doubles the output channels (Improved DDPM Sec. 3.1: [eps | v]).
      out_channels: output channels before doubling (None = input channels).
      num_heads / num_head_channels: attention heads; ``num_head_channels`` (if set)
        overrides with ``C // num_head_channels`` heads (ADM).
      use_scale_shift_norm: ADM AdaGN conditioning in res blocks.
      resblock_updown: use res blocks with avg-pool / nearest resampling for
        down/up sampling (ADM/BigGAN) instead of strided conv / upsample+conv.
      norm_groups: max GroupNorm groups (the largest divisor of C not above it that leaves
        >= 4 channels per group is used, see ``layers.num_groups``).
      norm_eps: GroupNorm epsilon (1e-6: DDPM; diffusers' ``norm_eps``).
      cos_first / freq_shift: sinusoidal time embedding order and frequency shift
        (``embeddings.timestep_embedding``; DDPM's original code and google/ddpm-* use freq_shift=1).
      downsample_padding: 0 = DDPM's (0, 1) padding of the strided conv, 1 = one pixel each side
        (diffusers' ``downsample_padding``).
      remat / remat_policy: rematerialise each res and attention block in the backward pass with that
        ``jdiff.models.remat`` policy (less activation memory, same numbers).
      dtype / param_dtype: compute / parameter dtypes. Output is always float32.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    num_classes: int | None = None
    learn_sigma: bool = False
    out_channels: int | None = None
    num_heads: int = 1
    num_head_channels: int | None = None
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-6
    cos_first: bool = False
    freq_shift: float = 0.0
    downsample_padding: int = 0
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _heads(self, c: int) -> int:
        if self.num_head_channels:
            if c % self.num_head_channels:
                raise ValueError(
                    f"num_head_channels={self.num_head_channels} must divide every attention width; got width {c}"
                )
            return c // self.num_head_channels
        return self.num_heads

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False) -> jax.Array:
        n_down = len(self.ch_mult) - 1
        check_inputs(
            x, y, self.num_classes, 2**n_down, f"UNet with ch_mult={tuple(self.ch_mult)} downsamples {n_down} times"
        )
        b, _, _, c_in = x.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_kw = dict(
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            norm_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            **kw,
        )
        res_block = maybe_remat(ResBlock, self.remat, self.remat_policy, static_argnums=(3,))  # 3: train
        attn_block = maybe_remat(AttnBlock, self.remat, self.remat_policy)
        attn = lambda h, name: attn_block(self._heads(h.shape[-1]), self.norm_groups, self.norm_eps, name=name, **kw)(h)
        use_attn = lambda h: min(h.shape[1], h.shape[2]) in tuple(self.attention_resolutions)

        emb = TimestepEmbedder(
            4 * self.ch,
            freq_dim=self.ch,
            cos_first=self.cos_first,
            freq_shift=self.freq_shift,
            kernel_init=default_init,
            name="time_embed",
            **kw,
        )(t)
        if self.num_classes is not None:
            emb = emb + LabelEmbedder(self.num_classes, 4 * self.ch, name="label_embed", **kw)(y, b)

        h = nn.Conv(self.ch, (3, 3), kernel_init=default_init, name="conv_in", **kw)(x.astype(self.dtype))
        hs = [h]
        for lvl, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res_block(self.ch * mult, name=f"down_{lvl}_res_{i}", **res_kw)(h, emb, train)
                if use_attn(h):
                    h = attn(h, f"down_{lvl}_attn_{i}")
                hs.append(h)
            if lvl != len(self.ch_mult) - 1:
                if self.resblock_updown:
                    h = res_block(h.shape[-1], updown="down", name=f"down_{lvl}_resample", **res_kw)(h, emb, train)
                else:
                    h = Downsample(self.downsample_padding, name=f"down_{lvl}_resample", **kw)(h)
                hs.append(h)

        h = res_block(h.shape[-1], name="mid_res_0", **res_kw)(h, emb, train)
        h = attn(h, "mid_attn")
        h = res_block(h.shape[-1], name="mid_res_1", **res_kw)(h, emb, train)

        for lvl, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res_block(self.ch * mult, name=f"up_{lvl}_res_{i}", **res_kw)(h, emb, train)
                if use_attn(h):
                    h = attn(h, f"up_{lvl}_attn_{i}")
            if lvl != 0:
                if self.resblock_updown:
                    h = res_block(h.shape[-1], updown="up", name=f"up_{lvl}_resample", **res_kw)(h, emb, train)
                else:
                    h = Upsample(name=f"up_{lvl}_resample", **kw)(h)
        assert not hs

        out_ch = (self.out_channels or c_in) * (2 if self.learn_sigma else 1)
        h = nn.GroupNorm(num_groups(h.shape[-1], self.norm_groups), epsilon=self.norm_eps, name="norm_out", **kw)(h)
        h = nn.silu(h)
        h = nn.Conv(out_ch, (3, 3), kernel_init=zero_init, name="conv_out", **kw)(h)
        return h.astype(jnp.float32)
