"""Sample grids from the EMA parameters, written as PNG (Pillow)."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff.training.config import TrainConfig


def grid_labels(num_samples: int, num_classes: Optional[int]) -> Optional[jax.Array]:
    """(N,) int32 labels 0, 1, ..., num_classes-1, 0, 1, ... (None if unconditional)."""
    if not num_classes:
        return None
    return jnp.arange(num_samples, dtype=jnp.int32) % num_classes


def generate(model: Any, schedule: Any, params: Any, config: TrainConfig, image_shape: tuple, rng: jax.Array,
             num_classes: Optional[int]) -> np.ndarray:
    """config.num_samples images (N, H, W, C) float32 in [-1, 1] drawn with config.sampler / sample_steps
    (classifier-free guidance if config.guidance_scale and the model is conditional)."""
    labels = grid_labels(config.num_samples, num_classes)
    guided = labels is not None and config.guidance_scale is not None
    x = jdiff.sample(
        model.apply, schedule, (config.num_samples, *image_shape), rng, params={"params": params},
        sampler=config.sampler, num_steps=config.sample_steps, prediction=config.objective, labels=labels,
        guidance_scale=config.guidance_scale if guided else None, null_label=num_classes if guided else None,
        clip_x0=(-1.0, 1.0),
    )
    return np.clip(np.asarray(x, np.float32), -1.0, 1.0)


def image_grid(images: np.ndarray, *, columns: int, upscale: int = 1, pad: int = 1) -> np.ndarray:
    """Tiles (N, H, W, C) float images in [-1, 1] into a uint8 (rows*(H*s+pad)+pad, ..., C) grid with
    `pad` pixels of mid-grey between tiles, each tile upscaled `upscale`x by nearest neighbour."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    u8 = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
    if upscale > 1:
        u8 = u8.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = u8[i]
    return grid


def save_png(grid: np.ndarray, path: str) -> str:
    """Writes a uint8 (H, W, 1|3) grid as PNG (atomically). Returns the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path


def sample_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "samples", f"step_{step:06d}.png")
