"""Random-access image sources (in-memory arrays, sklearn digits, image folders).

Every source has ``num_classes`` (int, or None when unlabelled),
``image_shape`` ``(H, W, C)``, ``__len__`` and ``get(indices)`` returning
``{"image": float32 (n, H, W, C) in [-1, 1], "label": int32 (n,)}``
(labels are all 0 for unlabelled sources). ``get`` is thread-safe: sources
hold no mutable state after construction. Sources that decode files
(``ImageFolderSource``, ``TfdsSource``) decode a batch on ``workers`` threads.

Errors: bad arguments and unusable data found at construction are
ValueErrors. ``ImageFolderSource.get`` raises ``image_ops.DataError`` (a ValueError
subclass, one line naming the file) when an image that passed the start-up
check cannot be decoded (corrupt pixel data, file changed or removed since):
catch it in a training loop to save a checkpoint and stop cleanly.

Upscaling is capped: ``image_size`` may be at most ``MAX_UPSCALE`` (8) times
the native shorter side (digits: 64; image folders: 8x the largest shorter
side; TFDS: 8x the dataset's shape), so a typo such as ``image_size=4096``
on 8x8 digits fails at once instead of exhausting memory.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np

from jdiff.data import image_ops
from jdiff.data.workers import check_workers, decode_into

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DIGITS_SPLITS = ("train", "test", "all")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
MAX_UPSCALE = 8
BAD_IMAGE_POLICIES = ("skip", "error")
_SHOW_BAD = 5  # bad files named in the warning / error


@runtime_checkable
class Source(Protocol):
    """Random-access dataset of images (and labels)."""

    num_classes: int | None
    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


def _as_indices(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"indices out of range [0, {n})")
    return idx


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return channels


def check_upscale(image_size: int, native_side: int, what: str) -> None:
    """ValueError if ``image_size`` exceeds ``MAX_UPSCALE`` times the native shorter side."""
    if image_size > MAX_UPSCALE * native_side:
        raise ValueError(
            f"image_size={image_size} would upscale {what} (shorter side {native_side}) more than "
            f"{MAX_UPSCALE}x; use image_size <= {MAX_UPSCALE * native_side}"
        )


class ArraySource:
    """In-memory source over already-prepared arrays.

    Args:
      images: float32-convertible (N, H, W, C), values in [-1, 1].
      labels: optional int (N,); None -> all zeros and ``num_classes=None``.
      num_classes: defaults to ``labels.max() + 1`` when labels are given.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, num_classes: int | None = None):
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
        if labels is None:
            labels = np.zeros(len(images), np.int32)
        else:
            labels = np.asarray(labels, np.int32)
            if labels.shape != (len(images),):
                raise ValueError(f"labels must be ({len(images)},), got shape {labels.shape}")
            if num_classes is None:
                num_classes = int(labels.max()) + 1 if labels.size else 0
        self._images, self._labels = images, labels
        self.num_classes = num_classes
        self.image_shape = tuple(int(d) for d in images.shape[1:])

    def __len__(self) -> int:
        return len(self._images)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = _as_indices(indices, len(self))
        return {"image": self._images[idx], "label": self._labels[idx]}


def digits_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted example indices of a digits split.

    The held-out split is fixed: per class, ``round(0.2 * n_class)`` examples
    chosen by ``np.random.default_rng([DIGITS_SPLIT_SEED, class]).permutation``
    form "test" (359 examples), the rest "train" (1,438); "all" is everything.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS} for digits, got {split!r}")
    if split == "all":
        return np.arange(len(labels))
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        perm = np.random.default_rng([DIGITS_SPLIT_SEED, int(c)]).permutation(len(members))
        test.append(members[perm[: round(DIGITS_TEST_FRACTION * len(members))]])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


class DigitsSource(ArraySource):
    """scikit-learn's embedded 8x8 handwritten digits (1,797 images, 10 classes).

    Pixel values 0..16 map linearly to [-1, 1] (``x / 8 - 1``). Native shape is
    (8, 8, 1); ``image_size``/``channels`` optionally resize (bicubic) or
    repeat to RGB (at most 64, ``MAX_UPSCALE`` x 8). Splits: "train" (1,438),
    "test" (359, the fixed held-out set, see ``digits_split_indices``), "all"
    (1,797). Loaded (and resized) fully in memory.
    """

    def __init__(self, split: str = "train", image_size: int | None = None, channels: int | None = None):
        from sklearn.datasets import load_digits  # local: sklearn import is slow-ish

        bunch = load_digits()
        idx = digits_split_indices(bunch.target, split)
        images = (bunch.images[idx] / 8.0 - 1.0).astype(np.float32)[..., None]
        channels = _check_channels(1 if channels is None else channels)
        if channels != 1:
            images = np.repeat(images, channels, axis=-1)
        if image_size is not None and image_size != 8:
            check_upscale(image_size, 8, "the 8x8 digits")
            images = np.stack([np.clip(image_ops.resize_center_crop(x, image_size), -1.0, 1.0) for x in images])
        super().__init__(images, bunch.target[idx].astype(np.int32), num_classes=10)
        self.split = split


def _visible(rel: pathlib.PurePath) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def list_image_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Image files (PNG/JPEG, case-insensitive) under ``root``, recursive, hidden entries skipped, sorted."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and _visible(p.relative_to(root))
    )


def check_images(files, workers: int = 8, chunk: int = 256) -> list[tuple[tuple[int, int] | None, str | None]]:
    """``image_ops.check_image`` of every file, in order (a thread pool over chunks of files for large lists)."""
    files = list(files)
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    if len(chunks) <= 1:
        return [image_ops.check_image(f) for f in files]
    with ThreadPoolExecutor(min(workers, len(chunks)), thread_name_prefix="jdiff-data-check") as pool:
        return [r for part in pool.map(lambda c: [image_ops.check_image(f) for f in c], chunks) for r in part]


class ImageFolderSource:
    """Image files (.png/.jpg/.jpeg) from a directory tree or a single image file.

    Labels: if images live in subfolders, the class of an image is its
    top-level subfolder and ``class_names`` are the sorted names of the
    subfolders that contain image files (labels index into it; a class whose
    files are all unreadable keeps its index). If all images lie directly in
    ``path`` (or ``path`` is a file) the source is unlabelled:
    ``num_classes=None``, labels 0. Mixing loose root images with class
    subfolders is a ValueError. Hidden files/folders (".name") are skipped.

    Every file gets a cheap header check at construction
    (``image_ops.check_image``, ~0.1 ms per small PNG, no pixel decoding).
    Unreadable files (truncated, zero-byte, not an image) are, with
    ``on_bad_image="skip"`` (default), left out with one warning naming the
    first few and the count (``bad_files`` lists ``(path, reason)``), or with
    ``"error"`` refused by a ValueError naming the first few. No readable file
    at all is a ValueError either way.

    Images are decoded lazily in ``get`` (nothing is cached, so memory stays
    flat for large folders), on ``workers`` threads (None: one per core, at
    most 8; ``jdiff.data.workers``; the result does not depend on it), while
    the prefetch thread overlaps whole batches with training; a file that then
    fails to decode raises ``DataError`` (the first failing file in order). Pixels are scaled by mode
    (``image_ops``: 16-bit PNGs keep their range, alpha composited on black,
    EXIF orientation applied), converted to ``channels`` (1 grey, 3 RGB), the
    shorter side resized to ``image_size`` and centre-cropped -> float32
    (image_size, image_size, channels). ``image_size`` above ``MAX_UPSCALE``
    times the largest shorter side in the folder is a ValueError.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        on_bad_image: str = "skip",
        workers: int | None = None,
    ):
        root = pathlib.Path(path).expanduser()
        self.workers = check_workers(workers)
        if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int for an image folder, got {image_size!r}")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        self.channels = _check_channels(channels)
        if root.is_file():
            if root.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"path {str(path)!r} is not a PNG/JPEG file ({IMAGE_EXTENSIONS})")
            files, rel = [root], [pathlib.PurePath(root.name)]
        elif root.is_dir():
            files = list_image_files(root)
            rel = [f.relative_to(root) for f in files]
        else:
            raise ValueError(f"path {str(path)!r} does not exist")
        if not files:
            raise ValueError(f"path {str(path)!r} contains no images with extensions {IMAGE_EXTENSIONS}")
        nested = [len(r.parts) > 1 for r in rel]
        if any(nested) and not all(nested):
            loose = [str(r) for r, n in zip(rel, nested) if not n][:3]
            raise ValueError(
                f"path {str(path)!r} mixes class subfolders with images directly in the root (e.g. {loose}); "
                "move them into a subfolder or remove them"
            )
        if all(nested):
            self.class_names = tuple(sorted({r.parts[0] for r in rel}))
            lookup = {name: i for i, name in enumerate(self.class_names)}
            labels = [lookup[r.parts[0]] for r in rel]
            self.num_classes = len(self.class_names)
        else:
            self.class_names, labels, self.num_classes = (), [0] * len(files), None
        checks = check_images(files)
        ok = [size is not None for size, _ in checks]
        self.bad_files = tuple((f, reason) for f, (_, reason) in zip(files, checks) if reason is not None)
        if self.bad_files:
            bad = [f"{r.as_posix()}: {reason}" for r, (_, reason) in zip(rel, checks) if reason]
            more = f"; ... and {len(bad) - _SHOW_BAD} more" if len(bad) > _SHOW_BAD else ""
            summary = (
                f"{len(bad)} of {len(files)} image files in {str(path)!r} are unreadable: "
                f"{'; '.join(bad[:_SHOW_BAD])}{more}"
            )
            if on_bad_image == "error" or not any(ok):
                hint = "no readable image left" if not any(ok) else "fix or remove them, or pass on_bad_image='skip'"
                raise ValueError(f"{summary}; {hint}")
            warnings.warn(f"skipping {summary}", stacklevel=2)
        check_upscale(int(image_size), max(min(size) for size, _ in checks if size), f"the images in {str(path)!r}")
        self.files = tuple(f for f, good in zip(files, ok) if good)
        self.root = root if root.is_dir() else root.parent
        self._labels = np.asarray(labels, np.int32)[np.asarray(ok)]
        self.image_size = int(image_size)
        self.image_shape = (self.image_size, self.image_size, self.channels)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Decodes the files at ``indices``; DataError (naming the file) if one cannot be decoded."""
        idx = _as_indices(indices, len(self))
        images = np.empty((len(idx),) + self.image_shape, np.float32)
        decode_into(images, [self.files[i] for i in idx], self._decode, self.workers)
        return {"image": images, "label": self._labels[idx]}

    def _decode(self, path: pathlib.Path) -> np.ndarray:
        return image_ops.prepare(image_ops.read_image(path), self.image_size, self.channels)
