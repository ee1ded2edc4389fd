"""The sampler registry: declared options (defaults, checks, traced vs static), capability flags, and adding a
sampler with nothing else changed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler_compile import PARAMS, SHAPE, _conv_model, count_compiles

import jdiff
from jdiff.analytic import gaussian_eps_fn
from jdiff.sampling import SAMPLERS, Sampler, all_options, check_options, get_sampler, register
from jdiff.spec import Spec

LIN = jdiff.get_schedule("linear", 1000)
GAUSS = gaussian_eps_fn(LIN, [1.0, -0.5], [[0.3, 0.1], [0.1, 0.05]])
POINT = jnp.asarray([0.5, -0.25])
POINT_FN = gaussian_eps_fn(LIN, POINT, np.zeros((2, 2)))


def _never_called(x, t):
    raise AssertionError("model_fn was traced")


# A toy sampler: DDIM with eta = 0, whose last step multiplies x0 by `gain` (traced) and negates it if `negate`
# (static); validate forbids negate with gain > 1.
GAIN = Spec(float, 1.0, "factor on the final x0", gt=0.0)
NEGATE = Spec(bool, False, "negate the final x0", static=True)


def _toy_step(denoise, x, s, key, opts):
    g = s.row
    d = denoise(x, g.t, g.alpha, g.sigma)
    x0 = jnp.where(s.is_last, opts["gain"], 1.0) * d.x0
    return g.alpha_next * (-x0 if opts["negate"] else x0) + g.sigma_next * d.eps


def _toy_validate(opts):
    if opts["negate"] and not isinstance(opts["gain"], jax.core.Tracer) and opts["gain"] > 1.0:
        raise ValueError(f"toy: negate needs gain <= 1, got gain {opts['gain']}")


@pytest.fixture
def toy():
    smp = register(
        Sampler(
            name="toy",
            step=_toy_step,
            nfe=lambda n: n,
            stochastic=False,
            zero_terminal_snr=False,
            options={"gain": GAIN, "negate": NEGATE},
            validate=_toy_validate,
        )
    )
    yield smp
    SAMPLERS.pop("toy")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_declared_options_have_valid_defaults_and_help(name):
    smp = get_sampler(name)
    assert smp.name == name and check_options(name) == {k: spec.default for k, spec in smp.options.items()}
    for option, spec in smp.options.items():
        assert spec.check(option, spec.default) == spec.default and spec.help and spec.describe()
        assert spec.static or spec.kind in (int, float)  # traced options are int32 / float32 scalars
        assert all_options()[option] == (spec, tuple(sorted(n for n, s in SAMPLERS.items() if option in s.options)))
    assert all(isinstance(smp.nfe(n), int) and smp.nfe(n) >= n for n in (1, 2, 50))


def test_options_of_one_name_are_one_spec_and_enter_the_program_as_declared():
    """An option several samplers declare is one Spec (one command-line flag); eta is traced, variance and the
    multistep rules static (nfe and zero_terminal_snr: tests/test_sampler_references.py)."""
    for option, (spec, names) in all_options().items():
        assert names and all(get_sampler(n).options[option] == spec for n in names)
    assert not all_options()["eta"][0].static
    assert all(all_options()[o][0].static for o in ("variance", "lower_order_final", "solver_type"))
    assert {"dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"} <= set(all_options()["solver_type"][1])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_sampler_that_is_not_stochastic_ignores_rng_after_x_T(name):
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    opts = {"eta": 1.0} if "eta" in get_sampler(name).options else {}
    a, b = (
        jdiff.sample(GAUSS, LIN, (8, 2), jax.random.key(k), sampler=name, num_steps=5, x_init=x_T, options=opts)
        for k in (1, 2)
    )
    assert np.array_equal(a, b) == (not get_sampler(name).stochastic)


@pytest.mark.parametrize(
    "sampler, kwargs, match",
    [
        (
            "dpmpp_2m",
            dict(options={"eta": 0.0}),
            r"^sampler 'dpmpp_2m' has no option 'eta' \(its options: lower_order_final, solver_type\)$",
        ),
        ("dpmpp_2m", dict(options={"solver_type": "rk4"}), r"bad value 'rk4' for solver_type; allowed: midpoint, heun"),
        ("euler", dict(eta=0.0), r"sampler 'euler' has no option 'eta' \(its options: none\)"),
        ("heun", dict(variance="posterior"), r"sampler 'heun' has no option 'variance'"),
        ("ddim", dict(variance="beta"), r"sampler 'ddim' has no option 'variance' \(its options: eta\)"),
        ("ddpm", dict(options={"eta": 1.0}), r"sampler 'ddpm' has no option 'eta' \(its options: variance\)"),
        ("ddim", dict(options={"etta": 1.0}), r"no option 'etta'"),
        ("ddim", dict(eta=1.5), r"^eta must be in \[0, 1\], got 1.5$"),
        ("ddim", dict(options={"eta": -0.1}), r"eta must be in \[0, 1\]"),
        ("ddim", dict(options={"eta": "lots"}), r"bad value 'lots' for eta: expected float in \[0, 1\]"),
        ("ddim", dict(eta=jnp.ones(2)), r"eta must be a scalar"),
        ("ddim", dict(eta=True), r"bad value True for eta"),
        ("ddpm", dict(variance="foo"), r"^bad value 'foo' for variance; allowed: posterior, beta, learned$"),
        ("ddpm", dict(options={"variance": 3}), r"bad value 3 for variance"),
        ("ddim", dict(eta=0.5, options={"eta": 0.5}), r"eta is given twice"),
    ],
)
def test_unknown_options_and_bad_values_are_rejected_before_tracing(sampler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jdiff.sample(_never_called, LIN, (4, 2), jax.random.key(0), sampler=sampler, **kwargs)
    options = dict(kwargs.get("options", {}), **{k: v for k, v in kwargs.items() if k in ("eta", "variance")})
    if "twice" not in match:
        with pytest.raises(ValueError, match=match):
            check_options(sampler, options)


def test_options_from_text_shorthands_and_arrays_agree():
    assert check_options("ddim", {"eta": "0.25"}) == {"eta": 0.25}
    assert check_options("ddim", {"eta": np.float32(1)}) == {"eta": 1.0}
    assert check_options("ddpm", {"variance": " beta"}) == {"variance": "beta"}
    run = lambda **kw: jdiff.sample(GAUSS, LIN, (8, 2), jax.random.key(3), num_steps=6, **kw)
    ref = run(options={"eta": 0.5})
    for kw in (dict(eta=0.5), dict(options={"eta": "0.5"}), dict(eta=jnp.float32(0.5))):
        np.testing.assert_array_equal(run(**kw), ref)
    # Under an outer jit the traced option is a tracer: passed through (only its shape is checked).
    np.testing.assert_allclose(jax.jit(lambda e: run(eta=e))(0.5), ref, atol=1e-6)
    ddpm_beta = run(sampler="ddpm", variance="beta")
    np.testing.assert_array_equal(ddpm_beta, run(sampler="ddpm", options={"variance": "beta"}))


def test_changing_a_traced_option_does_not_recompile_and_a_static_one_does():
    sch = jdiff.get_schedule("linear", 1000)
    kw = dict(params=PARAMS, num_steps=6)
    jdiff.sample(_conv_model, sch, SHAPE, jax.random.key(0), sampler="ddim", eta=0.0, **kw)  # warm
    jdiff.sample(_conv_model, sch, SHAPE, jax.random.key(0), sampler="ddpm", variance="posterior", **kw)
    with count_compiles() as events:
        outs = [
            jdiff.sample(_conv_model, sch, SHAPE, jax.random.key(0), sampler="ddim", options={"eta": e}, **kw)
            for e in (0.2, 1.0, "0.7")
        ]
        jax.block_until_ready(outs)
    assert events == [], f"{len(events)} recompilations"
    assert not np.allclose(outs[0], outs[1])
    with count_compiles() as events:
        jdiff.sample(
            _conv_model, sch, SHAPE, jax.random.key(0), sampler="ddpm", variance="beta", **kw
        ).block_until_ready()
    assert len(events) >= 1


def test_a_registered_sampler_works_through_sample_with_nothing_else_changed(toy):
    run = lambda **kw: jdiff.sample(POINT_FN, LIN, (16, 2), jax.random.key(0), sampler="toy", num_steps=5, **kw)
    np.testing.assert_allclose(run(), jnp.broadcast_to(POINT, (16, 2)), atol=2e-4)
    np.testing.assert_allclose(run(options={"gain": 2.0}), jnp.broadcast_to(2 * POINT, (16, 2)), atol=4e-4)
    np.testing.assert_allclose(
        run(options={"gain": "0.5", "negate": "true"}), jnp.broadcast_to(-0.5 * POINT, (16, 2)), atol=2e-4
    )
    assert "toy" in jdiff.SAMPLERS and check_options("toy") == {"gain": 1.0, "negate": False}
    assert all_options()["gain"] == (GAIN, ("toy",)) and all_options()["negate"] == (NEGATE, ("toy",))
    with pytest.raises(ValueError, match="gain must be > 0"):
        run(options={"gain": 0.0})
    with pytest.raises(ValueError, match="toy: negate needs gain <= 1"):  # the validate hook
        run(options={"gain": 2.0, "negate": True})
    with pytest.raises(ValueError, match=r"sampler 'toy' has no option 'eta' \(its options: gain, negate\)"):
        run(eta=0.0)
    with count_compiles() as events:
        run(options={"gain": 3.0}).block_until_ready()
    assert events == []


def test_the_toy_fixture_leaves_the_registry_as_it_was():
    assert "toy" not in SAMPLERS and "gain" not in all_options()


def test_registration_checks_the_declaration():
    before = dict(SAMPLERS)
    step = lambda denoise, x, s, key, opts: x
    make = lambda **options: Sampler(
        name="bad", step=step, nfe=lambda n: n, stochastic=False, zero_terminal_snr=True, options=options
    )
    with pytest.raises(ValueError, match="option 'eta' differs from sampler 'ddim'"):
        register(make(eta=Spec(float, 0.5, "another eta", ge=0.0, le=1.0)))
    with pytest.raises(ValueError, match="traced option 'mode' must be a non-optional int or float"):
        make(mode=Spec(str, "a", "a mode", choices=("a", "b")))
    with pytest.raises(ValueError, match="scale must be > 0"):
        make(scale=Spec(float, 0.0, "a scale", gt=0.0))
    assert SAMPLERS == before
    with pytest.raises(TypeError):
        get_sampler("ddim").options["eta"] = Spec(float, 0.5, "changed")


@pytest.mark.parametrize("name", sorted(SAMPLERS) + ["toy"])
def test_zero_terminal_snr_support_follows_the_capability_flag(name, toy):
    z = jdiff.get_schedule("linear", 100, zero_terminal_snr=True)
    run = lambda **kw: jdiff.sample(
        lambda x, t: jnp.zeros_like(x), z, (4, 2), jax.random.key(0), sampler=name, num_steps=3, prediction="v", **kw
    )
    if get_sampler(name).zero_terminal_snr:
        assert np.all(np.isfinite(run(spacing="trailing")))
        with pytest.raises(ValueError, match="terminal SNR"):  # the Karras spacing needs a finite sigma_max
            run(spacing="karras")
    else:
        with pytest.raises(ValueError, match=rf"sampler '{name}' with spacing 'trailing' needs a finite terminal SNR"):
            run(spacing="trailing")


def test_learned_variance_needs_a_model_with_twice_the_channels():
    with pytest.raises(ValueError, match="2x the input channels"):
        jdiff.sample(GAUSS, LIN, (4, 2), jax.random.key(0), sampler="ddpm", num_steps=3, variance="learned")
