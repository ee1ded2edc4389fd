"""A step-indexed iterator that computes ``make_batch(step)`` ahead in a background thread.

One daemon thread fills a bounded queue; blocking ``put``/``get`` need no
polling because the producer always delivers a batch or a failure for every
step the consumer may ask for, and ``close`` drains the queue, which unblocks a
waiting producer, before joining it. ``weakref.finalize`` runs the same
shutdown when the iterator is garbage-collected or still open at interpreter
exit (so no thread is inside JAX while the interpreter tears down).
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

_JOIN_S = 10.0  # an unfinished make_batch (e.g. a hung read) must not hang close() or exit forever


class _Failure:
    """Carries an exception raised in the producer thread to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_CLOSED = object()  # wakes a consumer still waiting in get() when another thread closes the iterator


def _produce(make_batch, out: queue.Queue, stop: threading.Event, step: int, end: int | None) -> None:
    try:
        while (end is None or step < end) and not stop.is_set():
            out.put(make_batch(step))
            step += 1
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
        out.put(_Failure(e))


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def _shutdown(stop: threading.Event, q: queue.Queue, thread: threading.Thread) -> None:
    stop.set()
    _drain(q)  # room for the producer's last put, so it returns, sees `stop` and exits
    if thread is not threading.current_thread():
        thread.join(_JOIN_S)
    _drain(q)  # release batches (device buffers) made before it saw `stop`
    try:
        q.put_nowait(_CLOSED)
    except queue.Full:  # only if the join timed out and the producer put once more
        pass


class BatchIterator:
    """Yields ``make_batch(step)`` for ``step = start_step, start_step + 1, ...``.

    Stops after ``num_steps`` batches (None: never). With ``prefetch > 0`` a
    daemon thread computes up to ``prefetch`` batches ahead; an exception
    raised there is re-raised by ``next()`` (after the batches made before it)
    and ends the iteration. The thread is stopped by ``close()``, the ``with``
    block, garbage collection or interpreter exit. ``step`` is the step of the
    next batch.
    """

    def __init__(
        self,
        make_batch: Callable[[int], Any],
        *,
        start_step: int = 0,
        num_steps: int | None = None,
        prefetch: int = 2,
        name: str = "jdiff-data-prefetch",
    ):
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 0):
            raise ValueError(f"num_steps must be None or a non-negative int, got {num_steps!r}")
        self.step = start_step
        self._make = make_batch
        self._end = None if num_steps is None else start_step + num_steps
        self._closed = False
        self._queue: queue.Queue | None = None
        self._finalizer = None
        if prefetch:
            self._queue = queue.Queue(maxsize=prefetch)
            stop = threading.Event()
            thread = threading.Thread(
                target=_produce, args=(make_batch, self._queue, stop, start_step, self._end), name=name, daemon=True
            )
            # Holds no reference to self, so an abandoned iterator is collected and its thread stopped.
            self._finalizer = weakref.finalize(self, _shutdown, stop, self._queue, thread)
            thread.start()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        if self._closed or (self._end is not None and self.step >= self._end):
            self.close()
            raise StopIteration
        try:
            item = self._make(self.step) if self._queue is None else self._queue.get()
        except BaseException:
            self.close()
            raise
        if item is _CLOSED:
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        self.step += 1
        return item

    def close(self) -> None:
        """Stops and joins the background thread (idempotent)."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown at most once

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
