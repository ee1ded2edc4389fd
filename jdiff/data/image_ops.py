"""Host-side (numpy/Pillow) image helpers shared by the sources.

All images are HWC numpy arrays. "Unit range" means float32 in [-1, 1].
Geometry: the shorter side is resized to ``size`` (Pillow BICUBIC, which
antialiases when downscaling; skipped when the shorter side already equals
``size``, so same-size data is never resampled), then a centred
``size x size`` square is cropped (offset ``(long - size) // 2``).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def uint8_to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (0 -> -1, 255 -> 1), same shape."""
    return np.asarray(x, np.float32) / np.float32(127.5) - np.float32(1.0)


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) float32 with C in {1, 3, 4} -> (H, W, channels), channels in {1, 3}.

    1 -> 3 repeats the grey channel; 3/4 -> 1 uses luma (alpha dropped).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    c = x.shape[-1]
    if c == 4:
        x, c = x[..., :3], 3
    if c == channels:
        return x
    if c == 1:
        return np.repeat(x, 3, axis=-1)
    if c == 3:
        return (x @ _LUMA)[..., None].astype(np.float32)
    raise ValueError(f"cannot convert an image with {c} channels")


def resize_center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) float32 -> (size, size, C) float32: shorter side to ``size``, centre crop.

    Resampling happens per channel in Pillow's float ("F") mode, so no uint8
    rounding is introduced. Values are not clipped here.
    """
    if size <= 0:
        raise ValueError(f"image_size must be a positive int, got {size!r}")
    h, w = x.shape[:2]
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(x[..., k], np.float32), "F").resize(
                        (nw, nh), Image.Resampling.BICUBIC
                    )
                )
                for k in range(x.shape[-1])
            ],
            axis=-1,
        )
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return x[top : top + size, left : left + size]


def prepare(x: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (size, size, channels) in [-1, 1]."""
    if x.ndim == 2:
        x = x[..., None]
    out = convert_channels(uint8_to_unit(x), channels)
    if out.shape[:2] != (size, size):
        out = np.clip(resize_center_crop(out, size), -1.0, 1.0)
    return out


def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
    """Decodes an 8-bit PNG/JPEG file -> uint8 (H, W, channels), EXIF orientation applied."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return arr[..., None] if arr.ndim == 2 else arr
