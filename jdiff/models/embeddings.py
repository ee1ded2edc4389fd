"""Timestep, class-label and position embeddings shared by the U-Net and DiT.

All functions are pure; modules are Flax Linen with ``dtype`` (compute) and
``param_dtype`` (storage, float32 by default) fields.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def timestep_embedding(
    t: jax.Array, dim: int, *, max_period: float = 10000.0, cos_first: bool = False, freq_shift: float = 0.0
) -> jax.Array:
    """Sinusoidal timestep embedding (Vaswani et al. 2017 Sec. 3.5; DDPM App. B; ADM).

    ``emb[:, i] = sin(t * f_i)``, ``emb[:, half + i] = cos(t * f_i)`` with
    ``f_i = max_period ** (-i / (half - freq_shift))``, ``half = dim // 2``. ``freq_shift=0`` gives the
    ADM/DiT frequencies; ``freq_shift=1`` those of DDPM's original code (frequencies over ``half - 1``) and
    of diffusers' ``get_timestep_embedding(downscale_freq_shift=1)``. Works for fractional ``t``.
    ``cos_first=True`` gives the [cos, sin] order of ADM/DiT's reference code (diffusers'
    ``flip_sin_to_cos=True``). Odd ``dim`` is zero-padded by one column.

    Args:
      t: (B,) timesteps, any real dtype (may be fractional).
      dim: embedding width.
    Returns:
      (B, dim) float32.
    """
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    if half - freq_shift <= 0:
        raise ValueError(f"timestep embedding: freq_shift={freq_shift} must be below dim // 2 = {half}")
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if cos_first else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding followed by Dense -> SiLU -> Dense (DDPM/ADM/DiT).

    ``(B,) float t -> (B, hidden) dtype``. ``freq_dim`` is the sinusoid width
    (DDPM U-Net: ``ch``; DiT: 256); ``cos_first`` and ``freq_shift`` as in ``timestep_embedding``.
    """

    hidden: int
    freq_dim: int = 256
    cos_first: bool = False
    freq_shift: float = 0.0
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        emb = timestep_embedding(t, self.freq_dim, cos_first=self.cos_first, freq_shift=self.freq_shift)
        dense = lambda name: nn.Dense(
            self.hidden, kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        return dense("dense_1")(nn.silu(dense("dense_0")(emb)))


def check_labels(y: jax.Array, num_classes: int, batch: int | None = None) -> None:
    """Raise ``ValueError`` unless ``y`` is an integer (B,) array with values in [0, num_classes].

    ``num_classes`` itself is the null (unconditional) label. The value check runs
    only for concrete arrays (eager ``apply``); for tracers (inside ``jit``, ``grad``,
    ``eval_shape``) only shape and dtype can be checked, and JAX's gather then gives
    NaN rows for labels > num_classes and wraps negative labels, without an error.
    Validate labels before a jitted train/sample loop.
    """
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(f"class labels y must be an integer array, got dtype {jnp.result_type(y)}")
    if jnp.ndim(y) != 1 or (batch is not None and jnp.shape(y)[0] != batch):
        raise ValueError(f"class labels y must have shape (B,)=({batch},), got {jnp.shape(y)}")
    if isinstance(y, jax.core.Tracer):
        return
    yv = np.asarray(y)
    if yv.size and (yv.min() < 0 or yv.max() > num_classes):
        raise ValueError(
            f"class labels y must be in [0, num_classes]=[0, {num_classes}] "
            f"({num_classes} is the null label for classifier-free guidance); "
            f"got min {yv.min()}, max {yv.max()}"
        )


def drop_labels(key: jax.Array, y: jax.Array, prob: float, null_label: Any) -> jax.Array:
    """Replace each example's condition by the null one with probability ``prob`` (CFG training,
    Ho & Salimans 2022, Alg. 1). Pure: ``(key, (B, ...) int) -> (B, ...) int``: labels (B,) with the null label
    an int, or caption token ids (B, L) with the empty caption's ids (L,) (caption dropout).
    A Python number ``prob <= 0`` returns ``y`` itself (no random draw)."""
    if isinstance(prob, (int, float)) and prob <= 0:
        return y
    drop = jax.random.bernoulli(key, prob, jnp.shape(y)[:1])
    drop = drop.reshape(drop.shape + (1,) * (jnp.ndim(y) - 1))
    return jnp.where(drop, jnp.asarray(null_label, jnp.result_type(y)), y)


class LabelEmbedder(nn.Module):
    """Class-label embedding table with ``num_classes + 1`` rows; row ``num_classes``
    is the learned null label used for classifier-free guidance (DiT Sec. 3.1).

    ``y=None`` embeds the null label; label dropout is ``drop_labels``, done by the caller.
    ``(B,) int32 -> (B, hidden) dtype``.
    """

    num_classes: int
    hidden: int
    embedding_init: Any = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array | None, batch: int) -> jax.Array:
        if y is None:
            y = jnp.full((batch,), self.num_classes, jnp.int32)
        else:
            y = jnp.asarray(y)
            check_labels(y, self.num_classes, batch)
        table = nn.Embed(
            self.num_classes + 1,
            self.hidden,
            embedding_init=self.embedding_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="table",
        )
        return table(y)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos position embedding (MAE ``get_1d_sincos_pos_embed_from_grid``):
    ``(M,) -> (M, dim)`` float64, [sin | cos], frequencies ``10000 ** (-2i/dim)``."""
    if dim % 2:
        raise ValueError(f"sin-cos position embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE/DiT ``get_2d_sincos_pos_embed``).

    First half of the channels encodes the column (w) index, second half the row
    (h) index, exactly as the DiT reference (its meshgrid puts w first).
    Returns a numpy (grid_h * grid_w, dim) float32 array in row-major patch order,
    computed at trace time (a constant, not a parameter).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding width must be divisible by 4, got {dim}")
    gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    emb = np.concatenate([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], axis=1)
    return emb.astype(np.float32)
