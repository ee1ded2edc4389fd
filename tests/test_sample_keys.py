"""Per-example keys (`jdiff.sample(..., sample_keys=)`): sample j depends only on its key, for every stochastic
sampler, whatever the batch, the batch size or the device count; the Generator keys image j by (seed, j)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler_compile import count_compiles

import jdiff
from jdiff.analytic import gaussian_eps_fn
from jdiff.run.generate import Generator, Settings
from jdiff.sampling import SAMPLERS, Sampler, register

LIN = jdiff.get_schedule("linear", 1000)
SHAPE = (2, 3)  # per example; the Gaussian lives on the 6 flattened coordinates
GAUSS = gaussian_eps_fn(LIN, np.linspace(-1.0, 1.0, 6), np.diag(np.linspace(0.05, 0.5, 6)))
STOCHASTIC = sorted(name for name, s in SAMPLERS.items() if s.stochastic)
KEYS = jax.random.split(jax.random.key(7), 8)


def _opts(name):
    return {"eta": 1.0} if "eta" in SAMPLERS[name].options else {}


def _never_called(x, t):
    raise AssertionError("model_fn was traced")


def _noisy_step(denoise, x, s, noise, opts):
    """DDIM with eta = 0 plus two independent draws per step (a stand-in for a sampler registered later)."""
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    a, b = noise(x.shape, x.dtype), noise(x.shape, x.dtype)
    return g.alpha_next * d.x0 + g.sigma_next * d.eps + jnp.where(s.is_last, 0.0, 0.05) * (a - b)


@pytest.fixture
def noisy():
    smp = register(Sampler("noisy", _noisy_step, nfe=lambda n: n, stochastic=True, zero_terminal_snr=False))
    yield smp
    SAMPLERS.pop("noisy")


def _draw(name, keys, **kw):
    shape = (keys.shape[0], *SHAPE)
    return jdiff.sample(GAUSS, LIN, shape, None, sampler=name, num_steps=6, options=_opts(name), sample_keys=keys, **kw)


def _check_batch_invariance(name):
    full = _draw(name, KEYS)
    halves = np.concatenate([_draw(name, KEYS[:4]), _draw(name, KEYS[4:])])
    np.testing.assert_allclose(halves, full, atol=1e-6)
    np.testing.assert_allclose(_draw(name, KEYS[:1]), full[:1], atol=1e-6)
    # The batch rng is unused with sample_keys; the keys really drive x_T and the noise after it.
    with_rng = jdiff.sample(
        GAUSS, LIN, full.shape, jax.random.key(3), sampler=name, num_steps=6, options=_opts(name), sample_keys=KEYS
    )
    np.testing.assert_array_equal(with_rng, full)
    x_init = jnp.ones(full.shape)
    a, b = _draw(name, KEYS, x_init=x_init), _draw(name, jax.random.split(jax.random.key(8), 8), x_init=x_init)
    assert float(jnp.abs(a - b).min()) > 1e-4  # every example's noise changes with its key
    # With x_init and a trajectory: the first 4 examples' states are those of the batch of 4.
    (x8, t8), (x4, t4) = (_draw(name, k, x_init=x_init[: len(k)], return_trajectory_every=4) for k in (KEYS, KEYS[:4]))
    np.testing.assert_allclose(x4, x8[:4], atol=1e-6)
    np.testing.assert_allclose(t4, t8[:, :4], atol=1e-6)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_every_stochastic_sampler_gives_sample_j_from_its_key_alone(name):
    _check_batch_invariance(name)


def test_a_sampler_registered_later_gets_per_example_noise_from_the_same_mechanism(noisy):
    _check_batch_invariance("noisy")


def test_per_example_x_T_and_step_noise_follow_the_documented_keys():
    _, traj = _draw("ddim", KEYS[:2], return_trajectory_every=1)
    expect = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), SHAPE))(KEYS[:2])
    np.testing.assert_array_equal(traj[0], expect)


def test_without_sample_keys_outputs_are_unchanged():
    """Values recorded before sample_keys existed (the batch rng path is bit-identical on CPU)."""
    pinned = {
        "ddpm": [[1.1046372652053833, -0.45854613184928894], [0.7065364718437195, -0.6018657088279724]],
        "ddim": [[1.104608416557312, -0.4585416316986084], [0.706526517868042, -0.6018374562263489]],
    }
    gauss2 = gaussian_eps_fn(LIN, [1.0, -0.5], [[0.3, 0.1], [0.1, 0.05]])
    for name, expect in pinned.items():
        x, traj = jdiff.sample(
            gauss2,
            LIN,
            (3, 2),
            jax.random.key(0),
            sampler=name,
            num_steps=5,
            options=_opts(name),
            return_trajectory_every=5,
        )
        np.testing.assert_allclose(x[:2], expect, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(traj[0], jax.random.normal(jax.random.split(jax.random.key(0))[0], (3, 2)))


@pytest.mark.parametrize(
    "keys, match",
    [
        (jax.random.split(jax.random.key(0), 3), r"\(4,\) array of typed PRNG keys.*shape \(3,\)"),
        (jax.random.key(0), r"got shape \(\)"),
        (jax.random.key_data(jax.random.split(jax.random.key(0), 4)), r"wrap_key_data.*shape \(4, 2\) dtype uint32"),
        (jnp.zeros((4,), jnp.uint32), "typed PRNG keys"),
        (np.arange(4), "typed PRNG keys"),
        ([1, 2, 3, 4], "typed PRNG keys"),
    ],
)
def test_bad_sample_keys_are_rejected_before_tracing(keys, match):
    with pytest.raises(ValueError, match=match):
        jdiff.sample(_never_called, LIN, (4, 2), jax.random.key(0), sampler="ddpm", sample_keys=keys)


def test_rng_may_be_none_only_with_sample_keys():
    with pytest.raises(ValueError, match="rng must be a PRNG key"):
        jdiff.sample(_never_called, LIN, (4, 2), None)


def test_changing_sample_keys_does_not_recompile():
    _draw("ddpm", KEYS)  # warm
    with count_compiles() as events:
        outs = [_draw("ddpm", jax.random.split(jax.random.key(k), 8)) for k in (1, 2)]
        jax.block_until_ready(outs)
    assert events == [], f"{len(events)} recompilations"
    assert not np.allclose(outs[0], outs[1])


class _TinyModel(nn.Module):
    """A conv whose output depends on t: per-example like any image model, compiles in a moment."""

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        return jnp.tanh(nn.Conv(1, (3, 3))(x)) * (1.0 + t[:, None, None, None] / 100.0)


MODEL = _TinyModel()
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"]
SCHEDULE = jdiff.get_schedule("linear", 100)


def _images(name, batch, devices):
    settings = Settings(sampler=name, steps=5, options=_opts(name))
    gen = Generator(
        MODEL,
        SCHEDULE,
        settings,
        image_shape=(8, 8, 1),
        num_classes=None,
        prediction="eps",
        batch=batch,
        devices=devices,
    )
    return gen.draw(PARAMS, 8, seed=3)[0]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_generator_images_do_not_depend_on_batch_size_or_device_count(name):
    one = jax.devices()[:1]
    ref = _images(name, 8, one)
    np.testing.assert_allclose(_images(name, 4, one), ref, atol=1e-6)
    np.testing.assert_allclose(_images(name, 8, jax.devices()[:2]), ref, atol=1e-5)
    assert float(np.abs(ref[:4] - ref[4:]).mean()) > 0.1  # distinct images
