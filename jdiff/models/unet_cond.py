"""Text-conditioned U-Net of Stable Diffusion 1.x / 2.x (Rombach et al. 2022, Sec. 3.3, App. E.2; diffusers'
UNet2DConditionModel with CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D /
UpBlock2D).

``UNetCond().apply({'params': p}, x, t, context, train=False)`` maps NHWC latents ``x`` (B, H, W, C), ``t`` (B,)
float timesteps and text-encoder states ``context`` (B, L, D) to a float32 (B, H, W, out) prediction. It is the
DDPM U-Net of `jdiff.models.unet` (same `ResBlock`, resampling and skip connections) with a `Transformer2D`
(self-attention, cross-attention over ``context``, GEGLU feed-forward) after every res block of the levels
marked in ``cross_attention`` and in the middle. With `SD15` it has the 859,520,964 parameters of
runwayml/stable-diffusion-v1-5's UNet, with `SD21` the 865,910,724 of stabilityai/stable-diffusion-2-1's.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.embeddings import TimestepEmbedder
from jdiff.models.layers import check_inputs, num_groups
from jdiff.models.transformer2d import Transformer2D
from jdiff.models.unet import Downsample, ResBlock, Upsample, default_init, zero_init

Dtype = Any


class UNetCond(nn.Module):
    """Cross-attention U-Net.

    Fields:
      block_out_channels: width of each level (SD: (320, 640, 1280, 1280)); ``len - 1`` 2x downsamplings.
      cross_attention: per level, whether its res blocks are followed by a `Transformer2D` (SD: all but the
        last); the decoder mirrors it; the middle always has one.
      heads: attention heads per level (an int: the same for every level); head width = level width / heads
        (diffusers' ``attention_head_dim``, which holds the head count for these models). The middle uses the
        last level's.
      layers_per_block: res blocks per encoder level (decoder: one more).
      transformer_layers: BasicTransformerBlocks per `Transformer2D`.
      context_dim: width D of the text-encoder states (diffusers' ``cross_attention_dim``; SD 1.x: 768, SD 2.x:
        1024); used by `abstract_params`-style initialisation, the layers read it from ``context``.
      out_channels: output channels (None: as many as the input).
      norm_groups / norm_eps: GroupNorm groups (`layers.num_groups`) and eps of the res blocks and the output.
      cos_first / freq_shift: the sinusoidal time embedding (SD: cos first, shift 0).
      downsample_padding: 1 = one pixel on every side of the strided conv (SD), 0 = DDPM's (0, 1).
      dropout: res-block dropout (active with ``train=True`` and a ``'dropout'`` rng).
      dtype / param_dtype: compute / parameter dtypes; the output is float32.
    """

    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    cross_attention: Sequence[bool] = (True, True, True, False)
    heads: int | Sequence[int] = 8
    layers_per_block: int = 2
    transformer_layers: int = 1
    context_dim: int = 768
    out_channels: int | None = None
    norm_groups: int = 32
    norm_eps: float = 1e-5
    cos_first: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def level_heads(self) -> tuple[int, ...]:
        """Attention heads of each level."""
        n = len(self.block_out_channels)
        heads = (self.heads,) * n if isinstance(self.heads, int) else tuple(self.heads)
        if len(heads) != n:
            raise ValueError(f"heads must be an int or one per level ({n}), got {self.heads!r}")
        for w, h in zip(self.block_out_channels, heads):
            if h < 1 or w % h:
                raise ValueError(f"heads={self.heads!r}: {h} heads do not divide the level width {w}")
        return heads

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
        boc = tuple(self.block_out_channels)
        n = len(boc)
        if len(self.cross_attention) != n:
            raise ValueError(f"cross_attention needs one entry per level ({n}), got {self.cross_attention!r}")
        check_inputs(x, None, None, 2 ** (n - 1), f"UNetCond with {n} levels downsamples {n - 1} times")
        b, _, _, c_in = x.shape
        if jnp.ndim(context) != 3 or jnp.shape(context)[0] != b:
            raise ValueError(f"context must be text-encoder states (B, L, D) with B={b}, got {jnp.shape(context)}")
        heads = self.level_heads()
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_kw = dict(dropout=self.dropout, norm_groups=self.norm_groups, norm_eps=self.norm_eps, **kw)

        def attn(h, lvl, name):
            w = h.shape[-1]
            tr = Transformer2D(heads[lvl], w // heads[lvl], self.transformer_layers, self.norm_groups, name=name, **kw)
            return tr(h, context)

        emb = TimestepEmbedder(
            4 * boc[0],
            freq_dim=boc[0],
            cos_first=self.cos_first,
            freq_shift=self.freq_shift,
            kernel_init=default_init,
            name="time_embed",
            **kw,
        )(t)
        h = nn.Conv(boc[0], (3, 3), kernel_init=default_init, name="conv_in", **kw)(x.astype(self.dtype))
        hs = [h]
        for lvl, width in enumerate(boc):
            for i in range(self.layers_per_block):
                h = ResBlock(width, name=f"down_{lvl}_res_{i}", **res_kw)(h, emb, train)
                if self.cross_attention[lvl]:
                    h = attn(h, lvl, f"down_{lvl}_attn_{i}")
                hs.append(h)
            if lvl != n - 1:
                h = Downsample(self.downsample_padding, name=f"down_{lvl}_resample", **kw)(h)
                hs.append(h)

        h = ResBlock(boc[-1], name="mid_res_0", **res_kw)(h, emb, train)
        h = attn(h, n - 1, "mid_attn")
        h = ResBlock(boc[-1], name="mid_res_1", **res_kw)(h, emb, train)

        for lvl in reversed(range(n)):
            for i in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = ResBlock(boc[lvl], name=f"up_{lvl}_res_{i}", **res_kw)(h, emb, train)
                if self.cross_attention[lvl]:
                    h = attn(h, lvl, f"up_{lvl}_attn_{i}")
            if lvl != 0:
                h = Upsample(name=f"up_{lvl}_resample", **kw)(h)
        assert not hs

        h = nn.GroupNorm(num_groups(boc[0], self.norm_groups), epsilon=self.norm_eps, name="norm_out", **kw)(h)
        h = nn.Conv(self.out_channels or c_in, (3, 3), kernel_init=zero_init, name="conv_out", **kw)(nn.silu(h))
        return h.astype(jnp.float32)


# The published configurations (diffusers' unet/config.json of each): SD 1.x (runwayml/stable-diffusion-v1-5,
# CompVis/stable-diffusion-v1-4: 64x64x4 latents, CLIP ViT-L/14 states of width 768) and SD 2.x
# (stabilityai/stable-diffusion-2-1: 96x96x4, OpenCLIP ViT-H/14 states of width 1024, head width 64).
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention=(True, True, True, False), heads=8)
SD15.update(context_dim=768)
SD21 = dict(SD15, heads=(5, 10, 20, 20), context_dim=1024)
