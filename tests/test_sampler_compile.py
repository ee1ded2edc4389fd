"""Compile behaviour of the scan samplers (tested by structure and compile counts, never by timing)."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff.sampling import split_options
from jdiff.sampling.api import _sample_jit
from jdiff.sampling.denoiser import Guidance

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    events = []

    def listener(name, secs, **kw):
        if name == BACKEND_COMPILE:
            events.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _conv_model(params, x, t, y=None):
    h = jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return h * (1.0 + t[:, None, None, None] / 1000.0)


PARAMS = {"w": 0.01 * jnp.ones((3, 3, 1, 1))}
SHAPE = (2, 8, 8, 1)


def _lowered_text(sampler, num_steps, **kw):
    sch = jdiff.get_schedule("linear", 1000)
    # jdiff.sample validates and then calls this jitted program; lower it directly.
    static_options, traced_options = split_options(sampler)  # the defaults
    args = (_conv_model, PARAMS, sch, jax.random.key(0), traced_options, Guidance(None, None, None), None, None, None)
    return _sample_jit.lower(
        *args,
        shape=SHAPE,
        sampler=jdiff.SAMPLERS[sampler],
        num_steps=num_steps,
        prediction="eps",
        spacing=kw.get("spacing", "linspace"),
        steps_offset=0,
        final_level="clean",
        static_options=tuple(static_options.items()),
        rho=7.0,
        trajectory_every=None,
    ).as_text()


@pytest.mark.parametrize("sampler", sorted(jdiff.SAMPLERS))
@pytest.mark.parametrize("spacing", ["linspace", "karras"])
def test_program_size_does_not_grow_with_steps(sampler, spacing):
    small, big = _lowered_text(sampler, 10, spacing=spacing), _lowered_text(sampler, 1000, spacing=spacing)
    # Identical programs up to numeric literals: the loop bound, N-1, and the grid's array shapes
    # (tensor<10xf32> vs tensor<1000xf32>). Nothing is unrolled and no N-sized constant is embedded.
    mask = lambda text: re.sub(r"\d+(\.\d+)?(e[+-]\d+)?", "#", text)
    assert mask(small) == mask(big)
    assert abs(len(small) - len(big)) < 0.02 * len(small), (len(small), len(big))
    assert "stablehlo.while" in small


def test_changing_eta_guidance_rng_schedule_or_params_does_not_recompile():
    sch_a = jdiff.get_schedule("linear", 1000)
    sch_b = jdiff.get_schedule("cosine", 1000)
    labels = jnp.array([0, 1])
    kw = dict(params=PARAMS, sampler="ddim", num_steps=12, labels=labels, null_label=10)
    jdiff.sample(_conv_model, sch_a, SHAPE, jax.random.key(0), eta=0.0, guidance_scale=1.5, **kw)  # warm
    kw2 = dict(kw, params={"w": 2 * PARAMS["w"]}, labels=jnp.array([3, 4]))  # (eager ops compile too)
    with count_compiles() as events:
        outs = []
        for i, (eta, g, sch) in enumerate([(0.3, 1.5, sch_a), (1.0, 4.0, sch_b), (0.0, 7.5, sch_a)]):
            outs.append(jdiff.sample(_conv_model, sch, SHAPE, jax.random.key(i + 1), eta=eta, guidance_scale=g, **kw))
        outs.append(jdiff.sample(_conv_model, sch_b, SHAPE, jax.random.key(9), eta=0.5, guidance_scale=2.0, **kw2))
        jax.block_until_ready(outs)
    assert events == [], f"{len(events)} recompilations"
    assert not np.allclose(outs[0], outs[1])


def test_changing_a_static_argument_does_compile():
    """The counter itself works: a new num_steps is a new program (own model_fn: no other test compiled it)."""
    sch = jdiff.get_schedule("linear", 1000)
    model = lambda params, x, t: _conv_model(params, x, t)
    jdiff.sample(model, sch, SHAPE, jax.random.key(0), params=PARAMS, num_steps=5)
    with count_compiles() as events:
        jdiff.sample(model, sch, SHAPE, jax.random.key(0), params=PARAMS, num_steps=6).block_until_ready()
    assert len(events) >= 1
