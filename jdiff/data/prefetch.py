"""A step-indexed iterator that computes ``make_batch(step)`` ahead in a background thread."""

from __future__ import annotations

import atexit
import queue
import threading
from typing import Any, Callable

_POLL_S = 0.05
_JOIN_S = 10.0


class _Failure:
    """Carries an exception raised in the producer thread to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def _produce(make_batch, out: queue.Queue, stop: threading.Event, step: int, end: int | None) -> None:
    try:
        while (end is None or step < end) and not stop.is_set():
            item = make_batch(step)
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    pass
            step += 1
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
        while not stop.is_set():
            try:
                out.put(_Failure(e), timeout=_POLL_S)
                return
            except queue.Full:
                pass


class _Stopper:
    """Stops and joins the producer; registered with atexit until the iterator closes."""

    def __init__(self, stop: threading.Event, q: queue.Queue, thread: threading.Thread):
        self.stop, self.queue, self.thread = stop, q, thread

    def __call__(self) -> None:
        self.stop.set()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        if self.thread is not threading.current_thread():
            self.thread.join(_JOIN_S)


class BatchIterator:
    """Yields ``make_batch(step)`` for ``step = start_step, start_step + 1, ...``.

    Stops after ``num_steps`` batches (None: never). With ``prefetch > 0`` a
    daemon thread computes up to ``prefetch`` batches ahead; an exception
    raised there is re-raised by ``next()`` (after the batches made before it),
    and the thread is stopped by ``close()``, the ``with`` block, garbage
    collection or interpreter exit. ``step`` is the step of the next batch.
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
        self._stopper = None
        if prefetch:
            q: queue.Queue = queue.Queue(maxsize=prefetch)
            stop = threading.Event()
            thread = threading.Thread(
                target=_produce, args=(make_batch, q, stop, start_step, self._end), name=name, daemon=True
            )
            self._stopper = _Stopper(stop, q, thread)
            atexit.register(self._stopper)
            thread.start()

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Any:
        if self._closed or (self._end is not None and self.step >= self._end):
            self.close()
            raise StopIteration
        try:
            item = self._make(self.step) if self._stopper is None else self._get()
        except BaseException:
            self.close()
            raise
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        self.step += 1
        return item

    def _get(self) -> Any:
        q, thread = self._stopper.queue, self._stopper.thread
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise RuntimeError("the prefetch thread stopped unexpectedly") from None

    def close(self) -> None:
        """Stops the background thread (idempotent)."""
        self._closed = True
        stopper, self._stopper = self._stopper, None
        if stopper is not None:
            stopper()
            atexit.unregister(stopper)

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
