"""Decoding a batch on a pool of threads: ``decode_into(out, items, fn, workers)``.

Pillow's JPEG/PNG decoders and resampling, and numpy's large array operations,
release the GIL, so threads decode images in parallel without the start-up,
pickling and shared-memory costs of worker processes
(``benchmarks/input_pipeline.py`` measures both; docs/benchmarks.md). Each
thread fills a contiguous chunk of ``out`` in place, so the result is the
same array, bit for bit, for any number of workers; an exception is re-raised
for the first failing item in order, as a sequential loop would.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """One decoding thread per CPU core this process may use, at most ``MAX_DEFAULT_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def check_workers(workers: int | None) -> int:
    """``workers`` (a positive int; None: ``default_workers()``) -> the thread count; ValueError otherwise."""
    if workers is None:
        return default_workers()
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int or None (one per core), got {workers!r}")
    return int(workers)


def decode_into(out: np.ndarray, items: Sequence[Any], fn: Callable[[Any], np.ndarray], workers: int) -> np.ndarray:
    """``out[k] = fn(items[k])`` for every k, on up to ``workers`` threads; returns ``out``.

    The items are split into ``min(workers, len(items))`` contiguous chunks: the calling thread fills the
    first, one new thread each of the others (a thread costs ~0.1 ms to start, an image 1-10 ms to decode).
    """
    n = len(items)

    def fill(lo: int, hi: int) -> None:
        for k in range(lo, hi):
            out[k] = fn(items[k])

    chunks = min(workers, n)
    if chunks <= 1:
        fill(0, n)
        return out
    bounds = np.linspace(0, n, chunks + 1).round().astype(int)
    errors: list[BaseException | None] = [None] * chunks

    def run(c: int) -> None:
        try:
            fill(int(bounds[c]), int(bounds[c + 1]))
        except BaseException as e:  # noqa: BLE001 - re-raised below, in order
            errors[c] = e

    threads = [threading.Thread(target=run, args=(c,), name=f"jdiff-data-decode-{c}") for c in range(1, chunks)]
    for t in threads:
        t.start()
    run(0)  # the calling thread decodes the first chunk
    for t in threads:
        t.join()
    for e in errors:  # in order: the first failing chunk holds the first failing item
        if e is not None:
            raise e
    return out
