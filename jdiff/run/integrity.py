"""Checkpoint integrity: a checksum of every saved array, written beside the checkpoint and checked on
restore, so that a flipped bit on disk is an error rather than a silently different model.

The checksum of an array is the sum, modulo 2^32, of its bytes read as unsigned 32-bit (or narrower)
integers: one pass on the device, no host copy, and any single flipped bit changes it. Checksums live in
WORKDIR/checksums/STEP.json as {leaf path: checksum}, written before the checkpoint itself; a checkpoint
without them is damaged.
"""

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

CHECKSUM_SUBDIR = "checksums"


def _bits(x: jax.Array) -> jax.Array:
    """The bytes of `x` as unsigned integers of at most 32 bits."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = x.dtype.itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8-byte: (..., 2) uint32


@jax.jit
def _stats(leaves: list) -> tuple[list, list]:
    """Per leaf: the checksum and whether it is finite (True for non-float leaves), computed on device."""
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True) for x in leaves]
    return [jnp.sum(_bits(x), dtype=jnp.uint32) for x in leaves], finite


def _tree_stats(tree: Any) -> dict[str, tuple[int, bool]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums, finite = jax.device_get(_stats([x for _, x in flat]))
    return {jax.tree_util.keystr(p): (int(s), bool(f)) for (p, _), s, f in zip(flat, sums, finite)}


def tree_checksums(tree: Any) -> dict[str, int]:
    """{leaf path (jax.tree_util.keystr): checksum} of every array leaf of `tree`."""
    return {k: s for k, (s, _) in _tree_stats(tree).items()}


def checksum_path(workdir: str, step: int) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKSUM_SUBDIR, f"{step}.json")


def write_checksums(workdir: str, step: int, sums: dict[str, int], keep_steps: Optional[list] = None) -> None:
    """Writes the checksums of checkpoint `step` atomically; removes those of steps not in `keep_steps`."""
    path = checksum_path(workdir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(sums, f)
    os.replace(path + ".tmp", path)
    if keep_steps is not None:
        for name in os.listdir(os.path.dirname(path)):
            stem = name.split(".")[0]
            if stem.isdigit() and int(stem) not in keep_steps and int(stem) != step:
                os.remove(os.path.join(os.path.dirname(path), name))


def read_checksums(workdir: str, step: int) -> Optional[dict[str, int]]:
    """The checksums of checkpoint `step`, or None when they are missing or unreadable."""
    try:
        with open(checksum_path(workdir, step)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def mismatches(tree: Any, expected: dict[str, int], prefix: str = "") -> list[str]:
    """Leaf paths of `tree` (each prefixed by `prefix`, e.g. ".ema_params" for a restored subtree) whose
    checksum differs from `expected` or is missing there, plus those that are not finite. Empty means intact."""
    bad = []
    for path, (s, finite) in _tree_stats(tree).items():
        if expected.get(prefix + path) != s:
            bad.append(prefix + path)
        elif not finite:
            bad.append(prefix + path + " (not finite)")
    return bad
