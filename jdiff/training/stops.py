"""Stops that every process agrees on: before each step, the processes of a multi-host run exchange their
local reason to stop (a SIGTERM/SIGINT, or a batch they could not read) and all stop at the same step when any
has one. A process that decided alone would enter the collective checkpoint save while the others wait in the
step's gradient all-reduce, and the job would hang.

The exchange is an all-gather of one int32 per process, over a mesh of one device per process (a few bytes on
the interconnect, compiled once). Its cost is that the host waits for the previous step before it dispatches
the next one (benchmarks/stop_vote.py measures it); one process: no exchange, the local reason is the verdict.
It runs every step because a process that cannot read its batch for step s cannot take part in step s.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdiff.data import DataError

# Codes of the reasons, in priority order (the highest code present wins): 0 is "go on".
REASONS = ("SIGINT", "SIGTERM", "data")


@dataclasses.dataclass(frozen=True)
class Stop:
    """The agreed stop: `reason` (SIGINT, SIGTERM or data), the lowest process index that has it, the step."""

    reason: str
    process: int
    step: int


class PeerDataError(DataError):
    """Another process could not read its batch; this one stopped with it at the same step (exit status 1)."""


def _code(signal_reason: Optional[str], data_error: bool) -> int:
    if data_error:
        return REASONS.index("data") + 1
    if signal_reason is None:
        return 0
    return REASONS.index(signal_reason) + 1 if signal_reason in REASONS else REASONS.index("SIGTERM") + 1


class StopVote:
    """`vote(step, signal_reason, data_error)` -> the agreed `Stop`, or None to take the step. Every process
    must call it at every step (it is a collective when jax.process_count() > 1)."""

    def __init__(self):
        self.count = jax.process_count()
        self._gather = None

    def _exchange(self, code: int) -> np.ndarray:
        if self._gather is None:
            devices = [
                min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(self.count)
            ]
            mesh = Mesh(np.asarray(devices, dtype=object), ("process",))
            self._sharding = NamedSharding(mesh, P("process"))
            self._gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
        x = jax.make_array_from_process_local_data(self._sharding, np.asarray([code], np.int32), (self.count,))
        return np.asarray(self._gather(x).addressable_data(0))

    def __call__(self, step: int, signal_reason: Optional[str], data_error: bool) -> Optional[Stop]:
        code = _code(signal_reason, data_error)
        codes = np.asarray([code]) if self.count == 1 else self._exchange(code)
        best = int(codes.max())
        if best == 0:
            return None
        process = jax.process_index() if self.count == 1 else int(np.argmax(codes == best))
        return Stop(REASONS[best - 1], process, step)
