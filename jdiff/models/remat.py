"""Rematerialisation (gradient checkpointing, Chen et al. 2016) of model blocks: the backward pass recomputes a
block's activations instead of keeping them, trading about one extra forward pass for activation memory.
Parameters and numbers are unchanged (same parameter tree; the recomputation repeats the same operations)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

# What a rematerialised block keeps for the backward pass (names of `jax.checkpoint_policies`):
# nothing_saveable: only the block's inputs (least memory); dots_saveable: also every matmul output;
# dots_with_no_batch_dims_saveable: also matmul outputs without batch dimensions (weight-like products).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_policy(name: str):
    """The `jax.checkpoint_policies` function called `name` (one of REMAT_POLICIES); ValueError otherwise."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {', '.join(REMAT_POLICIES)}; got {name!r}")
    return getattr(jax.checkpoint_policies, name)


def maybe_remat(block: type, enabled: bool, policy: str, static_argnums: Sequence[int] = ()) -> type:
    """`block` wrapped with `nn.remat(policy=...)` when `enabled`, else `block` itself. `static_argnums` index
    the arguments of `__call__` counting `self` as 0 (Python values such as `train` flags)."""
    if not enabled:
        return block
    return nn.remat(block, policy=remat_policy(policy), static_argnums=tuple(static_argnums))
