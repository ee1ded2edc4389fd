"""Writing images: tiled grids as PNG (Pillow), raw samples as .npz, denoising trajectories as PNG strip + GIF."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np


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
        grid[y : y + h, x : x + w] = u8[i]
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


def upscale_for(image_shape: Sequence[int], min_side: int = 64) -> int:
    """Nearest-neighbour factor that makes a tile at least `min_side` pixels (8x8 digits -> 8)."""
    return max(1, -(-min_side // max(image_shape[0], image_shape[1])))


class NpzStream:
    """Writes an .npz of `num` float32 images of `image_shape` batch by batch, so memory stays flat in `num`:
    images go to a temporary .npy on disk (memory-mapped), and `finish` stores it in the .npz (a zip of .npy
    files, as `np.savez` writes it) with the labels and metadata, atomically. `abort` leaves nothing behind."""

    def __init__(self, path: str, num: int, image_shape: Sequence[int]):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self._npy = path, path + ".images.tmp.npy"
        self._images = np.lib.format.open_memmap(self._npy, mode="w+", dtype=np.float32, shape=(num, *image_shape))

    def add(self, start: int, images: np.ndarray) -> None:
        self._images[start : start + len(images)] = images

    def finish(self, labels: Optional[np.ndarray], **meta: Any) -> str:
        """Writes the .npz: images (N, H, W, C), labels int32 (N,) (empty if unconditional), and `meta`."""
        import zipfile

        self._images.flush()
        del self._images
        arrays = {"labels": np.zeros((0,), np.int32) if labels is None else np.asarray(labels, np.int32)}
        arrays.update({k: np.asarray(v) for k, v in meta.items()})
        tmp = self.path + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(self._npy, "images.npy")
            for name, arr in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, arr)
        os.replace(tmp, self.path)
        os.remove(self._npy)
        return self.path

    def abort(self) -> None:
        if hasattr(self, "_images"):
            del self._images
        for p in (self._npy, self.path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)


def write_trajectory(traj: np.ndarray, png_path: str, gif_path: str, upscale: int) -> tuple[str, str]:
    """traj (F, S, H, W, C): a strip PNG (one row per sample, one column per kept step, x_T first) and
    an animated GIF (one frame per kept step, the samples side by side; the last frame held longer)."""
    from PIL import Image

    f, s = traj.shape[:2]
    strip = image_grid(np.swapaxes(traj, 0, 1).reshape(f * s, *traj.shape[2:]), columns=f, upscale=upscale)
    save_png(strip, png_path)
    frames = []
    for k in range(f):
        g = image_grid(traj[k], columns=s, upscale=upscale)
        frames.append(Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g))
    os.makedirs(os.path.dirname(gif_path) or ".", exist_ok=True)
    frames[0].save(gif_path, save_all=True, append_images=frames[1:], duration=[120] * (f - 1) + [1200], loop=0)
    return png_path, gif_path
