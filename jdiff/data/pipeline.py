"""Source dispatch and step-indexed batches (numpy on the host, jax.Array on devices).

``batch_at(source, step, ...)`` is a pure function of (source, seed, step):
resuming training at step ``s`` only needs ``s`` (see ``jdiff.data.sampler``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from jdiff.data import sampler
from jdiff.data.latent_cache import LatentCacheSource, is_latent_cache
from jdiff.data.prefetch import BatchIterator
from jdiff.data.sources import BAD_IMAGE_POLICIES, DigitsSource, ImageFolderSource, Source
from jdiff.data.tfds_source import TfdsSource
from jdiff.data.workers import check_workers

Batch = dict[str, np.ndarray]


def make_source(
    name: str,
    *,
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    data_dir: str | os.PathLike | None = None,
    on_bad_image: str = "skip",
    workers: int | None = None,
) -> Source:
    """Builds a source from a name.

    * ``"digits"`` -> ``DigitsSource(split, image_size, channels)``
      (splits "train"/"test"/"all"; ``data_dir`` unused).
    * a latent cache directory (``jdiff.cli.encode``'s output, holding
      latent_cache.json) -> ``LatentCacheSource(name, split)`` (split must be
      the encoded one; image_size/channels are checked by the training setup).
    * an existing directory or PNG/JPEG file -> ``ImageFolderSource(name,
      image_size, channels or 3, on_bad_image)``; ``image_size`` is required
      and ``split`` must be "train" or "all" (folders have no splits).
      ``on_bad_image`` ("skip" or "error") says what to do with unreadable
      files; it is validated for every name but only used by folders.
    * anything else -> ``TfdsSource(name, split, data_dir, image_size,
      channels)`` (e.g. "mnist", "fashion_mnist", "cifar10", "celeb_a"); the
      dataset must already be prepared as array_record.

    ``workers``: threads that decode a batch of a folder or tfds source (None:
    one per core, at most 8; ``jdiff.data.workers``); batches do not depend on it.

    Raises ValueError naming the offending argument.
    """
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name):
        raise ValueError(f"name must be 'digits', a path or a TFDS name, got {name!r}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    check_workers(workers)
    if os.fspath(name) == "digits":
        return DigitsSource(split, image_size=image_size, channels=channels)
    path = os.path.expanduser(os.fspath(name))
    if is_latent_cache(path):
        return LatentCacheSource(path, split)
    if os.path.exists(path):
        if split not in ("train", "all"):
            raise ValueError(f"split must be 'train' or 'all' for an image folder, got {split!r}")
        if image_size is None:
            raise ValueError(f"image_size is required for an image folder/file (name={name!r})")
        return ImageFolderSource(
            path, image_size, 3 if channels is None else channels, on_bad_image=on_bad_image, workers=workers
        )
    try:
        return TfdsSource(os.fspath(name), split, data_dir, image_size, channels, workers=workers)
    except ValueError as e:
        if os.sep in path or path.startswith("."):
            raise ValueError(f"name {name!r} is neither an existing path nor an available TFDS dataset: {e}") from None
        raise


def _gather(source: Source, step: int, rows: np.ndarray, global_batch_size: int, seed: int, random_flip: bool) -> Batch:
    """The global-batch ``rows`` at ``step``: image float32 (len(rows), H, W, C), label int32."""
    indices = sampler.indices_at(len(source), step * global_batch_size + rows, seed)
    if random_flip and getattr(source, "handles_flips", False):  # e.g. a latent cache's stored flipped posteriors
        return source.get(indices, flip=sampler.flip_mask(step, rows, global_batch_size=global_batch_size, seed=seed))
    batch = source.get(indices)
    if random_flip:
        flip = sampler.flip_mask(step, rows, global_batch_size=global_batch_size, seed=seed)
        image = np.array(batch["image"], copy=True)
        image[flip] = image[flip, :, ::-1]
        batch = dict(batch, image=image)
    return batch


def batch_at(
    source: Source,
    step: int,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    random_flip: bool = False,
) -> Batch:
    """This host's slice of global batch ``step``.

    Returns ``{"image": float32 (B/P, H, W, C) in [-1, 1], "label": int32 (B/P,)}``
    with B = global_batch_size, P = process_count (B % P must be 0). With
    ``random_flip`` each example is mirrored horizontally with probability 1/2,
    decided by (seed, step, row) so the result is reproducible.
    """
    sampler.check_step(step)
    sampler.check_batch_args(global_batch_size, seed, process_index, process_count)
    rows = sampler.host_rows(global_batch_size, process_index, process_count)
    return _gather(source, step, rows, global_batch_size, seed, random_flip)


def _local_rows(sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Sorted global-batch rows that this process's devices hold under ``sharding``."""
    try:
        sharding.shard_shape(global_shape)
    except ValueError as e:
        raise ValueError(f"global_batch_size={global_shape[0]} cannot be split by sharding={sharding}: {e}") from None
    rows = [
        np.arange(*(idx[0] if idx else slice(None)).indices(global_shape[0]))
        for idx in sharding.addressable_devices_indices_map(global_shape).values()
    ]
    return np.unique(np.concatenate(rows))


def iterate_batches(
    source: Source,
    *,
    start_step: int = 0,
    global_batch_size: int,
    seed: int,
    num_steps: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    random_flip: bool = False,
    sharding: Any = None,
    prefetch: int = 2,
    transform: Callable[[int, Any], Any] | None = None,
) -> BatchIterator:
    """Iterator of device batches for steps ``start_step, start_step + 1, ...``.

    * ``sharding`` given (a ``jax.sharding.Sharding``, or a dict of them keyed
      like the batch): yields global ``jax.Array``s of shape (B, ...) built with
      ``jax.make_array_from_process_local_data`` from the rows this process's
      devices hold (for the usual process-major mesh these are exactly
      ``batch_at(..., process_index, process_count)``; process_index/count are
      then ignored). Values equal ``batch_at`` for the global batch.
    * ``sharding=None``: yields ``batch_at(...)`` for this host (process_index/
      count default to ``jax.process_index()/process_count()``) placed on the
      default device with ``jax.device_put``.

    ``prefetch`` batches are prepared (and transferred) ahead in a background
    thread; use the iterator in a ``with`` block or call ``close()`` to stop it
    early. ``num_steps=None`` iterates forever.

    ``transform(step, batch) -> batch`` (optional) is applied to each device batch in the same background
    thread (e.g. encoding images to VAE latents), so it overlaps with the consumer's work.
    """
    import jax

    sampler.check_step(start_step)
    if sharding is None:
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        sampler.check_batch_args(global_batch_size, seed, pi, pc)

        def make_batch(step: int):
            return jax.device_put(
                batch_at(
                    source,
                    step,
                    global_batch_size=global_batch_size,
                    seed=seed,
                    process_index=pi,
                    process_count=pc,
                    random_flip=random_flip,
                )
            )

    else:
        sampler.check_batch_args(global_batch_size, seed, 0, 1)
        shardings = dict(sharding) if isinstance(sharding, Mapping) else {"image": sharding, "label": sharding}
        if set(shardings) != {"image", "label"}:
            raise ValueError(
                f"sharding must be one Sharding or a dict with keys 'image' and 'label', got {sorted(shardings)}"
            )
        shapes = {"image": (global_batch_size, *source.image_shape), "label": (global_batch_size,)}
        rows = {k: _local_rows(shardings[k], shapes[k]) for k in shapes}
        if not np.array_equal(rows["image"], rows["label"]):
            raise ValueError("sharding must assign the same batch rows to this process for 'image' and 'label'")
        local_rows = rows["image"]

        def make_batch(step: int):
            local = _gather(source, step, local_rows, global_batch_size, seed, random_flip)
            out = {k: jax.make_array_from_process_local_data(shardings[k], local[k], shapes[k]) for k in shapes}
            for k in sorted(set(local) - set(shapes)):  # more per-example arrays (a text run's "tokens"): label's rows
                shape = (global_batch_size, *local[k].shape[1:])
                out[k] = jax.make_array_from_process_local_data(shardings["label"], local[k], shape)
            return out

    if transform is not None:
        raw = make_batch
        make_batch = lambda step: transform(step, raw(step))  # noqa: E731
    return BatchIterator(make_batch, start_step=start_step, num_steps=num_steps, prefetch=prefetch)
