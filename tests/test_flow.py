"""Flow matching (`jdiff.flow`): the flow schedule and grids, the "flow" prediction in every sampler (exact
velocity fields of Gaussian data), equality with diffusers' flow-matching schedulers (committed outputs of
tests/fixtures/make_flow_fixtures.py), and the errors."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import analytic, flow
from jdiff.sampling import SAMPLERS, make_grid

PEERS = np.load(Path(__file__).parent / "fixtures" / "flow_peers.npz")
MU = np.array([0.5, -1.0])
COV = np.array([[0.3, 0.1], [0.1, 0.2]])


# --- the schedule and its grids ---------------------------------------------------------------------------


def test_flow_schedule_is_the_interpolant_in_vp_variables():
    sch = jdiff.get_schedule("flow", 1000, shift=3.0)
    s = flow.shift_time(np.arange(1, 1001) / 1000.0, 3.0)
    abar = np.asarray(sch.alphas_cumprod, np.float64)
    np.testing.assert_allclose(abar, (1 - s) ** 2 / ((1 - s) ** 2 + s**2), rtol=2e-5, atol=1e-7)
    assert abar[-1] == 0.0  # s = 1: zero terminal SNR
    # EDM's sigma is s/(1 - s); from_vp inverts to_vp.
    a, sg = np.asarray(sch.sqrt_alphas_cumprod[:-1]), np.asarray(sch.sqrt_one_minus_alphas_cumprod[:-1])
    np.testing.assert_allclose(sg / a, s[:-1] / (1 - s[:-1]), rtol=1e-4)
    s_back, _ = flow.from_vp(*flow.to_vp(jnp.asarray(s, jnp.float32)))
    np.testing.assert_allclose(np.asarray(s_back), s, rtol=1e-6)
    assert float(sch.flow_shift) == 3.0


def test_shift_and_flux_shift_closed_forms():
    np.testing.assert_allclose(flow.shift_time(np.array([0.0, 0.5, 1.0]), 3.0), [0.0, 0.75, 1.0])
    # diffusers' calculate_shift: mu = 0.5 at 256 tokens, 1.15 at 4096 (Flux at 1024 px: 4096 tokens).
    assert flow.flux_shift(256) == pytest.approx(np.exp(0.5))
    assert flow.flux_shift(4096) == pytest.approx(np.exp(1.15))
    # exp(mu)/(exp(mu) + 1/s - 1), diffusers' dynamic time_shift, is shift_time with shift = exp(mu)
    s = np.linspace(0.05, 1, 7)
    np.testing.assert_allclose(np.exp(0.8) / (np.exp(0.8) + 1 / s - 1), flow.shift_time(s, np.exp(0.8)))


@pytest.mark.parametrize("case, spacing", [("euler", "flow"), ("euler_shift1", "flow"), ("dpmpp_2m", "flow_sigmas")])
def test_flow_grids_are_diffusers(case, spacing):
    shift = 1.0 if case == "euler_shift1" else float(PEERS["shift"])
    sch = jdiff.get_schedule("flow", 1000, shift=shift)
    g = make_grid(sch, spacing, int(PEERS[f"{case}_steps"]))
    s = np.append(np.asarray(flow.from_vp(g.alpha, g.sigma)[0]), 0.0)
    np.testing.assert_allclose(s, PEERS[f"{case}_sigmas"], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g.alpha_next[-1]), 1.0)


def test_default_spacing_of_the_flow_schedule_is_flow():
    sch = jdiff.get_schedule("flow", 1000, shift=3.0)
    v = analytic.gaussian_velocity_fn(MU, COV)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    a = jdiff.sample(
        v, sch, (8, 2), None, sampler="euler", num_steps=5, prediction="flow", x_init=x, sample_keys=_keys(8)
    )
    b = jdiff.sample(
        v,
        sch,
        (8, 2),
        None,
        sampler="euler",
        num_steps=5,
        prediction="flow",
        x_init=x,
        sample_keys=_keys(8),
        spacing="flow",
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _keys(n):
    return jax.random.split(jax.random.key(3), n)


# --- equality with diffusers ---------------------------------------------------------------------------------


def _peer_model(x, t):
    s = (t / 1000.0)[:, None]
    return _peer_v(x, s)


def _peer_model_int_t(x, t):
    """The peer model called with floor(T s): DPMSolverMultistep / UniPCMultistep cast their timesteps to int64."""
    return _peer_v(x, (jnp.floor(t) / 1000.0)[:, None])


def _peer_v(x, s):
    w1, w2, b, c = (jnp.asarray(PEERS[k]) for k in ("w1", "w2", "b", "c"))
    return jnp.tanh(x @ w1 + s * b) @ w2 + s * c * x


@pytest.mark.parametrize(
    "case, sampler, spacing",
    [
        ("euler", "euler", "flow"),
        ("euler", "ddim", "flow"),
        ("euler_shift1", "euler", "flow"),
        ("heun", "flow_heun", "flow"),
        # flow_sigmas starts at s_0 < 1: x_T is the flow state there (diffusers' start), not the VP x (which
        # differs by the factor alpha_0 + sigma_0 and left these 5.5e-4 off before `start_scale`).
        ("dpmpp_2m", "dpmpp_2m", "flow_sigmas"),
        ("unipc", "unipc", "flow_sigmas"),
    ],
)
def test_samplers_equal_diffusers_flow_schedulers(case, sampler, spacing):
    """x_T -> x_0 through the same model function: euler (and DDIM eta = 0) = FlowMatchEulerDiscreteScheduler,
    flow_heun = FlowMatchHeunDiscreteScheduler, dpmpp_2m / unipc = DPMSolverMultistep / UniPCMultistep with
    use_flow_sigmas and prediction_type "flow_prediction"."""
    shift = 1.0 if case == "euler_shift1" else float(PEERS["shift"])
    sch = jdiff.get_schedule("flow", 1000, shift=shift)
    x_t = jnp.asarray(PEERS["x_t"])
    n = int(PEERS[f"{case}_steps"])
    int_t = case in ("dpmpp_2m", "unipc")
    if int_t:  # the model sees the same integer timesteps as in diffusers
        g = make_grid(sch, spacing, n)
        ts = 1000.0 * np.asarray(jdiff.flow.from_vp(g.alpha, g.sigma)[0])
        np.testing.assert_array_equal(np.floor(ts), PEERS[f"{case}_timesteps"])
    out = jdiff.sample(
        _peer_model_int_t if int_t else _peer_model,
        sch,
        x_t.shape,
        jax.random.key(0),
        sampler=sampler,
        num_steps=n,
        prediction="flow",
        spacing=spacing,
        x_init=x_t,
    )
    ref = PEERS[f"{case}_out"]
    assert np.abs(np.asarray(out) - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max()), np.abs(out - ref).max()


# --- every sampler on exact velocity fields ------------------------------------------------------------------


# `consistency` (multistep consistency sampling) samples consistency models; on a plain denoiser it returns
# posterior means (tests/test_distill_consistency.py checks it against Alg. 1).
ODE_AND_SDE_SAMPLERS = sorted(set(SAMPLERS) - {"consistency"})


@pytest.fixture(scope="module")
def gaussian_runs():
    """Every registered sampler at 100 steps on the flow schedule (shift 3) with the exact velocity of N(MU, COV):
    {name: samples (4000, 2)}. Samplers that cannot start at s = 1 (EDM sigma infinite) use "flow_sigmas"."""
    sch = jdiff.get_schedule("flow", 1000, shift=3.0)
    v = analytic.gaussian_velocity_fn(MU, COV)
    out = {}
    for name in ODE_AND_SDE_SAMPLERS:
        spacing = "flow" if SAMPLERS[name].zero_terminal_snr else "flow_sigmas"
        x = jdiff.sample(
            v, sch, (4000, 2), jax.random.key(1), sampler=name, num_steps=100, prediction="flow", spacing=spacing
        )
        out[name] = np.asarray(x)
    return out


@pytest.mark.parametrize("name", ODE_AND_SDE_SAMPLERS)
def test_every_sampler_samples_a_flow_model(name, gaussian_runs):
    x = gaussian_runs[name]
    assert np.all(np.isfinite(x))
    se = np.sqrt(np.diag(COV) / len(x))
    assert np.all(np.abs(x.mean(0) - MU) < 5 * se + 0.01), x.mean(0)
    np.testing.assert_allclose(np.cov(x.T), COV, atol=0.05)


def test_flow_samplers_sample_an_eps_model_and_a_flow_model_alike():
    """The conversion meets in one place: the exact eps predictor of the VP view and the exact velocity of the
    flow view give the same flow_heun trajectory on a (non-zero-terminal-SNR) linear schedule."""
    sch = jdiff.get_schedule("linear", 1000)
    x = jax.random.normal(jax.random.key(2), (64, 2))
    run = lambda fn, p: jdiff.sample(
        fn, sch, (64, 2), jax.random.key(0), sampler="flow_heun", num_steps=10, prediction=p, x_init=x, spacing="karras"
    )  # noqa: E731
    # The eps model is called with the fractional timestep, the flow model with 1000 s at the same level.
    a = run(analytic.gaussian_eps_fn(sch, MU, COV), "eps")
    b = run(analytic.gaussian_velocity_fn(MU, COV), "flow")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3)


def _flow_ode_error(name, n):
    """RMS error vs the exact ODE map N(0, I) -> N(MU, COV), float64, on the flow grid (shift 1)."""
    sch = jdiff.get_schedule("flow", 1000, shift=1.0)
    v = analytic.gaussian_velocity_fn(MU, COV)
    x = jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)
    out = jdiff.sample(v, sch, (64, 2), jax.random.key(0), sampler=name, num_steps=n, prediction="flow", x_init=x)
    ref = analytic.gaussian_ode_solution(MU, COV, np.asarray(x), 0.0, 1.0)
    return float(np.sqrt(np.mean((np.asarray(out, np.float64) - ref) ** 2)))


@pytest.mark.parametrize("name, lo, hi", [("euler", 0.85, 1.15), ("flow_heun", 1.8, 2.3)])
def test_flow_order_of_convergence_in_float64(name, lo, hi):
    with jax.enable_x64(True):
        e1, e2 = _flow_ode_error(name, 40), _flow_ode_error(name, 80)
    order = np.log2(e1 / e2)
    assert lo <= order <= hi, (e1, e2, order)


def test_gmm_velocity_is_the_gaussian_one_for_one_component_and_matches_finite_differences():
    mu = np.array([0.3, -0.2])
    v1 = analytic.gmm_velocity_fn(mu[None], [0.4], [1.0])
    vg = analytic.gaussian_velocity_fn(mu, 0.16 * np.eye(2))
    x = jax.random.normal(jax.random.key(4), (16, 2))
    t = jnp.linspace(0.0, 1000.0, 16)
    np.testing.assert_allclose(np.asarray(v1(x, t)), np.asarray(vg(x, t)), rtol=1e-4, atol=1e-5)
    # E[eps - x0 | x_s] by Monte Carlo for one level, two-component mixture.
    means, stds, w = np.array([[1.0, 0.0], [-1.0, 0.5]]), np.array([0.2, 0.3]), np.array([0.3, 0.7])
    vm = analytic.gmm_velocity_fn(means, stds, w)
    rng = np.random.default_rng(0)
    k = rng.choice(2, size=400_000, p=w)
    x0 = means[k] + stds[k, None] * rng.standard_normal((400_000, 2))
    eps = rng.standard_normal((400_000, 2))
    s = 0.6
    xs = (1 - s) * x0 + s * eps
    near = np.sum((xs - np.array([0.1, 0.2])) ** 2, 1) < 0.05**2
    mc = (eps - x0)[near].mean(0)
    got = np.asarray(vm(jnp.asarray([[0.1, 0.2]], jnp.float32), jnp.asarray([600.0])))[0]
    np.testing.assert_allclose(got, mc, atol=0.05)


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_shift_is_refused(shift):
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        jdiff.get_schedule("flow", 1000, shift=shift)


def test_flow_model_with_learned_ddpm_variance_is_refused():
    sch = jdiff.get_schedule("flow", 1000)
    with pytest.raises(ValueError, match=r'variance="learned" .*prediction .flow.'):
        jdiff.sample(
            analytic.gaussian_velocity_fn(MU, COV),
            sch,
            (4, 2),
            jax.random.key(0),
            sampler="ddpm",
            variance="learned",
            prediction="flow",
            num_steps=4,
        )


def test_heun_cannot_start_at_s_equal_1():
    sch = jdiff.get_schedule("flow", 1000)
    with pytest.raises(ValueError, match="flow_sigmas"):
        jdiff.sample(
            analytic.gaussian_velocity_fn(MU, COV),
            sch,
            (4, 2),
            jax.random.key(0),
            sampler="heun",
            prediction="flow",
            num_steps=4,
        )


# --- training ------------------------------------------------------------------------------------------------


def test_exact_velocity_gives_zero_flow_loss_and_a_wrong_one_does_not():
    """For point data x0 = mu the conditional target eps - x0 = (x_s - mu)/s is the exact velocity, so its loss
    is 0 (the interpolant, the target's sign and the time input T s all enter); a model off by 0.1 is not."""
    mu = np.array([0.7, -0.3])
    v = analytic.gaussian_velocity_fn(mu, np.zeros((2, 2)))
    x0 = jnp.tile(jnp.asarray(mu, jnp.float32), (64, 1))
    for t_sampling in flow.T_SAMPLINGS:
        loss, aux = flow.flow_loss(v, x0, jax.random.key(0), t_sampling=t_sampling, shift=3.0)
        assert float(loss) < 1e-8 and aux["mse"] == loss
    bad, _ = flow.flow_loss(lambda x, t: v(x, t) + 0.1, x0, jax.random.key(0))
    assert float(bad) == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize(
    "t_sampling, shift, density",
    [
        ("uniform", 1.0, lambda s: np.ones_like(s)),
        # s = k u/(1 + (k - 1) u): u = s/(k - (k - 1) s), du/ds = k/(k - (k - 1) s)^2
        ("uniform", 3.0, lambda s: 3.0 / (3.0 - 2.0 * s) ** 2),
        ("logit_normal", 1.0, flow.logit_normal_density),
        ("mode", 1.0, flow.mode_density),
    ],
)
def test_timestep_sampling_densities(t_sampling, shift, density):
    s = np.asarray(flow.sample_time(jax.random.key(0), (400_000,), t_sampling, shift=shift))
    assert s.min() >= 0.0 and s.max() <= 1.0
    hist, edges = np.histogram(s, bins=20, range=(0.0, 1.0), density=True)
    mid = 0.5 * (edges[1:] + edges[:-1])
    # bin averages of the density by a fine midpoint rule
    fine = np.linspace(0, 1, 20 * 50 + 1)
    fine = 0.5 * (fine[1:] + fine[:-1])
    ref = density(fine).reshape(20, 50).mean(1)
    np.testing.assert_allclose(hist, ref, rtol=0.03, atol=0.01), mid


def test_logit_normal_density_and_mode_density_integrate_to_one():
    u = (np.arange(200_000) + 0.5) / 200_000
    assert np.mean(flow.logit_normal_density(u, 0.5, 0.8)) == pytest.approx(1.0, abs=1e-4)
    assert np.mean(flow.mode_density(u, 1.29)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--diffusion.prediction", "flow"], "does not go with diffusion.schedule linear"),
        (["--diffusion.schedule", "flow"], "does not go with diffusion.schedule flow"),
        (["--diffusion.shift", "2"], "diffusion.shift applies to schedule flow only"),
        (["--diffusion.t_sampling", "logit_normal"], "needs prediction flow"),
        (["--preset", "digits_flow", "--diffusion.shift", "0"], "shift"),
    ],
)
def test_train_cli_refuses_flow_config_conflicts_in_one_line(args, match, capsys, tmp_path):
    from jdiff.cli import train

    with pytest.raises(SystemExit) as e:
        train.main(args + ["--run.workdir", str(tmp_path / "r")])
    code, err = e.value.code, capsys.readouterr().err.strip()
    assert code == 2 and match in err and "\n" not in err, err


def test_flow_presets_build():
    from jdiff.config.presets import get_preset
    from jdiff.run.build import build_schedule

    for name in ("digits_flow", "cifar10_flow", "sit"):
        c = get_preset(name)
        assert c.diffusion.prediction == "flow" and build_schedule(c).flow_shift is not None


# --- diffusers configs ---------------------------------------------------------------------------------------


def test_flow_match_euler_configs_load_as_the_flow_schedule():
    from jdiff.pretrained.files import PretrainedError
    from jdiff.pretrained.scheduler import flow_schedule_from_config, schedule_from_config

    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    sch, pred = schedule_from_config(sd3)
    assert pred == "flow" and float(sch.flow_shift) == 3.0
    g = make_grid(sch, "flow", int(PEERS["euler_steps"]))  # the loaded config gives diffusers' grid
    s = np.append(np.asarray(flow.from_vp(g.alpha, g.sigma)[0]), 0.0)
    np.testing.assert_allclose(s, PEERS["euler_sigmas"], rtol=2e-6, atol=1e-7)
    flux = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
    }
    sch, _ = flow_schedule_from_config(flux, image_seq_len=4096)
    assert float(sch.flow_shift) == pytest.approx(np.exp(1.15), rel=1e-6)
    for bad, match in [
        (flux, "needs image_seq_len"),
        ({**sd3, "shift": 0.0}, "shift must be a finite number > 0"),
        ({**sd3, "invert_sigmas": True}, "invert_sigmas=True is not supported"),
        ({**sd3, "use_karras_sigmas": True}, "use_karras_sigmas=True is not supported"),
        ({**sd3, "beta_schedule": "linear"}, r"\['beta_schedule'\] are not FlowMatchEulerDiscreteScheduler settings"),
    ]:
        with pytest.raises(PretrainedError, match=match):
            schedule_from_config(bad)


def test_flow_start_state_is_the_flow_state_and_inversion_returns_it():
    """x_T (drawn or x_init) is the flow state x_s at the first level: the VP state is (alpha_0 + sigma_0) x_T,
    and ddim_invert returns x_T in the same variable: one step of it is the flow state (1 - s_0) x0 + s_0 eps_hat
    with eps_hat from the velocity at level 0 on the state x0, and inverting then sampling returns x0 up to the
    inversion's O(1/N) error."""
    sch = jdiff.get_schedule("flow", 1000, shift=3.0)
    g = make_grid(sch, "flow_sigmas", 16)
    s0 = float(flow.from_vp(g.alpha[0], g.sigma[0])[0])
    scale = float(jdiff.sampling.api.start_scale(sch, g))
    assert scale == pytest.approx(1.0 / np.sqrt((1 - s0) ** 2 + s0**2), rel=1e-6) and scale != pytest.approx(1.0)
    assert float(jdiff.sampling.api.start_scale(jdiff.get_schedule("linear", 1000), g)) == 1.0
    v = analytic.gaussian_velocity_fn(MU, COV)
    x0 = jnp.asarray(np.random.default_rng(0).multivariate_normal(MU, COV, 6), jnp.float32)
    one = jdiff.ddim_invert(v, sch, x0, num_steps=1, prediction="flow", spacing="flow_sigmas")
    g1 = make_grid(sch, "flow_sigmas", 1)
    s1 = float(flow.from_vp(g1.alpha[0], g1.sigma[0])[0])
    x_s = x0 / float(jdiff.sampling.api.start_scale(sch, g1))  # the VP state x0 read as level 0's flow state
    eps_hat = x_s + (1 - s1) * v(x_s, jnp.full((6,), 1000.0 * s1))  # eps = x_s + (1 - s) v
    np.testing.assert_allclose(np.asarray(one), (1 - s1) * np.asarray(x0) + s1 * np.asarray(eps_hat), rtol=1e-5)
    kw = dict(num_steps=200, prediction="flow", spacing="flow_sigmas")
    x_t = jdiff.ddim_invert(v, sch, x0, **kw)
    back = jdiff.sample(v, sch, x0.shape, None, sampler="ddim", x_init=x_t, sample_keys=_keys(6), **kw)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x0), atol=0.03)
