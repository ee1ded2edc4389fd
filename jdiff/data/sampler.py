"""Deterministic, stateless index sampling: the batch at a step is a pure function of (seed, step).

The example stream is the concatenation of per-epoch permutations
``np.random.default_rng([seed, 0, epoch]).permutation(num_examples)``;
global batch ``step`` is stream positions ``[step * B, (step + 1) * B)``.
Host ``p`` of ``P`` owns the contiguous rows ``[p * B/P, (p + 1) * B/P)``.
Horizontal flips use ``default_rng([seed, 1, step]).random(B) < 0.5`` indexed
by row, so every host (and a resumed run) agrees on them.
"""

from __future__ import annotations

import functools

import numpy as np


def check_batch_args(global_batch_size: int, seed: int, process_index: int, process_count: int) -> int:
    """Validates the arguments; returns the per-host batch size ``global_batch_size // process_count``."""
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(process_count, (int, np.integer)) or process_count <= 0:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by process_count={process_count}")
    return global_batch_size // process_count


@functools.lru_cache(maxsize=8)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Read-only int64 (num_examples,) permutation used for ``epoch``."""
    perm = np.random.default_rng([seed, 0, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def indices_at(num_examples: int, positions: np.ndarray, seed: int) -> np.ndarray:
    """Dataset indices (int64) at stream ``positions`` (int64 array)."""
    if num_examples <= 0:
        raise ValueError(f"the source is empty (num_examples={num_examples})")
    positions = np.asarray(positions, np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(int(num_examples), int(seed), int(e))[offsets[sel]]
    return out


def check_step(step: int) -> None:
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def host_rows(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Rows of the global batch owned by a host: int64 (global_batch_size // process_count,)."""
    b = check_batch_args(global_batch_size, 0, process_index, process_count)
    return np.arange(process_index * b, (process_index + 1) * b, dtype=np.int64)


def flip_mask(step: int, rows: np.ndarray, *, global_batch_size: int, seed: int) -> np.ndarray:
    """bool (len(rows),): whether the examples at these global-batch rows are flipped at ``step``."""
    return np.random.default_rng([seed, 1, step]).random(global_batch_size)[rows] < 0.5
