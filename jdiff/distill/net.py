"""A network as the distillation losses see it: its denoiser with a noise level per example.

The losses draw a noise level per example; `jdiff.sampling.denoiser` takes t, alpha and sigma per example when
they are shaped (B, 1, ..., 1) like x, so the network runs once on the batch. Every prediction type the
denoiser knows (eps, x0, v, EDM, flow) works unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jdiff.sampling.denoiser import Guidance, make_denoiser

Array = jax.Array


class Net(NamedTuple):
    """model_fn(params, x, t[, y]) (or model_fn(x, t[, y]) when params is None), what it predicts, and the flow
    time scale T of a flow model (`make_denoiser`'s flow_time_scale)."""

    model_fn: Callable[..., Array]
    params: Any
    prediction: str
    flow_time_scale: float = 1000.0


def denoiser(net: Net, labels: Optional[Array]):
    """`make_denoiser` of `net` for a batch with `labels` ((B,) int32 or None): denoise(x, t, alpha, sigma) with
    per-example levels shaped (B, 1, ..., 1) (`per_example`)."""
    guidance = Guidance(labels, None, None)
    return make_denoiser(
        net.model_fn, net.params, prediction=net.prediction, guidance=guidance, flow_time_scale=net.flow_time_scale
    )


def per_example(v: Array, x: Array) -> Array:
    """A (B,) array of per-example scalars shaped (B, 1, ..., 1) to broadcast against x (B, ...)."""
    return jnp.reshape(v, (x.shape[0],) + (1,) * (x.ndim - 1))
