"""Runs a registered sampler's step function step by step over a grid (the loop `jdiff.sample` runs inside one
`lax.scan`), with any denoiser and any per-step noise: one jitted program per (sampler, static options,
denoiser, noise source) serves every grid, step count and dtype-compatible input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.sampling import SAMPLERS, Grid, Step, check_options
from jdiff.sampling.base import Noise
from jdiff.sampling.denoiser import Denoised
from jdiff.sampling.timesteps import level_fn

_PROGRAMS = {}


class GivenNoise:
    """A `Noise` stand-in whose draw n of step i is draws[i] (n = 0 only): the noise a peer was fed."""

    def __init__(self, draws):
        self.draws, self.calls = draws, 0

    def __call__(self, shape, dtype=jnp.float32):
        if self.calls:
            raise AssertionError("the fixture has one draw per step")
        self.calls += 1
        return jnp.asarray(self.draws, dtype).reshape(shape)


def x0_denoiser(x0_fn):
    """denoise(x, t, alpha, sigma) -> Denoised from an exact x0(x, alpha, sigma) (the timestep is unused)."""

    def denoise(x, t, alpha, sigma):
        x0 = x0_fn(x, alpha, sigma)
        return Denoised(x0, (x - alpha * x0) / sigma, None)

    return denoise


def edm_grid(sigmas, dtype=np.float32, t=None) -> Grid:
    """The Grid of EDM noise levels `sigmas` (N,) then the clean level: alpha = 1/sqrt(1 + s^2), sigma = s
    alpha; model timesteps `t` (zeros when not given: for denoisers that ignore it)."""
    s = np.asarray(sigmas, np.float64)
    a = 1.0 / np.sqrt(1.0 + s**2)
    t = np.zeros_like(s) if t is None else np.asarray(t, np.float64)
    nxt = lambda v, last: np.append(v[1:], last)  # noqa: E731
    cols = (t, a, s * a, nxt(t, -1.0), nxt(a, 1.0), nxt(s * a, 0.0))
    return Grid(*(jnp.asarray(c.astype(dtype)) for c in cols))


def drive(name, x, grid, denoise, options=None, *, schedule, noise=None, key=None, steps=None):
    """Sampler `name` from x at grid level 0 for `steps` (default all) steps. noise: (N, *x.shape) draws fed
    step by step (`GivenNoise`), else jdiff's own `Noise` from `key`."""
    smp, n = SAMPLERS[name], int(grid.t.shape[0])
    opts = check_options(name, options or {})
    static = tuple((k, v) for k, v in opts.items() if smp.options[k].static)
    traced = {k: jnp.asarray(v) for k, v in opts.items() if not smp.options[k].static}
    given = noise is not None
    prog_key = (name, static, denoise, given, jax.config.jax_enable_x64)
    if prog_key not in _PROGRAMS:

        def step(carry, row, i, n, sch, rng, draws, traced):
            s = Step(i, i == 0, i == n - 1, row, n, level_fn(sch))
            src = GivenNoise(draws) if given else Noise(rng, i, False)
            return smp.step(denoise, carry, s, src, {**dict(static), **traced})

        _PROGRAMS[prog_key] = jax.jit(step)
    step = _PROGRAMS[prog_key]
    key = jax.random.key(0) if key is None else key
    carry = smp.init(x)
    for i in range(n if steps is None else steps):
        draws = noise[i] if given else jnp.zeros(())
        carry = step(carry, Grid(*(a[i] for a in grid)), jnp.int32(i), jnp.int32(n), schedule, key, draws, traced)
    return smp.output(carry)
