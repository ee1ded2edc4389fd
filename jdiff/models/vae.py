"""KL autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G), the Stable Diffusion VAE that
DiT (Peebles & Xie 2023) samples in, computing what diffusers' ``AutoencoderKL`` computes.

``AutoencoderKL().apply({'params': p}, x, method='encode')`` maps NHWC images (B, H, W, in_channels) in
[-1, 1] to the posterior's (mean, logvar), each (B, H/f, W/f, latent_channels) with f = 2^(len(blocks) - 1)
and logvar clipped to [-30, 20]; ``method='decode'`` maps latents z (B, h, w, latent_channels) to images.
Diffusion models see ``scaling_factor * z`` (0.18215 for sd-vae-ft-ema/-mse); see `jdiff.pretrained`.

Submodule names follow diffusers' state-dict names with ``.i`` written ``_i`` (``encoder/down_blocks_0/
resnets_1/conv2``), so a checkpoint maps by name (`jdiff.pretrained.autoencoder`).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import dot_product_attention

Dtype = Any
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def _conv(features: int, kernel: int, name: str, dtype: Dtype, **kw) -> nn.Conv:
    pad = "SAME" if kernel > 1 and "strides" not in kw else "VALID"
    return nn.Conv(features, (kernel, kernel), padding=pad, name=name, dtype=dtype, **kw)


def _norm(groups: int, eps: float, name: str, dtype: Dtype) -> nn.GroupNorm:
    # Two-pass variance, like torch's GroupNorm, so float32 outputs agree to ~1e-6.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name, dtype=dtype)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without a time embedding: ``x' + conv2(silu(GN(conv1(silu(GN(x))))))`` with a 1x1
    ``conv_shortcut`` when the channel count changes."""

    out_channels: int
    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = nn.silu(_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """diffusers' one-head VAE attention: ``x + to_out(softmax(q k^T / sqrt(C)) v)`` over the H*W positions of
    ``GN(x)``, with Dense to_q, to_k, to_v, to_out_0."""

    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = _norm(self.groups, self.eps, "group_norm", self.dtype)(x).reshape(b, hgt * wid, 1, c)
        q, k, v = (nn.Dense(c, name=n, dtype=self.dtype)(h) for n in ("to_q", "to_k", "to_v"))
        h = dot_product_attention(q, k, v).reshape(b, hgt * wid, c)
        return x + nn.Dense(c, name="to_out_0", dtype=self.dtype)(h).reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D of the VAE: resnets_0, [attentions_0], resnets_1."""

    groups: int
    eps: float
    attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.eps, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = SpatialSelfAttention(self.groups, self.eps, self.dtype, name="attentions_0")(x)
        return ResnetBlock(c, self.groups, self.eps, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """diffusers Downsample2D(use_conv=True, padding=0): zero-pad one row/column at the bottom/right, then a
    3x3 conv with stride 2 ("conv")."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", self.dtype, strides=(2, 2))(x)


class Upsample(nn.Module):
    """diffusers Upsample2D(use_conv=True): nearest-neighbour 2x, then a 3x3 conv ("conv")."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class UpDownBlock(nn.Module):
    """diffusers DownEncoderBlock2D (resnets_j, then downsamplers_0) or, with ``up``, UpDecoderBlock2D
    (resnets_j, then upsamplers_0); the resampler only when ``resample``."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    resample: bool
    up: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            h = ResnetBlock(self.out_channels, self.groups, self.eps, self.dtype, name=f"resnets_{j}")(h)
        if self.resample:
            h = (Upsample if self.up else Downsample)(self.dtype, name="upsamplers_0" if self.up else "downsamplers_0")(
                h
            )
        return h


class _Tower(nn.Module):
    """The fields that Encoder and Decoder share (out_channels: the width of their conv_out)."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    eps: float
    mid_attention: bool
    dtype: Dtype = jnp.float32


class Encoder(_Tower):
    """conv_in, down_blocks_i (layers_per_block resnets, then a Downsample except in the last), mid_block,
    GN + SiLU, conv_out to out_channels (2 * latent_channels: mean and logvar)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        boc, kw = self.block_out_channels, dict(dtype=self.dtype)
        h = _conv(boc[0], 3, "conv_in", self.dtype)(x)
        for i, ch in enumerate(boc):
            last = i == len(boc) - 1
            h = UpDownBlock(ch, self.layers_per_block, self.groups, self.eps, not last, name=f"down_blocks_{i}", **kw)(
                h
            )
        h = MidBlock(self.groups, self.eps, self.mid_attention, name="mid_block", **kw)(h)
        h = nn.silu(_norm(self.groups, self.eps, "conv_norm_out", self.dtype)(h))
        return _conv(self.out_channels, 3, "conv_out", self.dtype)(h)


class Decoder(_Tower):
    """conv_in, mid_block, up_blocks_i over the reversed channels (layers_per_block + 1 resnets, then an
    Upsample except in the last), GN + SiLU, conv_out."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        boc, kw = tuple(reversed(self.block_out_channels)), dict(dtype=self.dtype)
        h = _conv(boc[0], 3, "conv_in", self.dtype)(z)
        h = MidBlock(self.groups, self.eps, self.mid_attention, name="mid_block", **kw)(h)
        for i, ch in enumerate(boc):
            last = i == len(boc) - 1
            h = UpDownBlock(
                ch, self.layers_per_block + 1, self.groups, self.eps, not last, up=True, name=f"up_blocks_{i}", **kw
            )(h)
        h = nn.silu(_norm(self.groups, self.eps, "conv_norm_out", self.dtype)(h))
        return _conv(self.out_channels, 3, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder (fields named as in diffusers' config.json).

    Only DownEncoderBlock2D / UpDecoderBlock2D blocks and the SiLU activation exist in the published SD VAEs;
    other values raise ValueError. ``norm_eps`` is diffusers' fixed 1e-6.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    def _check(self) -> None:
        n = len(self.block_out_channels)
        for key, value, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            bad = sorted({b for b in value if b not in allowed})
            if bad:
                raise ValueError(f"AutoencoderKL {key}: {bad} not supported; allowed: {', '.join(allowed)}")
            if len(value) != n:
                raise ValueError(f"AutoencoderKL {key} has {len(value)} entries, block_out_channels {n}")
        if self.act_fn != "silu":
            raise ValueError(f"AutoencoderKL act_fn {self.act_fn!r} not supported; allowed: silu")
        bad_ch = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_ch:
            raise ValueError(f"AutoencoderKL block_out_channels {bad_ch} not divisible by norm_num_groups")

    def setup(self):
        self._check()
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            mid_attention=self.mid_block_add_attention,
            dtype=self.dtype,
        )
        self.encoder = Encoder(2 * self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, in_channels) -> posterior (mean, logvar), float32, logvar clipped to [-30, 20]."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"AutoencoderKL.encode: x must be (B, H, W, {self.in_channels}) with H, W multiples of {f}, got "
                f"{tuple(x.shape)}"
            )
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels), float32."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: z must be (B, h, w, {self.latent_channels}), got {tuple(z.shape)}")
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode a posterior sample (key given) or the mean (key None)."""
        mean, logvar = self.encode(x)
        return self.decode(mean if key is None else sample_posterior(key, mean, logvar))


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw of the diagonal Gaussian posterior: ``mean + exp(logvar / 2) * eps``, eps ~ N(0, I)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


# Named configs (diffusers config.json values). "sd" is stabilityai/sd-vae-ft-ema / -mse (83.7M params,
# 8x downsampling, 4 latent channels); "tiny" is CPU-sized for tests (2 blocks, 2x downsampling).
VAE_CONFIGS: MappingProxyType = MappingProxyType(
    {
        "sd": MappingProxyType(
            dict(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
                latent_channels=4,
                norm_num_groups=32,
            )
        ),
        "tiny": MappingProxyType(
            dict(
                block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
            )
        ),
    }
)


def get_vae(name: str, **overrides: Any) -> AutoencoderKL:
    """AutoencoderKL of a named config in VAE_CONFIGS ("sd", "tiny"), with field overrides."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE config {name!r}; allowed: {', '.join(VAE_CONFIGS)}")
    return AutoencoderKL(**{**VAE_CONFIGS[name], **overrides})
