"""Parameter counts (via ``jax.eval_shape``, no allocation) and forward FLOPs (XLA cost analysis)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.text_unet import is_text_model


def tree_size(tree: Any) -> int:
    """Total element count of a pytree's leaves: arrays, numpy arrays or ``jax.ShapeDtypeStruct``
    (a leaf without ``shape``, e.g. a Python number, counts 1). The parameter count of a params tree."""
    return sum(math.prod(getattr(a, "shape", ())) for a in jax.tree.leaves(tree))


def _abstract_inputs(model: nn.Module, input_shape: Sequence[int], with_labels: bool):
    """x, t and y of a batch; a text model (`jdiff.models.text_unet`) always takes token ids y (B, max_length)."""
    b = input_shape[0]
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    y = jax.ShapeDtypeStruct((b,), jnp.int32) if with_labels else None
    if is_text_model(model):
        y = jax.ShapeDtypeStruct((b, model.max_length), jnp.int32)
    return x, t, y


def abstract_params(model: nn.Module, input_shape: Sequence[int], *, with_labels: bool = False) -> Any:
    """``jax.eval_shape`` of ``model.init``: the params pytree of ShapeDtypeStructs (no memory used).
    ``input_shape`` is NHWC (B, H, W, C)."""
    x, t, y = _abstract_inputs(model, input_shape, with_labels)

    def init(x, t, y):
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return model.init(rngs, x, t, y)["params"]

    return jax.eval_shape(init, x, t, y)


def count_params(model: nn.Module, input_shape: Sequence[int], *, with_labels: bool = False) -> int:
    """Number of trainable parameters of ``model`` for NHWC ``input_shape`` (B, H, W, C).

    Uses ``jax.eval_shape`` so even DiT-XL is counted without allocating. A
    class-conditional model creates its label table whether or not ``with_labels``.
    """
    return tree_size(abstract_params(model, input_shape, with_labels=with_labels))


def _flops(cost: Any) -> float:
    """Extract 'flops' from a cost analysis that may be a dict, a list of dicts (older jax) or None."""
    if cost is None:
        raise RuntimeError("XLA cost analysis is unavailable on this backend")
    if isinstance(cost, dict):
        cost = [cost]
    return float(sum(c.get("flops", 0.0) for c in cost if c))


def forward_flops(
    model: nn.Module,
    params_or_abstract: Any,
    input_shape: Sequence[int],
    *,
    with_labels: bool = False,
    compile: bool = False,
) -> float:
    """FLOPs of one forward pass (``train=False``) for a batch of NHWC ``input_shape``,
    from XLA's HLO cost analysis (a multiply-add counts as 2 FLOPs).

    ``params_or_abstract`` may be real arrays or ShapeDtypeStructs (e.g. from
    :func:`abstract_params`). By default the cost of the lowered (unoptimised) HLO
    is used, which needs no compilation; ``compile=True`` analyses the compiled
    executable instead (after fusion; slow for big models). Divide by the batch size
    for per-image FLOPs.
    """
    x, t, y = _abstract_inputs(model, input_shape, with_labels)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params_or_abstract)

    def fwd(params, x, t, y):
        return model.apply({"params": params}, x, t, y, train=False)

    lowered = jax.jit(fwd).lower(shapes, x, t, y)
    if not compile and hasattr(lowered, "cost_analysis"):
        try:
            return _flops(lowered.cost_analysis())
        except Exception:  # fall back to the compiled executable
            pass
    return _flops(lowered.compile().cost_analysis())
