"""Reference statistics as .npz: pytorch-fid's (``mu``, ``sigma``) and ADM's published reference batches.

pytorch-fid's ``--save-stats`` writes ``np.savez(path, mu=mu, sigma=sigma)``. ADM's reference batches
(Dhariwal & Nichol 2021, guided-diffusion ``evaluations/``, e.g. ``VIRTUAL_imagenet256_labeled.npz``) hold the
reference images ``arr_0`` (N, H, W, 3) uint8 and the pool3 statistics ``mu``, ``sigma`` (and ``mu_s``,
``sigma_s`` of spatial features, unused here). Both are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **extra) -> str:
    """Writes ``mu`` (d,) and ``sigma`` (d, d) (float64) and any ``extra`` arrays to ``path`` (pytorch-fid's
    layout; readable by ``pytorch_fid`` and `load_stats`); returns the path written."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"statistics must be mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, **extra)
    os.replace(tmp, path)
    return path


def _open(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"statistics file {path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"statistics file {path} is not a readable .npz ({' '.join(str(e).split())})") from None


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu (d,), sigma (d, d)) float64 from a pytorch-fid statistics file or an ADM reference batch; ValueError
    (one line) for a missing file, one without ``mu`` / ``sigma``, mismatched shapes or non-finite values."""
    with _open(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"statistics file {path} has no {' / '.join(missing)} array (it holds {sorted(f.files)})")
        try:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        except (ValueError, zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"statistics file {path}: cannot read mu / sigma ({' '.join(str(e).split())})") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"statistics file {path}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d)")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"statistics file {path}: mu or sigma contains NaN or inf")
    return mu, sigma


def _rgb(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 or [-1, 1] float images (n, H, W, 1 or 3) -> float32 RGB in [0, 1] (grey repeated, as PIL's
    ``convert('RGB')`` in pytorch-fid's loader; float samples quantised as sample.py's PNGs: `to_unit_range`)."""
    from jdiff.metrics.features import to_unit_range

    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must be (N, H, W, 3) or (N, H, W, 1) images, got shape {x.shape}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else to_unit_range(x)
    return np.repeat(x, 3, -1) if x.shape[-1] == 1 else x


def _read_header(fh):
    """(shape, fortran_order, dtype) of the .npy stream ``fh``, leaving it at the first data byte."""
    major, _ = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(fh)


def npz_images(path: str) -> tuple[str, tuple[int, ...], np.dtype]:
    """(member, shape, dtype) of the images of an ADM reference batch (``arr_0``) or a sample.py .npz
    (``images``), read from the .npy header only."""
    with _open(path) as f:
        key = next((k for k in ("arr_0", "images") if k in f.files), None)
        if key is None:
            raise ValueError(f"{path} has no images (arr_0 or images; it holds {sorted(f.files)})")
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as fh:
        shape, fortran, dtype = _read_header(fh)
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: {key} is not a plain C-order array")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"{path}: {key} must be (N, H, W, 3) or (N, H, W, 1) images, got shape {shape}")
    return key + ".npy", tuple(shape), dtype


def iter_npz_images(path: str, batch: int, limit: int | None = None):
    """Yields the images of an .npz (`npz_images`) as float32 RGB in [0, 1], ``batch`` rows at a time, reading
    the file in chunks (memory flat in N); ``limit`` stops after that many images."""
    member, shape, dtype = npz_images(path)
    n = shape[0] if limit is None else min(shape[0], limit)
    row = int(np.prod(shape[1:])) * dtype.itemsize
    with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
        _read_header(fh)
        for lo in range(0, n, batch):
            k = min(batch, n - lo)
            raw = fh.read(k * row)
            if len(raw) != k * row:
                raise ValueError(f"{path}: {member} is truncated at image {lo}")
            yield _rgb(np.frombuffer(raw, dtype).reshape(k, *shape[1:]), f"{path}: {member}")


def load_reference_images(path: str) -> np.ndarray:
    """All images of an ADM reference batch (``arr_0``) or a sample.py .npz, float32 RGB in [0, 1]."""
    member, shape, _ = npz_images(path)
    return np.concatenate(list(iter_npz_images(path, max(1, shape[0]))))
