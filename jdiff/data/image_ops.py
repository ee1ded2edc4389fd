"""Host-side (numpy/Pillow) image helpers shared by the sources.

All images are HWC numpy arrays. "Unit range" means float32 in [-1, 1].

Pixel values map to the unit range by dtype (``to_unit``), so every Pillow
mode has one documented meaning (``pil_to_array`` gives the array):

* bool (mode "1"): False -> -1, True -> 1.
* uint8 ("L", "LA", "RGB", "RGBA", and "P", "CMYK", "YCbCr", ... after
  Pillow's ``convert`` to RGB/RGBA): [0, 255].
* uint16 ("I;16*", 16-bit grey PNGs) and int32 ("I"): the 16-bit range
  [0, 65535], clipped. No per-image guessing: an "I" image holding only 0/1 is
  near-black, not a binary mask.
* float ("F"): [0, 1], clipped.

Alpha (2 or 4 channels) is composited on black: colour * alpha, so
transparent pixels become -1 whatever colour they store. "P" images with
transparency become RGBA first; "L"/"RGB" images with a tRNS colour key too.
Grey -> RGB repeats the channel, RGB -> grey uses ITU-R 601-2 luma.

Geometry: the shorter side is resized to ``size`` (Pillow BICUBIC, which
antialiases when downscaling; skipped when the shorter side already equals
``size``, so same-size data is never resampled), then a centred
``size x size`` square is cropped (offset ``(long - size) // 2``).

``read_image`` (full decode) raises ``DataError`` (a ValueError) naming the
file instead of Pillow's OSErrors; ``check_image`` is the cheap start-up check.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Modes whose numpy array already has a meaning in ``to_unit``; others go through Pillow's convert.
_ARRAY_MODES = {"1", "L", "LA", "RGB", "RGBA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_JPEG_EOI = b"\xff\xd9"


class DataError(ValueError):
    """An image file that cannot be read or decoded (one line, naming the file)."""


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def uint8_to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (0 -> -1, 255 -> 1), same shape."""
    return np.asarray(x, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_unit(x: np.ndarray) -> np.ndarray:
    """Pixel array -> float32 [-1, 1], scaled by dtype (see the module docstring), same shape."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return np.where(x, np.float32(1.0), np.float32(-1.0))
    if x.dtype == np.uint8:
        return uint8_to_unit(x)
    if np.issubdtype(x.dtype, np.integer):  # uint16 / int32: the 16-bit range
        return np.clip(x, 0, 65535).astype(np.float32) / np.float32(32767.5) - np.float32(1.0)
    if np.issubdtype(x.dtype, np.floating):
        return np.clip(x, 0.0, 1.0).astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    raise ValueError(f"unsupported pixel dtype {x.dtype}")


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) float32 unit range with C in {1, 2, 3, 4} -> (H, W, channels), channels in {1, 3}.

    A trailing alpha channel (C = 2 or 4) is composited on black; then 1 -> 3
    repeats the grey channel and 3 -> 1 uses luma.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    c = x.shape[-1]
    if c in (2, 4):
        alpha = (x[..., -1:] + np.float32(1.0)) * np.float32(0.5)
        x, c = (x[..., :-1] + np.float32(1.0)) * alpha - np.float32(1.0), c - 1
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
    """Pixel array (H, W[, C]) of any ``to_unit`` dtype -> float32 (size, size, channels) in [-1, 1]."""
    if x.ndim == 2:
        x = x[..., None]
    out = convert_channels(to_unit(x), channels)
    if out.shape[:2] != (size, size):
        out = np.clip(resize_center_crop(out, size), -1.0, 1.0)
    return out


def pil_to_array(img: Image.Image) -> np.ndarray:
    """Decoded Pillow image -> (H, W, C) array for ``prepare``, EXIF orientation applied.

    Modes without an array meaning ("P", "PA", "CMYK", "YCbCr", "La", ...) and
    "1"/"L"/"RGB" images with a transparency key are converted by Pillow to
    RGBA (if they carry transparency) or RGB (CMYK: Pillow's naive
    conversion, no ICC profile).
    """
    img = ImageOps.exif_transpose(img)
    if img.mode not in _ARRAY_MODES or (img.mode in ("1", "L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file -> (H, W, C) array (see ``pil_to_array``); DataError if it cannot."""
    try:
        with Image.open(path) as img:
            return pil_to_array(img)
    except MemoryError:
        raise
    except Exception as e:
        raise DataError(f"cannot decode image file {os.fspath(path)!r}: {_one_line(e)}") from e


def _ends_with(path: str | os.PathLike, tail: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - len(tail)))
        return f.read() == tail


def check_image(path: str | os.PathLike) -> tuple[tuple[int, int] | None, str | None]:
    """Cheap check that a file is a readable image, without decoding its pixels.

    Returns ``((width, height), None)``, or ``(None, reason)`` with a one-line
    reason. Pillow parses the header and ``verify()``s the file (for PNG: every
    chunk's CRC up to IEND, so truncation is caught). A JPEG that does not end
    with its end-of-image marker (truncated, or trailing bytes) is decoded at
    1/8 scale to decide.
    """
    try:
        with Image.open(path) as img:
            size, fmt = img.size, img.format
            img.verify()
        if fmt in ("JPEG", "MPO") and not _ends_with(path, _JPEG_EOI):
            with Image.open(path) as img:
                img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                img.load()
    except MemoryError:
        raise
    except Exception as e:
        return None, _one_line(e).replace(os.fspath(path), os.path.basename(path))
    return size, None
