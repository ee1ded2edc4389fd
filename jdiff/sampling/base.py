"""The sampler interface and registry. A sampler is one small unit: a step function that a `lax.scan`
runs over the grid (see `jdiff.sampling.timesteps`), plus how many model calls it makes."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from jdiff.sampling.denoiser import Denoised

Array = jax.Array
Denoise = Callable[[Array, Array, Array, Array], Denoised]


class Step(NamedTuple):
    """Scalars of one step (float32 unless noted): step index i (int32), whether it is the first / last step
    (bool), and the levels it goes between: model timestep t, alpha, sigma -> t_next, alpha_next, sigma_next."""

    index: Array
    is_first: Array
    is_last: Array
    t: Array
    alpha: Array
    sigma: Array
    t_next: Array
    alpha_next: Array
    sigma_next: Array


class Options(NamedTuple):
    """Sampler options: eta () float32 (traced) and the DDPM variance choice (static str)."""

    eta: Array
    variance: str


@dataclasses.dataclass(frozen=True)
class Sampler:
    """step(denoise, carry, step, key, options) -> carry; init(x_T) -> carry; output(carry) -> x.

    nfe(N) is the number of model evaluations for N steps; `stochastic` says whether it draws noise
    after x_T.
    """

    name: str
    step: Callable[[Denoise, Any, Step, Array, Options], Any]
    nfe: Callable[[int], int]
    stochastic: bool
    init: Callable[[Array], Any] = lambda x: x
    output: Callable[[Any], Array] = lambda carry: carry


SAMPLERS: dict[str, Sampler] = {}


def register(sampler: Sampler) -> Sampler:
    SAMPLERS[sampler.name] = sampler
    return sampler


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; allowed values: {sorted(SAMPLERS)}.")
    return SAMPLERS[name]
