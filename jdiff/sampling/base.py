"""The sampler interface and registry. A sampler is one small unit: a step function that a `lax.scan` runs
over the grid (see `jdiff.sampling.timesteps`), the options it takes (declared with `jdiff.spec.Spec`), and
what it can do (model calls per run, noise after x_T, zero-terminal-SNR schedules). All its noise comes from
`Noise`, so per-example keys (`jdiff.sample`'s sample_keys) work for every sampler.

Adding a sampler is one module that calls `register`; `jdiff.sample` and the command-line tools take its
options, defaults, help and checks from the declaration (`check_options`, `all_options`).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.sampling.denoiser import Denoised
from jdiff.sampling.timesteps import Grid
from jdiff.spec import Spec

Array = jax.Array
Denoise = Callable[[Array, Array, Array, Array], Denoised]


def _no_level(sigma_edm):
    raise ValueError("this Step has no `level` function (a sampler that visits off-grid levels needs one)")


class Step(NamedTuple):
    """One step i of the scan: index (int32), is_first / is_last (bool), and `row`, the grid's row i (a `Grid`
    of float32 scalars: the model timestep t, alpha, sigma of this level -> t_next, alpha_next, sigma_next).

    num_steps: N, the number of steps of the run (a Python int: it is static). level(sigma_edm) -> (t, alpha,
    sigma): the model timestep of the EDM noise level sigma_edm = sigma/alpha (clamped to [0, T-1]) and its
    VP coefficients (for samplers that evaluate the model off the grid, e.g. EDM's churn)."""

    index: Array
    is_first: Array
    is_last: Array
    row: Grid
    num_steps: int = 0
    level: Callable[[Array], tuple[Array, Array, Array]] = _no_level


class Noise:
    """The standard normal draws of one step, the `noise` argument of a sampler's step: noise(shape, dtype)
    -> array of `shape` (B, ...). Each call in a step is a new draw. The one source of randomness after x_T.

    Batch keys (`jdiff.sample` without sample_keys): draw n of step i is normal(fold_in(key, i)) over the whole
    batch (n = 0; fold_in(., n) after). Per-example keys ((B,) keys, `per_example`): example j's draw comes from
    fold_in(keys[j], data) alone (data = i + 1 for step i, 0 for x_T), so it does not depend on the batch.
    """

    def __init__(self, key: Array, data: Array, per_example: bool):
        self.key, self.data, self.per_example, self.draws = key, data, per_example, 0

    def _draw(self, key: Array, n: int, shape, dtype) -> Array:
        key = jax.random.fold_in(key, self.data)
        return jax.random.normal(jax.random.fold_in(key, n) if n else key, shape, dtype)

    def __call__(self, shape, dtype=jnp.float32) -> Array:
        n, self.draws = self.draws, self.draws + 1
        if not self.per_example:
            return self._draw(self.key, n, tuple(shape), dtype)
        if len(shape) < 1 or shape[0] != self.key.shape[0]:
            raise ValueError(f"per-example noise needs shape ({self.key.shape[0]}, ...), got {tuple(shape)}")
        return jax.vmap(lambda k: self._draw(k, n, tuple(shape[1:]), dtype))(self.key)


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A registered sampler.

    step(denoise, carry, step, noise, opts) -> carry runs one step; init(x_T) -> carry; output(carry) -> x.
    noise (a `Noise`) is its only source of randomness: noise(x.shape, x.dtype) draws N(0, I) per example.
    opts maps each declared option to its value: a Python value for a static option (it fixes the compiled
    program), a float32 / int32 scalar array for a traced one (a change never recompiles).
    nfe(N): model evaluations for N steps. stochastic: it may draw noise after x_T. zero_terminal_snr: it
    works with a schedule whose last abar is 0. final_level_first: its last step is a DDIM transfer that may end
    at the first training level instead of abar = 1 (`jdiff.sample`'s final_level "first", diffusers'
    set_alpha_to_one=False). validate(opts): optional cross-option check on the host
    (raises ValueError; a traced option may be a tracer when `jdiff.sample` runs under an outer jit).
    Compiled programs are cached per Sampler object (hashed by identity), so re-registering a name recompiles.
    """

    name: str
    step: Callable[[Denoise, Any, Step, Noise, dict], Any]
    nfe: Callable[[int], int]
    stochastic: bool
    zero_terminal_snr: bool
    options: Mapping[str, Spec] = dataclasses.field(default_factory=dict)
    validate: Optional[Callable[[dict], None]] = None
    final_level_first: bool = False
    init: Callable[[Array], Any] = lambda x: x
    output: Callable[[Any], Array] = lambda carry: carry

    def __post_init__(self):
        for name, spec in self.options.items():
            if not name.isidentifier():
                raise ValueError(f"sampler {self.name!r}: option name {name!r} is not an identifier")
            if not spec.static and (spec.kind not in (int, float) or spec.optional):
                raise ValueError(
                    f"sampler {self.name!r}: traced option {name!r} must be a non-optional int or "
                    "float (it is passed as an int32 / float32 scalar); declare it static=True"
                )
            spec.check(name, spec.default)
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))


SAMPLERS: dict[str, Sampler] = {}


def register(sampler: Sampler) -> Sampler:
    """Adds `sampler` to SAMPLERS (replacing one of its name). An option another sampler also declares must
    have the identical Spec, so that a command-line tool offers one flag for it."""
    for name, spec in sampler.options.items():
        for other in SAMPLERS.values():
            if other.name != sampler.name and other.options.get(name, spec) != spec:
                raise ValueError(
                    f"sampler {sampler.name!r}: option {name!r} differs from sampler "
                    f"{other.name!r}'s option of that name; same-named options must be identical"
                )
    SAMPLERS[sampler.name] = sampler
    return sampler


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; allowed values: {sorted(SAMPLERS)}.")
    return SAMPLERS[name]


def _check_value(name: str, spec: Spec, value: Any) -> Any:
    if isinstance(value, jax.core.Tracer):
        if spec.static or np.shape(value) != ():
            raise ValueError(
                f"{name} must be a concrete {spec.describe()}"
                if spec.static
                else f"{name} must be a scalar, got shape {np.shape(value)}"
            )
        return value  # traced under an outer jit: only its shape can be checked
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if np.shape(value) != ():
            raise ValueError(f"{name} must be a scalar {spec.describe()}, got shape {np.shape(value)}")
        value = np.asarray(value).item()
    return spec.parse(name, value)


def check_options(sampler: str, options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The options of sampler `sampler`, checked and with defaults filled in: {name: value} for every option
    it declares. A value may be command-line text ("0.5"), a Python value, or for a traced option a scalar
    array. Raises a one-line ValueError naming the unknown sampler, the undeclared option or the bad value."""
    smp = get_sampler(sampler)
    options = dict(options or {})
    for name in options:
        if name not in smp.options:
            raise ValueError(
                f"sampler {smp.name!r} has no option {name!r} (its options: {', '.join(smp.options) or 'none'})"
            )
    out = {name: _check_value(name, spec, options.get(name, spec.default)) for name, spec in smp.options.items()}
    if smp.validate is not None:
        smp.validate(out)
    return out


def split_options(sampler: str, options: Optional[Mapping[str, Any]] = None) -> tuple[dict, dict]:
    """`check_options`, then split by how each option enters a compiled program: (static {name: Python value}:
    it fixes the program, traced {name: float32 / int32 scalar}: an argument, so a new value never
    recompiles)."""
    opts, spec = check_options(sampler, options), get_sampler(sampler).options
    static = {k: v for k, v in opts.items() if spec[k].static}
    traced = {
        k: jnp.asarray(v, jnp.float32 if spec[k].kind is float else jnp.int32)
        for k, v in opts.items()
        if not spec[k].static
    }
    return static, traced


def all_options() -> dict[str, tuple[Spec, tuple[str, ...]]]:
    """Every option any registered sampler declares: {name: (spec, names of the samplers that take it)}."""
    out: dict[str, tuple[Spec, tuple[str, ...]]] = {}
    for smp in sorted(SAMPLERS.values(), key=lambda s: s.name):
        for name, spec in smp.options.items():
            out[name] = (spec, out.get(name, (spec, ()))[1] + (smp.name,))
    return out
